from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.cohorts import age_years, select_cohort
from features.errors import CohortDefinitionError
from features.fhir.columnar import site_date_start
from features.fhir.validate import parse_datetime
from features.labels import LabelCounts, build_labels, labels_to_arrow, usual_interval_days
from features.schemas import LABELS
from features.tasks import load_task
from tests.features.task_fixtures import BP, DRUG, MI, T0, VISIT, day, events_frame, task, toy_events

REPO = Path(__file__).resolve().parents[2]


def test_cohort_excludes_child_and_counts_it() -> None:
    selection = select_cohort(toy_events(), task())
    assert selection.cohort["subject_id"].to_list() == [1, 2, 3, 4]
    assert selection.attrition[-1] == ("age within limits", 4)
    assert selection.cohort["prediction_time"].to_list() == [T0] * 4
    assert selection.cohort["sex"].to_list() == ["female", "male", "female", "male"]


def test_age_limits_in_completed_years_and_no_recorded_sex_as_unknown() -> None:
    # Prediction at 2020-01-01: subject 1 is 17.5, subject 2 18.2 (no sex recorded), subject 3 16.
    def person(subject: int, birth: datetime, sex: str | None) -> list[tuple[int, datetime | None, str, float | None,
                                                                        str | None, str]]:
        rows = [(subject, birth, "MEDS_BIRTH", None, None, "ehr"), (subject, datetime(2019, 6, 1), BP, 120.0, None,
                                                                       "ehr")]
        return rows + ([(subject, None, f"SEX//{sex}", None, None, "ehr")] if sex else [])

    events = events_frame(person(1, datetime(2002, 7, 2), "female") + person(2, datetime(2001, 10, 20), None)
                          + person(3, datetime(2004, 1, 1), "male"))
    fixed = {"prediction_time": {"fixed": "2020-01-01"}}
    end = {"follow_up_end": "2021-01-01"}  # the export, after the records: each patient has a year to follow
    under_18 = select_cohort(events, task(cohort={**fixed, "max_age_years": 17}, **end))
    assert under_18.cohort["subject_id"].to_list() == [1, 3]  # 17.5 is "17 or under"
    adults = select_cohort(events, task(cohort={**fixed, "min_age_years": 18}, **end))
    assert adults.cohort["subject_id"].to_list() == [2]
    unknown = select_cohort(events, task(cohort={**fixed, "sex": ["unknown"]}, **end))
    assert unknown.cohort.select("subject_id", "sex").rows() == [(2, None)]
    every_sex = select_cohort(events, task(cohort={**fixed, "sex": ["female", "male", "other", "unknown"]}, **end))
    assert every_sex.cohort["subject_id"].to_list() == [1, 2, 3]


def test_a_patient_is_of_age_from_the_first_instant_of_their_birthday() -> None:
    # On the 18th birthday a 365.25-day year gave 17.9997 to a patient born in 2005 (four leap days
    # between) and 18.0024 to one born in 2004 (five): one was "under 18" on the day, the other not.
    def person(subject: int, birth: datetime) -> list[tuple[int, datetime | None, str, float | None, str | None, str]]:
        return [(subject, birth, "MEDS_BIRTH", None, None, "ehr"),
                (subject, datetime(2022, 6, 1), BP, 120.0, None, "ehr")]

    events = events_frame(person(1, datetime(2005, 1, 1)) + person(2, datetime(2005, 1, 2)))
    fixed, end = {"prediction_time": {"fixed": "2023-01-01"}}, {"follow_up_end": "2024-01-01"}
    adults = select_cohort(events, task(cohort={**fixed, "min_age_years": 18}, **end))
    assert adults.cohort.select("subject_id", "age_years").rows() == [(1, 18.0)]
    minors = select_cohort(events, task(cohort={**fixed, "max_age_years": 17}, **end))
    assert minors.cohort["subject_id"].to_list() == [2]
    assert minors.cohort["age_years"].item() == pytest.approx(17 + 364 / 365)


@pytest.mark.parametrize(("birth", "at", "zone", "age"), [
    (date(2004, 2, 29), datetime(2023, 2, 28, 0, 0), "UTC", 19.0),  # the 28th is the birthday in other years
    (date(2004, 2, 29), datetime(2024, 2, 28, 12, 0), "UTC", 19 + 365.5 / 366),  # 2024 has the 29th
    (date(1950, 6, 15), datetime(2023, 6, 15, 3, 0), "UTC", 73 + 0.125 / 366),  # 2024 is a leap year
    # 03:00 UTC on the 15th is still the 14th in New York: a day short of 73.
    (date(1950, 6, 15), datetime(2023, 6, 15, 3, 0), "America/New_York", 72 + (365 - 1 / 24) / 365),
    # 19:00 UTC on the 14th is 00:30 on the 15th in Kolkata: the birthday has begun.
    (date(1950, 6, 15), datetime(2023, 6, 14, 19, 0), "Asia/Kolkata", 73 + 0.5 / 24 / 366),
])
def test_age_years_counts_birthdays_on_the_sites_calendar(birth: date, at: datetime, zone: str, age: float) -> None:
    # MEDS_BIRTH is the first instant of the birth date on the site's calendar (events.event_frames).
    frame = pl.DataFrame({"birth_date": [birth], "prediction_time": [at]})
    birth_time = site_date_start(pl.col("birth_date"), zone)
    computed = frame.select(age_years(birth_time, pl.col("prediction_time"), zone)).item()
    assert computed == pytest.approx(age, abs=1e-9)


def test_cohort_excludes_the_dead_including_those_of_unknown_death_date() -> None:
    # Patient 1 died before the index visit, patient 2 after it, patient 3 at an unknown date
    # (a deceasedBoolean without deceasedDateTime): only 2 and 4 (5 is a child) can be predicted for.
    deaths = events_frame([
        (1, day(-10), "MEDS_DEATH", None, None, "ehr"),
        (2, day(50), "MEDS_DEATH", None, None, "ehr"),
        (3, None, "MEDS_DEATH", None, None, "ehr"),
    ])
    selection = select_cohort(pl.concat([toy_events(), deaths]), task())
    assert selection.cohort["subject_id"].to_list() == [2, 4]
    assert ("alive at prediction time", 3) in selection.attrition  # 2, 4 and the child 5


def test_labels_exact_values() -> None:
    definition = task()
    cohort = select_cohort(toy_events(), definition).cohort
    labels, counts = build_labels(toy_events(), cohort, definition)
    assert labels["boolean_value"].to_list() == [True, False, None, False]
    assert labels["event"].to_list() == [True, False, False, True]
    # Patient 3's last record is at day 100; records on 3 days (-200, -30, 0) since the first one
    # (the birth record is not a visit) give a usual interval of 200 / 3 days. Patient 2 is followed
    # to the latest record in the data.
    assert labels["duration_days"].to_list() == pytest.approx([100.0, 500.0, 100.0 + 200 / 3, 400.0])
    assert labels["treated"].to_list() == [False, True, False, False]
    assert (counts.positive, counts.negative, counts.censored_before_horizon) == (1, 2, 1)
    assert counts.events_observed == 2
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (1, 3, 0, 0)
    assert labels_to_arrow(labels).schema == LABELS


def test_follow_up_ends_at_the_last_record_when_asked() -> None:
    definition = task(follow_up_after_last_record=0)
    cohort = select_cohort(toy_events(), definition).cohort
    labels, counts = build_labels(toy_events(), cohort, definition)
    assert labels["duration_days"].to_list() == [100.0, 500.0, 100.0, 400.0]
    assert labels["boolean_value"].to_list() == [True, False, None, False]
    assert counts.no_follow_up == 0


def test_follow_up_after_last_record_in_days_stops_at_the_export_date() -> None:
    definition = task(follow_up_after_last_record=300, follow_up_end="2024-03-01")
    cohort = select_cohort(toy_events(), definition).cohort
    labels, _ = build_labels(toy_events(), cohort, definition)
    # Patient 3: day 100 + 300 = day 400, past the horizon: followed a whole year without the MI.
    # Patient 2: its day-500 visit is after the export date (day 425), so day 5 + 300 = 305.
    assert labels["duration_days"].to_list() == [100.0, 305.0, 400.0, 400.0]
    assert labels["boolean_value"].to_list() == [True, None, False, False]


def test_usual_interval_counts_record_days_in_the_year_before() -> None:
    events = events_frame([
        (1, day(-400), BP, 120.0, None, "ehr"),  # outside the year: not counted
        (1, day(-100), BP, 120.0, None, "ehr"),
        (1, day(-100) + timedelta(hours=1), BP, 125.0, None, "ehr"),  # same day: one record day
        (1, day(0), VISIT, None, None, "ehr"),
        (2, day(-73), BP, 120.0, None, "ehr"),  # first record 73 days before: the span is 73 days
        (2, day(0), VISIT, None, None, "ehr"),
        (3, day(0), VISIT, None, None, "ehr"),  # seen on the index day only
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [day(0)] * 4})
    intervals = usual_interval_days(events, cohort)
    assert_frame_equal(intervals, pl.DataFrame({"subject_id": [1, 2, 3], "interval_days": [182.5, 36.5, 0.0]}))


def test_usual_interval_ignores_birth_and_is_a_year_without_records_in_the_year() -> None:
    events = events_frame([
        (1, day(-20000), "MEDS_BIRTH", None, None, "ehr"),
        (1, day(-20), BP, 120.0, None, "ehr"),  # first visit 20 days before: span 20 days, not a year
        (1, day(0), VISIT, None, None, "ehr"),
        (2, day(-20000), "MEDS_BIRTH", None, None, "ehr"),
        (2, day(-700), BP, 120.0, None, "ehr"),  # seen two years before, not in the year
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [day(0)] * 2})
    assert_frame_equal(usual_interval_days(events, cohort),
                       pl.DataFrame({"subject_id": [1, 2], "interval_days": [10.0, 365.0]}))


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_usual_interval_counts_days_on_the_sites_calendar(zone: str) -> None:
    # A visit at 10:00 and a lab dated only by that day are one day with a record, wherever the site is.
    latest = datetime(2025, 12, 31)
    visit, lab, prediction = (parse_datetime(text, "x", latest, zone)
                              for text in ("2023-03-01T10:00:00", "2023-03-01", "2023-03-10T12:00:00"))
    events = events_frame([(1, visit, VISIT, None, None, "ehr"), (1, lab, BP, 120.0, None, "ehr"),
                           (1, prediction, VISIT, None, None, "ehr")])
    cohort = pl.DataFrame({"subject_id": [1], "prediction_time": [prediction]})
    assert usual_interval_days(events, cohort, zone)["interval_days"].to_list() == [
        pytest.approx((9 + 2 / 24) / 2)]  # 9 days and 2 hours since the first record, 2 days with a record


def fixed_date_task(**overrides: object) -> object:
    fixed = {"cohort": {"prediction_time": {"fixed": "2023-01-01T09:00:00"}, "min_age_years": 18}, "treatment": None}
    return task(**{**fixed, **overrides})


def test_fixed_date_follow_up_runs_from_the_last_record_before_the_date() -> None:
    # No record after the fixed date. Patient 1, seen on days -300 and -100, is followed from day
    # -100 for their usual interval (300 / 2 = 150 days), to day 50, not for a year from the date.
    # Patient 2, last seen two years before (no record in the year: an interval of 365 days), left
    # care before the date: no follow-up at all (and no division by zero record days). Patient 3 has
    # a record after the date and is followed to it.
    events = events_frame([
        (1, day(-300), BP, 120.0, None, "ehr"),
        (1, day(-100), BP, 125.0, None, "ehr"),
        (2, day(-730), BP, 120.0, None, "ehr"),
        (3, day(-50), BP, 120.0, None, "ehr"),
        (3, day(400), BP, 120.0, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [day(0)] * 3})
    labels, counts = build_labels(events, cohort, fixed_date_task())
    assert labels["duration_days"].to_list() == pytest.approx([50.0, 0.0, 400.0])
    assert labels["boolean_value"].to_list() == [None, None, False]
    assert (counts.no_follow_up, counts.censored_before_horizon) == (2, 2)


def test_death_competes_with_an_outcome_that_excludes_it() -> None:
    # Death on day 100 without the MI: when death is not the outcome, the patient can no longer have
    # it within the year (negative for the risk), and is censored at death for the progression target.
    events = pl.concat([toy_events(), events_frame([(3, day(60), "MEDS_DEATH", None, None, "ehr")])])
    definition = task(outcome={"codes": [MI], "death": False})
    labels, counts = build_labels(events, select_cohort(events, definition).cohort, definition)
    patient_3 = labels.filter(pl.col("subject_id") == 3)
    assert patient_3.select("boolean_value", "event", "duration_days").rows() == [(False, False, 60.0)]
    assert (counts.positive, counts.negative, counts.censored_before_horizon) == (1, 3, 0)
    # With death in the outcome it is the event itself.
    labels, _ = build_labels(events, select_cohort(events, task()).cohort, task())
    assert labels.filter(pl.col("subject_id") == 3).select("boolean_value", "event").rows() == [(True, True)]


def test_a_date_only_follow_up_end_includes_that_day() -> None:
    # The MI of patient 1 is at day 100, 09:00; a follow-up end on that date keeps it.
    definition = task(follow_up_end=str(day(100).date()))
    assert definition.follow_up_end == datetime(2023, 4, 11, 23, 59, 59, 999999)
    labels, _ = build_labels(toy_events(), select_cohort(toy_events(), definition).cohort, definition)
    assert labels.filter(pl.col("subject_id") == 1)["event"].item() is True


def test_prediction_times_at_or_after_the_follow_up_end_are_excluded() -> None:
    definition = fixed_date_task(follow_up_end="2023-01-01T09:00:00Z")
    selection = select_cohort(toy_events(), definition)
    assert selection.cohort.height == 0
    assert selection.attrition[1:3] == (("prediction time placed", 5), ("prediction time before follow-up end", 0))


def test_without_a_follow_up_end_prediction_times_from_the_latest_record_on_are_excluded() -> None:
    # The labels end follow-up at the latest record when the task names no cut-off: a prediction
    # time past it has nothing to follow, and was kept with every patient censored at once.
    latest = toy_events()["time"].max()
    definition = fixed_date_task(follow_up_end="2023-01-01T09:00:00Z")
    after = replace(definition, follow_up_end=None,
                    cohort=replace(definition.cohort, prediction_time=replace(
                        definition.cohort.prediction_time, fixed=latest)))
    selection = select_cohort(toy_events(), after)
    assert selection.cohort.height == 0
    assert selection.attrition[1:3] == (("prediction time placed", 5), ("prediction time before follow-up end", 0))
    before = replace(after, cohort=replace(after.cohort, prediction_time=replace(
        after.cohort.prediction_time, fixed=latest - timedelta(days=1))))
    assert select_cohort(toy_events(), before).attrition[2] == ("prediction time before follow-up end", 5)


@pytest.mark.parametrize("value", ["usual", -1, True])
def test_follow_up_after_last_record_rejects_other_values(value: object) -> None:
    with pytest.raises(CohortDefinitionError,
                       match="follow_up_after_last_record must be a number of days from 0 to 73050 or "
                             "'usual_interval'"):
        task(follow_up_after_last_record=value)


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
    assert labels["treated"].null_count() == labels.height
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (
        None, None, None, None)


def new_user_events() -> pl.DataFrame:
    """Eight patients with an index visit at day 0 (the prediction time), clopidogrel (DRUG) around it.

    Grace period [0, 30], washout 365 days. Follow-up ends at the last record (or death).
    1: on the drug 100 days before, refilled at day 10: prevalent user.
    2: last on the drug 400 days before (outside the washout), restarted at day 10: new user, treated.
    3: MI at day 5, clopidogrel the next day (standard care after an MI): follow-up ended in the window.
    4: dies at day 20, in care (a visit that day), without the drug (death is not the outcome here).
    5: last record at day 15: censored in the window.
    6: starts at day 10, followed to day 400: treated.
    7: no drug, followed to day 400: untreated.
    8: last record exactly at day 30, the end of the grace period: not followed beyond it.
    """
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str]] = [
        (sid, day(0), VISIT, None, None, "ehr") for sid in range(1, 9)
    ]
    rows += [
        (1, day(-100), DRUG, None, None, "ehr"), (1, day(10), DRUG, None, None, "ehr"),
        (1, day(400), VISIT, None, None, "ehr"),
        (2, day(-400), DRUG, None, None, "ehr"), (2, day(10), DRUG, None, None, "ehr"),
        (2, day(400), VISIT, None, None, "ehr"),
        (3, day(5), MI, None, None, "ehr"), (3, day(6), DRUG, None, None, "ehr"),
        (3, day(400), VISIT, None, None, "ehr"),
        (4, day(20), VISIT, None, None, "ehr"), (4, day(20), "MEDS_DEATH", None, None, "ehr"),
        (5, day(15), VISIT, None, None, "ehr"),
        (6, day(10), DRUG, None, None, "ehr"), (6, day(400), VISIT, None, None, "ehr"),
        (7, day(400), VISIT, None, None, "ehr"),
        (8, day(30), VISIT, None, None, "ehr"),
    ]
    return events_frame(rows)


def new_user_task(**treatment: object) -> object:
    return task(outcome={"codes": [MI], "death": False}, follow_up_after_last_record=0,
                follow_up_end="2024-12-31", treatment={"codes": [DRUG], "window_days": [0, 30], **treatment})


def expected_labels(treated: list[bool | None], prevalent: bool = True) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": list(range(1, 9)),
            "prediction_time": [T0] * 8,
            "task": ["toy"] * 8,
            # 4 died without the MI (a competing event: negative); 5 and 8 left care before the horizon.
            "boolean_value": [False, False, True, False, None, False, False, None],
            "event": [False, False, True, False, False, False, False, False],
            "duration_days": [400.0, 400.0, 5.0, 20.0, 15.0, 400.0, 400.0, 30.0],
            "treated": treated,
            # Patient 1 had the drug before the prediction time.
            "prevalent_user": [prevalent] + [False] * 7,
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "task": pl.String,
                "boolean_value": pl.Boolean, "event": pl.Boolean, "duration_days": pl.Float64,
                "treated": pl.Boolean, "prevalent_user": pl.Boolean},
    )


def test_treated_is_a_new_user_start_among_patients_followed_through_the_grace_period() -> None:
    events = new_user_events()
    cohort = pl.DataFrame({"subject_id": list(range(1, 9)), "prediction_time": [T0] * 8})
    labels, counts = build_labels(events, cohort, new_user_task())
    # The old rule ("a code in the window") gave [True, True, True, False, False, True, False, False]:
    # a refill (1) and a drug given for the outcome (3) as starts, and three patients who could not
    # have started (4, 5, 8) as untreated.
    assert_frame_equal(labels, expected_labels([None, True, None, None, None, True, False, None]))
    assert counts == LabelCounts(cohort=8, positive=1, negative=5, censored_before_horizon=2, events_observed=1,
                                 no_follow_up=0, treated=2, untreated=1, treatment_prevalent=1,
                                 treatment_undetermined=4)


@pytest.mark.parametrize(("washout_days", "treated_1", "prevalent"), [(100, None, 1), (99, True, 0), (0, True, 0)])
def test_washout_days_decides_who_is_a_prevalent_user(washout_days: float, treated_1: bool | None,
                                                      prevalent: int) -> None:
    # Patient 1's earlier code is exactly 100 days before the prediction time: inside a 100-day washout
    # (the bound included), outside a 99-day one; a washout of 0 days catches only a code at the
    # prediction time itself, and no patient here has one.
    events = new_user_events()
    cohort = pl.DataFrame({"subject_id": list(range(1, 9)), "prediction_time": [T0] * 8})
    labels, counts = build_labels(events, cohort, new_user_task(washout_days=washout_days))
    assert_frame_equal(labels, expected_labels([treated_1, True, None, None, None, True, False, None],
                                               prevalent=bool(prevalent)))
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (
        3 - prevalent, 1, prevalent, 4)


def end_of(when: datetime) -> datetime:
    """Where ingest stores a date without a time of day: the day's last instant."""
    return when.replace(hour=23, minute=59, second=59, microsecond=999999)


def arm_frame(treated: list[bool | None], prevalent: list[bool], boolean_value: list[bool | None],
              duration_days: list[float]) -> pl.DataFrame:
    """Expected labels of patients 1..n at T0, without the event (MI only, death not the outcome)."""
    n = len(treated)
    return pl.DataFrame(
        {"subject_id": list(range(1, n + 1)), "prediction_time": [T0] * n, "task": ["toy"] * n,
         "boolean_value": boolean_value, "event": [False] * n, "duration_days": duration_days,
         "treated": treated, "prevalent_user": prevalent},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "task": pl.String,
                "boolean_value": pl.Boolean, "event": pl.Boolean, "duration_days": pl.Float64,
                "treated": pl.Boolean, "prevalent_user": pl.Boolean},
    )


@pytest.mark.parametrize(
    ("washout_days", "treated", "prevalent", "arm_counts"),
    [
        (365, [None, True, None, False], [True, False, True, False], (1, 1, 2, 0)),
        # A washout of 0 days still catches the code at the prediction time itself.
        (0, [None, True, False, False], [True, False, False, False], (1, 2, 1, 0)),
    ],
)
def test_a_treatment_code_at_the_prediction_time_is_baseline_not_a_start(
        washout_days: float, treated: list[bool | None], prevalent: list[bool],
        arm_counts: tuple[int, int, int, int]) -> None:
    # The model inputs keep events at or before the prediction time, so a code at that very instant
    # is an input: the patient is on the drug at baseline (a prevalent user), never a new user who
    # starts in a grace period beginning at 0. 1: code at the prediction time; 2: one minute after
    # it (a start); 3: the day before; 4: none. Everyone is followed to day 400.
    pt = day(0)
    events = events_frame([
        *[(sid, pt, VISIT, None, None, "ehr") for sid in range(1, 5)],
        *[(sid, day(400), VISIT, None, None, "ehr") for sid in range(1, 5)],
        (1, pt, DRUG, None, None, "ehr"),
        (2, pt + timedelta(minutes=1), DRUG, None, None, "ehr"),
        (3, day(-1), DRUG, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T0] * 4})
    labels, counts = build_labels(events, cohort, new_user_task(washout_days=washout_days))
    assert_frame_equal(labels, arm_frame(treated, prevalent, [False] * 4, [400.0] * 4))
    assert (counts.treated, counts.untreated, counts.treatment_prevalent,
            counts.treatment_undetermined) == arm_counts


def test_the_review_tie_case_makes_a_prevalent_user() -> None:
    # /tmp/review14b/r6_treatment_tie.py: patient 3 of the toy events gets the drug at the index time;
    # it was both an input token and a start (treated). It is now a prevalent user with no arm.
    events = pl.concat([toy_events(), events_frame([(3, day(0), DRUG, None, None, "ehr")])])
    definition = task()
    labels, counts = build_labels(events, select_cohort(events, definition).cohort, definition)
    assert labels.select("subject_id", "treated", "prevalent_user").rows() == [
        (1, False, False), (2, True, False), (3, None, True), (4, False, False)]
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (1, 2, 1, 0)


def test_grace_window_bounds_count_codes_after_the_prediction_time() -> None:
    # Window [5, 30]: a start is a code at least 5 and at most 30 days after the prediction time
    # (both bounds included); one on day 4 is an early start the design leaves out, so no arm
    # (they were untreated), even with a refill inside the window (patient 5); one a minute past
    # day 30 is not a start.
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in range(1, 5)],
        *[(sid, day(400), VISIT, None, None, "ehr") for sid in range(1, 5)],
        (1, day(4), DRUG, None, None, "ehr"),
        (2, day(5), DRUG, None, None, "ehr"),
        (3, day(30), DRUG, None, None, "ehr"),
        (4, day(30) + timedelta(minutes=1), DRUG, None, None, "ehr"),
        (5, day(0), VISIT, None, None, "ehr"), (5, day(400), VISIT, None, None, "ehr"),
        (5, day(2), DRUG, None, None, "ehr"), (5, day(20), DRUG, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5], "prediction_time": [T0] * 5})
    labels, counts = build_labels(events, cohort, new_user_task(window_days=[5, 30]))
    assert_frame_equal(labels, arm_frame([None, True, True, False, None], [False] * 5, [False] * 5, [400.0] * 5))
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (2, 1, 0, 2)


def test_the_arm_needs_observed_follow_up_beyond_the_grace_period() -> None:
    # The usual interval credits follow-up after the last record for the risk label; it is not
    # evidence of who started. With the usual interval (the index visit and the visits before it
    # decide it):
    # 1: visits on days -200, -100, 0 and none after: followed 200 / 3 days (imputed), no arm
    #    (was untreated).
    # 2: a visit on day 400: untreated.
    # 3: seen a year before and at the index visit, nothing after: a year imputed, no arm (was untreated).
    # 4: visits on days -300, -200, 0, the drug on day 10 and nothing after: 10 + 100 days of
    #    follow-up, but none observed past day 10: no arm (was treated).
    # 5: the same visits, no drug, a last visit exactly on day 30, the end of the grace period: no arm.
    # 6: the same visits, the drug on day 10 and a visit on day 31: treated.
    # 7: the same visits, the drug 10 days before and nothing after: a prevalent user, counted as
    #    such (not undetermined).
    history = [(sid, day(d), VISIT, None, None, "ehr") for sid in (4, 5, 6, 7) for d in (-300, -200, 0)]
    events = events_frame([
        (1, day(-200), VISIT, None, None, "ehr"), (1, day(-100), VISIT, None, None, "ehr"),
        (1, day(0), VISIT, None, None, "ehr"),
        (2, day(0), VISIT, None, None, "ehr"), (2, day(400), VISIT, None, None, "ehr"),
        (3, day(-400), VISIT, None, None, "ehr"), (3, day(0), VISIT, None, None, "ehr"),
        *history,
        (4, day(10), DRUG, None, None, "ehr"),
        (5, day(30), VISIT, None, None, "ehr"),
        (6, day(10), DRUG, None, None, "ehr"), (6, day(31), VISIT, None, None, "ehr"),
        (7, day(-10), DRUG, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": list(range(1, 8)), "prediction_time": [T0] * 7})
    definition = task(outcome={"codes": [MI], "death": False}, follow_up_end="2024-12-31",
                      treatment={"codes": [DRUG], "window_days": [0, 30]})
    labels, counts = build_labels(events, cohort, definition)
    expected = arm_frame(
        treated=[None, False, None, None, None, True, None],
        prevalent=[False] * 6 + [True],
        boolean_value=[None, False, False, None, None, None, None],
        # Usual intervals: 200 / 3, 0 (the index day only), 365 (the whole year's span over its one
        # record day, the index visit), 100, 100, 100 and 300 / 4 (the drug is a record).
        duration_days=[200 / 3, 400.0, 365.0, 110.0, 130.0, 131.0, 75.0],
    )
    assert_frame_equal(labels, expected)
    assert counts == LabelCounts(cohort=7, positive=0, negative=2, censored_before_horizon=5, events_observed=0,
                                 no_follow_up=3, treated=1, untreated=1, treatment_prevalent=1,
                                 treatment_undetermined=4)
    assert counts.treated + counts.untreated + counts.treatment_prevalent + counts.treatment_undetermined == 7
    # With follow-up ending at the last record the arms are the same: 4 was never observed past day 10.
    labels_0, counts_0 = build_labels(events, cohort, replace(definition, follow_up_after_last_record=0.0))
    assert labels_0["treated"].to_list() == [None, False, None, None, None, True, None]
    assert (counts_0.treated, counts_0.untreated, counts_0.treatment_prevalent,
            counts_0.treatment_undetermined) == (1, 1, 1, 4)


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
    # Every arm we give is the simulator's; the simulator has no prevalent users. 20 patients have no
    # arm: 2 (one started, one not) had the event within the 30-day grace period, 8 (none started)
    # have no record after the prediction time, and the records of 10 (7 started) stop within the
    # grace period: their follow-up beyond it is imputed (the usual interval), not observed.
    arms = joined.group_by("treated", "treated_ours").len().sort(["treated", "treated_ours"], nulls_last=False)
    assert arms.rows() == [(False, None, 11), (False, False, 156), (True, None, 9), (True, True, 124)]
    assert (joined["event_observed"] == joined["event"]).all()
    # No label we give contradicts the truth. Against it (rows: the truth; null = left care before the
    # horizon without the event): every positive found; 221 of 238 true negatives labelled, 17 left
    # out because their records stop more than a usual interval before the horizon; 4 patients who
    # left care within their usual interval of the horizon labelled negative.
    table = joined.group_by("event_within_horizon", "boolean_value").len().sort(
        ["event_within_horizon", "boolean_value"], nulls_last=False)
    assert table.rows() == [(None, None, 30), (None, False, 4), (False, None, 17), (False, False, 221),
                            (True, True, 28)]
    # The ingest's events (DocumentReference notes included) give the same counts as the
    # simulator's truth for positives (28) and treatment (133, of whom 124 have an arm).
    assert int(truth["event_within_horizon"].sum()) == counts.positive == 28
    assert int(truth["treated"].sum()) == 133
    assert (counts.treated, counts.untreated, counts.treatment_prevalent, counts.treatment_undetermined) == (
        124, 156, 0, 20)
    assert (counts.negative, counts.events_observed, counts.no_follow_up) == (225, 70, 8)
    assert (truth["event_within_horizon"].null_count(), counts.censored_before_horizon) == (34, 47)


@pytest.mark.slow
def test_follow_up_at_the_last_record_labels_fewer(small_hospital: Path, small_warehouse: Path) -> None:
    events = pl.read_parquet(small_warehouse / "events.parquet")
    definition = replace(load_task(REPO / "tasks" / "simulated_mace_1y.yaml"), follow_up_after_last_record=0.0)
    labels, counts = build_labels(events, select_cohort(events, definition).cohort, definition)
    truth = pl.read_parquet(small_hospital / "truth.parquet")
    joined = truth.join(labels, on="subject_id")
    # Every label is then the true one, but 28 true negatives are left out (their records stop
    # before the horizon although they were still in care), against 17 with the usual interval.
    table = joined.group_by("event_within_horizon", "boolean_value").len().sort(
        ["event_within_horizon", "boolean_value"], nulls_last=False)
    assert table.rows() == [(None, None, 34), (False, None, 28), (False, False, 210), (True, True, 28)]
    assert (counts.negative, counts.censored_before_horizon) == (210, 62)


def test_the_mace_task_leaves_out_patients_with_an_acute_event_in_the_four_weeks_before() -> None:
    # Patient 1's MI 10 days before the visit would be coded again after it and counted as new;
    # patient 2's, 100 days before, is history.
    events = pl.concat([toy_events(), events_frame([(1, day(-10), MI, None, None, "ehr"),
                                                    (2, day(-100), MI, None, None, "ehr")])])
    definition = load_task(REPO / "tasks" / "simulated_mace_1y.yaml")
    selection = select_cohort(events, definition)
    assert selection.cohort["subject_id"].to_list() == [2, 3, 4]
    assert selection.attrition[-1][1] == 3 and selection.attrition[-1][0].startswith("exclude[0]")


def recorded(events: pl.DataFrame, subject_id: int, code: str, happened: datetime, known: datetime) -> pl.DataFrame:
    """``events`` with one more event of ``code`` that happened at ``happened`` and was recorded at ``known``."""
    row = events_frame([(subject_id, happened, code, None, None, "ehr")]).with_columns(
        pl.lit(known, dtype=pl.Datetime("us")).alias("known_time"))
    return pl.concat([events, row])


def test_a_patient_enters_the_cohort_when_the_index_event_is_recorded() -> None:
    # Patient 1's only index visit happened at day 0 but reached the record on day 3: no prediction
    # could be made for them before then.
    events = toy_events().filter(~((pl.col("subject_id") == 1) & (pl.col("code") == VISIT)))
    events = recorded(events, 1, VISIT, day(0), day(3))
    selection = select_cohort(events, task())
    assert selection.cohort.select("subject_id", "prediction_time").rows() == [
        (1, day(3)), (2, T0), (3, T0), (4, T0)
    ]


def test_an_inclusion_rule_reads_only_what_was_recorded_by_the_prediction_time() -> None:
    # Each patient had a heart attack 10 days before the visit (40 for patient 3); patient 2's was
    # recorded only 5 days after the visit: at the prediction time nothing admitted them. Patient
    # 3's, recorded 20 days before, happened outside the 30-day window.
    events = recorded(toy_events(), 1, MI, day(-10), day(-9))
    events = recorded(events, 2, MI, day(-10), day(5))
    events = recorded(events, 3, MI, day(-40), day(-20))
    events = recorded(events, 4, MI, day(-10), day(-10))
    definition = task(cohort={"prediction_time": {"first_event": {"codes": [VISIT], "on_or_after": "2023-01-01"}},
                              "min_age_years": 18, "include": [{"codes": [MI], "window_days": 30}]})
    assert select_cohort(events, definition).cohort["subject_id"].to_list() == [1, 4]


def test_an_exclusion_rule_reads_when_things_happened_even_if_recorded_later() -> None:
    # The same heart attacks as an exclusion (a blanking period): patient 2's, recorded after the
    # visit, would be coded again after it and counted as a new outcome, so it still excludes.
    events = recorded(toy_events(), 1, MI, day(-10), day(-9))
    events = recorded(events, 2, MI, day(-10), day(5))
    events = recorded(events, 3, MI, day(-40), day(-20))
    definition = task(cohort={"prediction_time": {"first_event": {"codes": [VISIT], "on_or_after": "2023-01-01"}},
                              "min_age_years": 18, "exclude": [{"codes": [MI], "window_days": 30}]})
    assert select_cohort(events, definition).cohort["subject_id"].to_list() == [3, 4]


def test_minimum_history_counts_from_when_the_first_record_was_recorded() -> None:
    # Every patient's first record (a blood pressure at day -200); patient 1's was only entered at
    # day -20, so at the prediction time the record reached back 20 days, not 200.
    events = toy_events().with_columns(
        pl.when((pl.col("subject_id") == 1) & (pl.col("code") == BP) & (pl.col("time") == day(-200)))
        .then(pl.lit(day(-20))).otherwise(pl.col("known_time")).alias("known_time"))
    definition = task(cohort={"prediction_time": {"first_event": {"codes": [VISIT], "on_or_after": "2023-01-01"}},
                              "min_age_years": 18, "min_history_days": 100})
    assert select_cohort(events, definition).cohort["subject_id"].to_list() == [2, 3, 4]


@pytest.mark.parametrize(("zone", "day"), [
    ("UTC", "2023-03-12"),
    ("America/New_York", "2023-03-12"),  # 23 hours: clocks go forward at 02:00
    ("Australia/Sydney", "2023-10-01"),
    ("America/Santiago", "2019-09-08"),  # clocks go from 00:00 to 01:00: the day starts at 01:00
    ("America/New_York", "2023-11-05"),  # 25 hours
])
def test_a_fixed_date_cohort_keeps_its_days_date_only_records_after_it_on_any_day(zone: str, day: str) -> None:
    # A fixed date predicts at the start of that day on the site's calendar: an MI dated only by
    # that day is an outcome, and one dated the day before excludes the patient.
    latest = datetime(2025, 12, 31)
    before = (datetime.fromisoformat(day) - timedelta(days=1)).date().isoformat()

    def patient(subject: int, mi_date: str) -> list[tuple[int, datetime | None, str, float | None, str | None, str]]:
        return [(subject, None, "SEX//male", None, None, "ehr"),
                (subject, datetime(1960, 1, 1), "MEDS_BIRTH", None, None, "ehr"),
                (subject, datetime(2018, 6, 1, 9), VISIT, None, None, "ehr"),
                (subject, parse_datetime(mi_date, "Condition.onsetDateTime", latest, zone), MI, None, None, "ehr"),
                (subject, datetime(2024, 6, 1, 9), VISIT, None, None, "ehr")]

    events = events_frame(patient(1, day) + patient(2, before))
    fixed = task(cohort={"prediction_time": {"fixed": day}, "exclude": [{"codes": [MI], "window_days": 28}]},
                 follow_up_end="2025-12-31").on_site_clock(zone)
    assert select_cohort(events, fixed).cohort["subject_id"].to_list() == [1]


def test_cohort_selection_refuses_events_without_known_time() -> None:
    with pytest.raises(ValueError, match=r"events table has no known_time column .*ingest the landing zone again"):
        select_cohort(toy_events().drop("known_time"), task())


@pytest.mark.parametrize(("zone", "day_end"), [("UTC", datetime(2023, 1, 1, 23, 59, 59, 999_999)),
                                              ("America/New_York", datetime(2023, 1, 2, 4, 59, 59, 999_999))])
def test_a_date_only_record_on_the_index_day_is_history_for_exclusions_and_treatment(
    zone: str, day_end: datetime
) -> None:
    # Ingest stores a date without a time of day as its last microsecond on the site's calendar (no
    # input before the day is over). An MI or a prescription dated only by the index visit's day may
    # have come before the visit: the blanking period excludes the patient, and the drug makes a
    # prevalent user, not a start.
    latest = datetime(2025, 12, 31)
    visit = parse_datetime("2023-01-01T09:00:00Z", "Encounter.period.start", latest)
    same_day = parse_datetime("2023-01-01", "Condition.onsetDateTime", latest, zone)
    assert same_day == day_end

    def patient(subject: int, code: str, time: datetime) -> list[tuple[int, datetime | None, str, float | None,
                                                                        str | None, str]]:
        return [(subject, None, "SEX//male", None, None, "ehr"),
                (subject, datetime(1960, 1, 1), "MEDS_BIRTH", None, None, "ehr"),
                (subject, datetime(2022, 6, 1, 9), BP, 130.0, None, "ehr"),
                (subject, visit, VISIT, None, None, "ehr"), (subject, time, code, None, None, "ehr"),
                (subject, datetime(2024, 6, 1, 9), VISIT, None, None, "ehr")]

    # 1: MI dated the index day; 2: MI at 15:00 that day (after the visit); 3: the drug dated the
    # index day; 4: the drug at 15:00 that day.
    events = events_frame(patient(1, MI, same_day) + patient(2, MI, datetime(2023, 1, 1, 15))
                          + patient(3, DRUG, same_day) + patient(4, DRUG, datetime(2023, 1, 1, 15)))
    definition = task(cohort={"prediction_time": {"first_event": {"codes": [VISIT]}, "offset_minutes": 45},
                              "exclude": [{"codes": [MI], "window_days": 28}]},
                      follow_up_end="2025-12-31").on_site_clock(zone)
    selected = select_cohort(events, definition)
    assert selected.cohort["subject_id"].to_list() == [2, 3, 4]
    labels, _ = build_labels(events, selected.cohort, definition)
    assert labels.select("subject_id", "boolean_value", "treated", "prevalent_user").rows() == [
        (2, True, None, False), (3, False, None, True), (4, False, True, False)]
    # A start dated only by the grace period's last day (30 days after 09:45) may fall within it.
    last_day = events_frame(patient(5, DRUG, parse_datetime("2023-01-31", "MedicationRequest.authoredOn", latest,
                                                            zone)))
    labels, _ = build_labels(last_day, select_cohort(last_day, definition).cohort, definition)
    assert labels.select("subject_id", "treated").rows() == [(5, True)]
    # A fixed-date cohort predicts at midnight, before all of that day: its date-only records stay after.
    fixed = task(cohort={"prediction_time": {"fixed": "2023-01-01"}, "exclude": [{"codes": [MI], "window_days": 28}]},
                 follow_up_end="2025-12-31").on_site_clock(zone)
    selected = select_cohort(events, fixed)
    assert selected.cohort["subject_id"].to_list() == [1, 2, 3, 4]
    labels, _ = build_labels(events, selected.cohort, fixed)
    assert labels.select("subject_id", "boolean_value", "event", "treated", "prevalent_user").rows() == [
        (1, True, True, None, False), (2, True, True, None, False), (3, False, False, True, False),
        (4, False, False, True, False)]


def test_an_outcome_dated_only_by_the_index_day_is_history_and_one_dated_by_the_death_day_counts() -> None:
    # Stored at the last instant of their day: an MI dated only by the index visit's day may be the
    # one the patient came in with (history, as exclusions and treatment starts read it: once a
    # positive 0.6 days in); one dated only by the day of a timed death happened by the death (it
    # had fallen after the end of follow-up, and the death, not the outcome, made a negative).
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in range(1, 4)],
        *[(sid, day(400), VISIT, None, None, "ehr") for sid in (1, 3)],
        (1, end_of(day(0)), MI, None, None, "ehr"),
        (2, day(100) + timedelta(hours=10), "MEDS_DEATH", None, None, "ehr"),
        (2, end_of(day(100)), MI, None, None, "ehr"),
        (3, day(200), MI, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [T0] * 3})
    labels, _ = build_labels(events, cohort, new_user_task())
    assert labels.select("subject_id", "boolean_value", "event", "duration_days").rows() == [
        (1, False, False, 400.0), (2, True, True, pytest.approx(100 + 10 / 24)), (3, True, True, 200.0)]


def test_a_death_dated_only_by_the_index_day_is_the_outcome_of_a_mortality_task() -> None:
    # The patient was alive at the visit: a death dated only by its day (a deceasedDateTime given as
    # a date) happened after it, unlike a diagnosis dated that day, which may be what brought them in.
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in (1, 2, 3)],
        (1, end_of(day(0)), "MEDS_DEATH", None, None, "ehr"),
        (2, day(0.5), "MEDS_DEATH", None, None, "ehr"),
        (3, day(400), VISIT, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [T0] * 3})
    mortality = task(outcome={"death": True}, follow_up_after_last_record=0, follow_up_end="2024-12-31",
                     treatment=None)
    labels, counts = build_labels(events, cohort, mortality)
    assert labels.select("subject_id", "boolean_value", "event", "duration_days").rows() == [
        (1, True, True, pytest.approx(15 / 24)),  # the day's last instant, from 09:00
        (2, True, True, 0.5), (3, False, False, 400.0)]
    assert counts.positive == 2


def test_an_outcome_dated_only_by_the_horizons_last_day_is_within_it() -> None:
    # The horizon ends at 09:00 on day 365. An MI dated only by that day may have come before 09:00:
    # a positive (as a start dated only by the grace period's last day counts as in it), with its
    # time to event as stored. One dated only by the next day is after the horizon: a negative.
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in (1, 2, 3)],
        *[(sid, day(700), VISIT, None, None, "ehr") for sid in (1, 2, 3)],
        (1, day(365) - timedelta(hours=1), MI, None, None, "ehr"),
        (2, end_of(day(365)), MI, None, None, "ehr"),
        (3, end_of(day(366)), MI, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [T0] * 3})
    labels, counts = build_labels(events, cohort, new_user_task())
    assert labels.select("subject_id", "boolean_value", "event", "duration_days").rows() == [
        (1, True, True, pytest.approx(365 - 1 / 24)), (2, True, True, pytest.approx(365 + 15 / 24)),
        (3, False, True, pytest.approx(366 + 15 / 24))]
    assert (counts.positive, counts.negative) == (2, 1)
    # A cohort at midnight: its horizon ends as day 365 begins, so neither MI of that day is within it.
    midnight = cohort.with_columns(pl.lit(T0.replace(hour=0)).alias("prediction_time"))
    labels, _ = build_labels(events, midnight, new_user_task())
    assert labels["boolean_value"].to_list() == [False, False, False]


def test_the_grace_period_closes_at_the_end_of_the_last_day_a_start_dated_only_by_it_counts_on() -> None:
    # Window [0, 30]: it ends at 09:00 on day 30, and a start dated only by day 30 counts, as it may
    # have come by then. Such a start may also have come after an MI at 17:00 that day
    # (clopidogrel after the infarction): the arm is known only for patients followed beyond day
    # 30, whether they started (1) or not (2). Followed past it, the start makes the treated (3).
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in (1, 2, 3)],
        *[(sid, day(400), VISIT, None, None, "ehr") for sid in (1, 2, 3)],
        (1, end_of(day(30)), DRUG, None, None, "ehr"), (1, day(30) + timedelta(hours=8), MI, None, None, "ehr"),
        (2, day(30) + timedelta(hours=8), MI, None, None, "ehr"),
        (3, end_of(day(30)), DRUG, None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [T0] * 3})
    labels, counts = build_labels(events, cohort, new_user_task())
    assert labels["treated"].to_list() == [None, None, True]
    assert (counts.treated, counts.untreated, counts.treatment_undetermined) == (1, 0, 2)
    # A cohort at midnight: its window ends as day 30 begins, so a start dated only by day 30 is not
    # in it, and an MI later that day leaves the arm known: untreated, all three.
    midnight = cohort.with_columns(pl.lit(T0.replace(hour=0)).alias("prediction_time"))
    labels, _ = build_labels(events, midnight, new_user_task())
    assert labels["treated"].to_list() == [False, False, False]


@pytest.mark.parametrize("after_last_record", [0.0, 30.0])
def test_a_death_known_after_the_records_stop_ends_follow_up_without_extending_it(after_last_record: float) -> None:
    # Records stop at day 10; a death at day 200 is known all the same (a registry, the Patient
    # record). An MI between the two would have left no record here, so the patient is not shown to
    # be MI-free to day 200: censored when their records stop (plus the task's credit), not a
    # competing-death negative, and with no arm. Dying in care (2: a visit that day), the death competes.
    # Where death is the outcome (the mortality task), its record extends follow-up as the MI's
    # does: the death is the event.
    events = events_frame([
        *[(sid, day(0), VISIT, None, None, "ehr") for sid in (1, 2)],
        (1, day(10), VISIT, None, None, "ehr"), (1, day(200), "MEDS_DEATH", None, None, "ehr"),
        (2, day(200), VISIT, None, None, "ehr"), (2, day(200), "MEDS_DEATH", None, None, "ehr"),
    ])
    cohort = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [T0] * 2})
    definition = replace(new_user_task(), follow_up_after_last_record=after_last_record)
    labels, counts = build_labels(events, cohort, definition)
    assert labels.select("subject_id", "boolean_value", "event", "duration_days", "treated").rows() == [
        (1, None, False, 10.0 + after_last_record, None), (2, False, False, 200.0, False)]
    assert (counts.negative, counts.censored_before_horizon) == (1, 1)
    mortality = task(outcome={"death": True}, follow_up_after_last_record=after_last_record,
                     follow_up_end="2024-12-31", treatment=None)
    labels, _ = build_labels(events, cohort, mortality)
    assert labels.select("subject_id", "boolean_value", "event", "duration_days").rows() == [
        (1, True, True, 200.0), (2, True, True, 200.0)]
