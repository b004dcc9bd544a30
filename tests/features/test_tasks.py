from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from features.errors import CohortDefinitionError
from features.tasks import load_task, parse_task
from tests.features.task_fixtures import task

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_tasks_load(path: Path) -> None:
    definition = load_task(path)
    assert definition.name == path.stem
    assert definition.horizon_days > 0


def test_simulated_task_matches_simulator() -> None:
    definition = load_task(REPO / "tasks" / "simulated_mace_1y.yaml")
    rule = definition.cohort.prediction_time
    assert rule.codes == ("SNOMED//11429006",)
    assert rule.offset == timedelta(minutes=45)
    assert rule.on_or_after == datetime(2022, 1, 1)
    assert definition.treatment is not None and definition.treatment.codes == ("RXNORM//309362",)
    assert definition.outcome.death


def test_code_without_prefix_names_the_key() -> None:
    expected = r"task 'toy': outcome.codes\[1\] 'I50' has no vocabulary prefix \(expected like 'ICD10CM//I50'\)"
    with pytest.raises(CohortDefinitionError, match=expected):
        task(outcome={"codes": ["SNOMED//22298006", "I50"]})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"horizon_days": "a year"}, r"horizon_days must be a number \(found str 'a year'\)"),
        ({"horizon_days": 0}, r"horizon_days must be a number >= 1 \(found int 0\)"),
        ({"outcome": {}}, r"outcome must list codes or set death: true"),
        ({"colour": 1}, r"unknown key colour"),
        ({"treatment": {"codes": ["RXNORM//1"], "window_days": [30, 0]}},
         r"treatment.window_days must be \[start, end\]"),
        ({"splits": {"train": 0.5, "tuning": 0.1, "held_out": 0.1}}, r"train \+ tuning \+ held_out = 1"),
        ({"cohort": {"prediction_time": {}}}, r"cohort.prediction_time must have exactly one of"),
        ({"cohort": {"prediction_time": {"fixed": "soon"}}}, r"cohort.prediction_time.fixed must be a date"),
        ({"cohort": {"prediction_time": {"fixed": "2020-01-01"}, "sex": ["f"]}}, r"cohort.sex must be a list"),
        ({"cohort": {"prediction_time": {"fixed": "2020-01-01"}, "include": [{"window_days": 3}]}},
         r"missing key cohort.include\[0\].codes"),
        ({"inputs": {"max_studies": 0}}, r"inputs.max_studies must be an integer >= 1 \(found int 0\)"),
    ],
)
def test_malformed_task_names_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(CohortDefinitionError, match=message):
        task(**overrides)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        # Each passed parsing and then gave wrong labels (a NaN horizon: every event a positive) or
        # crashed on the data (an overflowing duration), or failed on a bare assert.
        ("horizon_days: .nan", r"horizon_days must be a finite number >= 1 and <= 73050 \(found float nan\)"),
        ("horizon_days:", r"horizon_days must be a number >= 1 \(found nothing\)"),
        ("horizon_days: 1000000000",
         r"horizon_days must be a finite number >= 1 and <= 73050 \(found int 1000000000\)"),
        ("horizon_days: 365\ncohort: {prediction_time: {fixed: 2020-01-01}, min_history_days: .inf}",
         r"cohort.min_history_days must be a finite number >= 0 and <= 73050 \(found float inf\)"),
        ("horizon_days: 365\ncohort: {prediction_time: {fixed: 2020-01-01}, exclude: [{codes: [ICD10CM//I21], "
         "window_days: 1.0e+12}]}", r"cohort.exclude\[0\].window_days must be a finite number >= 0 and <= 73050"),
        ("horizon_days: 365\ncohort: {prediction_time: {first_event: [SNOMED//1], offset_minutes: .nan}}",
         r"cohort.prediction_time.offset_minutes must be a finite number >= -1.05192e\+08 and <= 1.05192e\+08 "
         r"\(found float nan\)"),
        ("horizon_days: 365\ncohort: {prediction_time: {fixed: 2020-01-01}, max_age_years: .inf}",
         r"cohort.max_age_years must be a finite number >= 0 and <= 150 \(found float inf\)"),
        ("horizon_days: 365\nfollow_up_after_last_record: .nan",
         r"follow_up_after_last_record must be a number of days from 0 to 73050 or 'usual_interval' "
         r"\(found float nan\)"),
    ],
)
def test_numbers_a_task_file_spells_as_infinity_nan_or_nothing_are_refused_before_any_data(
        tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "toy.yaml"
    text = f"name: toy\noutcome: {{death: true}}\n{yaml_text}\n"
    if "cohort:" not in yaml_text:
        text += "cohort: {prediction_time: {fixed: 2020-01-01}}\n"
    path.write_text(text)
    with pytest.raises(CohortDefinitionError, match=rf"^task 'toy': {message}"):
        load_task(path)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("I50", r"'I50' has no vocabulary prefix \(expected like 'ICD10CM//I50'\)"),
        ("SNOMED//22298006 ", r"'SNOMED//22298006 ' has whitespace or no code after its vocabulary prefix "
                              r"\(expected like 'SNOMED//22298006'\)"),
        ("SNOMED//", r"'SNOMED//' has whitespace or no code after its vocabulary prefix \(expected like "
                     r"'SNOMED//I21.9'\)"),
        ("SNOMED 22298006", r"'SNOMED 22298006' has no vocabulary prefix \(expected like 'ICD10CM//I21.9'\)"),
    ],
)
def test_a_malformed_code_is_named_with_what_is_wrong(code: str, message: str) -> None:
    with pytest.raises(CohortDefinitionError, match=rf"^task 'toy': outcome.codes\[0\] {message}$"):
        task(outcome={"codes": [code]})


def test_treatment_washout_days() -> None:
    assert task().treatment.washout_days == 365.0
    for value in (0, 180, 90.5):
        definition = task(treatment={"codes": ["RXNORM//1"], "washout_days": value})
        assert definition.treatment.washout_days == float(value)
    assert load_task(REPO / "tasks" / "simulated_mace_1y.yaml").treatment.washout_days == 365.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, r"task 'toy': treatment.washout_days must be a number >= 0 \(found int -1\)"),
        ("a year", r"task 'toy': treatment.washout_days must be a number \(found str 'a year'\)"),
        (True, r"task 'toy': treatment.washout_days must be a number \(found bool True\)"),
        (None, r"task 'toy': treatment.washout_days must be a number >= 0 \(found nothing\)"),
    ],
)
def test_treatment_washout_days_rejects_other_values(value: object, message: str) -> None:
    with pytest.raises(CohortDefinitionError, match=message):
        task(treatment={"codes": ["RXNORM//1"], "washout_days": value})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_treatment_washout_days_must_be_finite(value: float) -> None:
    # A washout of .inf or .nan passed parsing and crashed build_labels (a duration in microseconds).
    message = (rf"task 'toy': treatment.washout_days must be a finite number >= 0 and <= 73050 "
               rf"\(found float {value!r}\)")
    if value < 0:  # caught by the minimum first
        message = r"task 'toy': treatment.washout_days must be a number >= 0 \(found float -inf\)"
    with pytest.raises(CohortDefinitionError, match=message):
        task(treatment={"codes": ["RXNORM//1"], "washout_days": value})


@pytest.mark.parametrize("spelling", [".inf", ".nan", ".Inf"])
def test_treatment_washout_days_yaml_infinity_is_rejected(tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "toy.yaml"
    path.write_text("name: toy\ncohort: {prediction_time: {fixed: 2020-01-01}}\noutcome: {death: true}\n"
                    f"horizon_days: 365\ntreatment: {{codes: [RXNORM//1], washout_days: {spelling}}}\n")
    found = "nan" if "nan" in spelling else "inf"
    expected = (rf"^task 'toy': treatment.washout_days must be a finite number >= 0 and <= 73050 "
                rf"\(found float {found}\)$")
    with pytest.raises(CohortDefinitionError, match=expected):
        load_task(path)


@pytest.mark.parametrize(
    ("horizon", "window", "found"),
    [(365, [0, 365], "list [0, 365]"), (30, [0, 30], "list [0, 30]"), (30, [10, 45.5], "list [10, 45.5]"),
     (365, [0, float("inf")], "list [0, inf]")],
)
def test_treatment_window_must_end_before_the_horizon(horizon: float, window: list[float], found: str) -> None:
    # A grace period reaching the horizon leaves only patients event-free at the horizon with an arm:
    # every one of them a negative, and the T-learner cannot fit.
    expected = (rf"^task 'toy': treatment.window_days must be \[start, end\] days with end < horizon_days "
                rf"\({horizon:g}\): patients with an arm are event-free through the grace period "
                rf"\(found {re.escape(found)}\)$")
    with pytest.raises(CohortDefinitionError, match=expected):
        task(horizon_days=horizon, treatment={"codes": ["RXNORM//1"], "window_days": window})


def test_treatment_window_just_before_the_horizon_is_accepted() -> None:
    definition = task(horizon_days=30, treatment={"codes": ["RXNORM//1"], "window_days": [0, 29.5]})
    assert definition.treatment is not None
    assert (definition.treatment.window_start_days, definition.treatment.window_end_days) == (0.0, 29.5)
    assert definition.horizon_days == 30.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (128, r"^task 'toy': inputs.value_bins must be an integer <= 127 \(value bins are stored as int8\) "
              r"\(found int 128\)$"),
        (200, r"^task 'toy': inputs.value_bins must be an integer <= 127 \(value bins are stored as int8\) "
              r"\(found int 200\)$"),
        (0, r"^task 'toy': inputs.value_bins must be an integer >= 1 and <= 127 \(found int 0\)$"),
        (5.0, r"^task 'toy': inputs.value_bins must be an integer >= 1 and <= 127 \(found float 5.0\)$"),
    ],
)
def test_value_bins_must_fit_int8(value: object, message: str) -> None:
    with pytest.raises(CohortDefinitionError, match=message):
        task(inputs={"value_bins": value})


def test_value_bins_up_to_127_are_accepted() -> None:
    assert task(inputs={"value_bins": 127}).inputs.value_bins == 127
    assert task(inputs={"value_bins": 1}).inputs.value_bins == 1


def test_input_caps_come_from_the_task_file() -> None:
    definition = task(inputs={"max_notes": 3, "max_studies": 2})
    assert (definition.inputs.max_notes, definition.inputs.max_studies) == (3, 2)
    assert task().inputs.max_studies == 8


def test_load_task_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(CohortDefinitionError, match="is not valid YAML at line"):
        load_task(path)
    with pytest.raises(CohortDefinitionError, match=r"missing.yaml does not exist \(expected the path of a task YAML"):
        load_task(tmp_path / "missing.yaml")
    with pytest.raises(CohortDefinitionError, match=r"is a folder \(expected the path of a task YAML file"):
        load_task(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(CohortDefinitionError, match=r"latin1.yaml cannot be read \(UnicodeDecodeError\)"):
        load_task(tmp_path / "latin1.yaml")


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    # YAML parsers keep the last copy: a second exclude rule would silently replace the first.
    text = (REPO / "tasks" / "simulated_mace_1y.yaml").read_text(encoding="utf-8")
    path = tmp_path / "simulated_mace_1y.yaml"
    path.write_text(text.replace("horizon_days: 365\n", "horizon_days: 365\nhorizon_days: 30\n", 1), encoding="utf-8")
    line = text[:text.index("horizon_days: 365")].count("\n") + 1
    with pytest.raises(CohortDefinitionError, match=re.escape(
            f"task file {path}: key 'horizon_days' is given twice (lines {line} and {line + 1}; expected each key "
            "once: the second would silently replace the first)")):
        load_task(path)


@pytest.mark.parametrize("written", ["20251231", "2025-W53-3", "2025-365"])
def test_a_date_in_another_iso_form_is_refused(written: str) -> None:
    # Python reads 20251231 as a midnight: an inclusive follow-up end would lose its last day.
    with pytest.raises(CohortDefinitionError, match=re.escape(
            f"follow_up_end must be a date or date-time like 2022-01-01 or 2022-01-01T00:00:00Z (found str "
            f"'{written}')")):
        task(follow_up_end=written)


def test_missing_name() -> None:
    with pytest.raises(CohortDefinitionError, match="name must be a string"):
        parse_task({"cohort": {}})


def test_publishing_settings_come_from_the_task_file_and_are_checked(tmp_path: Path) -> None:
    task = load_task(Path(__file__).resolve().parents[2] / "tasks" / "simulated_mace_1y.yaml")
    assert (task.publishing.high_share, task.publishing.medium_share) == (0.05, 0.15)
    assert (task.publishing.min_auroc, task.publishing.max_calibration_error) == (0.55, 0.1)
    bad = tmp_path / "toy.yaml"
    bad.write_text("name: toy\ncohort: {prediction_time: {fixed: 2020-01-01}}\noutcome: {death: true}\n"
                   "horizon_days: 365\npublishing: {high_share: 0.9, medium_share: 0.2}\n")
    with pytest.raises(CohortDefinitionError, match=r"task 'toy': publishing.high_share must be a share in \(0, 1\]"):
        load_task(bad)


def test_dates_without_an_offset_are_read_on_the_sites_calendar() -> None:
    fixed = task(cohort={"prediction_time": {"fixed": "2023-01-01T08:00:00"}}, follow_up_end="2025-12-31")
    assert fixed.site_clock == ("cohort.prediction_time.fixed", "follow_up_end")
    chicago = fixed.on_site_clock("America/Chicago")  # CST, UTC-6
    assert chicago.cohort.prediction_time.fixed == datetime(2023, 1, 1, 14)
    assert chicago.follow_up_end == datetime(2026, 1, 1, 5, 59, 59, 999999)  # the end of 31 December there
    assert chicago.site_clock == () and chicago.site_timezone == "America/Chicago"
    assert fixed.on_site_clock("UTC").follow_up_end == fixed.follow_up_end
    # An instant with an offset is read as given, whatever the site.
    window = task(cohort={"prediction_time": {"first_event": {"codes": ["SNOMED//1"], "on_or_after": "2023-01-01",
                                                              "before": "2024-01-01T00:00:00Z"}}})
    assert window.site_clock == ("cohort.prediction_time.first_event.on_or_after",)
    rule = window.on_site_clock("Asia/Tokyo").cohort.prediction_time
    assert (rule.on_or_after, rule.before) == (datetime(2022, 12, 31, 15), datetime(2024, 1, 1))


def test_task_dates_that_do_not_hold_on_the_sites_calendar_are_named() -> None:
    open_end = task(follow_up_end="9999-12-31")
    with pytest.raises(CohortDefinitionError, match=r"^task 'toy': follow_up_end 9999-12-31 is outside the dates a "
                                                    r"calendar can hold in the site's time zone America/Chicago"):
        open_end.on_site_clock("America/Chicago")
    assert open_end.on_site_clock("UTC").follow_up_end == datetime(9999, 12, 31, 23, 59, 59, 999999)
    # Valid as written (00:00 Chicago is 06:00 UTC), empty once read there.
    window = task(cohort={"prediction_time": {"first_event": {"codes": ["SNOMED//1"], "on_or_after": "2023-01-01",
                                                              "before": "2023-01-01T03:00:00Z"}}})
    with pytest.raises(CohortDefinitionError, match=re.escape(
            "task 'toy': cohort.prediction_time.first_event.before must be after on_or_after once read in the site's "
            "time zone America/Chicago (found 2023-01-01T06:00:00 and 2023-01-01T03:00:00 UTC)")):
        window.on_site_clock("America/Chicago")


def test_the_static_facts_limit_comes_from_the_task_file_within_max_events() -> None:
    assert task().inputs.max_static_events is None  # half of max_events, in the tokenizer
    assert task(inputs={"max_events": 64, "max_static_events": 64}).inputs.max_static_events == 64
    assert task(inputs={"max_static_events": 0}).inputs.max_static_events == 0
    with pytest.raises(CohortDefinitionError, match=r"^task 'toy': inputs.max_static_events must be an integer <= 64 "
                                                    r"\(inputs.max_events\) \(found int 65\)$"):
        task(inputs={"max_events": 64, "max_static_events": 65})
