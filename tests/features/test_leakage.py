from __future__ import annotations

from datetime import timedelta

import polars as pl

from features.cohorts import select_cohort
from features.leakage import find_leaks, find_negative_offsets, find_split_overlap
from features.splits import assign_splits
from features.tasks import SplitFractions
from features.tokenize import EventTokenizer
from tests.features.task_fixtures import T0, task, toy_events


def test_planted_leak_is_caught_issue_4() -> None:
    events = toy_events()
    cohort = select_cohort(events, task()).cohort
    tokens = EventTokenizer(10, 2, 1).fit(events, cohort, [1, 2, 3]).transform(events, cohort)
    assert find_leaks(tokens, cohort, "last_input_time").height == 0
    # Plant: one patient's inputs dated a day after its prediction time.
    leaked = tokens.with_columns(
        pl.when(pl.col("subject_id") == 3).then(pl.col("last_input_time") + timedelta(days=1))
        .otherwise(pl.col("last_input_time")).alias("last_input_time"),
        pl.when(pl.col("subject_id") == 3)
        .then(pl.col("time_before_days").list.eval(pl.element() - 2.0))
        .otherwise(pl.col("time_before_days")).alias("time_before_days"),
    )
    leaks = find_leaks(leaked, cohort, "last_input_time")
    assert leaks["subject_id"].to_list() == [3]
    assert leaks["prediction_time"].to_list() == [T0]
    assert find_negative_offsets(leaked)["subject_id"].to_list() == [3]


def test_rows_of_patients_outside_the_cohort_are_leaks() -> None:
    cohort = pl.DataFrame({"subject_id": [1], "prediction_time": [T0]})
    rows = pl.DataFrame({"subject_id": [2], "time": [T0 - timedelta(days=1)]})
    assert find_leaks(rows, cohort)["subject_id"].to_list() == [2]


def test_split_overlap_caught() -> None:
    splits = assign_splits(range(100), SplitFractions())
    assert find_split_overlap(splits).height == 0
    planted = pl.concat([splits, splits.head(1).with_columns(pl.lit("held_out").alias("split"))])
    if splits.head(1)["split"].item() == "held_out":
        planted = pl.concat([splits, splits.head(1).with_columns(pl.lit("train").alias("split"))])
    assert find_split_overlap(planted)["subject_id"].to_list() == [0]
