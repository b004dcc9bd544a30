"""``cohortcast demo``: the main job on the embedded default data.

Stage: orchestration. In: a workspace folder, a patient count and a seed. Out: a simulated hospital
in ``WORKSPACE/landing``, its ingest into ``WORKSPACE/warehouse``, the demo task's inputs, model and
scores, and the published cohort under ``WORKSPACE/published``: one Dagster run per stage in the
instance that ``DAGSTER_HOME`` names (so the runs show in ``dagster dev``), then the top of the
high-risk list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from features.cohorts import site_clock
from features.errors import LandingZoneError
from features.ingest import PROMOTED_BATCH_FILE, SUMMARY_FILE, IngestSummary, warehouse_site_timezone
from features.simulate.hospital import SIMULATION_MANIFEST
from models.publishing import current_scores, current_version
from pipelines.definitions import all_asset_checks, ingest_assets, task_assets
from pipelines.resources import resources_for_deployment

DEMO_TASK = "simulated_mace_1y"
"""The task the simulated hospital is built for (``tasks/simulated_mace_1y.yaml``)."""
DEMO_KNOWN_UNITS = "LOINC//29463-7"
"""The code the simulated hospital charts in two units (body weight: kg, and pounds from its Bundle feed)."""

# A failed step's reason is printed by the demo in one line (DemoFailed); Dagster's console
# logger would print its whole traceback at ERROR level before it.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class DemoFailed(LandingZoneError):
    """A stage of the demo did not succeed."""


def check_demo_workspace(workspace: Path) -> None:
    """Refuse a workspace that holds a hospital's data: the demo replaces its warehouse.

    The demo's ingest lets another simulated hospital of any size replace the last one's tables;
    pointed at a deployment's workspace (``COHORTCAST_WORKSPACE`` set on the hospital's machine),
    it would replace the hospital's warehouse with simulated patients, and could publish them.
    A warehouse is the demo's when its last ingest read the workspace's own ``landing/``.
    """
    warehouse, landing = workspace / "warehouse", workspace / "landing"
    summary = warehouse / SUMMARY_FILE
    read_from = Path(IngestSummary.from_json(summary).landing_dir) if summary.is_file() else None
    # A demo workspace moved or reached by another path (a symbolic link, another mount) names a
    # landing folder that no longer exists, or the same folder by another name; its own landing/
    # still holds the simulation.
    elsewhere = read_from is not None and (
        read_from.resolve() != landing.resolve() if read_from.exists()
        else not (landing / SIMULATION_MANIFEST).is_file())
    if (warehouse / PROMOTED_BATCH_FILE).is_file() or elsewhere:
        source = f"batch {(warehouse / PROMOTED_BATCH_FILE).read_text().strip()}" if (
            warehouse / PROMOTED_BATCH_FILE).is_file() else str(read_from)
        raise LandingZoneError(f"workspace {workspace} holds a warehouse ingested from {source}, not a demo's: the "
                               "demo would replace it with simulated patients; give the demo a workspace of its own "
                               "(--workspace, or unset COHORTCAST_WORKSPACE)")


def run_demo(
    workspace: Path,
    patients: int,
    seed: int,
    console: Console,
    instance: dg.DagsterInstance | None = None,
    epochs: int = 12,
    hidden_size: int = 64,
    min_auroc: float | None = None,
    max_calibration_error: float | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize every stage into ``workspace``, printing each stage, its outputs and the high-risk list.

    ``instance`` defaults to the one ``DAGSTER_HOME`` names, or an ephemeral one when it is unset.
    ``min_auroc`` and ``max_calibration_error`` override the task file's quality gates when given.

    Raises
    ------
    DemoFailed
        When a stage fails or a blocking check stops it; the message names the stage and the checks.
    """
    workspace = workspace.absolute()
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LandingZoneError(f"workspace {workspace} cannot be created ({exc.strerror})") from exc
    if not os.access(workspace, os.W_OK):
        raise LandingZoneError(f"workspace {workspace} is not writable")
    check_demo_workspace(workspace)
    if instance is None:
        instance = dg.DagsterInstance.get() if "DAGSTER_HOME" in os.environ else dg.DagsterInstance.ephemeral()
    # The simulator writes its times in UTC, whatever the deployment's site time zone.
    resources = resources_for_deployment(str(workspace), site_timezone="UTC")
    training = {"max_epochs": epochs, "hidden_size": hidden_size}
    gates = {"min_auroc": min_auroc, "max_calibration_error": max_calibration_error}
    stages = [
        (
            f"simulate {patients:,} patients and ingest them",
            ingest_assets,
            None,
            # Another simulated hospital, of any size, replaces the last one's tables.
            {"ops": {"simulated_landing_zone": {"config": {"patients": patients, "seed": seed}},
                     "ingested_tables": {"config": {"min_patient_share": 0.0}},
                     # The simulated Bundle feed weighs its patients in pounds: a known second unit,
                     # which the model's inputs convert; the check still warns of any other.
                     "events_codes_in_one_unit": {"config": {"known_codes": [DEMO_KNOWN_UNITS]}}}},
        ),
        (
            f"task {DEMO_TASK}: inputs, model, scores, publication",
            task_assets,
            DEMO_TASK,
            {"ops": {
                "fusion_model": {"config": training},
                # Unset overrides leave the task file's gates in force; publishing applies them again.
                "fusion_model_fusion_model_quality": {"config": gates},
                "deployed_model": {"config": gates},
                "published_cohort": {"config": gates},
            }},
        ),
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
                raise_on_error=False,
            )
        results.append(result)
        for event in result.get_asset_materialization_events():
            materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
            path = materialization.metadata.get("path")
            where = f" -> {path.value}" if path is not None else ""
            console.print(f"  {materialization.asset_key.to_user_string()}{where}")
        failed_checks = [e.asset_check_key.name for e in result.get_asset_check_evaluations() if not e.passed]
        if failed_checks:
            console.print(f"  checks that did not pass: {', '.join(failed_checks)}", style="yellow")
        if not result.success:
            failures = result.get_step_failure_events()
            failed = [e.step_key for e in failures]
            reason = f": {step_error(failures[0])}" if failures else ""
            raise DemoFailed(f"stage '{title}' failed (steps: {', '.join(failed) or 'none'}; checks: "
                             f"{', '.join(failed_checks) or 'none'}){reason}; run {result.run_id} in Dagster "
                             "has details")
    print_high_risk(workspace / "published", DEMO_TASK, console, warehouse_site_timezone(workspace / "warehouse"))
    console.print(f"every output is under {workspace}: landing/, warehouse/ (tables, tasks/, candidate_models/, "
                  "models/, scores/), "
                  "published/ (cohort versions, cohortcast.duckdb, FHIR RiskAssessments)")
    return results


def step_error(event: dg.DagsterEvent) -> str:
    """The first line of what made a step fail, without the error's module and class
    (``features.errors.LandingZoneError: landing folder ...``): the error the step's code raised,
    which Dagster's own step error holds as its cause (not that error's own cause, an ``OSError``
    it words, say)."""
    error = event.step_failure_data.error  # type: ignore[union-attr]
    if error is not None and error.cls_name == "DagsterExecutionStepExecutionError" and error.cause is not None:
        error = error.cause
    lines = (error.message if error is not None else "").strip().splitlines()
    first = lines[0] if lines else "no message"
    kind, _, rest = first.partition(": ")
    return rest if rest and " " not in kind else first


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def item_text(item: dict[str, Any]) -> str:
    """One explanation item for the terminal: its description shortened, but never its value
    range (``Systolic blood pressure >= 141.5`` cut to ``Systolic blood pressure >= 141.…`` hid
    the reading that raised the risk), then its contribution in points."""
    description = item.get("description") or item["item"]
    shown = item.get("value_range")
    at = description.rfind(f" {shown}") if shown else -1
    text = f"{_short(description[:at], 26)} {shown}" if at >= 0 else _short(description)
    return f"{text} ({item['contribution'] * 100:+.1f})"


def print_high_risk(published: Path, task: str, console: Console, site_timezone: str = "UTC", rows: int = 10) -> None:
    """Print the top of the live high-risk list of a task, each risk with the day it is as of (its
    prediction time, on the site's calendar: ``site_timezone``)."""
    scores = current_scores(published, task)
    if scores is None:
        console.print(f"no published cohort for {task} yet")
        return
    # A risk is as of its prediction time, which may be long past: the list says which day.
    top = scores.sort("risk", descending=True).head(rows).with_columns(
        site_clock(pl.col("prediction_time"), site_timezone).dt.date().cast(pl.String).alias("as_of"))
    version = current_version(published, task)
    manifest = json.loads((published / task / str(version) / "manifest.json").read_text())
    left_out = manifest.get("left_out", {})
    # The title on a line of its own: as the table's title it wraps at the table's width.
    console.print(f"{task}: top of the high-risk list (published {version}, "
                  f"{(scores['risk_tier'] == 'high').sum()} high-risk of {scores.height}; left out: "
                  f"{left_out.get('deceased', 0)} who died and {left_out.get('outcome_recorded', 0)} whose outcome "
                  "is recorded since their prediction time)", style="italic")
    table = Table()
    # "if treated": the change in the risk if the patient starts the task's treatment.
    for column in ("patient", "as of", "risk", "tier", "if treated", "why (top items)"):
        table.add_column(column)
    for row in top.iter_rows(named=True):
        effect = "" if row["treatment_effect"] is None else f"{row['treatment_effect'] * 100:+.1f} pts"
        why = "\n".join(item_text(i) for i in row["top_items"][:3])
        # Escaped: rich would read a unit like [lb_av] in an item as markup and drop it.
        table.add_row(escape(row["patient_id"][:13]), row["as_of"], f"{row['risk']:.2f}", row["risk_tier"], effect,
                      escape(why))
    console.print(table)
