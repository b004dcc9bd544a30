"""Scoring and publishing assets: the ranked, explained, versioned cohort people act on.

Stage: scoring and publishing. In: a task's ``fusion_model`` and model inputs, the warehouse's
``patients`` table and the previously published cohort. Out: ``risk_scores`` (every cohort patient
scored, under ``WAREHOUSE/scores/<task>.parquet``) and ``published_cohort`` (a new version under
``WORKSPACE/published/<task>/``, the DuckDB database and FHIR RiskAssessments).

Publishing is gated: every upstream check that is blocking (ingest accounting, leakage, split
disjointness, model quality) stops the run before ``published_cohort`` when it fails, so the
previous version stays live, and the failed check in the Dagster UI says why. A check only stops
the run it is in, so ``published_cohort`` applies the model's quality gates and the ingest's
accounting again (:func:`models.publishing.check_publishable`) and fails, with the reason, rather
than publish from a rejected model or an unbalanced warehouse (a nightly run that only re-scores).

The drift check warns. It compares today's risks with those the model gave its training cohort,
saved in the model folder (:mod:`models.drift`): a reference this run's publication cannot change.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from features.io import write_parquet_atomic
from features.tasks import load_task
from models.drift import PSI_ALARM, PSI_WARN, REFERENCE_FILE, load_reference, population_stability_index
from models.publishing import check_publishable, current_scores, publish
from models.scoring import RiskTiers, score_task
from pipelines.assets.tasks import TASKS_DIR, task_partitions
from pipelines.assets.training import ModelQualityConfig, model_dir, quality_gates
from pipelines.resources import Workspace


class ScoringRunConfig(dg.Config):  # type: ignore[misc]
    """Explanations and precision; the risk tiers come from the task file (``publishing``)."""

    explanations: bool = True
    top_items: int = 5
    # bfloat16 autocast for the forward passes; unset: on where the CPU (AMX or AVX512-BF16) or GPU
    # computes bfloat16 natively, 1.2-1.4x faster with risks within about 0.001 of float32.
    bf16: bool | None = None


def published_dir(workspace: Workspace) -> Path:
    return workspace.root_dir / "published"


def scores_path(workspace: Workspace, task: str) -> Path:
    return workspace.warehouse_dir / "scores" / f"{task}.parquet"


@dg.asset(group_name="scoring", partitions_def=task_partitions,
          deps=["fusion_model", "event_tokens", "note_embeddings", "imaging_inputs"], kinds={"parquet"})
def risk_scores(context: dg.AssetExecutionContext, config: ScoringRunConfig,
                workspace: Workspace) -> dg.MaterializeResult:
    """Risk, survival curve, treatment effect, tier and explanation of every cohort patient."""
    task = context.partition_key
    tiers = load_task(TASKS_DIR / f"{task}.yaml").publishing
    previous = current_scores(published_dir(workspace), task)
    scores = score_task(model_dir(workspace, task), workspace.warehouse_dir / "tasks" / task, task,
                        RiskTiers(tiers.high_share, tiers.medium_share), previous, config.top_items,
                        with_explanations=config.explanations, bf16=config.bf16)
    path = write_parquet_atomic(scores, scores_path(workspace, task))
    tiers = pl.from_arrow(scores.select(["risk_tier"])).to_series().value_counts()  # type: ignore[union-attr]
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "patients": scores.num_rows,
        **{f"tier/{tier}": int(n) for tier, n in tiers.iter_rows()},
        "model_version": scores.column("model_version")[0].as_py() if scores.num_rows else "",
    })


@dg.asset_check(asset=risk_scores, description="Score distribution against the model's training cohort (PSI).")
def risk_scores_drift(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
    task = context.run.tags.get("dagster/partition", "")
    today = pq.read_table(scores_path(workspace, task), columns=["risk"]).column("risk").to_numpy()
    # Not the live publication: published_cohort runs beside this check and, run first, made the
    # live version today's scores themselves (a PSI of 0 whatever the drift).
    reference = load_reference(model_dir(workspace, task))
    if reference is None:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={
            "reference": f"none: {model_dir(workspace, task)} has no {REFERENCE_FILE} (train the model again)"})
    psi = population_stability_index(reference, today)
    return dg.AssetCheckResult(
        passed=psi < PSI_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"risk_psi": psi, "warn_above": PSI_WARN, "retrain_above": PSI_ALARM,
                  "reference": "training cohort", "reference_patients": reference.size, "patients": today.size},
    )


@dg.asset(group_name="publishing", partitions_def=task_partitions, deps=[risk_scores, "patients", "codes"],
          kinds={"duckdb", "fhir"})
def published_cohort(context: dg.AssetExecutionContext, config: ModelQualityConfig,
                     workspace: Workspace) -> dg.MaterializeResult:
    """A new live version of the task's cohort: Parquet, DuckDB and FHIR RiskAssessments."""
    task = load_task(TASKS_DIR / f"{context.partition_key}.yaml")
    scores = pq.read_table(scores_path(workspace, task.name))
    # The model's and the ingest's blocking checks are not in every run that publishes (the nightly
    # one re-scores from whatever model folder and warehouse it finds), so their rules run here too.
    check_publishable(published_dir(workspace), task.name, scores, model_dir(workspace, task.name),
                      workspace.warehouse_dir, *quality_gates(task, config))
    patients = pl.read_parquet(workspace.warehouse_dir / "patients.parquet", columns=["subject_id", "patient_id"])
    codes = pl.read_parquet(workspace.warehouse_dir / "codes.parquet", columns=["code", "description"])
    outcome = task.description or task.name
    publication = publish(scores, patients, published_dir(workspace), task.name, task.horizon_days, outcome,
                          {"run_id": context.run.run_id, "warehouse": str(workspace.warehouse_dir),
                           "model": str(model_dir(workspace, task.name))}, codes=codes)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(publication.folder)),
        "version": publication.version,
        "patients": publication.n_patients,
        "high_risk_patients": publication.n_high_risk,
    })
