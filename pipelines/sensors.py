"""Landing batches: one Dagster partition per export folder, and the sensor that ingests new ones.

Stage: ingest. In: export folders under ``<workspace>/batches/``. Out: ``ingested_batch``, one
partition per folder, each ingested into ``<workspace>/warehouse/batches/<name>/`` by
:func:`features.ingest.ingest_landing_zone`. Land a batch atomically: copy it into ``.name`` (hidden
folders are ignored), then rename it to ``name``; the sensor adds the partition and starts its run.

The asset lives here, not in ``pipelines/assets``, because it is partitioned while the demo graph is
not: ``pipelines.definitions`` registers it with its own job and sensor.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
from pathlib import Path

import dagster as dg

from features.ingest import SUMMARY_FILE, ingest_landing_zone
from pipelines.assets.ingest import IngestRunConfig
from pipelines.resources import Workspace

BATCH_PARTITIONS = dg.DynamicPartitionsDefinition(name="landing_batches")


# ------------------------------------------------------------------------------------------------


def batches_dir(workspace: Workspace) -> Path:
    """Where landing batches arrive: ``<workspace>/batches/<name>/``."""
    return workspace.root_dir / "batches"


@dg.asset(partitions_def=BATCH_PARTITIONS, group_name="ingest", kinds={"parquet"})
def ingested_batch(
    context: dg.AssetExecutionContext, config: IngestRunConfig, workspace: Workspace
) -> dg.MaterializeResult:
    """One landing batch (an export folder under ``batches/``) ingested into its own warehouse folder."""
    batch = context.partition_key
    out = workspace.warehouse_dir / "batches" / batch
    summary = ingest_landing_zone(batches_dir(workspace) / batch, out, strict=config.strict, workers=config.workers)
    if not summary.balanced:
        raise dg.Failure(f"batch {batch}: records_in != records_out + quarantined; see {out / SUMMARY_FILE}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "records_in": summary.records_in,
            "records_out": summary.records_out,
            "quarantined": summary.quarantined,
            "duplicates": summary.duplicates,
            "events": summary.table_rows["events"],
        }
    )


ingest_batch_job = dg.define_asset_job("ingest_batch", selection=[ingested_batch])


def new_batches(root: Path, known: set[str]) -> list[str]:
    """Batch folders under ``root`` not yet known, in name order (hidden folders are still landing)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in known)


@dg.sensor(job=ingest_batch_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def landing_batch_sensor(context: dg.SensorEvaluationContext, workspace: Workspace) -> dg.SensorResult:
    """Start an ingest for every new batch folder under ``<workspace>/batches/``."""
    known = set(context.instance.get_dynamic_partitions(BATCH_PARTITIONS.name))
    fresh = new_batches(batches_dir(workspace), known)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=name, run_key=name) for name in fresh],
        dynamic_partitions_requests=[BATCH_PARTITIONS.build_add_request(fresh)] if fresh else [],
    )
