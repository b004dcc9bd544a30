from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from sklearn.exceptions import NotFittedError

from features.cohorts import select_cohort
from features.leakage import find_leaks, find_negative_offsets
from features.tokenize import PAD, UNK, EventTokenizer
from tests.features.task_fixtures import BP, T0, day, events_frame, task, toy_events


def fitted(**kwargs: int) -> tuple[EventTokenizer, pl.DataFrame]:
    cohort = select_cohort(toy_events(), task()).cohort
    params = {"max_events": 10, "value_bins": 2, "min_code_count": 1} | kwargs
    return EventTokenizer(**params).fit(toy_events(), cohort, [1, 2, 3]), cohort


def test_fit_learns_on_train_only_before_prediction_time() -> None:
    tokenizer, _ = fitted()
    assert list(tokenizer.vocabulary_)[:2] == [PAD, UNK]
    # Train patients 1-3 have BP 110, 120, 130 before day 0; patient 1's 180 is after it.
    assert tokenizer.bin_edges_[BP] == [120.0]
    assert "SNOMED//22298006" not in tokenizer.vocabulary_  # the outcome is after day 0


def test_transform_cuts_at_prediction_time_and_bins_values() -> None:
    tokenizer, cohort = fitted()
    tokens = tokenizer.transform(toy_events(), cohort)
    assert tokens["subject_id"].to_list() == [1, 2, 3, 4]
    first = tokens.row(0, named=True)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[t] for t in first["token_ids"]] == [
        "SEX//female", "MEDS_BIRTH", BP, "SNOMED//59621000", "SNOMED//11429006"]
    assert first["time_before_days"][0] is None and first["time_before_days"][-1] == 0.0
    assert first["value_bins"] == [0, 0, 1, 0, 0]  # BP 110 < 120 -> bin 1
    assert tokens.row(3, named=True)["value_bins"][2] == 2  # patient 4: BP 140 -> bin 2
    assert first["last_input_time"] == T0
    assert find_leaks(tokens, cohort, "last_input_time").height == 0
    assert find_negative_offsets(tokens).height == 0


def test_length_limit_keeps_static_and_most_recent() -> None:
    tokenizer, cohort = fitted(max_events=3)
    tokens = tokenizer.transform(toy_events(), cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[t] for t in tokens.row(0, named=True)["token_ids"]] == [
        "SEX//female", "SNOMED//59621000", "SNOMED//11429006"]


def test_unknown_codes_dropped_and_patients_without_events_kept() -> None:
    tokenizer, cohort = fitted()
    extra = events_frame([(9, day(-1), "LOINC//never-seen", 1.0, None, "ehr")])
    cohort9 = pl.concat([cohort, cohort.head(1).with_columns(pl.lit(9, pl.Int64).alias("subject_id"))])
    tokens = tokenizer.transform(pl.concat([toy_events(), extra]), cohort9)
    row = tokens.filter(pl.col("subject_id") == 9).row(0, named=True)
    assert row["token_ids"] == [] and row["last_input_time"] is None


def test_not_fitted_and_roundtrip(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        EventTokenizer().transform(toy_events(), select_cohort(toy_events(), task()).cohort)
    tokenizer, cohort = fitted()
    loaded = EventTokenizer.load(tokenizer.save(tmp_path / "vocabulary.json"))
    assert loaded.transform(toy_events(), cohort).equals(tokenizer.transform(toy_events(), cohort))


def test_events_at_the_same_time_are_listed_and_cut_the_same_way_in_any_row_order() -> None:
    tokenizer, cohort = fitted(max_events=4)
    # Patient 1: three blood pressures in the same minute before day 0; the limit cuts among them.
    tied = events_frame([(1, day(-10), BP, v, None, "ehr") for v in (150.0, 105.0, 125.0)])
    events = pl.concat([toy_events(), tied])
    results = [tokenizer.transform(frame, cohort) for frame in (events, events.reverse(), events.sample(
        fraction=1.0, shuffle=True, seed=5))]
    first = results[0].row(0, named=True)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    # Static sex, then the 3 most recent timed events: the visit and two of the three tied blood
    # pressures (ties in time are ordered by value: 105 and 125 are kept, 150 is cut).
    assert [names[t] for t in first["token_ids"]] == ["SEX//female", BP, BP, "SNOMED//11429006"]
    assert first["value_bins"] == [0, 1, 2, 0]  # 105 < 120 <= 125
    for other in results[1:]:
        assert_frame_equal(other, results[0])
