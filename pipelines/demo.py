"""``cohortcast demo``: the main job on the embedded default data.

Stage: orchestration. In: a workspace folder, a patient count and a seed. Out: a simulated hospital
in ``WORKSPACE/landing`` and every asset of :mod:`pipelines.definitions` materialized from it, in a
Dagster instance (``DAGSTER_HOME``) so the runs show in ``dagster dev``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from rich.console import Console

from features.errors import LandingZoneError
from pipelines.definitions import all_asset_checks, all_assets
from pipelines.resources import resources_for_deployment


def run_demo(
    workspace: Path,
    patients: int,
    seed: int,
    console: Console,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize every asset into ``workspace`` and print where the outputs are.

    ``instance`` defaults to the one ``DAGSTER_HOME`` names (so the runs show in ``dagster dev``),
    or an ephemeral one when it is unset.
    """
    workspace = workspace.absolute()
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LandingZoneError(f"workspace {workspace} cannot be created ({exc.strerror})") from exc
    if not os.access(workspace, os.W_OK):
        raise LandingZoneError(f"workspace {workspace} is not writable")
    if instance is None:
        instance = dg.DagsterInstance.get() if "DAGSTER_HOME" in os.environ else dg.DagsterInstance.ephemeral()
    run_config = {
        "ops": {"simulated_landing_zone": {"config": {"patients": patients, "seed": seed}}},
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    with console.status(f"materializing {len(all_assets)} assets on {patients:,} simulated patients"):
        result = dg.materialize(
            [*all_assets, *all_asset_checks],
            run_config=run_config,
            instance=instance,
            resources=resources_for_deployment(str(workspace)),
        )
    console.print(f"run {result.run_id} succeeded")
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        path = materialization.metadata.get("path")
        where = f" -> {path.value}" if path is not None else ""
        console.print(f"  {materialization.asset_key.to_user_string()}{where}")
    return result
