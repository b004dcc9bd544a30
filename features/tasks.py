"""Task definitions: what to predict, for whom, and when, as written by researchers in YAML.

Stage: tasks. In: a task YAML file. Out: a frozen :class:`TaskDefinition` (cohort rules, prediction
time rule, outcome, horizon, optional treatment, split fractions and model-input settings). A
malformed file raises :class:`~features.errors.CohortDefinitionError` naming the key, what was
expected and what was found.

A task file looks like this (every key but ``name``, ``cohort.prediction_time``, ``outcome`` and
``horizon_days`` is optional)::

    name: simulated_mace_1y
    description: Major adverse cardiovascular event within a year of a consultation.
    cohort:
      prediction_time:
        first_event:                      # or: fixed: 2020-01-01T00:00:00
          codes: [SNOMED//11429006]
          on_or_after: 2022-01-01
          before: 2024-07-01
        offset_minutes: 45                # predict at the end of the visit
      min_age_years: 18
      max_age_years: 100
      sex: [female, male]
      min_history_days: 0                 # first record at least this long before prediction
      include:                            # every rule must match (codes seen in the window)
        - codes: [SNOMED//59621000]
          window_days: 1825               # look-back; omit for "any time before"
      exclude:                            # any rule matching excludes the patient
        - codes: [SNOMED//22298006]
    outcome:
      codes: [SNOMED//22298006, ICD10CM//I21.9]
      death: true
    horizon_days: 365
    follow_up_end: 2025-12-31             # the data's cut-off (export date), a date includes its day; optional
    follow_up_after_last_record: usual_interval   # or days; 0 ends follow-up at the last record
    treatment:
      codes: [RXNORM//309362]
      window_days: [0, 30]                # grace period in which starting counts (features.labels); end < horizon_days
      washout_days: 365                   # a code this long before (or at) the prediction time: not a new user
    splits: {train: 0.7, tuning: 0.15, held_out: 0.15, seed: 0}
    inputs: {max_events: 512, value_bins: 5, min_code_count: 5, tabular_codes: 200}
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from features.errors import CohortDefinitionError
from features.fhir.validate import as_utc
from features.schemas import MAX_VALUE_BINS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VOCABULARY = r"[A-Za-z][A-Za-z0-9_-]*"
_CODE = re.compile(rf"^{_VOCABULARY}//\S+$")
_PREFIX = re.compile(rf"^{_VOCABULARY}$")
ISO_DATE_START = re.compile(r"\d{4}-\d{2}-\d{2}(?:$|[T ])")
MAX_AGE_YEARS = 150.0
MAX_DAYS = 73_050.0
"""The longest span in days a task may name (200 years): longer is a typo, and overflows time arithmetic."""
SEXES = ("female", "male", "other", "unknown")
USUAL_INTERVAL = "usual_interval"
"""``follow_up_after_last_record`` value: each patient's own usual interval between record days."""


@dataclass(frozen=True)
class CodeRule:
    """A set of codes seen in a look-back window before the prediction time."""

    # Vocabulary-prefixed codes (``ICD10CM//I21.9``); any one of them matches.
    codes: tuple[str, ...]
    # Days before the prediction time that count; None means any time before it.
    window_days: float | None = None


@dataclass(frozen=True)
class PredictionTimeRule:
    """When the prediction is made for each patient."""

    # The first event with one of these codes in [on_or_after, before) is the index event ...
    codes: tuple[str, ...] = ()
    on_or_after: datetime | None = None
    before: datetime | None = None
    # ... or, instead, one calendar instant for every patient.
    fixed: datetime | None = None
    # Added to the index event's time: an encounter is coded at its start, and a prediction made
    # at the end of the visit may use the visit's own results.
    offset: timedelta = timedelta(0)


@dataclass(frozen=True)
class CohortDefinition:
    """Who is in the cohort and when they enter it."""

    prediction_time: PredictionTimeRule
    # Age at the prediction time, in years (features.cohorts.age_years); None means no limit.
    min_age_years: float | None = None
    max_age_years: float | None = None
    # Administrative sexes allowed; empty means all.
    sex: tuple[str, ...] = ()
    # Days between the patient's first timed record and the prediction time: a minimum history
    # keeps patients whose record starts at the index visit (no baseline) out of the cohort.
    min_history_days: float = 0.0
    # Every inclusion rule must match; any exclusion rule matching removes the patient.
    include: tuple[CodeRule, ...] = ()
    exclude: tuple[CodeRule, ...] = ()


@dataclass(frozen=True)
class OutcomeDefinition:
    """What counts as the event."""

    # First of these codes strictly after the prediction time is the event.
    codes: tuple[str, ...] = ()
    # Death (``MEDS_DEATH``) is also the event; when false, death censors follow-up.
    death: bool = False


@dataclass(frozen=True)
class TreatmentDefinition:
    """Which treatment, started when, flags a patient as treated (a new-user design, see
    :mod:`features.labels`)."""

    codes: tuple[str, ...]
    # [start, end] days after the prediction time: the grace period in which starting counts (a code
    # strictly after the prediction time, at least start and at most end days after it). Only
    # patients followed event-free and observed (a record) beyond its end get an arm. end is less
    # than the task's horizon_days: a patient with an arm is then event-free at the horizon only
    # when the data say so, not by construction.
    window_start_days: float = 0.0
    window_end_days: float = 30.0
    # Finite days before the prediction time in which any treatment code, one at the prediction time
    # included (it is known then: a model input), makes the patient a prevalent user (no arm): a
    # refill in the window is not a start. 0 leaves out only a code at the prediction time itself.
    washout_days: float = 365.0


@dataclass(frozen=True)
class SplitFractions:
    """Shares of patients in each split, and the seed of the per-patient assignment."""

    train: float = 0.7
    tuning: float = 0.15
    held_out: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class InputSettings:
    """How model inputs are built from the events before the prediction time."""

    # Longest event-token sequence per patient: static facts first, then the most recent timed
    # events.
    max_events: int = 512
    # Most static facts (sex, genotypes, expression values) per patient; None: half of max_events.
    # A wide expression panel would otherwise leave no room for the timed events.
    max_static_events: int | None = None
    # Quantile bins per numeric code, learned on the train split.
    value_bins: int = 5
    # Codes seen in fewer train patients than this become unknown (and are dropped).
    min_code_count: int = 5
    # Most frequent train codes that get tabular columns (count, last value, time since).
    tabular_codes: int = 200
    # Most recent notes per patient that are embedded and read by the model: a long stay can
    # bring hundreds of notes, and embedding is the costliest step of building the inputs.
    max_notes: int = 16
    # Most recent imaging studies per patient that the model reads: follow-up imaging repeats the
    # same views, and the latest studies carry the current state.
    max_studies: int = 8


@dataclass(frozen=True)
class PublishingSettings:
    """Who is flagged, and the model quality a publication needs."""

    # Tiers by rank of risk: the top high_share of the cohort is high, the next medium_share medium.
    high_share: float = 0.05
    medium_share: float = 0.15
    # Held-out quality gates: below them the cohort is not published and the last version stays live.
    min_auroc: float = 0.6
    max_calibration_error: float = 0.1


@dataclass(frozen=True)
class TaskDefinition:
    """One prediction task: the cohort, the outcome, the horizon and optionally a treatment."""

    name: str
    cohort: CohortDefinition
    outcome: OutcomeDefinition
    # Risk label: event within this many days after the prediction time.
    horizon_days: float
    description: str = ""
    # End of the data (export date): follow-up never runs past it.
    follow_up_end: datetime | None = None
    # How long a patient without the outcome counts as followed after their last record: days, or
    # USUAL_INTERVAL (see features.labels). Records only prove presence on the days they exist, and
    # the outcome always leaves one, so ending follow-up at the last record over-states the risk.
    follow_up_after_last_record: float | str = USUAL_INTERVAL
    treatment: TreatmentDefinition | None = None
    splits: SplitFractions = field(default_factory=SplitFractions)
    inputs: InputSettings = field(default_factory=InputSettings)
    publishing: PublishingSettings = field(default_factory=PublishingSettings)
    # The keys of the instants above written without an offset (a date, or a date-time with no
    # zone): days and wall-clock times on the site's calendar, held as UTC until on_site_clock.
    site_clock: tuple[str, ...] = ()
    # The site's time zone (IANA) the instants were read in, and the cohort and labels count
    # calendar days in (a date-only record's day).
    site_timezone: str = "UTC"

    def prediction_target(self) -> dict[str, Any]:
        """What a model of this task predicts, as JSON: the outcome, the horizon and the treatment
        whose effect it estimates. A model trained for other values answers another question (its
        risks are of another event, or by another day), so scoring and publishing compare them."""
        treatment = self.treatment
        return {
            "outcome_codes": sorted(self.outcome.codes),
            "outcome_death": self.outcome.death,
            "horizon_days": float(self.horizon_days),
            "treatment": None if treatment is None else {
                "codes": sorted(treatment.codes),
                "window_days": [float(treatment.window_start_days), float(treatment.window_end_days)],
                "washout_days": float(treatment.washout_days),
            },
        }

    def on_site_clock(self, zone: str) -> TaskDefinition:
        """The task with its instants written without an offset read in the site's time zone
        (``zone``, IANA), as the warehouse's dates are: ``follow_up_end: 2025-12-31`` then keeps
        the records of 31 December on the site's calendar, not only those before its end in UTC.

        Raises
        ------
        CohortDefinitionError
            When an instant falls outside years 1 to 9999 in UTC there, or the index window is
            empty once read there.
        """
        if zone == "UTC" or not self.site_clock:
            return replace(self, site_clock=(), site_timezone=zone)

        def read(key: str, value: datetime | None, last: bool = False) -> datetime | None:
            written = next((name for name in self.site_clock if name.endswith(key)), None)
            if value is None or written is None:
                return value
            try:
                return as_utc(value, zone, last_occurrence=last)
            except OverflowError:
                raise CohortDefinitionError(
                    f"task '{self.name}': {written} {value:%Y-%m-%d} is outside the dates a calendar can hold in the "
                    f"site's time zone {zone} (years 1 to 9999 in UTC); leave it out for no limit") from None

        rule = self.cohort.prediction_time
        rule = replace(rule, on_or_after=read(".on_or_after", rule.on_or_after), before=read(".before", rule.before),
                       fixed=read(".fixed", rule.fixed))
        if rule.on_or_after is not None and rule.before is not None and rule.on_or_after >= rule.before:
            raise CohortDefinitionError(
                f"task '{self.name}': cohort.prediction_time.first_event.before must be after on_or_after once read "
                f"in the site's time zone {zone} (found {rule.on_or_after.isoformat()} and {rule.before.isoformat()} "
                "UTC)")
        return replace(self, cohort=replace(self.cohort, prediction_time=rule), site_clock=(), site_timezone=zone,
                       follow_up_end=read("follow_up_end", self.follow_up_end, last=True))


# --------------------------------------------------------------------------------------------
# Parsing, with errors that name the key
# --------------------------------------------------------------------------------------------


class _Reader:
    """Reads one mapping of the YAML file; every error names the task and the full key."""

    def __init__(self, task: str, key: str, value: Any, site_clock: list[str] | None = None) -> None:
        self.task, self.key = task, key
        if not isinstance(value, dict):
            self.fail(key, "a mapping", value)
        self.value: dict[str, Any] = value
        # The keys of instants read without an offset, shared by every reader of one file.
        self.site_clock: list[str] = [] if site_clock is None else site_clock

    def fail(self, key: str, expected: str, found: Any) -> None:
        raise CohortDefinitionError(
            f"task '{self.task}': {key} must be {expected} (found {_describe(found)})"
        )

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def check_keys(self, allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> None:
        for name in self.value:
            if name not in allowed:
                raise CohortDefinitionError(
                    f"task '{self.task}': unknown key {self.path(str(name))} "
                    f"(expected one of {', '.join(sorted(allowed))})"
                )
        for name in sorted(required):
            if name not in self.value:
                raise CohortDefinitionError(f"task '{self.task}': missing key {self.path(name)}")

    def child(self, name: str) -> _Reader:
        return _Reader(self.task, self.path(name), self.value.get(name), self.site_clock)

    def number(self, name: str, default: float | None, minimum: float | None = None,
               maximum: float | None = None, required: bool = False) -> float | None:
        """A finite number within [``minimum``, ``maximum``]; None when absent and not ``required``."""
        value = self.value.get(name, default)
        at_least = f" >= {minimum:g}" if minimum is not None else ""
        if value is None:
            if required:
                self.fail(self.path(name), f"a number{at_least}", value)
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(self.path(name), "a number", value)
        if minimum is not None and value < minimum:
            self.fail(self.path(name), f"a number{at_least}", value)
        # YAML spells infinity and NaN (.inf, .nan); as days they overflow or compare true to everything.
        if not math.isfinite(value) or (maximum is not None and value > maximum):
            self.fail(self.path(name), f"a finite number{at_least}"
                      + (f" and <= {maximum:g}" if maximum is not None else ""), value)
        return float(value)

    def integer(self, name: str, default: int, minimum: int, maximum: tuple[int, str] | None = None) -> int:
        """An integer >= ``minimum``; ``maximum`` is the largest value allowed and why."""
        value = self.value.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(self.path(name), f"an integer >= {minimum}"
                      + (f" and <= {maximum[0]}" if maximum is not None else ""), value)
        if maximum is not None and value > maximum[0]:
            self.fail(self.path(name), f"an integer <= {maximum[0]} ({maximum[1]})", value)
        return int(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.value.get(name, default)
        if not isinstance(value, bool):
            self.fail(self.path(name), "true or false", value)
        return bool(value)

    def string(self, name: str, default: str) -> str:
        value = self.value.get(name, default)
        if not isinstance(value, str):
            self.fail(self.path(name), "a string", value)
        return str(value)

    def instant(self, name: str, whole_day: bool = False) -> datetime | None:
        """A date or date-time as naive UTC. A bare date is its first instant, or with ``whole_day``
        its last (an inclusive end: ``follow_up_end: 2025-12-31`` keeps that day's records). One
        without an offset is noted in ``site_clock`` (:meth:`TaskDefinition.on_site_clock`)."""
        value = self.value.get(name)
        if value is None:
            return None
        # Only the extended form (2025-12-31, 2025-12-31T09:00): Python also reads 20251231, as a
        # midnight, which would drop an inclusive end's last day.
        if isinstance(value, str) and ISO_DATE_START.match(value):
            with contextlib.suppress(ValueError):  # not ISO: reported below with what was found
                value = date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
        if isinstance(value, datetime):
            if value.tzinfo is not None:
                return _to_naive_utc(value)
            self.site_clock.append(self.path(name))
            return value
        if isinstance(value, date):
            self.site_clock.append(self.path(name))
            start = datetime(value.year, value.month, value.day)
            return start + timedelta(days=1, microseconds=-1) if whole_day else start
        self.fail(self.path(name), "a date or date-time like 2022-01-01 or 2022-01-01T00:00:00Z", value)
        return None  # unreachable

    def codes(self, name: str, required: bool) -> tuple[str, ...]:
        value = self.value.get(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or (required and not value):
            self.fail(self.path(name), "a non-empty list of codes like 'ICD10CM//I21.9'", value)
        assert isinstance(value, list)
        for i, code in enumerate(value):
            if not isinstance(code, str):
                self.fail(f"{self.path(name)}[{i}]", "a code string like 'ICD10CM//I21.9'", code)
            if not _CODE.match(code):
                prefix, separator, rest = code.partition("//")
                if separator and _PREFIX.match(prefix):
                    problem = "has whitespace or no code after its vocabulary prefix"
                    example = f"{prefix}//{''.join(rest.split()) or 'I21.9'}"
                else:
                    problem = "has no vocabulary prefix"
                    example = f"ICD10CM//{code if code and not any(c.isspace() for c in code) else 'I21.9'}"
                raise CohortDefinitionError(
                    f"task '{self.task}': {self.path(name)}[{i}] '{code}' {problem} (expected like '{example}')")
        return tuple(value)


def _to_naive_utc(value: datetime) -> datetime:
    offset = value.utcoffset() or timedelta(0)
    return (value - offset).replace(tzinfo=None)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _code_rules(reader: _Reader, name: str) -> tuple[CodeRule, ...]:
    value = reader.value.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        reader.fail(reader.path(name), "a list of rules, each with codes and optionally window_days", value)
    rules = []
    for i, item in enumerate(value):
        rule = _Reader(reader.task, f"{reader.path(name)}[{i}]", item, reader.site_clock)
        rule.check_keys({"codes", "window_days"}, {"codes"})
        rules.append(CodeRule(rule.codes("codes", True), rule.number("window_days", None, 0.0, MAX_DAYS)))
    return tuple(rules)


def _prediction_time(reader: _Reader) -> PredictionTimeRule:
    reader.check_keys({"first_event", "fixed", "offset_minutes"})
    offset = timedelta(minutes=reader.number("offset_minutes", 0.0, -MAX_DAYS * 1440, MAX_DAYS * 1440) or 0.0)
    has_first, has_fixed = "first_event" in reader.value, "fixed" in reader.value
    if has_first == has_fixed:
        raise CohortDefinitionError(
            f"task '{reader.task}': {reader.key} must have exactly one of first_event or fixed "
            f"(found {'both' if has_first else 'neither'})"
        )
    if has_fixed:
        fixed = reader.instant("fixed")
        if fixed is None:
            reader.fail(reader.path("fixed"), "a date or date-time", None)
        return PredictionTimeRule(fixed=fixed, offset=offset)
    first = reader.child("first_event")
    first.check_keys({"codes", "on_or_after", "before"}, {"codes"})
    start, end = first.instant("on_or_after"), first.instant("before")
    if start is not None and end is not None and not start < end:
        raise CohortDefinitionError(
            f"task '{reader.task}': {first.key}.before must be after on_or_after "
            f"(found {start.isoformat()} and {end.isoformat()})"
        )
    return PredictionTimeRule(codes=first.codes("codes", True), on_or_after=start, before=end, offset=offset)


def parse_task(raw: Any, source: str = "<task>") -> TaskDefinition:
    """Build a :class:`TaskDefinition` from the parsed YAML mapping ``raw``.

    Raises
    ------
    CohortDefinitionError
        Naming the first key that is missing, unknown or of the wrong kind.

    Examples
    --------
    >>> task = parse_task({"name": "t", "cohort": {"prediction_time": {"fixed": "2020-01-01"}},
    ...                    "outcome": {"death": True}, "horizon_days": 365})
    >>> task.cohort.prediction_time.fixed, task.outcome.death, task.treatment
    (datetime.datetime(2020, 1, 1, 0, 0), True, None)
    """
    if not isinstance(raw, dict):
        raise CohortDefinitionError(f"task file {source} must hold a mapping (found {_describe(raw)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CohortDefinitionError(
            f"task file {source}: name must be a string of letters, digits, '_', '.' or '-' "
            f"(found {_describe(name)})"
        )
    top = _Reader(name, "", raw)
    top.check_keys(
        {"name", "description", "cohort", "outcome", "horizon_days", "follow_up_end",
         "follow_up_after_last_record", "treatment", "splits", "inputs", "publishing"},
        {"cohort", "outcome", "horizon_days"},
    )

    cohort = top.child("cohort")
    cohort.check_keys({"prediction_time", "min_age_years", "max_age_years", "sex", "min_history_days",
                       "include", "exclude"}, {"prediction_time"})
    sexes = cohort.value.get("sex", [])
    if isinstance(sexes, str):
        sexes = [sexes]
    if not isinstance(sexes, list) or any(s not in SEXES for s in sexes):
        cohort.fail("cohort.sex", f"a list drawn from {', '.join(SEXES)}", cohort.value.get("sex"))
    min_age = cohort.number("min_age_years", None, 0.0, MAX_AGE_YEARS)
    max_age = cohort.number("max_age_years", None, 0.0, MAX_AGE_YEARS)
    if min_age is not None and max_age is not None and max_age < min_age:
        cohort.fail("cohort.max_age_years", f"at least min_age_years ({min_age:g})", max_age)
    cohort_definition = CohortDefinition(
        prediction_time=_prediction_time(cohort.child("prediction_time")),
        min_age_years=min_age,
        max_age_years=max_age,
        sex=tuple(sexes),
        min_history_days=cohort.number("min_history_days", 0.0, 0.0, MAX_DAYS) or 0.0,
        include=_code_rules(cohort, "include"),
        exclude=_code_rules(cohort, "exclude"),
    )

    outcome = top.child("outcome")
    outcome.check_keys({"codes", "death"})
    outcome_definition = OutcomeDefinition(outcome.codes("codes", False), outcome.boolean("death", False))
    if not outcome_definition.codes and not outcome_definition.death:
        raise CohortDefinitionError(
            f"task '{name}': outcome must list codes or set death: true (found neither)"
        )

    horizon = float(top.number("horizon_days", None, 1.0, MAX_DAYS, required=True) or 0.0)
    after_last = raw.get("follow_up_after_last_record", USUAL_INTERVAL)
    if after_last != USUAL_INTERVAL and (isinstance(after_last, bool) or not isinstance(after_last, (int, float))
                                         or not 0 <= after_last <= MAX_DAYS):
        top.fail("follow_up_after_last_record", f"a number of days from 0 to {MAX_DAYS:g} or '{USUAL_INTERVAL}'",
                 after_last)

    treatment_definition = None
    if raw.get("treatment") is not None:
        treatment = top.child("treatment")
        treatment.check_keys({"codes", "window_days", "washout_days"}, {"codes"})
        window = treatment.value.get("window_days", [0, 30])
        if (not isinstance(window, list) or len(window) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in window)
                or not 0 <= window[0] <= window[1]):
            treatment.fail("treatment.window_days", "[start, end] days with 0 <= start <= end", window)
        if window[1] >= horizon:
            # Every patient with an arm is followed event-free through the grace period: with an end
            # at or past the horizon, they are all negatives and the arms compare nothing.
            treatment.fail("treatment.window_days",
                           f"[start, end] days with end < horizon_days ({horizon:g}): patients with an arm are "
                           "event-free through the grace period", window)
        # An explicit null is refused: the default is spelled out, never guessed.
        washout = treatment.number("washout_days", TreatmentDefinition.washout_days, 0.0, MAX_DAYS, required=True)
        treatment_definition = TreatmentDefinition(
            treatment.codes("codes", True), float(window[0]), float(window[1]), float(washout or 0.0)
        )

    splits = SplitFractions()
    if raw.get("splits") is not None:
        s = top.child("splits")
        s.check_keys({"train", "tuning", "held_out", "seed"})
        shares = {k: s.number(k, getattr(splits, k), 0.0) for k in ("train", "tuning", "held_out")}
        if abs(sum(v or 0.0 for v in shares.values()) - 1.0) > 1e-6:
            s.fail("splits", "train + tuning + held_out = 1", sum(v or 0.0 for v in shares.values()))
        if not shares["train"]:
            s.fail("splits.train", "a share > 0 (the vocabulary is learned on train)", shares["train"])
        splits = SplitFractions(
            float(shares["train"] or 0.0), float(shares["tuning"] or 0.0), float(shares["held_out"] or 0.0),
            s.integer("seed", 0, 0),
        )

    inputs = InputSettings()
    if raw.get("inputs") is not None:
        i = top.child("inputs")
        i.check_keys({"max_events", "max_static_events", "value_bins", "min_code_count", "tabular_codes", "max_notes",
                      "max_studies"})
        max_events = i.integer("max_events", inputs.max_events, 1)
        inputs = InputSettings(
            max_events=max_events,
            max_static_events=(None if i.value.get("max_static_events") is None else
                               i.integer("max_static_events", 0, 0, (max_events, "inputs.max_events"))),
            value_bins=i.integer("value_bins", inputs.value_bins, 1,
                                 (MAX_VALUE_BINS, "value bins are stored as int8")),
            min_code_count=i.integer("min_code_count", inputs.min_code_count, 1),
            tabular_codes=i.integer("tabular_codes", inputs.tabular_codes, 0),
            max_notes=i.integer("max_notes", inputs.max_notes, 1),
            max_studies=i.integer("max_studies", inputs.max_studies, 1),
        )

    publishing = PublishingSettings()
    if raw.get("publishing") is not None:
        pub = top.child("publishing")
        pub.check_keys({"high_share", "medium_share", "min_auroc", "max_calibration_error"})
        publishing = PublishingSettings(
            high_share=float(pub.number("high_share", publishing.high_share, 0.0) or 0.0),
            medium_share=float(pub.number("medium_share", publishing.medium_share, 0.0) or 0.0),
            min_auroc=float(pub.number("min_auroc", publishing.min_auroc, 0.0) or 0.0),
            max_calibration_error=float(pub.number("max_calibration_error", publishing.max_calibration_error, 0.0)
                                        or 0.0),
        )
        if not 0 < publishing.high_share <= 1 or publishing.high_share + publishing.medium_share > 1:
            pub.fail("publishing.high_share", "a share in (0, 1] with high_share + medium_share <= 1",
                     publishing.high_share)
        if publishing.min_auroc > 1:
            pub.fail("publishing.min_auroc", "an AUROC between 0 and 1", publishing.min_auroc)

    return TaskDefinition(
        name=name,
        description=top.string("description", ""),
        cohort=cohort_definition,
        outcome=outcome_definition,
        horizon_days=horizon,
        follow_up_end=top.instant("follow_up_end", whole_day=True),
        follow_up_after_last_record=after_last if after_last == USUAL_INTERVAL else float(after_last),
        treatment=treatment_definition,
        splits=splits,
        inputs=inputs,
        publishing=publishing,
        site_clock=tuple(top.site_clock),
    )


class _RepeatedKey(yaml.YAMLError):  # type: ignore[misc]
    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(f"key {key!r} is given twice")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML's safe loader, refusing a mapping that gives a key twice: PyYAML keeps the last, so a
    second ``exclude:`` would silently replace the first rule."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable):
                if key in lines:
                    raise _RepeatedKey(key, lines[key], line)
                lines[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load_task(path: Path) -> TaskDefinition:
    """Read and validate one task YAML file.

    Raises
    ------
    CohortDefinitionError
        When the file is missing, is not YAML, or any key is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CohortDefinitionError(f"task file {path} does not exist (expected the path of a task YAML file, "
                                    "like tasks/simulated_mace_1y.yaml)") from None
    except IsADirectoryError:
        raise CohortDefinitionError(f"task file {path} is a folder (expected the path of a task YAML file, "
                                    "like tasks/simulated_mace_1y.yaml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CohortDefinitionError(f"task file {path} cannot be read ({exc.__class__.__name__})") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _RepeatedKey as exc:
        raise CohortDefinitionError(f"task file {path}: key {exc.key!r} is given twice (lines {exc.first} and "
                                    f"{exc.second}; expected each key once: the second would silently replace "
                                    "the first)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CohortDefinitionError(f"task file {path} is not valid YAML{where}") from exc
    return parse_task(raw, str(path))
