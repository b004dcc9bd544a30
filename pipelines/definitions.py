"""The one Dagster ``Definitions`` object of cohortcast: its table of contents.

Stage: orchestration. In: every asset and check module under ``pipelines/assets`` and the batch
sensor. Out: what ``dagster dev`` and ``cohortcast demo`` load: the assets, their checks, the jobs
below, the sensor and the deployment's resources.

Jobs:

* ``simulate`` — the simulated hospital into the landing zone (the demo's data);
* ``ingest`` — the landing zone into the warehouse tables and events, or, with ``from_batch``, an
  ingested landing batch made the warehouse (the ``promote_newest_batch`` sensor's runs);
* ``task_pipeline`` — one task (a partition, named after its file in ``tasks/``): cohort, labels,
  splits, model inputs, the fusion model, scores and the published cohort;
* ``ingest_batch`` — one landing batch (a partition per export folder), started by the sensor.
"""

from __future__ import annotations

import dagster as dg

from pipelines import assets
from pipelines.assets.ingest import INGEST_ASSETS
from pipelines.resources import resources_for_deployment, site_timezone_from_environment
from pipelines.schedules import after_ingest_sensor, nightly_schedule
from pipelines.sensors import ingest_batch_job, ingested_batch, landing_batch_sensor, promote_batch_sensor

all_assets = dg.load_assets_from_package_module(assets)
all_asset_checks = dg.load_asset_checks_from_package_module(assets)

# Assets partitioned by task, and the rest: the demo's first stage (simulate, then ingest).
task_assets = [a for a in all_assets if a.partitions_def is not None]
ingest_assets = [a for a in all_assets if a.partitions_def is None]

simulate_job = dg.define_asset_job(
    "simulate",
    selection=dg.AssetSelection.assets("simulated_landing_zone"),
    description="A simulated hospital's export into the landing zone (the demo's data).",
)
# Without the simulator: a deployment's ingest reads the hospital's export, or promotes a batch.
ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    description="The landing zone (or an ingested batch) into normalized tables, quarantine and MEDS events.",
)
task_pipeline_job = dg.define_asset_job(
    "task_pipeline",
    selection=dg.AssetSelection.assets(*task_assets),
    description="One task from inputs to published cohort (partition = task file name).",
)

defs = dg.Definitions(
    assets=[*all_assets, ingested_batch],
    asset_checks=all_asset_checks,
    jobs=[simulate_job, ingest_job, task_pipeline_job, ingest_batch_job],
    schedules=[nightly_schedule(task_pipeline_job, site_timezone_from_environment())],
    sensors=[
        landing_batch_sensor,
        promote_batch_sensor(ingest_job),
        after_ingest_sensor(task_pipeline_job),
    ],
    resources=resources_for_deployment(),
)
