"""``build_all`` end to end on the real Synthea exports (``../shared/data/fhir``), ingested for real;
the event-tokens step on the toy events."""

from __future__ import annotations

import fcntl
import json
import shutil
import threading
from pathlib import Path

import polars as pl
import pytest

from features import task_inputs
from features.errors import LandingZoneError
from features.identifiers import subject_id_for
from features.note_embeddings import NoteEncoder
from features.tasks import load_task
from tests.features.task_fixtures import events_frame, task, toy_events

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_synthea_death_task_on_real_exports(synthea_warehouse: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    warehouse = tmp_path / "warehouse"
    shutil.copytree(synthea_warehouse, warehouse)
    definition = load_task(REPO / "tasks" / "synthea_death_1y.yaml")
    # max_length 64 keeps the test fast; which notes are embedded does not depend on it.
    encoder = NoteEncoder(cache_dir=warehouse / "cache", max_length=64)
    results = task_inputs.build_all(warehouse, definition, encoder)

    # 41 patients (13 bulk NDJSON + 28 Bundles); 7 died before 2016-01-01 and 8 of the living are
    # under 18 then. The ingest quarantines 16 duplicate resources of the Bundles.
    assert results["cohort"].stats["attrition"] == [
        ["patients in events", 41], ["prediction time placed", 41],
        ["prediction time before follow-up end", 41], ["alive at prediction time", 34],
        ["history >= 365 days", 34], ["age within limits", 26]]
    labels = pl.read_parquet(results["labels"].path)
    # One death within the year (2016-12-10); four deaths in all follow-up (2016 to 2021).
    assert results["labels"].stats == {"cohort": 26, "positive": 1, "negative": 25, "censored_before_horizon": 0,
                                       "events_observed": 4, "no_follow_up": 0, "treated": None,
                                       "untreated": None, "treatment_prevalent": None, "treatment_undetermined": None}
    assert labels.filter(pl.col("boolean_value"))["duration_days"].round(1).to_list() == [344.1]
    assert {k: results["splits"].stats[k] for k in ("train", "tuning", "held_out")} == {
        "train": 13, "tuning": 6, "held_out": 7}
    # Only the bulk export carries DocumentReference notes: 191 notes of 7 cohort patients are
    # dated before 2016-01-01, of which each patient's 16 most recent are embedded (inputs.max_notes);
    # no genomics or imaging in Synthea.
    notes = pl.read_parquet(warehouse / "notes.parquet").with_columns(
        pl.col("patient_id").map_elements(subject_id_for, return_dtype=pl.Int64).alias("subject_id"))
    before = notes.join(pl.read_parquet(results["cohort"].path), on="subject_id").filter(
        pl.col("time") <= pl.col("prediction_time")).group_by("subject_id").len()
    assert before["len"].sum() == 191 and before.height == 7
    embedded = pl.read_parquet(results["note_embeddings"].path).group_by("subject_id").len()
    capped = before.sort("subject_id")["len"].clip(upper_bound=16).to_list()
    assert embedded.sort("subject_id")["len"].to_list() == capped
    assert results["note_embeddings"].stats["notes"] == embedded["len"].sum() == encoder.n_embedded
    assert results["note_embeddings"].stats["patients_with_notes"] == 7
    assert results["imaging_inputs"].stats["studies"] == 0
    assert results["event_tokens"].stats["leaking_patients"] == 0
    assert results["tabular_features"].stats["codes"] == 100

    # A second run on the same data computes nothing; a new version of the steps recomputes them all.
    again = task_inputs.build_all(warehouse, definition, encoder)
    assert not any(result.recomputed for result in again.values())
    monkeypatch.setattr(task_inputs, "STEPS_VERSION", task_inputs.STEPS_VERSION + 1)
    upgraded = task_inputs.build_all(warehouse, definition, encoder)
    assert all(result.recomputed for result in upgraded.values())


def toy_warehouse(root: Path, events: pl.DataFrame) -> Path:
    warehouse = root / "warehouse"
    warehouse.mkdir()
    events.write_parquet(warehouse / "events.parquet")
    return warehouse


def test_event_tokens_step_writes_a_deleted_or_changed_vocabulary_again(tmp_path: Path) -> None:
    warehouse, definition = toy_warehouse(tmp_path, toy_events()), task(inputs={"min_code_count": 1})
    task_inputs.build_cohort(warehouse, definition)
    task_inputs.build_splits(warehouse, definition)
    assert task_inputs.build_event_tokens(warehouse, definition).recomputed
    vocabulary = task_inputs.task_dir(warehouse, definition) / "vocabulary.json"
    written = vocabulary.read_text(encoding="utf-8")
    assert not task_inputs.build_event_tokens(warehouse, definition).recomputed

    vocabulary.unlink()
    assert task_inputs.build_event_tokens(warehouse, definition).recomputed
    assert vocabulary.read_text(encoding="utf-8") == written
    vocabulary.write_text(json.dumps({"vocabulary": {"[PAD]": 0}}), encoding="utf-8")  # edited by hand
    assert task_inputs.build_event_tokens(warehouse, definition).recomputed
    assert vocabulary.read_text(encoding="utf-8") == written
    assert not task_inputs.build_event_tokens(warehouse, definition).recomputed


def test_inputs_built_before_another_ingest_was_put_in_place_are_named_stale(tmp_path: Path) -> None:
    warehouse, definition = toy_warehouse(tmp_path, toy_events()), task(inputs={"min_code_count": 1})
    task_inputs.build_cohort(warehouse, definition)
    task_inputs.build_splits(warehouse, definition)
    task_inputs.build_event_tokens(warehouse, definition)
    folder = task_inputs.task_dir(warehouse, definition)
    built = task_inputs.warehouse_events_key(warehouse)
    assert task_inputs.inputs_events_key(folder) == built
    assert task_inputs.stale_task_inputs(warehouse, "toy") is None
    # Another ingest's events (here: the same events, written again) replace the warehouse's.
    toy_events().write_parquet(tmp_path / "next.parquet")
    (tmp_path / "next.parquet").replace(warehouse / "events.parquet")
    now = task_inputs.warehouse_events_key(warehouse)
    assert now != built
    assert task_inputs.stale_task_inputs(warehouse, "toy") == (
        f"task 'toy': cohort was built from {built} (name:bytes:mtime), the warehouse now holds {now} (another "
        "ingest or batch was put in place since); build the task inputs again")
    for step in (task_inputs.build_cohort, task_inputs.build_splits, task_inputs.build_event_tokens):
        step(warehouse, definition)
    assert task_inputs.stale_task_inputs(warehouse, "toy") is None
    assert task_inputs.inputs_events_key(folder) == now


def event_tokens_of(tmp_path: Path, events: pl.DataFrame, max_events: int,
                    max_static_events: int | None = None) -> tuple[pl.DataFrame, dict]:
    """The event_tokens step on ``events``, every patient a train patient: its table and statistics."""
    warehouse = toy_warehouse(tmp_path, events)
    definition = task(inputs={"min_code_count": 1, "max_events": max_events, "max_static_events": max_static_events},
                      splits={"train": 1.0, "tuning": 0.0, "held_out": 0.0})
    task_inputs.build_cohort(warehouse, definition)
    task_inputs.build_splits(warehouse, definition)
    result = task_inputs.build_event_tokens(warehouse, definition)
    return pl.read_parquet(result.path), result.stats


@pytest.mark.parametrize(("max_static_events", "kept_static"), [
    (None, 2),  # the task file's default, half the sequence: birth, sex and one gene; 3 timed events
    (6, 5),  # allowed the whole sequence: birth, sex and four genes fill it
])
def test_event_tokens_step_cuts_and_counts_a_patient_with_more_static_facts_than_max_events(
        tmp_path: Path, max_static_events: int | None, kept_static: int) -> None:
    # Patient 2 has 8 expression values besides its sex: 9 static facts and birth, 4 timed events
    # before day 0. Birth is kept before the static facts (its time is the patient's age).
    panel = events_frame([(2, None, f"EXPRESSION//G{g}", 1.0, None, "genomics") for g in range(8)])
    tokens, stats = event_tokens_of(tmp_path, pl.concat([toy_events(), panel]), 6, max_static_events)
    # Patients 1, 3 and 4: sex, birth, blood pressure, a condition and the visit (5 < 6).
    assert tokens["token_ids"].list.len().to_list() == [5, 6, 5, 5]
    times = tokens.filter(pl.col("subject_id") == 2)["time_before_days"].to_list()[0]
    assert [t is None for t in times] == [True] * kept_static + [False] * (6 - kept_static)
    assert tokens["dropped_events"].to_list() == [0, 7, 0, 0]  # patient 2: 13 known, 6 kept
    assert stats["truncated_patients"] == 1
    assert stats["leaking_patients"] == 0


def test_a_patient_with_exactly_max_events_tokens_is_not_counted_as_cut(tmp_path: Path) -> None:
    tokens, stats = event_tokens_of(tmp_path, toy_events(), max_events=5)
    assert tokens["token_ids"].list.len().to_list() == [5, 5, 5, 5]
    assert tokens["dropped_events"].to_list() == [0, 0, 0, 0]
    assert stats["truncated_patients"] == 0


def test_the_cohort_reads_the_tasks_dates_in_the_warehouses_site_time_zone(tmp_path: Path) -> None:
    from datetime import datetime

    from features.ingest import SUMMARY_FILE, IngestSummary

    warehouse = toy_warehouse(tmp_path, toy_events())
    definition = task(cohort={"prediction_time": {"fixed": "2023-06-01T08:00:00"}, "min_age_years": 18})
    summary = IngestSummary(landing_dir="l", warehouse_dir=str(warehouse), export_time=datetime(2026, 1, 1),
                            strict=False, files=(), table_rows={}, quarantined_by_reason={}, duplicates=0,
                            fhir_resources_in=0, elapsed_seconds=0.0, site_timezone="America/Chicago")
    (warehouse / SUMMARY_FILE).write_bytes(summary.to_json())
    task_inputs.build_cohort(warehouse, definition)
    cohort = pl.read_parquet(task_inputs.task_dir(warehouse, definition) / "cohort.parquet")
    assert set(cohort["prediction_time"]) == {datetime(2023, 6, 1, 13)}  # 08:00 in Chicago (CDT, UTC-5)


def test_every_step_refuses_a_half_promoted_warehouse_even_with_its_output_cached(tmp_path: Path) -> None:
    warehouse, definition = toy_warehouse(tmp_path, toy_events()), task(inputs={"min_code_count": 1})
    encoder = NoteEncoder(None, cache_dir=tmp_path / "cache")
    task_inputs.build_all(warehouse, definition, encoder)
    # A promotion cut short after it linked some tables: events.parquet unchanged, so every step
    # would be served from its cache, and notes and imaging read from the new batch.
    (warehouse / ".promoting").write_text(f"{tmp_path / 'warehouse' / 'batches' / '2024-06-02'}\n")
    reason = (rf"warehouse {warehouse}: the promotion of batch 2024-06-02 was cut short or is running \(its "
              r"\.promoting is there\); run the promotion again \(ingest job, from_batch 2024-06-02\)")
    for step in (task_inputs.build_cohort, task_inputs.build_task_labels, task_inputs.build_event_tokens,
                 task_inputs.build_tabular_features, task_inputs.build_imaging_inputs):
        with pytest.raises(LandingZoneError, match=reason):
            step(warehouse, definition)
    with pytest.raises(LandingZoneError, match=reason):
        task_inputs.build_note_embeddings(warehouse, definition, encoder)


def test_a_step_waits_while_an_ingest_puts_its_files_in_place(tmp_path: Path) -> None:
    warehouse, definition = toy_warehouse(tmp_path, toy_events()), task()
    done = threading.Event()
    step = threading.Thread(target=lambda: (task_inputs.build_cohort(warehouse, definition), done.set()))
    # As an ingest or a promotion holds it while it renames its files into the warehouse.
    with (warehouse / ".read.lock").open("a+b") as placing:
        fcntl.flock(placing.fileno(), fcntl.LOCK_EX)
        step.start()
        assert not done.wait(1.0)
    step.join(30)
    assert done.is_set() and (task_inputs.task_dir(warehouse, definition) / "cohort.parquet").is_file()
