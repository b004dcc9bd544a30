from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.cohorts import select_cohort
from features.leakage import find_leaks
from features.tabular import TabularCodes, aggregate_before, select_tabular_codes
from features.tokenize import NO_UNIT, EventTokenizer
from tests.features.task_fixtures import BP, MI, T0, day, events_frame, task, toy_events


def test_aggregates_cut_at_prediction_time() -> None:
    events = toy_events()
    cohort = select_cohort(events, task()).cohort
    codes = select_tabular_codes(events, cohort, [1, 2, 3], max_codes=10)
    assert MI not in codes.codes and BP in codes.codes  # the outcome is never seen before day 0
    assert codes.numeric == [BP]
    table = aggregate_before(events, cohort, codes)
    first = table.row(0, named=True)
    assert first[f"count__{BP}"] == 1.0  # the day-50 value is after prediction time
    assert first[f"last__{BP}"] == 110.0
    assert first[f"days_since__{BP}"] == 200.0
    assert first["sex_female"] == 1.0 and round(first["age_years"]) == 60
    assert first["last_input_time"] == T0
    assert find_leaks(table, cohort, "last_input_time").height == 0
    assert table.height == 4 and table["subject_id"].is_sorted()
    assert table.select(pl.col(f"count__{BP}")).null_count().item() == 0


def test_values_charted_at_the_same_time_give_the_same_last_value_in_any_row_order() -> None:
    # Patient 1 has two more blood pressures charted in the same minute, before day 0.
    tied = events_frame([(1, day(-10), BP, 150.0, None, "ehr"), (1, day(-10), BP, 125.0, None, "ehr")])
    events = pl.concat([toy_events(), tied])
    cohort = select_cohort(events, task()).cohort
    tables = [aggregate_before(frame, cohort, TabularCodes([BP], [BP])) for frame in (
        events, events.reverse(), events.sample(fraction=1.0, shuffle=True, seed=3))]
    assert tables[0].row(0, named=True)[f"last__{BP}"] == 150.0  # of the tied values, the larger
    assert tables[0].row(0, named=True)[f"count__{BP}"] == 3.0
    for other in tables[1:]:
        assert_frame_equal(other, tables[0])


LAB = "LOINC//2160-0"
KEY = ["subject_id", "prediction_time", "last_input_time", "age_years", "sex_female", "n_ehr_events",
       "n_notes_events", "n_genomics_events", "n_imaging_events"]


def three_patients() -> pl.DataFrame:
    return pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [day(0)] * 3, "age_years": [60.0] * 3,
                         "sex": ["female"] * 3},
                        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"),
                                "age_years": pl.Float64, "sex": pl.String})


def test_which_codes_get_a_last_value_column_is_decided_on_the_train_split_only() -> None:
    cohort = three_patients()
    # Train patients 1 and 2 have the lab without a value; held-out patient 3 has one.
    events = events_frame([(1, day(-3), LAB, None, None, "ehr"), (2, day(-3), LAB, None, None, "ehr"),
                           (3, day(-3), LAB, 1.4, None, "ehr")])
    selected = select_tabular_codes(events, cohort, [1, 2], 10)
    assert selected == TabularCodes(codes=[LAB], numeric=[])
    columns = [*KEY, f"count__{LAB}", f"days_since__{LAB}"]
    assert aggregate_before(events, cohort, selected).columns == columns
    assert aggregate_before(events, cohort.filter(pl.col("subject_id") != 3), selected).columns == columns

    # The other way round: a train value, none in the held-out patient: the column is there, null.
    events = events_frame([(1, day(-3), LAB, 1.5, None, "ehr"), (2, day(-3), LAB, None, None, "ehr"),
                           (3, day(-3), LAB, None, None, "ehr")])
    selected = select_tabular_codes(events, cohort, [1, 2], 10)
    assert selected == TabularCodes(codes=[LAB], numeric=[LAB], units={LAB: NO_UNIT})
    held_out = aggregate_before(events, cohort.filter(pl.col("subject_id") == 3), selected)
    assert held_out.columns == [*columns, f"last__{LAB}"]
    assert held_out[f"last__{LAB}"].to_list() == [None]
    assert aggregate_before(events, cohort, selected)[f"last__{LAB}"].to_list() == [1.5, None, None]


def test_a_code_too_rare_for_the_vocabulary_keeps_its_units_apart() -> None:
    # Glucose in three train patients, below the tokenizer's min_code_count: it has no main unit
    # there, and its mmol/L value must not be aggregated with the mg/dL ones.
    glucose = "LOINC//2345-7"
    rows = [(s, day(-1), "SNOMED//11429006", None, None, "ehr") for s in range(1, 9)]
    rows += [(1, day(-1), glucose, 100.0, None, "ehr"), (2, day(-1), glucose, 110.0, None, "ehr"),
             (3, day(-1), glucose, 5.5, None, "ehr")]
    events = events_frame(rows).with_columns(unit=pl.Series([None] * 8 + ["mg/dL", "mg/dL", "mmol/L"]))
    ids = list(range(1, 9))
    cohort = pl.DataFrame({"subject_id": ids, "prediction_time": [T0] * 8, "age_years": [60.0] * 8,
                           "sex": ["male"] * 8})
    tokenizer = EventTokenizer(min_code_count=5).fit(events, cohort, ids)
    assert tokenizer.units_ == {}
    selected = select_tabular_codes(events, cohort, ids, 200, tokenizer.units_, tokenizer.unit_conversions_)
    assert selected.units == {glucose: "mg/dL"}
    assert selected.codes == [glucose, f"{glucose}//mmol/L", "SNOMED//11429006"]
    table = aggregate_before(events, cohort, selected)
    assert table[f"last__{glucose}"].head(3).to_list() == [100.0, 110.0, None]
    assert table[f"last__{glucose}//mmol/L"].head(3).to_list() == [None, None, 5.5]


SMOKING = "LOINC//72166-2"
CURRENT, NEVER = "SNOMED//77176002", "SNOMED//266919005"


def test_coded_answers_and_variants_get_columns_of_their_own_as_in_the_fusion_vocabulary() -> None:
    # Patients 1 and 3 are current smokers carrying one copy of rs4244285; 2 and 4 never smoked and
    # carry rs12248560: the baselines must be able to tell them apart, as the fusion model can.
    extra = events_frame(
        [(s, day(-20), SMOKING, None, CURRENT if s % 2 else NEVER, "ehr") for s in (1, 2, 3, 4)]
        + [(s, None, "GENE//CYP2C19", 1.0, "rs4244285" if s % 2 else "rs12248560", "genomics") for s in (1, 2, 3, 4)]
    )
    events = pl.concat([toy_events(), extra])
    cohort = select_cohort(events, task()).cohort
    selected = select_tabular_codes(events, cohort, [1, 2, 3, 4], 20)
    assert [c for c in selected.codes if "72166" in c or "CYP2C19" in c] == [
        "GENE//CYP2C19//rs12248560", "GENE//CYP2C19//rs4244285", f"{SMOKING}//{NEVER}", f"{SMOKING}//{CURRENT}"]
    assert [c for c in selected.numeric if "CYP2C19" in c] == ["GENE//CYP2C19//rs12248560", "GENE//CYP2C19//rs4244285"]
    table = aggregate_before(events, cohort, selected)
    assert table[f"count__{SMOKING}//{CURRENT}"].to_list() == [1.0, 0.0, 1.0, 0.0]
    assert table[f"days_since__{SMOKING}//{NEVER}"].to_list() == [None, 20.0, None, 20.0]
    assert table["last__GENE//CYP2C19//rs4244285"].to_list() == [1.0, None, 1.0, None]


def test_a_nan_latest_value_does_not_hide_an_earlier_reading() -> None:
    cohort = three_patients()
    events = events_frame([(1, day(-10), LAB, 1.5, None, "ehr"), (1, day(-5), LAB, float("nan"), None, "ehr")])
    table = aggregate_before(events, cohort, TabularCodes([LAB], [LAB]))
    assert table[f"last__{LAB}"].to_list() == [1.5, None, None]
    assert table[f"count__{LAB}"].to_list() == [2.0, 0.0, 0.0]


def five_weights(last_unit: str, code: str = "LOINC//29463-7") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events of four patients measured in the code's main unit and a fifth in ``last_unit``; the cohort."""
    rows = [(s, day(-5), code, 70.0 + s, None, "ehr") for s in range(1, 5)]
    rows.append((5, day(-5), code, 176.0, None, "ehr"))
    events = events_frame(rows).with_columns(pl.Series("unit", ["kg"] * 4 + [last_unit], dtype=pl.String))
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5], "prediction_time": [T0] * 5,
                           "age_years": [60.0] * 5, "sex": ["female"] * 5})
    return events, cohort


def test_a_value_in_a_unit_that_must_stay_apart_gets_columns_of_its_own() -> None:
    weight = "LOINC//29463-7"
    events, cohort = five_weights("[lb_av]")
    # No conversion learned (a model trained before conversions): 176 lb is not the heaviest patient in kg.
    codes = select_tabular_codes(events, cohort, [1, 2, 3, 4, 5], max_codes=10, units={weight: "kg"})
    assert codes.codes == [weight, f"{weight}//[lb_av]"] and codes.units == {weight: "kg"}
    table = aggregate_before(events, cohort, codes)
    assert table[f"last__{weight}"].to_list() == [71.0, 72.0, 73.0, 74.0, None]
    assert table[f"last__{weight}//[lb_av]"].to_list() == [None, None, None, None, 176.0]


def test_a_unit_first_seen_after_training_that_ucum_converts_is_read_in_the_main_unit() -> None:
    weight = "LOINC//29463-7"
    events, cohort = five_weights("[lb_av]")
    # Columns chosen while every weight was in kg: no conversion learned.
    table = aggregate_before(events, cohort, TabularCodes([weight], [weight], units={weight: "kg"}))
    assert table[f"last__{weight}"].to_list() == pytest.approx([71.0, 72.0, 73.0, 74.0, 176 * 0.45359237])
    # A unit UCUM cannot convert into kg stays out of the weight's columns.
    other, _ = five_weights("{beats}/min")
    table = aggregate_before(other, cohort, TabularCodes([weight], [weight], units={weight: "kg"}))
    assert table[f"last__{weight}"].to_list() == [71.0, 72.0, 73.0, 74.0, None]


def test_a_value_in_a_unit_the_tokenizer_converts_is_read_in_the_main_unit() -> None:
    weight = "LOINC//29463-7"
    events, cohort = five_weights("[lb_av]")
    conversions = {weight: {"[lb_av]": (0.45359237, 0.0)}, "LOINC//other": {"g": (0.001, 0.0)}}
    codes = select_tabular_codes(events, cohort, [1, 2, 3, 4, 5], max_codes=10, units={weight: "kg"},
                                 unit_conversions=conversions)
    assert codes.codes == [weight] and codes.unit_conversions == {weight: {"[lb_av]": (0.45359237, 0.0)}}
    table = aggregate_before(events, cohort, codes)
    assert table[f"last__{weight}"].to_list() == pytest.approx([71.0, 72.0, 73.0, 74.0, 176 * 0.45359237])


def test_the_last_value_is_the_latest_taken_among_those_known() -> None:
    # Creatinine drawn at 08:00 and issued at 11:30 (1.0), a stat repeat drawn at 10:00 and issued
    # at 10:30 (3.5), a third drawn at 11:00 and issued after the prediction time at noon (9.9).
    creatinine = "LOINC//2160-0"
    noon = T0
    rows = [(1, noon - timedelta(hours=4), creatinine, 1.0, None, "ehr"),
            (1, noon - timedelta(hours=2), creatinine, 3.5, None, "ehr"),
            (1, noon - timedelta(hours=1), creatinine, 9.9, None, "ehr")]
    known = [noon - timedelta(minutes=30), noon - timedelta(minutes=90), noon + timedelta(hours=1)]
    events = events_frame(rows).with_columns(known_time=pl.Series(known, dtype=pl.Datetime("us")))
    cohort = pl.DataFrame({"subject_id": [1], "prediction_time": [noon], "age_years": [70.0], "sex": ["male"]})
    table = aggregate_before(events, cohort, select_tabular_codes(events, cohort, [1], 10))
    assert table.select(f"count__{creatinine}", f"last__{creatinine}").row(0) == (2.0, 3.5)
    assert table[f"days_since__{creatinine}"].item() == pytest.approx(2 / 24)
