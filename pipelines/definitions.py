"""The one Dagster ``Definitions`` object of cohortcast: its table of contents.

Stage: orchestration. In: every asset and check module under ``pipelines/assets`` and the batch
sensor. Out: what ``dagster dev`` and ``cohortcast demo`` load: the assets, their checks, the jobs
below, the sensor and the deployment's resources.

Jobs:

* ``ingest`` — the landing zone (simulated for the demo) into the warehouse tables and events;
* ``task_pipeline`` — one task (a partition, named after its file in ``tasks/``): cohort, labels,
  splits, model inputs, the fusion model, scores and the published cohort;
* ``ingest_batch`` — one landing batch (a partition per export folder), started by the sensor.
"""

from __future__ import annotations

import dagster as dg

from pipelines import assets
from pipelines.resources import resources_for_deployment
from pipelines.schedules import after_ingest_sensor, nightly_schedule
from pipelines.sensors import ingest_batch_job, ingested_batch, landing_batch_sensor

all_assets = dg.load_assets_from_package_module(assets)
all_asset_checks = dg.load_asset_checks_from_package_module(assets)

# Assets partitioned by task and those that are not run in separate jobs (a run has one partition).
task_assets = [a for a in all_assets if a.partitions_def is not None]
ingest_assets = [a for a in all_assets if a.partitions_def is None]

ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(*ingest_assets),
    description="The landing zone into normalized tables, quarantine and MEDS events.",
)
task_pipeline_job = dg.define_asset_job(
    "task_pipeline",
    selection=dg.AssetSelection.assets(*task_assets),
    description="One task from inputs to published cohort (partition = task file name).",
)

defs = dg.Definitions(
    assets=[*all_assets, ingested_batch],
    asset_checks=all_asset_checks,
    jobs=[ingest_job, task_pipeline_job, ingest_batch_job],
    schedules=[nightly_schedule(task_pipeline_job)],
    sensors=[landing_batch_sensor, after_ingest_sensor(ingest_job, task_pipeline_job)],
    resources=resources_for_deployment(),
)
