"""The one Dagster ``Definitions`` object of cohortcast: its table of contents.

Stage: orchestration. In: every asset and check module under ``pipelines/assets``. Out: what
``dagster dev`` and ``cohortcast demo`` load.
"""

from __future__ import annotations

import dagster as dg

from pipelines import assets
from pipelines.resources import resources_for_deployment

all_assets = dg.load_assets_from_package_module(assets)
all_asset_checks = dg.load_asset_checks_from_package_module(assets)

demo_job = dg.define_asset_job("demo", selection=dg.AssetSelection.all(), description=(
    "Simulate a hospital and run every stage on it."))

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    jobs=[demo_job],
    resources=resources_for_deployment(),
)
