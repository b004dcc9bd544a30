"""End-to-end: the whole Dagster graph on the simulator's data, as ``cohortcast demo`` runs it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from rich.console import Console

from features.errors import LandingZoneError
from features.ingest import ingest_landing_zone
from features.simulate import SimulationConfig, simulate_hospital
from pipelines.definitions import all_asset_checks, all_assets, task_assets
from pipelines.demo import DEMO_TASK, DemoFailed, check_demo_workspace, run_demo, step_error
from pipelines.resources import resources_for_deployment

# The 400-patient demo's cohort (seed 1): living patients with the outcome recorded since their
# prediction time, and the high tier (top 5 %) of those left on the list.
LIVING_WITH_OUTCOME = 80
HIGH_RISK = 16


@pytest.mark.slow
def test_demo_materializes_every_asset_on_simulated_data(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    with dg.instance_for_test() as instance:
        results = run_demo(tmp_path / "workspace", patients=400, seed=1, console=console, instance=instance,
                           epochs=3, hidden_size=32, min_auroc=0.0, max_calibration_error=1.0)
    assert all(r.success for r in results)
    materialized = {
        e.asset_key.to_user_string() for r in results for e in r.get_asset_materialization_events()
    }
    expected = {key.to_user_string() for assets_def in all_assets for key in assets_def.keys}
    assert materialized == expected
    checks = [e for r in results for e in r.get_asset_check_evaluations()]
    assert checks and all(e.passed for e in checks)
    warehouse = tmp_path / "workspace" / "warehouse"
    truth = pl.read_parquet(tmp_path / "workspace" / "landing" / "truth.parquet")
    assert pl.read_parquet(warehouse / "patients.parquet").height == 400
    labels = pl.read_parquet(warehouse / "tasks" / DEMO_TASK / "labels.parquet")
    assert labels.height == truth.height
    model_metrics = json.loads((warehouse / "models" / DEMO_TASK / "metrics.json").read_text())["models"]
    references = ("truth", "truth_observed_modalities", "truth_estimated_severities")
    assert all(0.5 < model_metrics[name]["auroc"] <= 1.0 for name in references)
    published_dir = tmp_path / "workspace" / "published" / DEMO_TASK / "v0001"
    published = pl.read_parquet(published_dir / "scores.parquet")
    # Every cohort patient is scored; those who died after their prediction time, or had the outcome
    # since, are not published.
    dead = pl.read_parquet(warehouse / "patients.parquet").filter(
        pl.col("death_time").is_not_null() | pl.col("deceased").fill_null(False))["subject_id"]
    had_outcome = labels.filter(pl.col("event") & ~pl.col("subject_id").is_in(dead.implode()))["subject_id"]
    assert (dead.len(), had_outcome.len()) == (19, LIVING_WITH_OUTCOME)
    assert not published["subject_id"].is_in(pl.concat([dead, had_outcome]).implode()).any()
    assert published.height == 381 - LIVING_WITH_OUTCOME
    assert (published["risk_tier"] == "high").sum() == HIGH_RISK
    # A note or study that explains a risk is named by its date and kind, never by its id alone.
    descriptions = published.select(pl.col("top_items").explode().struct.field("description")).to_series()
    assert descriptions.str.starts_with("Image of ").sum() > 0 and descriptions.str.starts_with("Note of ").sum() > 0
    assert not descriptions.str.contains(r"^(note|study) ").any()
    manifest = json.loads((published_dir / "manifest.json").read_text())
    assert manifest["left_out"] == {"deceased": 19, "outcome_recorded": LIVING_WITH_OUTCOME}
    output = console.export_text()
    assert "[1/2] simulate 400 patients and ingest them" in output
    assert f"[2/2] task {DEMO_TASK}: inputs, model, scores, publication" in output
    assert (f"top of the high-risk list (published v0001, {HIGH_RISK} high-risk of {381 - LIVING_WITH_OUTCOME}; "
            f"left out: 19 who died and {LIVING_WITH_OUTCOME} whose outcome is recorded since their prediction time)"
            in " ".join(output.split()))
    # Each risk with the day it is as of: the top patient's prediction date (UTC, the demo's clock).
    top = published.sort("risk", descending=True).row(0, named=True)
    assert "as of" in output
    assert f"{top['patient_id'][:13]} │ {top['prediction_time']:%Y-%m-%d} │ {top['risk']:.2f}" in output

    # Run again on unchanged inputs with the same settings, the model is neither trained nor deployed again.
    warehouse_models = tmp_path / "workspace" / "warehouse"
    trained_at = (warehouse_models / "candidate_models" / DEMO_TASK / "model.safetensors").stat().st_mtime_ns
    deployed_info = (warehouse_models / "models" / DEMO_TASK / "cohortcast_model.json").read_text()
    gates = {"min_auroc": 0.0, "max_calibration_error": 1.0}
    with dg.instance_for_test() as instance:
        again = dg.materialize(
            [*task_assets, *all_asset_checks], selection=dg.AssetSelection.assets("fusion_model", "deployed_model"),
            partition_key=DEMO_TASK, instance=instance,
            resources=resources_for_deployment(str(tmp_path / "workspace")),
            run_config={"ops": {"fusion_model": {"config": {"max_epochs": 3, "hidden_size": 32}},
                                "fusion_model_fusion_model_quality": {"config": gates},
                                "deployed_model": {"config": gates}}},
        )
    [reused] = [e for e in again.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "fusion_model"]
    assert reused.event_specific_data.materialization.metadata["trained_in_this_run"].value is False
    assert (warehouse_models / "candidate_models" / DEMO_TASK / "model.safetensors").stat().st_mtime_ns == trained_at
    assert (warehouse_models / "models" / DEMO_TASK / "cohortcast_model.json").read_text() == deployed_info

    # A model below the task's quality gate is neither deployed nor published: the model before it
    # stays the one scoring reads, and the live version stays v0001.
    deployed = tmp_path / "workspace" / "warehouse" / "models" / DEMO_TASK
    deployed_weights = (deployed / "model.safetensors").read_bytes()
    with dg.instance_for_test() as instance:
        gated = dg.materialize(
            [*task_assets, *all_asset_checks], selection=dg.AssetSelection.assets(*task_assets),
            partition_key=DEMO_TASK, instance=instance, raise_on_error=False,
            resources=resources_for_deployment(str(tmp_path / "workspace")),
            run_config={"ops": {"fusion_model": {"config": {"max_epochs": 1, "hidden_size": 32, "bf16": False}},
                                "fusion_model_fusion_model_quality": {"config": {"min_auroc": 1.0}}}},
        )
    assert not gated.success
    quality = [e for e in gated.get_asset_check_evaluations() if e.asset_check_key.name == "fusion_model_quality"]
    assert [e.passed for e in quality] == [False]
    gated_materialized = {e.asset_key.to_user_string() for e in gated.get_asset_materialization_events()}
    assert "fusion_model" in gated_materialized
    assert not {"deployed_model", "risk_scores", "published_cohort"} & gated_materialized
    assert (tmp_path / "workspace" / "published" / DEMO_TASK / "CURRENT").read_text().strip() == "v0001"
    rejected = tmp_path / "workspace" / "warehouse" / "candidate_models" / DEMO_TASK
    arguments = json.loads((rejected / "metrics.json").read_text())["training_arguments"]
    assert arguments["bf16"] is False and arguments["max_epochs"] == 1
    assert (deployed / "model.safetensors").read_bytes() == deployed_weights
    assert json.loads((deployed / "metrics.json").read_text())["training_arguments"]["max_epochs"] == 3

    # Selected alone, without the check in its run, deployed_model applies the gates itself.
    with dg.instance_for_test() as instance:
        alone = dg.materialize(
            [*task_assets, *all_asset_checks], selection=dg.AssetSelection.assets("deployed_model"),
            partition_key=DEMO_TASK, instance=instance, raise_on_error=False,
            resources=resources_for_deployment(str(tmp_path / "workspace")),
            run_config={"ops": {"deployed_model": {"config": {"min_auroc": 1.0}}}},
        )
    assert not alone.success
    [failure] = alone.get_step_failure_events()
    assert f"model {rejected} not deployed: held-out auroc" in failure.event_specific_data.error.cause.message
    assert (deployed / "model.safetensors").read_bytes() == deployed_weights


def test_a_failed_demo_stage_says_why_in_one_line(tmp_path: Path) -> None:
    # A hospital's export put where the demo simulates: the simulator refuses to replace it.
    landing = tmp_path / "workspace" / "landing"
    landing.mkdir(parents=True)
    (landing / "export.ndjson").write_text("{}\n")
    with dg.instance_for_test() as instance, pytest.raises(DemoFailed) as failed:
        run_demo(tmp_path / "workspace", patients=5, seed=0, console=Console(file=io.StringIO()), instance=instance)
    assert re.fullmatch(
        r"stage 'simulate 5 patients and ingest them' failed \(steps: simulated_landing_zone; checks: none\): "
        rf"landing folder {re.escape(str(landing))} holds files but no simulation.json, so it is not a simulation: "
        r"the simulator replaces only its own output \(.*\); run \S+ in Dagster has details",
        str(failed.value),
    )
    assert (landing / "export.ndjson").read_text() == "{}\n"


@pytest.mark.parametrize("fed_by", ["batch", "export"])
def test_the_demo_refuses_a_workspace_that_holds_a_hospitals_warehouse(tmp_path: Path, fed_by: str,
                                                                        shared_fhir_dir: Path) -> None:
    # A deployment's workspace (COHORTCAST_WORKSPACE set on the hospital's machine): fed by batches,
    # its landing/ is empty, so only its warehouse tells that the data are not a demo's.
    workspace = tmp_path / "workspace"
    warehouse = workspace / "warehouse"
    warehouse.mkdir(parents=True)
    if fed_by == "batch":
        (warehouse / "promoted_batch.txt").write_text("2024-06-02\n")
        source = "batch 2024-06-02"
    else:
        ingest_landing_zone(shared_fhir_dir / "synthea-bulk-10", warehouse, workers=1)
        source = str((shared_fhir_dir / "synthea-bulk-10").absolute())
    before = sorted(p.name for p in workspace.rglob("*"))
    with dg.instance_for_test() as instance, pytest.raises(LandingZoneError) as refused:
        run_demo(workspace, patients=5, seed=0, console=Console(file=io.StringIO()), instance=instance)
    assert str(refused.value) == (
        f"workspace {workspace} holds a warehouse ingested from {source}, not a demo's: the demo would replace it "
        "with simulated patients; give the demo a workspace of its own (--workspace, or unset COHORTCAST_WORKSPACE)")
    assert sorted(p.name for p in workspace.rglob("*")) == before


def test_a_demo_workspace_moved_or_reached_by_a_link_is_still_the_demos(tmp_path: Path) -> None:
    workspace = tmp_path / "demo"
    simulate_hospital(workspace / "landing", SimulationConfig(n_patients=20, seed=1), workers=1)
    ingest_landing_zone(workspace / "landing", workspace / "warehouse", workers=1)
    check_demo_workspace(workspace)
    (tmp_path / "link").symlink_to(workspace)
    check_demo_workspace(tmp_path / "link")
    workspace.rename(tmp_path / "renamed")
    check_demo_workspace(tmp_path / "renamed")
    # A hospital's export ingested from a folder since deleted, the workspace's landing/ empty.
    (tmp_path / "renamed" / "landing" / "simulation.json").unlink()
    source = re.escape(str(tmp_path / "demo" / "landing"))
    with pytest.raises(LandingZoneError, match=rf"holds a warehouse ingested from {source}, not a demo's"):
        check_demo_workspace(tmp_path / "renamed")


def test_a_failed_step_is_told_by_the_error_its_code_raised() -> None:
    @dg.asset
    def unwritable() -> None:
        try:
            raise OSError(13, "Permission denied")
        except OSError as exc:
            raise LandingZoneError("output folder /data/x is not writable (Permission denied)") from exc

    with dg.instance_for_test() as instance:
        result = dg.materialize([unwritable], instance=instance, raise_on_error=False)
    (failure,) = result.get_step_failure_events()
    assert step_error(failure) == "output folder /data/x is not writable (Permission denied)"


def test_an_explanation_item_is_shortened_but_keeps_its_value_range() -> None:
    from pipelines.demo import item_text

    item = {"item": "LOINC//8480-6", "contribution": 0.0604, "value_range": ">= 141.5",
            "description": "Systolic blood pressure >= 141.5, latest of 7"}
    assert item_text(item) == "Systolic blood pressure >= 141.5 (+6.0)"
    item = {**item, "description": "Diastolic blood pressure measured sitting 77.5 to 85, latest of 2",
            "value_range": "77.5 to 85", "contribution": -0.024}
    assert item_text(item) == "Diastolic blood pressure… 77.5 to 85 (-2.4)"
    study = {"item": "d19db9c9-c1a7-4189-a12a-e5e4c3a8f0b1", "contribution": -0.024, "value_range": None}
    assert item_text(study) == "d19db9c9-c1a7-4189-a12a-e5e4c3a… (-2.4)"  # 31 characters and the ellipsis
