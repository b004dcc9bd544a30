from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from features.cohorts import select_cohort
from features.labels import build_labels, labels_to_arrow
from features.schemas import LABELS
from features.tasks import load_task
from tests.features.task_fixtures import T0, task, toy_events

REPO = Path(__file__).resolve().parents[2]


def test_cohort_excludes_child_and_counts_it() -> None:
    selection = select_cohort(toy_events(), task())
    assert selection.cohort["subject_id"].to_list() == [1, 2, 3, 4]
    assert selection.attrition[-1] == ("age within limits", 4)
    assert selection.cohort["prediction_time"].to_list() == [T0] * 4
    assert selection.cohort["sex"].to_list() == ["female", "male", "female", "male"]


def test_labels_exact_values() -> None:
    definition = task()
    cohort = select_cohort(toy_events(), definition).cohort
    labels, counts = build_labels(toy_events(), cohort, definition)
    assert labels["boolean_value"].to_list() == [True, False, None, False]
    assert labels["event"].to_list() == [True, False, False, True]
    assert labels["duration_days"].to_list() == [100.0, 500.0, 100.0, 400.0]
    assert labels["treated"].to_list() == [False, True, False, False]
    assert (counts.positive, counts.negative, counts.censored_before_horizon) == (1, 2, 1)
    assert counts.events_observed == 2 and counts.treated == 1
    assert labels_to_arrow(labels).schema == LABELS


def test_prediction_time_offset_and_follow_up_end() -> None:
    definition = task(
        cohort={"prediction_time": {"first_event": {"codes": ["SNOMED//11429006"]}, "offset_minutes": 45}},
        follow_up_end="2024-01-01",  # day 365 of the toy timeline
    )
    cohort = select_cohort(toy_events(), definition).cohort
    assert cohort["prediction_time"].to_list()[0] == T0 + timedelta(minutes=45)
    labels, counts = build_labels(toy_events(), cohort, definition)
    # Patient 2's day-500 visit is past the export date: follow-up ends at its day-5 treatment.
    assert labels.filter(pl.col("subject_id") == 2)["boolean_value"].item() is None
    assert counts.positive == 1


def test_no_treatment_gives_null_flag() -> None:
    definition = task(treatment=None)
    cohort = select_cohort(toy_events(), definition).cohort
    labels, counts = build_labels(toy_events(), cohort, definition)
    assert labels["treated"].null_count() == labels.height and counts.treated is None


@pytest.mark.slow
def test_labels_agree_with_simulator_truth(small_hospital: Path, small_warehouse: Path) -> None:
    events = pl.read_parquet(small_warehouse / "events.parquet")
    definition = load_task(REPO / "tasks" / "simulated_mace_1y.yaml")
    cohort = select_cohort(events, definition).cohort
    labels, counts = build_labels(events, cohort, definition)
    truth = pl.read_parquet(small_hospital / "truth.parquet")
    joined = truth.join(labels, on="subject_id", suffix="_ours")
    assert joined.height == truth.height == counts.cohort == 300
    assert (joined["prediction_time"] == joined["prediction_time_ours"]).all()
    assert (joined["treated"] == joined["treated_ours"]).all()
    assert (joined["event_observed"] == joined["event"]).all()
    labelled = joined.filter(pl.col("boolean_value").is_not_null())
    # Every label we give is the true one; patients whose records stop early are excluded.
    assert (labelled["boolean_value"] == labelled["event_within_horizon"]).all()
    assert joined.filter(pl.col("event_within_horizon"))["boolean_value"].to_list() == [True] * int(
        truth["event_within_horizon"].sum())
    # The ingest's events (DocumentReference notes included) give the same counts as the
    # simulator's truth for positives (28) and treatment (133).
    assert int(truth["event_within_horizon"].sum()) == counts.positive == 28
    assert int(truth["treated"].sum()) == counts.treated == 133
    assert (counts.negative, counts.events_observed, counts.no_follow_up) == (210, 70, 8)
    # Censored: 62 here, 34 in the truth. The truth knows 28 more patients were still followed
    # (censoring time past the horizon) with no event, but their records stop before the horizon
    # (no visit in the rest of the year), so from the records alone they are censored at their
    # last record, not negative.
    assert truth["event_within_horizon"].null_count() == 34
    assert counts.censored_before_horizon == 62
