"""Scoring and publishing assets: the ranked, explained, versioned cohort people act on.

Stage: scoring and publishing. In: a task's ``fusion_model`` and model inputs, the warehouse's
``patients`` table and the previously published cohort. Out: ``risk_scores`` (every cohort patient
scored, under ``WAREHOUSE/scores/<task>.parquet``) and ``published_cohort`` (a new version under
``WORKSPACE/published/<task>/``, the DuckDB database and FHIR RiskAssessments).

Publishing is gated: every upstream check that is blocking (ingest accounting, leakage, split
disjointness, model quality) stops the run before ``published_cohort`` when it fails, so the
previous version stays live, and the failed check in the Dagster UI says why. The drift check warns.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from features.io import write_parquet_atomic
from features.tasks import load_task
from models.drift import PSI_ALARM, PSI_WARN, population_stability_index
from models.publishing import current_scores, publish
from models.scoring import RiskTiers, score_task
from pipelines.assets.tasks import TASKS_DIR, task_partitions
from pipelines.assets.training import model_dir
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


@dg.asset_check(asset=risk_scores, description="Score and input distributions against the last publication (PSI).")
def risk_scores_drift(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
    task = context.run.tags.get("dagster/partition", "")
    today = pq.read_table(scores_path(workspace, task), columns=["risk"]).column("risk").to_numpy()
    previous = current_scores(published_dir(workspace), task)
    if previous is None or previous.height == 0:
        return dg.AssetCheckResult(passed=True, metadata={"reference": "none yet (first publication)"})
    psi = population_stability_index(previous["risk"].to_numpy(), today)
    return dg.AssetCheckResult(
        passed=psi < PSI_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"risk_psi": psi, "warn_above": PSI_WARN, "retrain_above": PSI_ALARM,
                  "reference_version_patients": previous.height},
    )


@dg.asset(group_name="publishing", partitions_def=task_partitions, deps=[risk_scores, "patients", "codes"],
          kinds={"duckdb", "fhir"})
def published_cohort(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """A new live version of the task's cohort: Parquet, DuckDB and FHIR RiskAssessments."""
    task = load_task(TASKS_DIR / f"{context.partition_key}.yaml")
    scores = pq.read_table(scores_path(workspace, task.name))
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
