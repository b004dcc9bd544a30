"""Landing batches: one Dagster partition per export folder, the sensor that ingests new ones and the
one that makes the newest the warehouse.

Stage: ingest. In: export folders under ``<workspace>/batches/``. Out: ``ingested_batch``, one
partition per folder, each ingested into ``<workspace>/warehouse/batches/<name>/`` by
:func:`features.ingest.ingest_landing_zone`, with its own quarantine and accounting; then the newest
ingested batch promoted to ``<workspace>/warehouse/`` by the ``ingest`` job (``from_batch``, which
also deletes all but the newest ``keep_ingested_batches`` ingested copies), whose success starts
every task's pipeline (``publish_after_ingest``).

A batch is a whole export (a nightly Bulk ``$export``): the newest replaces the warehouse's tables,
it does not add to them. Batch names sort in landing order (``2024-06-01``, ``2024-06-02``, ...), and
a batch ingested after a newer one is kept in its partition but never promoted (a promotion of it
re-executed by hand fails, unless ``allow_older_batch`` asks for a rollback). Land a batch
atomically: copy it into ``.name`` (hidden folders are ignored), then rename it to ``name``, and write
an empty ``_SUCCESS`` file into it last to have it ingested at the next tick (a ``_SUCCESS`` older
than another entry of the batch was not written last, and does not count). A batch copied in place
(``cp -r``, ``rsync``, an SFTP drop) is ingested once nothing under it, file or folder, has been
modified for ``LANDING_QUIET_SECONDS``: a copy that preserves the export's times (``rsync -a``,
``cp -p``) still changes the folders' times as it creates entries. A Bulk FHIR ``manifest.json`` is
not a completion marker: it is part of the export and may be copied before the files it lists; but
an ingested batch that does not match it (a listed file missing, or with another number of
records), or that has any other of :func:`features.ingest.ingest_problems`, fails its run and is
never promoted. A batch whose folder changes after its ingest, failed or not (the rest of a copy
that paused, an export sent again under the same name), is ingested again once it has landed
again, and promoted again if it is still the newest.

The asset lives here, not in ``pipelines/assets``, because it is partitioned while the demo graph is
not: ``pipelines.definitions`` registers it with its own job and sensors.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from features.ingest import (
    LANDED_MARKER,
    SUMMARY_FILE,
    batch_names,
    first_of,
    ingest_landing_zone,
    ingest_problems,
    is_batch_name,
    stray_batch_entries,
)
from pipelines.assets.ingest import BatchIngestRunConfig
from pipelines.resources import Workspace
from pipelines.schedules import materialized_assets

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

BATCH_PARTITIONS = dg.DynamicPartitionsDefinition(name="landing_batches")
# A batch folder is visible while it is still being copied in: ingested half-copied, it would become
# the warehouse with the rest of the export missing until the copy's end is seen (ingest_again_key).
# Two minutes without a change outlasts the pauses of a copy between files.
LANDING_QUIET_SECONDS = 120
# Writing _SUCCESS into the batch folder also sets the folder's time, a moment later on some file systems.
MARKER_CLOCK_SLACK_SECONDS = 1.0
# The newest known batches that are ingested again once their folder changes.
RETRIED_BATCHES = 7


@dg.asset(partitions_def=BATCH_PARTITIONS, group_name="ingest", kinds={"parquet"})
def ingested_batch(
    context: dg.AssetExecutionContext, config: BatchIngestRunConfig, workspace: Workspace
) -> dg.MaterializeResult:
    """One landing batch (an export folder under ``batches/``) ingested into its own warehouse folder."""
    batch = context.partition_key
    out = workspace.batch_warehouse_dir(batch)
    summary = ingest_landing_zone(workspace.batches_dir / batch, out, strict=config.strict, workers=config.workers,
                                  site_timezone=workspace.site_timezone)
    # The batch's own tables are checked here, before the promotion run can make them the warehouse's.
    problems = ingest_problems(out)
    if problems:
        raise dg.Failure(f"batch {batch}: {first_of(problems)}",
                         metadata={"problems": dg.MetadataValue.md("\n".join(f"* {line}" for line in problems)),
                                   "summary": dg.MetadataValue.path(str(out / SUMMARY_FILE))})
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "records_in": summary.records_in,
            "records_out": summary.records_out,
            "quarantined": summary.quarantined,
            "duplicates": summary.duplicates,
            "events": summary.table_rows["events"],
            "export_time": summary.export_time.isoformat(),
            "export_time_source": summary.export_time_source,
        }
    )


ingest_batch_job = dg.define_asset_job("ingest_batch", selection=[ingested_batch])


def new_batches(root: Path, known: set[str]) -> list[str]:
    """Batch folders under ``root`` not yet known, in name order (hidden folders are still landing)."""
    return [name for name in batch_names(root) if name not in known]


def batch_landed(folder: Path, now: float, quiet_seconds: float = LANDING_QUIET_SECONDS) -> bool:
    """Whether ``folder`` has landed: it holds a file, and either its ``_SUCCESS`` is as new as
    everything else under it, or nothing under it (itself included) was modified in the
    ``quiet_seconds`` before ``now`` (seconds since the epoch).

    A ``_SUCCESS`` older than another entry was not written last: an export that carries one from
    its writer (Spark, Hadoop), copied top-level files first (``rsync``, ``cp -r``), is still
    arriving while the marker is there. Folders count too: creating an entry changes its folder's
    time even when the copy keeps the files' own.
    """
    marker = folder / LANDED_MARKER
    try:
        newest, files = _newest_change(folder, but=marker)
        marked = marker.is_file() and os.lstat(marker).st_mtime >= newest - MARKER_CLOCK_SLACK_SECONDS
    except FileNotFoundError:  # a copier's temporary file renamed since it was listed: still landing
        return False
    return files > 0 and (marked or now - newest >= quiet_seconds)


def _newest_change(folder: Path, but: Path | None = None, clock: str = "st_mtime") -> tuple[float, int]:
    """The latest modification time under ``folder`` (itself included, ``but`` left out) and its
    number of files; ``clock="st_ctime"`` reads the inode change times instead, which a copy cannot
    set back (``cp -p`` and ``rsync -a`` give the files and folders their source's modification times)."""
    newest, files = getattr(folder.stat(), clock), 0
    for parent, folders, names in os.walk(folder):
        files += len(names)
        for name in folders + names:
            path = os.path.join(parent, name)
            if but is None or path != str(but):
                newest = max(newest, getattr(os.lstat(path), clock))
    return newest, files


ENDED_RUNS = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS)
"""A batch whose latest ingest ended so is ingested again once its folder changes and lands again,
while no newer batch is ingested (one superseded is never promoted): a failed one (a copy cut short
fails its checks), and a successful one (a copy that paused longer than the quiet period was
ingested half-copied, or the export was sent again, corrected, under the same name). A canceled run
is not: an operator canceled it, and re-executes it when the batch should go in; nor is one still
running, whose batch is looked at again once it ends."""


def newer_ingested(batch: str, ingested: set[str]) -> list[str]:
    """The batches among ``ingested`` newer than ``batch``, oldest first: while there is one,
    ``batch`` is never promoted (nor ingested again, :func:`ingest_again_key`)."""
    return sorted(name for name in ingested if is_batch_name(name) and name > batch)


def ingest_again_key(instance: dg.DagsterInstance, batch: str, folder: Path, now: float,
                     ingested: set[str]) -> str | None:
    """A run key to ingest a known batch again, or None.

    Its latest ``ingested_batch`` run ended (:data:`ENDED_RUNS`: failed for any cause, a check of
    its tables, a lost run worker, a run that never launched; or succeeded), no batch newer than
    it is among ``ingested`` (a batch superseded so would never be promoted, and its copy, which
    the promotion of the newer one deleted, would be written again for nothing), and the folder
    has changed since that run was created (what it read) and has landed again. A batch whose copy
    was cut short fails its checks (a file of its manifest missing, say), or passes them when the
    manifest is absent and the Patient file came first; its partition exists by then, and its first
    run key is spent, so without this the finished copy would never be ingested. Changes are read
    from the inode change times, which a copy that keeps the export's times (``cp -p``, ``rsync
    -a``) cannot set back to before the run; a change of permissions or owner moves them too, and
    ingests the batch once more.
    """
    if newer_ingested(batch, ingested):
        return None
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": batch}), limit=1)
    if not runs or runs[0].status not in ENDED_RUNS:
        return None
    record = instance.get_run_record_by_id(runs[0].run_id)
    try:
        newest, _ = _newest_change(folder, clock="st_ctime")
    except FileNotFoundError:
        return None
    if record is None or newest <= record.create_timestamp.timestamp() or not batch_landed(folder, now):
        return None
    return f"{batch}/changed-{newest:.6f}"


@dg.sensor(job=ingest_batch_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def landing_batch_sensor(context: dg.SensorEvaluationContext, workspace: Workspace) -> dg.SensorResult:
    """Start an ingest for every new batch folder under ``<workspace>/batches/`` that has landed."""
    if not workspace.batches_dir.is_dir():
        # Otherwise every batch would be missed with nothing in the tick history: a workspace path
        # relative to another working folder, or COHORTCAST_WORKSPACE unset, looks here.
        return dg.SensorResult(skip_reason=f"no batches folder {workspace.batches_dir} (the workspace's "
                                           "batches/; set COHORTCAST_WORKSPACE to the deployment's workspace)")
    known = set(context.instance.get_dynamic_partitions(BATCH_PARTITIONS.name))
    fresh = new_batches(workspace.batches_dir, known)
    now = time.time()
    ready = [name for name in fresh if batch_landed(workspace.batches_dir / name, now)]
    recent = [name for name in batch_names(workspace.batches_dir) if name in known][-RETRIED_BATCHES:]
    ingested = context.instance.get_materialized_partitions(ingested_batch.key) if recent else set()
    again = [(name, key) for name in recent
             if (key := ingest_again_key(context.instance, name, workspace.batches_dir / name, now, ingested))]
    strays = stray_batch_entries(workspace.batches_dir)
    stray_note = (f"left alone, not batches (a batch is a folder, whose name starts with its landing date written "
                  f"YYYY-MM-DD, such as 2024-06-01 or 2024-06-01T02:00:00Z, and holds only letters, digits and "
                  f". _ - : +; unpack an archive into one): {', '.join(strays)}" if strays else "")
    if stray_note and (ready or again):
        context.log.warning(stray_note)
    if not ready and not again:
        # Not requested, so not a partition yet: the next tick looks at these folders again.
        waiting = (f"batches still landing (no {LANDED_MARKER} written last, and empty or changed in the last "
                   f"{LANDING_QUIET_SECONDS} s): {', '.join(fresh)}" if fresh else "")
        return dg.SensorResult(skip_reason="; ".join(filter(None, [waiting, stray_note])) or None)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=name) for name in ready]
        + [dg.RunRequest(partition_key=name, run_key=key) for name, key in again],
        dynamic_partitions_requests=[BATCH_PARTITIONS.build_add_request(ready)] if ready else [],
    )


def promote_batch_request(batch: str, ingested: set[str], ingest_run_id: str) -> dg.RunRequest | dg.SkipReason:
    """Promote ``batch`` when no newer batch has been ingested; else say which one has.

    The run key names the ingest run: a batch ingested again (re-executed by hand, or after its
    folder changed) is promoted again, where a key per batch would be spent by its first promotion.
    """
    if newer := newer_ingested(batch, ingested):
        return dg.SkipReason(f"batch {batch} is not promoted: batch {newer[-1]}, ingested already, is newer")
    return dg.RunRequest(
        run_key=f"promote/{batch}/{ingest_run_id}",
        run_config={"ops": {"ingested_tables": {"config": {"from_batch": batch}}}},
        tags={"cohortcast/batch": batch},
    )


def promote_batch_sensor(ingest_job: "UnresolvedAssetJobDefinition") -> dg.RunStatusSensorDefinition:
    """When a batch's ingest succeeds, run ``ingest_job`` to make that batch the warehouse (if newest)."""

    # Every job of the code location is watched: a batch materialized from the asset's page or a
    # backfill runs in Dagster's own asset job, not in ingest_batch, and must be promoted too.
    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, request_job=ingest_job,
                          name="promote_newest_batch", default_status=dg.DefaultSensorStatus.STOPPED)
    def promote_newest_batch(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
        run = context.dagster_run
        if ingested_batch.key not in materialized_assets(context.instance, run.run_id):
            return dg.SkipReason(f"run {run.run_id} of {run.job_name} ingested no batch")
        batch = run.tags.get("dagster/partition")
        if batch is None:
            return dg.SkipReason(f"run {run.run_id} of {run.job_name} has no batch partition")
        ingested = context.instance.get_materialized_partitions(ingested_batch.key)
        return promote_batch_request(batch, ingested, run.run_id)

    return promote_newest_batch
