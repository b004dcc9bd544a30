"""Model inputs as tensors: one task's tokens, note and imaging embeddings, and labels.

Stage: model. In: the task's ``event_tokens`` (one row per patient: token ids, value bins, days
before the prediction time, modality ids), ``note_embeddings`` and ``imaging_inputs`` (one row per
note or study, already cut at the prediction time) and optionally ``labels``. Out: a
:class:`FusionDataset` of per-patient arrays and :func:`collate`, which pads a list of patients into
the tensors :class:`~models.fusion.FusionForRiskPrediction` takes.

Tensors are built here, in memory, from the stored tables; they are never written to disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from features.errors import TrainingDataError
from models.fusion.configuration_fusion import MODALITIES

IMAGING_MODALITIES = ("unknown", "US", "CT", "MR", "CR", "DX", "MG", "NM", "PT", "XA")
"""DICOM modalities the imaging-modality embedding knows; others map to ``unknown``."""

MICROSECONDS_PER_DAY = 86_400_000_000


@dataclass(frozen=True)
class PatientInputs:
    subject_id: int
    event_codes: npt.NDArray[np.int64]  # (Le,)
    event_value_bins: npt.NDArray[np.int64]  # (Le,)
    event_days: npt.NDArray[np.float32]  # (Le,)
    event_modalities: npt.NDArray[np.int64]  # (Le,)
    note_embeddings: npt.NDArray[np.float32]  # (Ln, Dt)
    note_days: npt.NDArray[np.float32]  # (Ln,)
    imaging_embeddings: npt.NDArray[np.float32]  # (Li, Di)
    imaging_modalities: npt.NDArray[np.int64]  # (Li,)
    imaging_days: npt.NDArray[np.float32]  # (Li,)
    # Ids of the notes and studies, for explanations ("note 1a2b... raised the risk").
    note_ids: tuple[str, ...]
    study_ids: tuple[str, ...]
    risk_label: float  # 0/1, NaN when unknown
    event: float
    duration_days: float
    treated: float  # 0/1, NaN when the task has no treatment or the patient no arm (features.labels)
    # Continuous value of each event token (NaN: none), when event_tokens has a "values" column.
    event_values: npt.NDArray[np.float32] | None = None  # (Le,)
    # Whether each event token is a static fact (no time: a genotype, sex), for explanations.
    event_static: npt.NDArray[np.bool_] | None = None  # (Le,)


def _days_before(table: pl.DataFrame) -> pl.Expr:
    return ((pl.col("prediction_time") - pl.col("time")).dt.total_microseconds() / MICROSECONDS_PER_DAY).cast(
        pl.Float32
    )


@dataclass(frozen=True)
class _Items:
    """One patient's notes or studies, most recent first."""

    embeddings: npt.NDArray[np.float32]  # (n, D)
    days: npt.NDArray[np.float32]  # (n,)
    ids: tuple[str, ...]
    modalities: tuple[str, ...]


def _group_items(table: pl.DataFrame | None, cohort: pl.DataFrame, max_items: int | None,
                 id_column: str, width: int) -> dict[int, _Items]:
    """Per subject, the ``max_items`` most recent rows (all when None), as numpy arrays sliced from
    whole columns; every embedding must have ``width`` values (the model's projection)."""
    if table is None or table.is_empty():
        return {}
    rows = (
        table.join(cohort.select("subject_id", "prediction_time"), on="subject_id", how="inner")
        .with_columns(_days_before(table).alias("days"))
        .sort(["subject_id", "days"])
    )
    after = rows.filter(pl.col("days") < 0)
    if not after.is_empty():
        # Inputs are what was known at the prediction time: a later note would leak the outcome's
        # work-up into the model, and sort as the most recent one.
        raise TrainingDataError(
            f"{id_column.removesuffix('_id')} inputs: {after.height} rows dated after their patient's prediction "
            f"time (subject {after['subject_id'][0]}, {-float(after['days'][0]):.1f} days after; expected inputs "
            "built by features.task_inputs, which keeps only what precedes it)"
        )
    if max_items is not None:
        rows = rows.group_by("subject_id", maintain_order=True).head(max_items)
    if rows.is_empty():
        return {}
    lengths = rows["embedding"].list.len()
    wrong = lengths != width
    if wrong.any():
        found = lengths.filter(wrong)
        kind = id_column.removesuffix("_id")
        raise TrainingDataError(
            f"{kind} inputs: {found.len()} embeddings have {found[0]} values where the model reads {width} "
            f"(subject {rows['subject_id'].filter(wrong)[0]}; expected every embedding from one encoder, "
            "the one the model is built for: ingest one encoder's embeddings, or train the model again for the new "
            "encoder)"
        )
    # One conversion of the whole column; per-patient Python lists of floats cost seconds.
    embeddings = rows["embedding"].cast(pl.List(pl.Float32)).list.to_array(width).to_numpy()
    days = rows["days"].to_numpy().astype(np.float32)
    subjects = rows["subject_id"].to_numpy()
    ids = ([str(v) for v in rows[id_column]] if id_column in rows.columns else None)
    modalities = rows["modality"].to_list() if "modality" in rows.columns else None
    cuts = np.flatnonzero(np.diff(subjects)) + 1
    groups = {}
    for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), len(subjects)], strict=True):
        groups[int(subjects[start])] = _Items(
            embeddings=embeddings[start:stop],
            days=days[start:stop],
            ids=tuple(ids[start:stop]) if ids is not None
            else tuple(f"{id_column.removesuffix('_id')} {k + 1}" for k in range(stop - start)),
            modalities=tuple(modalities[start:stop]) if modalities is not None else (),
        )
    return groups


@dataclass(frozen=True)
class _FlatEvents:
    """Every patient's event tokens end to end; patient ``i`` owns ``offsets[i]:offsets[i + 1]``."""

    codes: npt.NDArray[np.int64]
    value_bins: npt.NDArray[np.int64]
    days: npt.NDArray[np.float32]
    modalities: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]  # (n_patients + 1,)
    values: npt.NDArray[np.float32] | None = None  # when event_tokens has a "values" column
    static: npt.NDArray[np.bool_] | None = None  # tokens without a time (genotype, sex)


def _flat_values(column: pl.Series, dtype: type) -> np.ndarray:
    """A list column's elements end to end (empty lists add nothing; null floats become NaN)."""
    return np.asarray(pc.list_flatten(column.to_arrow()).to_numpy(zero_copy_only=False), dtype=dtype)


def _flat_events(event_tokens: pl.DataFrame, kept_modality_ids: list[int]) -> _FlatEvents:
    """The token list columns as flat arrays, keeping only tokens of the kept modalities."""
    modalities = _flat_values(event_tokens["modality_ids"], np.int64)
    keep = np.isin(modalities, kept_modality_ids)
    lengths = event_tokens["modality_ids"].list.len().to_numpy().astype(np.int64)
    patient = np.repeat(np.arange(len(lengths)), lengths)
    kept_lengths = np.bincount(patient[keep], minlength=len(lengths))
    days = _flat_values(event_tokens["time_before_days"], np.float32)
    values = (_flat_values(event_tokens["values"], np.float32)[keep] if "values" in event_tokens.columns
              else None)
    return _FlatEvents(
        codes=_flat_values(event_tokens["token_ids"], np.int64)[keep],
        value_bins=_flat_values(event_tokens["value_bins"], np.int64)[keep],
        # Static facts (genotype, sex) have no time: they sit at the prediction time.
        days=np.nan_to_num(days, nan=0.0)[keep],
        modalities=modalities[keep],
        offsets=np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64),
        values=values,
        static=np.isnan(days)[keep],
    )


def _label_columns(cohort: pl.DataFrame, labels: pl.DataFrame | None) -> dict[str, npt.NDArray[np.float64]]:
    """risk_label, event, duration_days and treated per cohort patient, in cohort order (NaN when unknown)."""
    n = cohort.height
    if labels is None:
        nan = np.full(n, np.nan)
        return {"risk_label": nan, "event": np.zeros(n), "duration_days": np.zeros(n), "treated": nan}
    joined = cohort.select("subject_id").join(
        labels.with_columns(pl.lit(True).alias("_labelled")), on="subject_id", how="left", maintain_order="left"
    )
    if joined.height != n:
        raise ValueError(f"labels: {joined.height - n} duplicate label rows for patients of event_tokens")
    missing = joined["_labelled"].null_count()
    if missing:
        raise ValueError(f"labels: {missing} patients of event_tokens have no label row")
    treated = joined["treated"] if "treated" in joined.columns else pl.Series([None] * n, dtype=pl.Boolean)
    return {
        "risk_label": joined["boolean_value"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        "event": joined["event"].fill_null(False).cast(pl.Float64).to_numpy(),
        "duration_days": joined["duration_days"].cast(pl.Float64).fill_null(0.0).to_numpy(),
        "treated": treated.cast(pl.Float64).fill_null(np.nan).to_numpy(),
    }


class FusionDataset(Dataset[PatientInputs]):
    """Per-patient model inputs of one task, in the order of ``event_tokens``.

    Parameters
    ----------
    event_tokens
        ``subject_id, prediction_time, token_ids, value_bins, time_before_days, modality_ids``, and
        optionally ``values`` (each token's continuous value, null or NaN for none; for models with
        ``numeric_value_embedding``).
    note_embeddings
        ``subject_id, time, embedding`` per note, or None when the task has no notes.
    imaging_inputs
        ``subject_id, time, modality, embedding`` per study, or None.
    labels
        ``subject_id, boolean_value, event, duration_days, treated``, or None when scoring.
    text_embedding_dim, imaging_embedding_dim
        Widths used for patients without notes or studies.
    max_notes, max_studies
        Most recent notes and studies kept per patient; None keeps every row given (the task's
        ``note_embeddings`` and ``imaging_inputs`` already hold only its ``inputs.max_notes`` and
        ``inputs.max_studies`` most recent).
    modalities
        Modalities the model may see (default all); the others are left out, as for a patient who
        lacks them. Used to measure what each modality alone achieves.
    """

    def __init__(
        self,
        event_tokens: pl.DataFrame,
        note_embeddings: pl.DataFrame | None,
        imaging_inputs: pl.DataFrame | None,
        labels: pl.DataFrame | None,
        text_embedding_dim: int,
        imaging_embedding_dim: int,
        max_notes: int | None = None,
        max_studies: int | None = None,
        modalities: tuple[str, ...] = MODALITIES,
    ) -> None:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"modalities: {sorted(unknown)} are not among {list(MODALITIES)}")
        cohort = event_tokens.select("subject_id", "prediction_time")
        if "notes" not in modalities:
            note_embeddings = None
        if "imaging" not in modalities:
            imaging_inputs = None
        notes = _group_items(note_embeddings, cohort, max_notes, "note_id", text_embedding_dim)
        studies = _group_items(imaging_inputs, cohort, max_studies, "study_id", imaging_embedding_dim)
        events = _flat_events(event_tokens, [MODALITIES.index(m) for m in modalities])
        label_columns = _label_columns(cohort, labels)
        modality_index = {m: i for i, m in enumerate(IMAGING_MODALITIES)}
        no_notes = np.zeros((0, text_embedding_dim), dtype=np.float32)
        no_studies = np.zeros((0, imaging_embedding_dim), dtype=np.float32)
        empty_days, empty_ids = np.zeros(0, np.float32), np.zeros(0, np.int64)
        self.patients: list[PatientInputs] = []
        # One Python step per patient that only slices whole-column arrays: per-row conversions of
        # token lists cost about a second per 10,000 patients, more than scoring them.
        for i, sid in enumerate(cohort["subject_id"].to_list()):
            start, stop = events.offsets[i], events.offsets[i + 1]
            note, study = notes.get(sid), studies.get(sid)
            self.patients.append(
                PatientInputs(
                    subject_id=sid,
                    event_codes=events.codes[start:stop],
                    event_value_bins=events.value_bins[start:stop],
                    event_days=events.days[start:stop],
                    event_modalities=events.modalities[start:stop],
                    note_embeddings=note.embeddings if note is not None else no_notes,
                    note_days=note.days if note is not None else empty_days,
                    imaging_embeddings=study.embeddings if study is not None else no_studies,
                    imaging_modalities=(
                        np.asarray([modality_index.get(m, 0) for m in study.modalities], dtype=np.int64)
                        if study is not None else empty_ids
                    ),
                    imaging_days=study.days if study is not None else empty_days,
                    note_ids=note.ids if note is not None else (),
                    study_ids=study.ids if study is not None else (),
                    risk_label=float(label_columns["risk_label"][i]),
                    event=float(label_columns["event"][i]),
                    duration_days=float(label_columns["duration_days"][i]),
                    treated=float(label_columns["treated"][i]),
                    event_values=events.values[start:stop] if events.values is not None else None,
                    event_static=events.static[start:stop] if events.static is not None else None,
                )
            )

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> PatientInputs:
        return self.patients[index]

    def __iter__(self) -> Iterator[PatientInputs]:
        return iter(self.patients)

    @property
    def subject_ids(self) -> npt.NDArray[np.int64]:
        return np.array([p.subject_id for p in self.patients], dtype=np.int64)

    def label_arrays(self) -> dict[str, npt.NDArray[np.float64]]:
        """risk_label, event, duration_days and treated of every patient, in order."""
        return {
            name: np.array([getattr(p, name) for p in self.patients], dtype=np.float64)
            for name in ("risk_label", "event", "duration_days", "treated")
        }


def _pad(arrays: list[np.ndarray], fill: float = 0.0, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length arrays (L_i, ...) into (B, L, ...) and a (B, L) mask, L = max(1, max L_i)
    rounded up to a multiple of ``multiple``."""
    width = -(-max(1, *(len(a) for a in arrays)) // multiple) * multiple
    first = arrays[0]
    out = np.full((len(arrays), width, *first.shape[1:]), fill, dtype=first.dtype)
    mask = np.zeros((len(arrays), width), dtype=bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
        mask[i, : len(a)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


LABEL_KEYS = ("risk_labels", "event", "duration_days", "treated")
"""Keys of a collated batch that carry outcomes: the loss needs them, scoring does not."""


def collate(patients: list[PatientInputs], pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pad a list of patients into the keyword tensors of ``FusionForRiskPrediction.forward``.

    ``event_values`` (padded with NaN) is included only when every patient has them. Each sequence is
    padded to a multiple of ``pad_to_multiple_of``: on a GPU, fewer distinct shapes mean fewer
    attention kernel plans to build (as ``pad_to_multiple_of`` in transformers' data collators).
    """
    if pad_to_multiple_of < 1:
        raise ValueError(f"collate: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    pad = partial(_pad, multiple=pad_to_multiple_of)
    event_codes, event_mask = pad([p.event_codes for p in patients])
    note_embeddings, note_mask = pad([p.note_embeddings for p in patients])
    imaging_embeddings, imaging_mask = pad([p.imaging_embeddings for p in patients])
    event_values = [p.event_values for p in patients if p.event_values is not None]
    values = {"event_values": pad(event_values, fill=np.nan)[0]} if len(event_values) == len(patients) else {}
    return {
        "event_codes": event_codes,
        "event_value_bins": pad([p.event_value_bins for p in patients])[0],
        "event_days": pad([p.event_days for p in patients])[0],
        "event_modalities": pad([p.event_modalities for p in patients])[0],
        "event_mask": event_mask,
        "note_embeddings": note_embeddings,
        "note_days": pad([p.note_days for p in patients])[0],
        "note_mask": note_mask,
        "imaging_embeddings": imaging_embeddings,
        "imaging_modalities": pad([p.imaging_modalities for p in patients])[0],
        "imaging_days": pad([p.imaging_days for p in patients])[0],
        "imaging_mask": imaging_mask,
        "risk_labels": torch.tensor([p.risk_label for p in patients], dtype=torch.float32),
        "event": torch.tensor([p.event for p in patients], dtype=torch.float32),
        "duration_days": torch.tensor([p.duration_days for p in patients], dtype=torch.float32),
        "treated": torch.tensor([p.treated for p in patients], dtype=torch.float32),
        **values,
    }
