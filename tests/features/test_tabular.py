from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

from features.cohorts import select_cohort
from features.leakage import find_leaks
from features.tabular import aggregate_before, select_tabular_codes
from tests.features.task_fixtures import BP, MI, T0, day, events_frame, task, toy_events


def test_aggregates_cut_at_prediction_time() -> None:
    events = toy_events()
    cohort = select_cohort(events, task()).cohort
    codes = select_tabular_codes(events, cohort, [1, 2, 3], max_codes=10)
    assert MI not in codes and BP in codes  # the outcome is never seen before day 0
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
    tables = [aggregate_before(frame, cohort, [BP]) for frame in (events, events.reverse(), events.sample(
        fraction=1.0, shuffle=True, seed=3))]
    assert tables[0].row(0, named=True)[f"last__{BP}"] == 150.0  # of the tied values, the larger
    assert tables[0].row(0, named=True)[f"count__{BP}"] == 3.0
    for other in tables[1:]:
        assert_frame_equal(other, tables[0])
