from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features import note_embeddings
from features.identifiers import subject_id_for
from features.note_embeddings import NoteEncoder, embed_notes, imaging_before, model_fingerprint, text_sha256
from tests.features.task_fixtures import T0

TEXTS = [
    "Chest pain on exertion, relieved by rest. ECG unremarkable.",
    "BP 162/95, started lisinopril 10mg daily.",
    "Follow-up: feeling well, no dyspnea.",
    "Troponin elevated, NSTEMI suspected; cardiology consulted.",
]


@pytest.fixture(scope="module")
def encoder_factory(tmp_path_factory: pytest.TempPathFactory) -> object:
    cache = tmp_path_factory.mktemp("embedding_cache")
    return lambda: NoteEncoder(cache_dir=cache, batch_size=2)


def test_encode_shape_deterministic_and_cached(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    first = encoder_factory()
    vectors = first.encode(TEXTS)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert first.n_embedded == 4
    second = encoder_factory()  # a new process would see the same on-disk cache
    again = second.encode(TEXTS)
    assert second.n_embedded == 0 and second._model is None
    np.testing.assert_array_equal(vectors, again)
    # Related notes are closer than unrelated ones.
    assert vectors[0] @ vectors[3] > vectors[1] @ vectors[2] - 0.5
    third = encoder_factory()
    third.encode([TEXTS[0], "A new note."])
    assert third.n_embedded == 1


def test_embed_notes_keeps_only_notes_before_prediction_time(encoder_factory) -> None:  # type: ignore[no-untyped-def]
    notes = pl.DataFrame({
        "note_id": ["a", "b", "c"], "patient_id": ["p1", "p1", "p2"],
        "time": [T0 - timedelta(days=3), T0 + timedelta(days=1), T0],
        "note_type": ["progress", "discharge", "progress"], "text": TEXTS[:3],
    })
    cohort = pl.DataFrame({"subject_id": [subject_id_for("p1"), subject_id_for("p2")],
                           "prediction_time": [T0, T0]})
    table = embed_notes(notes, cohort, encoder_factory())
    assert sorted(table["note_id"].to_list()) == ["a", "c"]
    assert table["text_sha256"].to_list()[0] in {text_sha256(TEXTS[0]), text_sha256(TEXTS[2])}
    assert table["embedding"].list.len().to_list() == [384, 384]


def test_embed_notes_keeps_each_patients_most_recent_notes() -> None:
    notes = pl.DataFrame({
        "note_id": ["a", "b", "c", "d"], "patient_id": ["p1", "p1", "p1", "p2"],
        "time": [T0 - timedelta(days=30), T0 - timedelta(days=2), T0 - timedelta(days=9), T0 - timedelta(days=99)],
        "note_type": ["progress"] * 4, "text": TEXTS,
    })
    cohort = pl.DataFrame({"subject_id": [subject_id_for("p1"), subject_id_for("p2")],
                           "prediction_time": [T0, T0]})
    encoder = NoteEncoder(cache_dir=None, batch_size=2)
    table = embed_notes(notes, cohort, encoder, max_notes_per_patient=2)
    by_patient = {s: set(ids) for s, ids in table.group_by("subject_id").agg("note_id").iter_rows()}
    assert by_patient == {subject_id_for("p1"): {"b", "c"}, subject_id_for("p2"): {"d"}}
    assert encoder.n_embedded == 3  # note "a", which the model would never read, is not embedded


def test_imaging_before_keeps_each_patients_most_recent_studies() -> None:
    days = [40, 3, 3, 10, 1, 500]
    imaging = pl.DataFrame({
        "study_id": ["s1", "s2", "s3", "s4", "late", "other"], "patient_id": ["p1"] * 5 + ["p2"],
        "time": [T0 - timedelta(days=d) for d in days[:4]] + [T0 + timedelta(days=1), T0 - timedelta(days=500)],
        "modality": ["CT"] * 6, "body_site": ["chest"] * 6, "embedding": [[float(d), 0.0] for d in days],
    })
    cohort = pl.DataFrame({"subject_id": [subject_id_for("p1"), subject_id_for("p2")],
                           "prediction_time": [T0, T0]})
    p1, p2 = subject_id_for("p1"), subject_id_for("p2")
    every = imaging_before(imaging, cohort)
    assert sorted(every["study_id"].to_list()) == ["other", "s1", "s2", "s3", "s4"]  # "late" is after T0
    capped = imaging_before(imaging, cohort, max_studies_per_patient=2)
    # s2 and s3 share the latest date; s4 is older: the two most recent are s2 and s3.
    assert {s: sorted(ids) for s, ids in capped.group_by("subject_id").agg("study_id").iter_rows()} == {
        p1: ["s2", "s3"], p2: ["other"]}
    assert capped.filter(pl.col("subject_id") == p1)["study_id"].to_list() == ["s2", "s3"]  # in time order
    one = imaging_before(imaging, cohort, max_studies_per_patient=1)
    assert one.filter(pl.col("subject_id") == p1)["study_id"].to_list() == ["s2"]  # tie broken by study id


def test_bad_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        NoteEncoder(model_path=tmp_path)


def test_encode_embeds_and_caches_a_slice_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import features.note_embeddings as note_embeddings


    whole = NoteEncoder(cache_dir=None, batch_size=2).encode(TEXTS)
    monkeypatch.setattr(note_embeddings, "EMBED_SLICE", 3)
    caplog.set_level(logging.INFO, logger="features.note_embeddings")
    sliced = NoteEncoder(cache_dir=tmp_path, batch_size=2)
    vectors = sliced.encode([*TEXTS, TEXTS[0]])
    # Four distinct texts in slices of three: two cache shards; the repeated text is embedded once.
    assert sliced.n_embedded == 4
    assert len(list((tmp_path / sliced.fingerprint).glob("part-*.parquet"))) == 2
    np.testing.assert_allclose(vectors[:4], whole, atol=2e-3)
    np.testing.assert_array_equal(vectors[4], vectors[0])
    assert [r.getMessage() for r in caplog.records] == [
        "note encoder: embedded 3 of 4 distinct notes not in the cache",
        "note encoder: embedded 4 of 4 distinct notes not in the cache",
    ]


def test_encoder_uses_bfloat16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Emulated bfloat16 embedded notes 3x slower than float32; native, up to 3x faster.
    monkeypatch.setattr(note_embeddings, "cpu_native_bf16", lambda: False)
    assert NoteEncoder(cache_dir=None).dtype == "float32"
    monkeypatch.setattr(note_embeddings, "cpu_native_bf16", lambda: True)
    assert NoteEncoder(cache_dir=None).dtype == "bfloat16"
    assert NoteEncoder(cache_dir=None, dtype="float32").dtype == "float32"


def fake_model(folder: Path, weights: bytes, vocab: str = "[PAD]\n[UNK]\n") -> Path:
    """A model folder as far as the fingerprint sees it (the model itself is only loaded to embed)."""
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 4}', encoding="utf-8")
    (folder / "vocab.txt").write_text(vocab, encoding="utf-8")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_another_checkpoint_of_the_same_size_gets_another_fingerprint_and_cache(tmp_path: Path) -> None:
    base = fake_model(tmp_path / "v1", bytes(range(256)) * 64)
    copy = fake_model(tmp_path / "copy_of_v1", bytes(range(256)) * 64)
    # Fine-tuned: the same files and sizes, other weights (one byte differs).
    tuned = fake_model(tmp_path / "v2_fine_tuned", b"\x01" + bytes(range(1, 256)) + bytes(range(256)) * 63)
    retokenized = fake_model(tmp_path / "v1_other_vocab", bytes(range(256)) * 64, vocab="[PAD]\n[UNX]\n")
    assert (tmp_path / "v1" / "model.safetensors").stat().st_size == (tmp_path / "v2_fine_tuned" /
                                                                       "model.safetensors").stat().st_size
    fingerprint = model_fingerprint(base, 256)
    assert model_fingerprint(copy, 256) == fingerprint  # the folder's name and place do not count
    others = {model_fingerprint(tuned, 256), model_fingerprint(retokenized, 256), model_fingerprint(base, 128),
              model_fingerprint(base, 256, "bfloat16")}
    assert len(others) == 4 and fingerprint not in others
    # So the fine-tuned encoder reads and fills its own cache folder, not the first one's vectors.
    cache = tmp_path / "cache"
    folders = [encoder.cache.folder for encoder in (NoteEncoder(path, cache_dir=cache, dtype="float32")
                                                     for path in (base, tuned)) if encoder.cache is not None]
    assert folders == [cache / fingerprint, cache / model_fingerprint(tuned, 256)]


def test_an_encoder_whose_config_names_its_size_otherwise_embeds(tmp_path: Path) -> None:
    # DistilBERT's config calls its hidden size "dim"; the packaged tokenizer with a tiny random model.
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(note_embeddings.default_model_path()), local_files_only=True)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(config).save_pretrained(tmp_path / "distilbert")
    tokenizer.save_pretrained(tmp_path / "distilbert")
    encoder = NoteEncoder(tmp_path / "distilbert", dtype="float32", num_threads=1)
    assert encoder.dim == 32
    vectors = encoder.encode(["Pt well.", "Short of breath on exertion."])
    assert vectors.shape == (2, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_the_encoder_loads_without_a_progress_bar_and_leaves_the_switch_as_it_was(
        capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()
    NoteEncoder(batch_size=2).encode(TEXTS[:1])
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()
