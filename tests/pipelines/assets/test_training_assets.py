"""Tests of the model quality check and of ``deployed_model`` on hand-built model folders.

A candidate model folder is written file by file (its metrics, placeholder weights and the SHA-256
digests training records), so each test runs only the check or the deployment, without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from models.task_model import MODEL_FORMAT_VERSION, model_file_digests
from pipelines.assets.training import deployed_model, fusion_model, fusion_model_quality
from pipelines.resources import Workspace

TASK = "simulated_mace_1y"  # quality gates in its task file: min_auroc 0.55, max_calibration_error 0.1


def write_candidate(root: Path, metrics: bytes) -> Path:
    """A whole candidate model folder of ``TASK`` under ``root``'s warehouse with this ``metrics.json``."""
    folder = root / "warehouse" / "candidate_models" / TASK
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_bytes(metrics)
    (folder / "model.safetensors").write_bytes(b"weights")
    for name in ("config.json", "vocabulary.json", "calibration.json"):
        (folder / name).write_text("{}")
    (folder / "cohortcast_model.json").write_text(json.dumps(
        {"format_version": MODEL_FORMAT_VERSION, "task": TASK, "targets": ["risk"],
         "files": model_file_digests(folder)}))
    return folder


def metrics_json(auroc: float, calibration_error: float = 0.05) -> bytes:
    return json.dumps({"models": {"fusion": {"auroc": auroc, "calibration_error": calibration_error}}}).encode()


def quality_check(root: Path) -> dg.AssetCheckEvaluation:
    """``fusion_model_quality`` on the candidate already in ``root``, in a run with the deployment it
    guards; a candidate deployed means the check passed, and a failed check left none deployed."""
    result = dg.materialize(
        [fusion_model, fusion_model_quality, deployed_model],
        selection=dg.AssetSelection.checks(fusion_model_quality) | dg.AssetSelection.assets(deployed_model),
        partition_key=TASK, resources={"workspace": Workspace(root=str(root))}, raise_on_error=False)
    [check] = result.get_asset_check_evaluations()
    deployed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"] \
        == ["fusion_model_fusion_model_quality", "deployed_model"]
    assert deployed == check.passed == (root / "warehouse" / "models" / TASK / "metrics.json").is_file()
    return check


def test_a_candidate_meeting_the_tasks_gates_passes_the_quality_check(tmp_path: Path) -> None:
    write_candidate(tmp_path, metrics_json(0.71))
    check = quality_check(tmp_path)
    assert check.passed
    assert {key: value.value for key, value in check.metadata.items()} == {
        "auroc": 0.71, "min_auroc": 0.55, "calibration_error": 0.05, "max_calibration_error": 0.1}


def test_a_candidate_below_the_tasks_gates_fails_the_quality_check(tmp_path: Path) -> None:
    write_candidate(tmp_path, metrics_json(0.52))
    assert not quality_check(tmp_path).passed


def test_a_candidate_whose_metrics_were_edited_fails_the_quality_check_with_the_reason(tmp_path: Path) -> None:
    folder = write_candidate(tmp_path, metrics_json(0.52))
    # Edited after training to pass the gate: its digest is no longer the one training recorded.
    (folder / "metrics.json").write_bytes(metrics_json(0.91))
    check = quality_check(tmp_path)
    assert not check.passed
    reason = check.metadata["reason"].value
    assert reason.startswith(f"quality check of {TASK}'s candidate model failed: model folder {folder}")
    assert "metrics.json" in reason
    assert check.metadata["min_auroc"].value == 0.55


def test_a_candidate_with_damaged_metrics_fails_the_quality_check_with_the_reason(tmp_path: Path) -> None:
    folder = write_candidate(tmp_path, b'{"models": {"fusion": {"auroc": 0.7')
    check = quality_check(tmp_path)
    assert not check.passed
    assert check.metadata["reason"].value.startswith(
        f"quality check of {TASK}'s candidate model failed: {folder / 'metrics.json'} is not JSON (")


def test_a_candidate_without_a_calibration_error_fails_the_quality_check_with_the_reason(tmp_path: Path) -> None:
    folder = write_candidate(tmp_path, json.dumps({"models": {"fusion": {"auroc": 0.7}}}).encode())
    check = quality_check(tmp_path)
    assert not check.passed
    assert check.metadata["reason"].value == (
        f"quality check of {TASK}'s candidate model failed: {folder / 'metrics.json'} has no models.fusion auroc "
        "and calibration_error (expected the held-out metrics training writes; train the model again)")


def test_deployed_model_reports_the_deployed_models_held_out_metrics(tmp_path: Path) -> None:
    write_candidate(tmp_path, metrics_json(0.71, 0.04))
    result = dg.materialize([fusion_model, deployed_model], selection=dg.AssetSelection.assets(deployed_model),
                            partition_key=TASK, resources={"workspace": Workspace(root=str(tmp_path))})
    [materialization] = result.asset_materializations_for_node("deployed_model")
    live = tmp_path / "warehouse" / "models" / TASK
    assert {key: value.value for key, value in materialization.metadata.items()} == {
        "path": str(live), "held_out/auroc": 0.71, "held_out/calibration_error": 0.04}
    assert (live / "metrics.json").read_bytes() == metrics_json(0.71, 0.04)
