"""``cohortcast demo``: the main job on the embedded default data.

Stage: orchestration. In: a workspace folder, a patient count and a seed. Out: a simulated hospital
in ``WORKSPACE/landing``, its ingest into ``WORKSPACE/warehouse`` and the demo task's inputs under
``WORKSPACE/warehouse/tasks/<task>/``, each stage one Dagster run in the instance that
``DAGSTER_HOME`` names (so the runs show in ``dagster dev``).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from rich.console import Console

from features.errors import LandingZoneError
from pipelines.definitions import all_asset_checks, ingest_assets, task_assets
from pipelines.resources import resources_for_deployment

DEMO_TASK = "simulated_mace_1y"
"""The task the simulated hospital is built for (``tasks/simulated_mace_1y.yaml``)."""

QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_demo(
    workspace: Path,
    patients: int,
    seed: int,
    console: Console,
    instance: dg.DagsterInstance | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize every stage into ``workspace``, printing each stage and where its outputs are.

    ``instance`` defaults to the one ``DAGSTER_HOME`` names, or an ephemeral one when it is unset.
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
    resources = resources_for_deployment(str(workspace))
    stages = [
        (
            f"simulate {patients:,} patients and ingest them",
            ingest_assets,
            None,
            {"ops": {"simulated_landing_zone": {"config": {"patients": patients, "seed": seed}}}},
        ),
        (f"build the inputs of task {DEMO_TASK}", task_assets, DEMO_TASK, {}),
    ]
    results = []
    for number, (title, stage_assets, partition_key, run_config) in enumerate(stages, start=1):
        console.rule(f"[{number}/{len(stages)}] {title}")
        with console.status(title):
            result = dg.materialize(
                [*stage_assets, *all_asset_checks],
                selection=dg.AssetSelection.assets(*stage_assets),
                run_config={**run_config, **QUIET_LOGS},
                instance=instance,
                resources=resources,
                partition_key=partition_key,
            )
        results.append(result)
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
            path = materialization.metadata.get("path")
            where = f" -> {path.value}" if path is not None else ""
            console.print(f"  {materialization.asset_key.to_user_string()}{where}")
        failed_checks = [
            e.asset_check_key.name for e in result.get_asset_check_evaluations() if not e.passed
        ]
        if failed_checks:
            console.print(f"  checks that did not pass: {', '.join(failed_checks)}", style="yellow")
    console.print(f"done: every output is under {workspace}")
    return results
