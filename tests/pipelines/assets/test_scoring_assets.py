"""Tests of the scoring assets' drift check and of the gates ``published_cohort`` applies at publish time.

The workspace is built by hand (a model folder with its metrics and drift reference, scores, an
ingest accounting and a live version), so each test runs only ``published_cohort`` and the drift
check, as a nightly run does after re-scoring.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.ingest import SUMMARY_FILE, FileAccount, IngestSummary
from features.schemas import SCORES
from features.tabular import TabularCodes, aggregate_before
from models.drift import (
    INPUT_REFERENCE_FILE,
    PREVIOUS_PREFIX,
    PSI_ALARM,
    REFERENCE_FILE,
    input_reference,
    save_reference,
)
from models.publishing import current_version, publish
from models.scoring import RiskTiers, model_version
from models.task_model import MODEL_FORMAT_VERSION, model_file_digests
from pipelines.assets.scoring import (
    _input_label,
    published_cohort,
    risk_scores,
    risk_scores_drift,
    risk_scores_input_drift,
)
from pipelines.resources import Workspace

TASK = "simulated_mace_1y"  # quality gates in its task file: min_auroc 0.55, max_calibration_error 0.1
# The training cohort's risks: 1000 evenly spread, so that each decile bin holds a tenth of them.
REFERENCE = (np.arange(1000) + 0.5) / 1000
# Drifted: half the cohort in the lowest decile of the reference, half in the highest.
DRIFTED = np.repeat([0.05, 0.95], 500)


def scores_table(risk: np.ndarray, version: str) -> pa.Table:
    n = len(risk)
    return pa.table({
        "subject_id": np.arange(1, n + 1), "prediction_time": [datetime(2025, 6, 1)] * n, "task": [TASK] * n,
        "risk": risk, "risk_tier": RiskTiers().assign(risk), "previous_risk": [None] * n,
        "previous_model_version": [None] * n, "survival_times_days": [[365.0]] * n,
        "survival_curve": [[1 - r] for r in risk],
        "treatment_effect": [None] * n, "modality_shares": [[]] * n, "top_items": [[]] * n,
        "model_version": [version] * n,
    }, schema=SCORES)


def make_workspace(root: Path, today: np.ndarray, auroc: float = 0.7, observations_out: int = 5) -> Path:
    """A workspace whose model (held-out ``auroc``) scored ``today`` and whose live version is v0001."""
    warehouse = root / "warehouse"
    model = warehouse / "models" / TASK
    model.mkdir(parents=True)
    (model / "metrics.json").write_text(json.dumps({"models": {"fusion": {"auroc": auroc, "calibration_error": 0.05}}}))
    (model / "model.safetensors").write_bytes(b"weights")
    for name in ("config.json", "vocabulary.json", "calibration.json"):
        (model / name).write_text("{}")
    save_reference(model / REFERENCE_FILE, {"train": REFERENCE[:600], "tuning": REFERENCE[600:800],
                                            "held_out": REFERENCE[800:]})
    summary = IngestSummary(
        landing_dir="landing", warehouse_dir=str(warehouse), export_time=datetime(2026, 1, 1), strict=False,
        files=(FileAccount("fhir", "Patient.ndjson", 1000, 1000, 0),
               FileAccount("fhir", "Observation.ndjson", 5, observations_out, 0)),
        table_rows={}, quarantined_by_reason={}, duplicates=0, fhir_resources_in=1005, elapsed_seconds=0.1,
    )
    (warehouse / SUMMARY_FILE).write_bytes(summary.to_json())
    ids = list(range(1, len(today) + 1))
    patients = pl.DataFrame({"subject_id": ids, "patient_id": [f"p-{i}" for i in ids],
                             "death_time": pl.Series([None] * len(ids), dtype=pl.Datetime("us")),
                             "deceased": [False] * len(ids)})
    patients.write_parquet(warehouse / "patients.parquet")
    pl.DataFrame({"code": ["LOINC//8480-6"], "description": ["Systolic blood pressure"]}).write_parquet(
        warehouse / "codes.parquet")
    # The model's inputs: each patient's systolic blood pressure a month before the prediction time;
    # the reference is the training cohort's aggregates, today's data the same.
    cohort = pl.DataFrame({"subject_id": ids, "prediction_time": [datetime(2025, 6, 1)] * len(ids),
                           "age_years": np.linspace(30, 90, len(ids)), "sex": ["female", "male"] * (len(ids) // 2)})
    events = pl.DataFrame({"subject_id": ids, "time": [datetime(2025, 5, 1)] * len(ids),
                           "known_time": pl.Series([None] * len(ids), dtype=pl.Datetime("us")),
                           "code": ["LOINC//8480-6"] * len(ids), "numeric_value": np.linspace(100, 180, len(ids)),
                           "text_value": pl.Series([None] * len(ids), dtype=pl.String), "modality": ["ehr"] * len(ids)})
    (warehouse / "tasks" / TASK).mkdir(parents=True)
    cohort.write_parquet(warehouse / "tasks" / TASK / "cohort.parquet")
    pl.DataFrame({"subject_id": ids, "event": [False] * len(ids)}).write_parquet(
        warehouse / "tasks" / TASK / "labels.parquet")
    events.write_parquet(warehouse / "events.parquet")
    codes = TabularCodes(["LOINC//8480-6"], ["LOINC//8480-6"])
    input_reference(aggregate_before(events, cohort, codes)).write_parquet(model / INPUT_REFERENCE_FILE)
    write_model_info(model)
    (warehouse / "scores").mkdir()
    scores = scores_table(today, model_version(model))
    pq.write_table(scores, warehouse / "scores" / f"{TASK}.parquet")
    # The live version: today's scores published before (so comparing with it finds no drift).
    publish(scores, patients, root / "published", TASK, 365, "MACE", {"run_id": "before"})
    return root


def write_model_info(model: Path, **info: str) -> None:
    """The folder's ``cohortcast_model.json`` with the SHA-256 of its files, as training writes it."""
    (model / "cohortcast_model.json").write_text(json.dumps(
        {"format_version": MODEL_FORMAT_VERSION, "task": TASK, "targets": ["risk"],
         "files": model_file_digests(model), **info}))


def publish_and_check(root: Path, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    """``published_cohort`` and the drift check in one run, as after the nightly re-score."""
    return dg.materialize(
        [risk_scores, published_cohort, risk_scores_drift],
        selection=dg.AssetSelection.assets(published_cohort) | dg.AssetSelection.checks(risk_scores_drift),
        partition_key=TASK, resources={"workspace": Workspace(root=str(root))}, raise_on_error=False,
        run_config=run_config or {},
    )


def test_drift_is_measured_against_the_training_cohort_not_this_runs_publication(tmp_path: Path) -> None:
    result = publish_and_check(make_workspace(tmp_path, DRIFTED))
    assert result.success
    started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    # The publication runs first, so the live version is today's scores when the check reads.
    assert started == ["published_cohort", "risk_scores_risk_scores_drift"]
    assert current_version(tmp_path / "published", TASK) == "v0002"
    [check] = result.get_asset_check_evaluations()
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.WARN)
    # Per task: another task's check result never stands for this one's.
    assert check.partition == TASK
    metadata = {key: value.value for key, value in check.metadata.items()}
    # Two bins of the reference's ten hold all of today's risks: 0.5 each against 0.1; the eight
    # empty ones count at the index's floor of 1e-4.
    expected = 2 * (0.5 - 0.1) * math.log(0.5 / 0.1) + 8 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert metadata["risk_psi"] == pytest.approx(expected, rel=1e-12)
    assert round(expected, 4) == 6.8082
    assert metadata["reference"] == "training cohort"
    assert (metadata["reference_patients"], metadata["patients"]) == (1000, 1000)


def test_scores_like_the_training_cohorts_pass_the_drift_check(tmp_path: Path) -> None:
    result = publish_and_check(make_workspace(tmp_path, np.random.default_rng(0).permutation(REFERENCE)))
    [check] = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["risk_psi"].value == 0.0


def test_a_run_that_deployed_a_new_model_measures_drift_against_the_model_before(tmp_path: Path) -> None:
    make_workspace(tmp_path, REFERENCE)
    model = tmp_path / "warehouse" / "models" / TASK
    # Deployed in this run (after it started; trained in an earlier one): its own reference is
    # today's data; the model it replaced trained on yesterday's, whose risks were all in the
    # reference's top decile.
    write_model_info(model, created="2000-01-01T00:00:00+00:00", deployed="2999-01-01T00:00:00+00:00")
    save_reference(model / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}", {"train": np.full(1000, 0.95)})
    [check] = publish_and_check(tmp_path).get_asset_check_evaluations()
    metadata = {key: value.value for key, value in check.metadata.items()}
    assert metadata["reference"] == "previous model's training cohort (this run deployed a new model)"
    assert not check.passed and metadata["risk_psi"] > PSI_ALARM
    (model / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").unlink()
    [check] = publish_and_check(tmp_path).get_asset_check_evaluations()
    assert check.metadata["reference"].value == "training cohort (this run deployed the first model)"
    assert check.passed


def test_a_model_folder_without_a_reference_fails_the_drift_check_with_the_reason(tmp_path: Path) -> None:
    make_workspace(tmp_path, DRIFTED)
    model = tmp_path / "warehouse" / "models" / TASK
    (model / REFERENCE_FILE).unlink()
    [check] = publish_and_check(tmp_path).get_asset_check_evaluations()
    assert not check.passed
    assert check.metadata["reference"].value == f"none: {model} has no {REFERENCE_FILE} (train the model again)"


def input_drift_check(root: Path) -> dg.AssetCheckEvaluation:
    """The input drift check, in a run with the publication, as after the nightly re-score."""
    result = dg.materialize(
        [risk_scores, published_cohort, risk_scores_input_drift],
        selection=dg.AssetSelection.assets(published_cohort) | dg.AssetSelection.checks(risk_scores_input_drift),
        partition_key=TASK, resources={"workspace": Workspace(root=str(root))},
    )
    [check] = result.get_asset_check_evaluations()
    return check


def test_inputs_like_the_training_cohorts_pass_the_input_drift_check(tmp_path: Path) -> None:
    check = input_drift_check(make_workspace(tmp_path, REFERENCE))
    assert check.passed
    metadata = {key: value.value for key, value in check.metadata.items()}
    # age, sex, four modality counts, and the code's count, days since and last value.
    assert (metadata["max_input_psi"], metadata["inputs"], metadata["inputs_above_retrain"]) == (0.0, 9, 0)


def test_a_blood_pressure_feed_that_stopped_warns_and_is_named(tmp_path: Path) -> None:
    make_workspace(tmp_path, REFERENCE)
    # Upstream stopped sending blood pressures for the older half of the cohort.
    events = pl.read_parquet(tmp_path / "warehouse" / "events.parquet")
    events.filter(pl.col("subject_id") <= 500).write_parquet(tmp_path / "warehouse" / "events.parquet")
    check = input_drift_check(tmp_path)
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.WARN)
    metadata = {key: value.value for key, value in check.metadata.items()}
    # The latest value: half the cohort, the upper five of the reference's ten decile bins, is now
    # missing (a bin that held none of it: the index's 1e-4 floor).
    latest = 5 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    # The count and the number of EHR events (1 for everyone, now 0 for half) and the days since
    # (now missing for half): half the cohort leaves the one bin that held all of it.
    half = (0.5 - 1e-4) * math.log(0.5 / 1e-4) + (0.5 - 1) * math.log(0.5 / 1)
    assert metadata["max_input_psi"] == pytest.approx(latest)
    assert (metadata["inputs_above_warn"], metadata["inputs_above_retrain"]) == (4, 4)
    assert metadata["most_drifted"].splitlines()[2:6] == [
        f"| last__LOINC//8480-6 (Systolic blood pressure) | {latest:.3f} | 0.0% | 50.0% |",
        f"| count__LOINC//8480-6 (Systolic blood pressure) | {half:.3f} | 0.0% | 0.0% |",
        f"| days_since__LOINC//8480-6 (Systolic blood pressure) | {half:.3f} | 0.0% | 50.0% |",
        f"| n_ehr_events | {half:.3f} | 0.0% | 0.0% |",
    ]


def test_a_model_folder_without_an_input_reference_warns_with_the_reason(tmp_path: Path) -> None:
    make_workspace(tmp_path, REFERENCE)
    model = tmp_path / "warehouse" / "models" / TASK
    # Trained without one (training writes it only when it has the inputs' aggregates).
    (model / INPUT_REFERENCE_FILE).unlink()
    write_model_info(model)
    check = input_drift_check(tmp_path)
    assert not check.passed
    assert check.metadata["reference"].value == f"none: {model} has no {INPUT_REFERENCE_FILE} (train the model again)"


def refusal(result: dg.ExecuteInProcessResult, step: str = "published_cohort") -> str:
    """The one line Dagster shows for the failed ``step``."""
    [failure] = result.get_step_failure_events()
    assert failure.step_key == step
    error = failure.step_failure_data.error
    assert error is not None and error.cause is not None
    return error.cause.message.strip()


def test_a_model_below_the_tasks_gates_is_not_published_by_a_rescore_run(tmp_path: Path) -> None:
    make_workspace(tmp_path, DRIFTED, auroc=0.42)
    result = publish_and_check(tmp_path)
    assert not result.success
    model = tmp_path / "warehouse" / "models" / TASK
    assert refusal(result) == (
        f"models.publishing.PublishError: publish {TASK} refused (live version v0001 unchanged): model {model} "
        "misses the task's quality gates: held-out auroc 0.4200 (expected >= 0.55)"
    )
    assert result.get_asset_materialization_events() == []
    assert (tmp_path / "published" / TASK / "CURRENT").read_text() == "v0001\n"
    assert sorted(p.name for p in (tmp_path / "published" / TASK).iterdir()) == ["CURRENT", "v0001"]
    # The run's override of the gates applies at publish time too (the demo's small cohorts).
    lowered = publish_and_check(tmp_path, {"ops": {"published_cohort": {"config": {"min_auroc": 0.4}}}})
    assert lowered.success and current_version(tmp_path / "published", TASK) == "v0002"


def test_an_unbalanced_ingest_is_not_published_by_a_rescore_run(tmp_path: Path) -> None:
    make_workspace(tmp_path, DRIFTED, observations_out=4)
    result = publish_and_check(tmp_path)
    assert not result.success
    assert refusal(result) == (
        f"models.publishing.PublishError: publish {TASK} refused (live version v0001 unchanged): "
        f"{tmp_path / 'warehouse' / SUMMARY_FILE}: 1 of 2 source files do not balance (expected "
        "records_in == records_out + quarantined; first: Observation.ndjson)"
    )
    assert result.get_asset_materialization_events() == []
    assert (tmp_path / "published" / TASK / "CURRENT").read_text() == "v0001\n"
    assert sorted(p.name for p in (tmp_path / "published" / TASK).iterdir()) == ["CURRENT", "v0001"]


def test_a_publication_records_the_quality_gates_it_passed(tmp_path: Path) -> None:
    make_workspace(tmp_path, REFERENCE)
    gates = {"min_auroc": 0.6, "max_calibration_error": 0.08}  # stricter than the task file's
    result = publish_and_check(tmp_path, {"ops": {"published_cohort": {"config": gates}}})
    assert result.success
    manifest = json.loads((tmp_path / "published" / TASK / "v0002" / "manifest.json").read_text())
    assert manifest["lineage"]["quality_gates"] == gates
    publish_and_check(tmp_path)
    manifest = json.loads((tmp_path / "published" / TASK / "v0003" / "manifest.json").read_text())
    assert manifest["lineage"]["quality_gates"] == {"min_auroc": 0.55, "max_calibration_error": 0.1}


def test_an_input_is_labelled_with_its_code_and_its_coded_answer() -> None:
    descriptions = {"LOINC//8480-6": "Systolic blood pressure", "LOINC//72166-2": "Tobacco smoking status",
                    "SNOMED//77176002": "Smoker", "GENE//CYP2C19": "CYP2C19 genotype"}
    assert _input_label("last__LOINC//8480-6", descriptions) == "last__LOINC//8480-6 (Systolic blood pressure)"
    assert (_input_label("count__LOINC//72166-2//SNOMED//77176002", descriptions)
            == "count__LOINC//72166-2//SNOMED//77176002 (Tobacco smoking status: Smoker)")
    assert (_input_label("last__GENE//CYP2C19//rs4244285", descriptions)
            == "last__GENE//CYP2C19//rs4244285 (CYP2C19 genotype: rs4244285)")
    assert _input_label("age_years", descriptions) == "age_years"
    assert _input_label("count__ICD10CM//I50", descriptions) == "count__ICD10CM//I50"


def test_publishing_without_scores_says_what_to_run_first(tmp_path: Path) -> None:
    make_workspace(tmp_path, DRIFTED)
    scores = tmp_path / "warehouse" / "scores" / f"{TASK}.parquet"
    scores.unlink()
    result = dg.materialize([risk_scores, published_cohort], selection=dg.AssetSelection.assets(published_cohort),
                            partition_key=TASK, resources={"workspace": Workspace(root=str(tmp_path))},
                            raise_on_error=False)
    assert not result.success
    assert refusal(result) == (f"models.publishing.PublishError: task '{TASK}' has no scores at {scores}: "
                               "materialize risk_scores first (the task_pipeline job does both)")
    assert (tmp_path / "published" / TASK / "CURRENT").read_text() == "v0001\n"


def test_scoring_without_a_deployed_model_names_the_gates_its_candidate_missed(tmp_path: Path) -> None:
    make_workspace(tmp_path, DRIFTED, auroc=0.42)
    warehouse = tmp_path / "warehouse"
    live, candidate = warehouse / "models" / TASK, warehouse / "candidate_models" / TASK
    candidate.parent.mkdir()
    live.rename(candidate)  # trained, never deployed

    def score() -> dg.ExecuteInProcessResult:
        return dg.materialize([risk_scores], partition_key=TASK, resources={"workspace": Workspace(root=str(tmp_path))},
                              raise_on_error=False)

    result = score()
    assert not result.success
    assert refusal(result, "risk_scores") == (
        f"models.publishing.PublishError: task '{TASK}' has no deployed model at {live}: the candidate model at "
        f"{candidate} misses the task's quality gates (held-out auroc 0.4200 (expected >= 0.55)), so it was not "
        "deployed; train a better model, or change the gates (publishing.min_auroc, publishing.max_calibration_error "
        "in the task file)"
    )
    passing = {"models": {"fusion": {"auroc": 0.7, "calibration_error": 0.05}}}
    (candidate / "metrics.json").write_text(json.dumps(passing))
    write_model_info(candidate)
    assert refusal(score(), "risk_scores") == (
        f"models.publishing.PublishError: task '{TASK}' has no deployed model at {live}: the candidate model at "
        f"{candidate} meets the task's quality gates but is not deployed yet; materialize deployed_model"
    )
