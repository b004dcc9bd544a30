"""Cohort selection: who is in a task's cohort and when each patient's prediction is made.

Stage: tasks. In: the ``events`` table (MEDS form, :data:`features.schemas.EVENTS`) and a
:class:`~features.tasks.TaskDefinition`. Out: the ``cohort`` table (:data:`features.schemas.COHORT`,
one row per patient with its ``prediction_time``) and the attrition: how many patients each rule
removed, in order, so that nobody leaves the cohort without being counted.

A patient enters a cohort when the index event is in the record, and the rules that admit a patient
(an inclusion rule, the minimum history) read only what was recorded by the prediction time: an
event counts from its ``known_time`` where it has one (a diagnosis recorded days after its onset),
else from its ``time``. Exclusion rules read when things happened, recorded later or not: they keep
labels clean (a heart attack the week before the visit, entered after it, would otherwise be coded
again and counted as a new outcome), as a retrospective study's washout does. Look-back windows
read when things happened. Death before the prediction time excludes whenever it was recorded (a
dead patient cannot be predicted for).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time as dt_time

import polars as pl

from features.fhir.columnar import site_date_start
from features.tasks import CodeRule, TaskDefinition

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
SEX_PREFIX = "SEX//"


@dataclass(frozen=True)
class CohortSelection:
    """The cohort and the patients each rule removed."""

    # Columns of :data:`features.schemas.COHORT`, sorted by subject_id.
    cohort: pl.DataFrame
    # (rule, patients remaining after it), starting with ("patients in events", n).
    attrition: tuple[tuple[str, int], ...]


LAST_INSTANT_OF_DAY = dt_time(23, 59, 59, 999_999)
"""Where ingest puts a date without a time of day, on the site's clock (features.fhir.validate.parse_datetime)."""


def site_clock(time: pl.Expr, zone: str) -> pl.Expr:
    """Naive UTC times as wall-clock times in ``zone`` (IANA), aware."""
    return time.dt.replace_time_zone("UTC").dt.convert_time_zone(zone)


def site_day_start(time: pl.Expr, zone: str) -> pl.Expr:
    """The first instant (naive UTC) of the day on the site's calendar that holds each naive UTC time."""
    return site_date_start(site_clock(time, zone).dt.date(), zone)


def age_years(birth_time: pl.Expr, prediction_time: pl.Expr, zone: str = "UTC") -> pl.Expr:
    """Age at the prediction time as people count it: the birthdays passed on the site's calendar
    (``zone``), plus the share of the year since the last one. A patient is 18 from the first
    instant of their 18th birthday (a 365.25-day year put some a few hours short on the day); one
    born on 29 February has their birthday on the 28th in other years.

    ``birth_time``: ``MEDS_BIRTH``'s time, the first instant of the birth date on the site's
    calendar (naive UTC); ``prediction_time``: naive UTC.
    """
    born = site_clock(birth_time, zone).dt.date()
    local = site_clock(prediction_time, zone).dt.replace_time_zone(None)
    years = local.dt.year() - born.dt.year()

    def birthday(after_years: pl.Expr) -> pl.Expr:
        return born.dt.offset_by(after_years.cast(pl.String) + "y").cast(pl.Datetime("us"))

    completed = pl.when(birthday(years) > local).then(years - 1).otherwise(years)
    last, following = birthday(completed), birthday(completed + 1)
    return completed + (local - last).dt.total_microseconds() / (following - last).dt.total_microseconds()


def happened_by(time: pl.Expr, prediction_time: pl.Expr, zone: str = "UTC") -> pl.Expr:
    """Whether an event may have happened by the prediction time: at or before it, or, for a date
    without a time of day (stored as the last microsecond of its day on the site's calendar,
    ``zone``, so that no input is read before its day is over), on a day that began before it.

    Exclusion rules and treatment history read it: a diagnosis or a prescription recorded only as
    the index visit's date may have come before the visit (the MI the patient came in for), so it is
    history, not an outcome or a new start that day. A prediction time at midnight (a fixed date)
    precedes all of its day, so that day's records stay after it.
    """
    if zone == "UTC":
        date_only, day_start = time.dt.time() == LAST_INSTANT_OF_DAY, time.dt.truncate("1d")
    else:
        date_only, day_start = site_clock(time, zone).dt.time() == LAST_INSTANT_OF_DAY, site_day_start(time, zone)
    return (time <= prediction_time) | (date_only & (day_start < prediction_time))


def as_frame(events: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Accept events eagerly or lazily; the selection runs lazily either way."""
    return events.lazy() if isinstance(events, pl.DataFrame) else events


def with_known_time(events: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """The events, lazily, with ``known_at``: when each became known (its ``known_time`` where it
    has one, else its ``time``; null for static facts).

    Raises
    ------
    ValueError
        When the table has no ``known_time`` column (a warehouse ingested by an older version).
    """
    frame = as_frame(events)
    if "known_time" not in frame.collect_schema().names():
        raise ValueError(
            "events table has no known_time column (expected the events of a warehouse ingested by this version "
            "of cohortcast: ingest the landing zone again)"
        )
    return frame.with_columns(pl.coalesce("known_time", "time").alias("known_at"))


def _rule_matches(events: pl.LazyFrame, cohort: pl.LazyFrame, rule: CodeRule, by: str,
                  zone: str = "UTC") -> pl.LazyFrame:
    """Subject ids whose record has one of the rule's codes in its window before prediction time,
    the event counted from its column ``by`` (``known_at`` or ``time``; the window reads ``time``).

    Static facts (null time) are known at any prediction time, so they match any window.
    """
    hits = events.filter(pl.col("code").is_in(list(rule.codes))).join(
        cohort.select("subject_id", "prediction_time"), on="subject_id"
    )
    # An exclusion reads when the event may have happened: a date-only one on the index day counts.
    before = (happened_by(pl.col("time"), pl.col("prediction_time"), zone) if by == "time"
              else pl.col(by) <= pl.col("prediction_time"))
    in_window = pl.col("time").is_null() | before
    if rule.window_days is not None:
        in_window = pl.col("time").is_null() | (
            before
            & (pl.col("time") >= pl.col("prediction_time")
               - pl.duration(microseconds=_microseconds(rule.window_days * 86_400)))
        )
    return hits.filter(in_window).select("subject_id").unique()


def prediction_times(events: pl.DataFrame | pl.LazyFrame, task: TaskDefinition) -> pl.DataFrame:
    """Return ``subject_id, prediction_time`` for every patient the prediction-time rule places.

    With ``first_event`` it is the first time one of the codes became known, in ``[on_or_after,
    before)``, plus the offset; with ``fixed`` it is that instant for every patient with a timed record.
    """
    lazy = with_known_time(events)
    rule = task.cohort.prediction_time
    if rule.fixed is not None:
        placed = lazy.filter(pl.col("time").is_not_null()).select("subject_id").unique().with_columns(
            pl.lit(rule.fixed + rule.offset).cast(pl.Datetime("us")).alias("prediction_time")
        )
    else:
        index = lazy.filter(pl.col("code").is_in(list(rule.codes)) & pl.col("time").is_not_null())
        if rule.on_or_after is not None:
            index = index.filter(pl.col("known_at") >= rule.on_or_after)
        if rule.before is not None:
            index = index.filter(pl.col("known_at") < rule.before)
        placed = index.group_by("subject_id").agg(
            (pl.col("known_at").min() + pl.duration(microseconds=_microseconds(rule.offset.total_seconds())))
            .alias("prediction_time")
        )
    return placed.sort("subject_id").collect()


def select_cohort(events: pl.DataFrame | pl.LazyFrame, task: TaskDefinition) -> CohortSelection:
    """Apply a task's cohort rules to the events table.

    Parameters
    ----------
    events
        The ``events`` table (:data:`features.schemas.EVENTS`), eager or lazy.
    task
        The task whose ``cohort`` rules to apply.

    Returns
    -------
    CohortSelection
        The cohort (:data:`features.schemas.COHORT`) and the attrition counts, rule by rule.
    """
    lazy = with_known_time(events)
    definition = task.cohort
    n_patients = lazy.select(pl.col("subject_id").n_unique()).collect().item()
    attrition: list[tuple[str, int]] = [("patients in events", int(n_patients))]

    cohort = prediction_times(lazy, task)
    attrition.append(("prediction time placed", cohort.height))
    # A prediction time at or after the data's cut-off (the task's follow_up_end; without one, the
    # latest record, as the labels read it) leaves nothing to follow up.
    data_end = task.follow_up_end or lazy.select(pl.col("time").max()).collect().item()
    if data_end is not None:
        cohort = cohort.filter(pl.col("prediction_time") < data_end)
        attrition.append(("prediction time before follow-up end", cohort.height))

    # Patients who died at or before the prediction time have nothing to predict. A patient recorded
    # as deceased without a date (a death event without a time) cannot be placed after any
    # prediction time, nor given a label: excluded too, so no dead patient is ever scored.
    deaths = (lazy.filter(pl.col("code") == DEATH_CODE).group_by("subject_id")
              .agg(pl.col("time").min().alias("death_time")).collect())
    cohort = cohort.join(deaths, on="subject_id", how="left").filter(
        (pl.col("death_time") > pl.col("prediction_time")).fill_null(True) & pl.col("subject_id").is_in(
            deaths.filter(pl.col("death_time").is_null())["subject_id"].implode()
        ).not_()
    ).drop("death_time")
    attrition.append(("alive at prediction time", cohort.height))

    # Minimum history: the first timed record (birth aside), from when it was recorded, must precede
    # the prediction time by min_history_days; a fixed-date cohort also needs one record before the date.
    first_seen = (lazy.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH_CODE))
                  .group_by("subject_id").agg(pl.col("known_at").min().alias("first_time")).collect())
    cohort = cohort.join(first_seen, on="subject_id", how="left").filter(
        pl.col("first_time").is_not_null()
        & (pl.col("first_time") <= pl.col("prediction_time")
           - pl.duration(microseconds=_microseconds(definition.min_history_days * 86_400)))
    ).drop("first_time")
    attrition.append((f"history >= {definition.min_history_days:g} days", cohort.height))

    births = (lazy.filter(pl.col("code") == BIRTH_CODE).group_by("subject_id")
              .agg(pl.col("time").min().alias("birth_time")).collect())
    sexes = (lazy.filter(pl.col("code").str.starts_with(SEX_PREFIX)).group_by("subject_id")
             .agg(pl.col("code").first().str.strip_prefix(SEX_PREFIX).alias("sex")).collect())
    cohort = (
        cohort.join(births, on="subject_id", how="left")
        .with_columns(age_years(pl.col("birth_time"), pl.col("prediction_time"), task.site_timezone).alias("age_years"))
        .drop("birth_time")
        .join(sexes, on="subject_id", how="left")
    )
    if definition.min_age_years is not None or definition.max_age_years is not None:
        # An unknown age cannot satisfy an age rule: such patients are excluded, and counted.
        keep = pl.col("age_years").is_not_null()
        if definition.min_age_years is not None:
            keep &= pl.col("age_years") >= definition.min_age_years
        if definition.max_age_years is not None:
            # In completed years, as a clinician reads "aged 17 or under": 17.9 is 17 (age_years).
            keep &= pl.col("age_years").floor() <= definition.max_age_years
        cohort = cohort.filter(keep)
        attrition.append(("age within limits", cohort.height))
    if definition.sex:
        # No recorded sex is FHIR's administrative gender "unknown".
        cohort = cohort.filter(pl.col("sex").fill_null("unknown").is_in(list(definition.sex)))
        attrition.append((f"sex in {', '.join(definition.sex)}", cohort.height))

    for i, rule in enumerate(definition.include):
        matched = _rule_matches(lazy, cohort.lazy(), rule, "known_at").collect()
        cohort = cohort.join(matched, on="subject_id", how="semi")
        attrition.append((f"include[{i}] {_describe_rule(rule)}", cohort.height))
    for i, rule in enumerate(definition.exclude):
        matched = _rule_matches(lazy, cohort.lazy(), rule, "time", task.site_timezone).collect()
        cohort = cohort.join(matched, on="subject_id", how="anti")
        attrition.append((f"exclude[{i}] {_describe_rule(rule)}", cohort.height))

    cohort = cohort.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
        pl.lit(task.name).alias("task"),
        pl.col("age_years").cast(pl.Float64),
        pl.col("sex").cast(pl.String),
    ).sort("subject_id")
    return CohortSelection(cohort, tuple(attrition))


def _microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _describe_rule(rule: CodeRule) -> str:
    codes = ", ".join(rule.codes[:3]) + (", ..." if len(rule.codes) > 3 else "")
    window = "any time" if rule.window_days is None else f"{rule.window_days:g} days"
    return f"{codes} ({window})"
