"""Operations: the nightly schedule and the sensor that chains a finished ingest through to publishing.

Stage: orchestration. In: the ``ingest`` and ``task_pipeline`` jobs of :mod:`pipelines.definitions`.
Out: run requests, one per task (partition): every night, and after every successful ingest, each
task's inputs are rebuilt, its model retrained when its inputs changed, and its cohort re-scored and
published (gated by the blocking checks upstream).
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg

from pipelines.assets.tasks import task_partitions

WAREHOUSE_EVENTS = dg.AssetKey("events")
"""The asset every ingest and promotion writes: a run that materialized it changed the warehouse."""


def materialized_assets(instance: dg.DagsterInstance, run_id: str) -> set[dg.AssetKey]:
    """The assets a run materialized: what a run-status sensor reacts to, whichever job ran them
    (one's own, Dagster's asset job from the asset's page, a backfill)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return {record.event_log_entry.asset_materialization.asset_key for record in records
            if record.event_log_entry.asset_materialization is not None}


def task_run_requests(job: dg.UnresolvedAssetJobDefinition, run_key_prefix: str) -> Iterator[dg.RunRequest]:
    for task in task_partitions.get_partition_keys():
        yield dg.RunRequest(run_key=f"{run_key_prefix}/{task}", partition_key=task, job_name=job.name)


def nightly_schedule(job: dg.UnresolvedAssetJobDefinition, site_timezone: str) -> dg.ScheduleDefinition:
    """Re-score (and re-publish) every task at 02:00 site time (``site_timezone``, IANA)."""

    @dg.schedule(cron_schedule="0 2 * * *", job=job, execution_timezone=site_timezone,
                 name="nightly_rescore", default_status=dg.DefaultScheduleStatus.STOPPED)
    def nightly_rescore(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest]:
        stamp = context.scheduled_execution_time.strftime("%Y-%m-%d")
        yield from task_run_requests(job, f"nightly/{stamp}")

    return nightly_rescore


def after_ingest_sensor(task_job: dg.UnresolvedAssetJobDefinition) -> dg.RunStatusSensorDefinition:
    """When a run that wrote the warehouse's ``events`` succeeds, run every task's pipeline on the new data.

    Every job of the code location is watched: an ingest started from the asset's page, or a
    backfill, runs in Dagster's own asset job rather than in ``ingest_job``.
    """

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, request_job=task_job,
                          name="publish_after_ingest", default_status=dg.DefaultSensorStatus.STOPPED)
    def publish_after_ingest(context: dg.RunStatusSensorContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        run = context.dagster_run
        if WAREHOUSE_EVENTS not in materialized_assets(context.instance, run.run_id):
            yield dg.SkipReason(f"run {run.run_id} of {run.job_name} did not write the warehouse")
            return
        yield from task_run_requests(task_job, f"after-ingest/{run.run_id}")

    return publish_after_ingest
