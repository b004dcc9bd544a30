"""Labels of a task: the risk label, the time-to-event target and the treatment flag.

Stage: tasks. In: the ``events`` table, a task's ``cohort`` (:data:`features.schemas.COHORT`) and
its :class:`~features.tasks.TaskDefinition`. Out: the ``labels`` table
(:data:`features.schemas.LABELS`) and :class:`LabelCounts`.

Follow-up of a patient ends at the first of: death; the patient's last record of any kind plus the
task's ``follow_up_after_last_record`` (records that stop mean the patient left the health system);
and the task's ``follow_up_end`` (the export date; without one, the latest record in the data). A
death is no record of care here unless death is the outcome: it is known whether or not the
patient was still in care (a registry, the Patient record), so it can end follow-up but never
extends it: an outcome between the last record and a death long after would have left no record. The
event is the first outcome code (or death, when the outcome includes it) strictly after the
prediction time and no later than the end of follow-up.

Why not end follow-up at the last record itself: records prove that a patient was still in care
only on the days they exist, and the outcome always leaves a record, so a patient with the event is
followed up to it while a patient without it loses the time since their last visit. That makes
censoring depend on the outcome, and the risk is over-stated (on the simulated hospital, a
Kaplan-Meier one-year risk of 0.141 against the truth's 0.130). The default,
``usual_interval``, credits each patient with their own mean interval between days with records in
the year before the prediction time: if visits come at a steady rate, that is the expected time
from the last visit to leaving care (0.131 there, and 9 % more patients with a risk label).

* ``event`` / ``duration_days``: the progression target, days to the event or to the end of
  follow-up when censored.
* ``boolean_value``: the risk label, true when the event falls within the horizon (one dated only
  by the horizon's last day included: it may have come before the horizon ended), false when the
  patient was followed for the whole horizon without it or died within it without it (when death
  is not part of the outcome, it competes with it), and **null** when follow-up ended before
  the horizon without the event. Such patients are excluded from the risk label and counted, never
  silently called negative: a patient lost after a month was not shown to be event-free for a year.
* ``treated``: the arm of a new-user, grace-period design (below); null when the task names no
  treatment, for a prevalent user, and when the arm is undetermined.
* ``prevalent_user``: a treatment code in the washout before the prediction time, or at it (null
  when the task names no treatment). Scoring gives such patients no treatment effect: they are on it
  already.

The treatment flag compares patients who start the treatment with patients who do not, and three
classic biases of pharmaco-epidemiology make the naive flag ("a treatment code in the window") unfit
for that. (a) Prevalent users: a patient already on the drug, whose refill falls in the window,
would count as starting it, and the treated arm would mix new starters with long-term survivors of
the drug. Any treatment code in the task's ``washout_days`` before the prediction time, or at the
prediction time itself, makes the patient a prevalent user, with no arm (``treated`` null). What is
known at the prediction time is baseline: the model inputs (event tokens, tabular features) keep
every event at or before it, so a code at that instant is an input and cannot also be the start of
treatment. The washout is the closed interval ``[prediction time - washout_days, prediction time]``
(a washout of 0 still catches a code at the prediction time itself). (b) Reverse causation: a drug
started because of the outcome (clopidogrel the day after a myocardial infarction is standard care)
would make the treated arm rich in events. (c) Immortal time: a patient whose follow-up ends inside
the window (the event, death or censoring) had no chance to start, and calling them untreated puts
every early event in the untreated arm. Against (b) and (c) the window ``[start, end]`` is a grace
period read at a landmark. A start is a treatment code strictly after the prediction time, at least
``start`` and at most ``end`` days after it (one dated only by the window's last day counts, as it
may have come by then). A new user has an arm only when they are followed event-free beyond the
window: beyond ``end`` days after the prediction time and beyond the end of that day on the site's
calendar (the latest a start dated only by that day can be; a fixed-date cohort's window ends at a
midnight, so no later). Their follow-up (``duration_days``) ends after it, and so does their
*observed* follow-up (their last record of any kind after the prediction time, the event included;
a death only where it is the outcome). The imputed ``follow_up_after_last_record`` extension is
credit for the risk label, not evidence of who started: a patient whose records stop within the
grace period (or who has none after the prediction time) could have started elsewhere, unseen.
Every other new user has an undetermined arm (null), whether or not they had started, so neither
arm is conditioned differently; those with an arm are treated when a start falls in the window,
else untreated, and every code that decides their arm precedes their outcome. The task parser keeps
``end`` below ``horizon_days``: at or past it, everyone with an arm would be event-free at the
horizon. The treatment-effect estimand is then among new users followed event-free through the
grace period; the risk and progression labels are the same for every patient, whatever their arm.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from features.cohorts import BIRTH_CODE, DEATH_CODE, as_frame, happened_by, site_clock, site_day_start
from features.schemas import LABELS
from features.tasks import USUAL_INTERVAL, TaskDefinition, TreatmentDefinition

MICROSECONDS_PER_DAY = 86_400_000_000
USUAL_INTERVAL_WINDOW_DAYS = 365
"""Look-back for the usual interval: recent enough to reflect the current pattern of care."""


@dataclass(frozen=True)
class LabelCounts:
    """How the cohort splits over the labels."""

    cohort: int
    # Risk label: event within the horizon, followed past it without the event, and excluded.
    positive: int
    negative: int
    censored_before_horizon: int
    # Progression target: events observed at any time of follow-up.
    events_observed: int
    # Patients without any record after the prediction time.
    no_follow_up: int
    # Treatment arms (features.labels' module docstring); every one is null when the task names no
    # treatment. treated + untreated + treatment_prevalent + treatment_undetermined = cohort.
    treated: int | None
    untreated: int | None
    # A treatment code in the washout before the prediction time, or at it: not a new user, no arm.
    treatment_prevalent: int | None
    # New users not followed event-free beyond the grace period: their follow-up (event, death or
    # censoring) ended within it, or their observed follow-up did (no record after its end: the
    # imputed follow_up_after_last_record extension does not count). No arm, whether or not they
    # started.
    treatment_undetermined: int | None

    @property
    def positive_rate(self) -> float:
        """Share of positives among patients with a risk label (nan when none has one)."""
        labelled = self.positive + self.negative
        return self.positive / labelled if labelled else float("nan")


def _days_after(days: float) -> pl.Expr:
    """The instant ``days`` after each patient's prediction time."""
    return pl.col("prediction_time") + pl.duration(microseconds=round(days * MICROSECONDS_PER_DAY))


def _days(expr: pl.Expr) -> pl.Expr:
    return expr.dt.total_microseconds().cast(pl.Float64) / MICROSECONDS_PER_DAY


def usual_interval_days(events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame,
                        zone: str = "UTC") -> pl.DataFrame:
    """Each cohort patient's mean interval between days with records, before the prediction time.

    Returns ``subject_id, interval_days``: the span of the year before the prediction time in which
    the patient had records (shorter when their first record is more recent) divided by the number
    of calendar days with a record in it (the index visit's included). A patient seen only on the
    index day gets about 0; one with records before the year but none in it, the whole year (they
    come less than once a year); one not seen at all, null. The birth record is not a visit: counted,
    it would make every adult's span the whole year.
    """
    index = cohort.lazy().select("subject_id", "prediction_time")
    before = (
        as_frame(events).filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH_CODE))
        .join(index, on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
    )
    window_start = pl.col("prediction_time") - pl.duration(days=USUAL_INTERVAL_WINDOW_DAYS)
    return (
        before.group_by("subject_id")
        .agg(
            pl.max_horizontal(pl.col("time").min(), window_start.first()).alias("since"),
            pl.col("prediction_time").first(),
            # Calendar days on the site's clock (``zone``): a date-only record is on its own day.
            site_clock(pl.col("time").filter(pl.col("time") > window_start), zone).dt.date().n_unique()
            .alias("record_days"),
        )
        .select("subject_id", pl.when(pl.col("record_days") > 0)
                .then(_days(pl.col("prediction_time") - pl.col("since")) / pl.col("record_days"))
                .otherwise(float(USUAL_INTERVAL_WINDOW_DAYS)).alias("interval_days"))
        .sort("subject_id")
        .collect()
    )


def build_labels(
    events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame, task: TaskDefinition
) -> tuple[pl.DataFrame, LabelCounts]:
    """Return the ``labels`` table of a cohort and its counts.

    Parameters
    ----------
    events
        The ``events`` table, eager or lazy.
    cohort
        ``subject_id, prediction_time`` per patient (the ``cohort`` table).
    task
        The task: outcome, horizon, follow-up end and treatment.

    Returns
    -------
    (pl.DataFrame, LabelCounts)
        Labels in :data:`features.schemas.LABELS` order, one row per cohort patient, sorted by
        ``subject_id``; and the counts.
    """
    lazy = as_frame(events)
    index = cohort.lazy().select("subject_id", "prediction_time")
    after = (
        lazy.filter(pl.col("time").is_not_null())
        .join(index, on="subject_id")
        .filter(pl.col("time") > pl.col("prediction_time"))
    )
    if task.follow_up_end is not None:
        after = after.filter(pl.col("time") <= task.follow_up_end)
    data_end = task.follow_up_end or lazy.select(pl.col("time").max()).collect().item()
    if task.follow_up_after_last_record == USUAL_INTERVAL:
        after_last = usual_interval_days(lazy, cohort, task.site_timezone).lazy()
    else:
        after_last = index.select("subject_id", pl.lit(float(task.follow_up_after_last_record)).alias("interval_days"))
    # A death is known whether or not the patient was still in care (a registry, the source system's
    # Patient record): one after the records stop proves nothing of an outcome in between, so it
    # ends follow-up without extending it, unless death is the outcome, whose record extends it as
    # every outcome's does.
    in_care = after if task.outcome.death else after.filter(pl.col("code") != DEATH_CODE)
    last_record = in_care.group_by("subject_id").agg(pl.col("time").max().alias("last_time"))
    # A fixed-date cohort's prediction time is not a visit: without a record after it, follow-up runs
    # from the last record before it (birth aside), not from the date itself.
    last_before = (
        lazy.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH_CODE))
        .join(index, on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("subject_id").agg(pl.col("time").max().alias("last_time_before"))
    )
    death = (after.filter(pl.col("code") == DEATH_CODE).group_by("subject_id")
             .agg(pl.col("time").min().alias("death_time")))
    outcome_codes = list(task.outcome.codes) + ([DEATH_CODE] if task.outcome.death else [])
    # An outcome dated only by the index day may be the one the patient came in with: history, not
    # an outcome (as exclusions and treatment starts read it, features.cohorts.happened_by). A death
    # is the exception: the patient was alive at the visit, so a death dated that day came after it.
    first_event = (after.filter(pl.col("code").is_in(outcome_codes)
                                & ((pl.col("code") == DEATH_CODE)
                                   | ~happened_by(pl.col("time"), pl.col("prediction_time"), task.site_timezone)))
                   .group_by("subject_id").agg(pl.col("time").min().alias("event_time")))

    table = (
        index.join(last_record, on="subject_id", how="left")
        .join(death, on="subject_id", how="left")
        .join(first_event, on="subject_id", how="left")
        .join(after_last, on="subject_id", how="left")
        .join(last_before, on="subject_id", how="left")
        .with_columns(
            # An outcome dated only by the day of a timed death (stored at the day's last instant)
            # happened by the death, not after it: read at the death, it is not lost to the end of
            # follow-up, and a death that is not the outcome does not make the patient a negative.
            pl.when((pl.col("event_time") > pl.col("death_time"))
                    & happened_by(pl.col("event_time"), pl.col("death_time"), task.site_timezone))
            .then(pl.col("death_time")).otherwise(pl.col("event_time")).alias("event_time")
        )
        .with_columns(
            # Without a record after the prediction time, the last one before it (the index visit for
            # an index-visit cohort). Follow-up that ended before the prediction time is none at all.
            pl.max_horizontal(
                pl.min_horizontal(
                    "death_time",
                    pl.coalesce("last_time", "last_time_before", "prediction_time")
                    + pl.duration(microseconds=(pl.col("interval_days").fill_null(0.0) * MICROSECONDS_PER_DAY)
                                  .cast(pl.Int64)),
                    pl.lit(data_end, dtype=pl.Datetime("us")),
                ),
                "prediction_time",
            ).alias("end_time")
        )
        .with_columns(
            (pl.col("event_time").is_not_null() & (pl.col("event_time") <= pl.col("end_time"))).alias("event")
        )
        .with_columns(
            _days(pl.when(pl.col("event")).then(pl.col("event_time")).otherwise(pl.col("end_time"))
                  - pl.col("prediction_time")).alias("duration_days")
        )
        .with_columns(
            # An outcome dated only by the horizon's last day may have come before the horizon ended,
            # as a treatment start dated only by the grace period's last day counts as within it.
            pl.when(pl.col("event") & ((pl.col("duration_days") <= task.horizon_days)
                                       | happened_by(pl.col("event_time"), _days_after(task.horizon_days),
                                                     task.site_timezone))).then(True)
            .when(pl.col("duration_days") >= task.horizon_days).then(False)
            # Death is a competing event when it is not the outcome: a patient who died within the
            # horizon without the outcome can no longer have it, so the risk (the cumulative
            # incidence at the horizon) counts them negative rather than unknown. Left out, the
            # frailest patients would vanish and the risk be over-stated. The progression target
            # keeps them censored at death (a cause-specific time to event).
            .when(pl.col("death_time").is_not_null() & (pl.col("end_time") == pl.col("death_time"))
                  & pl.lit(not task.outcome.death)).then(False)
            .otherwise(None).alias("boolean_value")
        )
    )
    if task.treatment is None:
        table = table.with_columns(pl.lit(None, dtype=pl.Boolean).alias("treated"),
                                   pl.lit(None, dtype=pl.Boolean).alias("prevalent"))
    else:
        table = _treatment_arms(lazy, index, table, task.treatment, task.site_timezone)

    labels = (
        table.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.lit(task.name).alias("task"),
            pl.col("boolean_value").cast(pl.Boolean),
            pl.col("event").cast(pl.Boolean),
            pl.col("duration_days").cast(pl.Float64),
            pl.col("treated").cast(pl.Boolean),
            pl.col("last_time").is_null().alias("no_record_after"),
            pl.col("prevalent").alias("prevalent_user"),
        )
        .sort("subject_id")
        .collect()
    )
    no_record_after = int(labels["no_record_after"].sum())
    prevalent = int(labels["prevalent_user"].sum())
    labels = labels.drop("no_record_after")
    has_treatment = task.treatment is not None
    counts = LabelCounts(
        cohort=labels.height,
        positive=int(labels["boolean_value"].eq(True).sum()),
        negative=int(labels["boolean_value"].eq(False).sum()),
        censored_before_horizon=int(labels["boolean_value"].is_null().sum()),
        events_observed=int(labels["event"].sum()),
        no_follow_up=no_record_after,
        treated=int(labels["treated"].eq(True).sum()) if has_treatment else None,
        untreated=int(labels["treated"].eq(False).sum()) if has_treatment else None,
        treatment_prevalent=prevalent if has_treatment else None,
        treatment_undetermined=int(labels["treated"].is_null().sum()) - prevalent if has_treatment else None,
    )
    return labels, counts


def _treatment_arms(lazy: pl.LazyFrame, index: pl.LazyFrame, table: pl.LazyFrame,
                    treatment: TreatmentDefinition, zone: str) -> pl.LazyFrame:
    """Add ``treated`` (true, false or null) and ``prevalent`` to the per-patient ``table``, which
    has ``duration_days``, ``end_time`` and ``last_time``: the new-user, grace-period design of the
    module docstring."""

    codes = (
        lazy.filter(pl.col("code").is_in(list(treatment.codes)) & pl.col("time").is_not_null())
        .join(index, on="subject_id")
    )
    # What is known at the prediction time is baseline (the model inputs keep events at or before
    # it): a start is strictly after it, even with a window starting at 0 ...
    # A code dated only by the index day may be from before the visit: history, not a start.
    started = (
        codes.filter(~happened_by(pl.col("time"), pl.col("prediction_time"), zone)
                     & (pl.col("time") >= _days_after(treatment.window_start_days))
                     & happened_by(pl.col("time"), _days_after(treatment.window_end_days), zone))
        .select("subject_id").unique().with_columns(pl.lit(True).alias("started"))
    )
    # A start after the prediction time but before the window opens (a window starting at 7 days
    # to leave out early, reverse-caused prescriptions): on the drug, so never untreated; nor
    # treated by a refill inside the window, since the design leaves such early starts out.
    early = (
        codes.filter(~happened_by(pl.col("time"), pl.col("prediction_time"), zone)
                     & (pl.col("time") < _days_after(treatment.window_start_days)))
        .select("subject_id").unique().with_columns(pl.lit(True).alias("early"))
    )
    # ... and a code at the prediction time itself makes a prevalent user: the washout is
    # [prediction time - washout_days, prediction time], so a washout of 0 days catches only that.
    prevalent = (
        codes.filter((pl.col("time") >= _days_after(-treatment.washout_days))
                     & happened_by(pl.col("time"), pl.col("prediction_time"), zone))
        .select("subject_id").unique().with_columns(pl.lit(True).alias("prevalent"))
    )
    # The grace period closes at the last instant a start counted in it can have: a code dated only by
    # the window's last day (stored at that day's last instant on the site's calendar) may have come
    # late that day, so follow-up must go beyond that day, or the outcome could precede the start.
    window_end = _days_after(treatment.window_end_days)
    one_microsecond = pl.duration(microseconds=1)
    last_day_start = site_day_start(window_end - one_microsecond, zone)
    last_day_end = site_day_start(last_day_start + pl.duration(hours=25), zone) - one_microsecond
    close_days = _days(pl.max_horizontal(window_end, last_day_end) - pl.col("prediction_time"))
    # Observed follow-up: the last record after the prediction time (the event is one; a death only
    # where it is the outcome), never past the end of follow-up (death, the export date). Null without
    # any record after it.
    # (min_horizontal skips nulls: the explicit test keeps "no record" null.)
    observed_days = _days(pl.when(pl.col("last_time").is_not_null())
                          .then(pl.min_horizontal("last_time", "end_time")) - pl.col("prediction_time"))
    return (
        table.join(started, on="subject_id", how="left")
        .join(early, on="subject_id", how="left")
        .join(prevalent, on="subject_id", how="left")
        .with_columns(pl.col("prevalent").fill_null(False))
        .with_columns(
            pl.when(pl.col("prevalent")).then(None)
            # Follow-up (event, death or censoring) ended within the grace period: the arm is not
            # known, whether or not they started. Calling them untreated would be immortal time for
            # the treated; calling a start after the event treated, reverse causation.
            .when(pl.col("duration_days") <= close_days).then(None)
            # Records stop within the grace period (or there are none after the prediction time): the
            # follow_up_after_last_record extension is imputed, and says nothing of a start unseen.
            .when(observed_days.is_null() | (observed_days <= close_days)).then(None)
            # Started before the window, whatever the window holds then (a refill is no new start).
            .when(pl.col("early").fill_null(False)).then(None)
            .otherwise(pl.col("started").fill_null(False))
            .alias("treated")
        )
    )


def labels_to_arrow(labels: pl.DataFrame) -> pa.Table:
    """The labels as an Arrow table with exactly the :data:`features.schemas.LABELS` schema."""
    return labels.select(LABELS.names).to_arrow().cast(LABELS)
