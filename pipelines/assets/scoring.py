"""Scoring and publishing assets: the ranked, explained, versioned cohort people act on.

Stage: scoring and publishing. In: a task's ``deployed_model`` and model inputs, the warehouse's
``patients`` table and the previously published cohort. Out: ``risk_scores`` (every cohort patient
scored, under ``WAREHOUSE/scores/<task>.parquet``) and ``published_cohort`` (a new version under
``WORKSPACE/published/<task>/``, the DuckDB database and FHIR RiskAssessments).

Publishing is gated: every upstream check that is blocking (ingest accounting, leakage, split
disjointness, model quality) stops the run before ``published_cohort`` when it fails, so the
previous version stays live, and the failed check in the Dagster UI says why. A check only stops
the run it is in, so ``published_cohort`` applies the model's quality gates and the ingest's
accounting again (:func:`models.publishing.check_publishable`) and fails, with the reason, rather
than publish from a rejected model or an unbalanced warehouse (a nightly run that only re-scores).

The drift checks warn. One compares today's risks with those the model gave its training cohort,
the other each of today's model inputs (the tabular aggregates) with the training cohort's; both
references are saved in the model folder (:mod:`models.drift`), which this run's publication
cannot change.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from features.ingest import warehouse_read, warehouse_site_timezone
from features.io import write_parquet_atomic
from features.task_inputs import stale_task_inputs, tabular_features_for
from features.tasks import TaskDefinition
from features.tokenize import saved_unit_keys
from models.drift import (
    INPUT_REFERENCE_FILE,
    PSI_ALARM,
    PSI_WARN,
    REFERENCE_FILE,
    input_drift,
    load_input_reference,
    load_reference,
    population_stability_index,
    reference_codes,
)
from models.publishing import (
    PublishError,
    check_publishable,
    comparable_scores,
    data_lineage,
    describe_token,
    held_out_metrics,
    outcome_recorded_subjects,
    patients_to_list,
    publish,
    quality_shortfalls,
    source_item_descriptions,
)
from models.scoring import RiskTiers, score_task
from pipelines.assets.tasks import IMAGING, NOTES, task_of_partition, task_partitions
from pipelines.assets.training import ModelQualityConfig, candidate_model_dir, model_dir, quality_gates
from pipelines.resources import Workspace

T = TypeVar("T")


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
          deps=["deployed_model", "event_tokens", "note_embeddings", "imaging_inputs"], kinds={"parquet"})
def risk_scores(context: dg.AssetExecutionContext, config: ScoringRunConfig,
                workspace: Workspace) -> dg.MaterializeResult:
    """Risk, survival curve, treatment effect, tier and explanation of every cohort patient."""
    task = context.partition_key
    definition = task_of_partition(task)
    check_model_deployed(workspace, definition)
    if (stale := stale_task_inputs(workspace.warehouse_dir, task)) is not None:
        raise PublishError(f"score {task} refused: {stale}")
    tiers = definition.publishing
    previous = comparable_scores(published_dir(workspace), task, definition.horizon_days,
                                 definition.description or definition.name)
    scores = score_task(model_dir(workspace, task), workspace.warehouse_dir / "tasks" / task, task,
                        RiskTiers(tiers.high_share, tiers.medium_share), previous, config.top_items,
                        with_explanations=config.explanations, bf16=config.bf16,
                        horizon_days=definition.horizon_days, target=definition.prediction_target())
    path = write_parquet_atomic(scores, scores_path(workspace, task))
    tiers = pl.from_arrow(scores.select(["risk_tier"])).to_series().value_counts()  # type: ignore[union-attr]
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "patients": scores.num_rows,
        **{f"tier/{tier}": int(n) for tier, n in tiers.iter_rows()},
        "model_version": scores.column("model_version")[0].as_py() if scores.num_rows else "",
    })


def check_model_deployed(workspace: Workspace, task: TaskDefinition) -> None:
    """Refuse to score a task that has no deployed model, saying why when a candidate was trained.

    A nightly re-scoring run after a training run whose candidate failed its gates would otherwise
    report a missing model folder, as if nothing had been trained.

    Raises
    ------
    PublishError
        When ``models/<task>`` does not exist but ``candidate_models/<task>`` does: with the gates
        the candidate misses (the task file's), or, when it meets them, that it is yet to be deployed.
    """
    live, candidate = model_dir(workspace, task.name), candidate_model_dir(workspace, task.name)
    if live.exists() or not candidate.exists():
        return  # a missing candidate too: scoring's own message says to train one
    refused = f"task '{task.name}' has no deployed model at {live}"
    shortfalls = quality_shortfalls(held_out_metrics(candidate, refused), *quality_gates(task, ModelQualityConfig()))
    if shortfalls:
        raise PublishError(f"{refused}: the candidate model at {candidate} misses the task's quality gates "
                           f"({'; '.join(shortfalls)}), so it was not deployed; train a better model, or change the "
                           "gates (publishing.min_auroc, publishing.max_calibration_error in the task file)")
    raise PublishError(f"{refused}: the candidate model at {candidate} meets the task's quality gates but is not "
                       "deployed yet; materialize deployed_model")


def _deployed_in_this_run(context: dg.AssetCheckExecutionContext, folder: Path) -> bool:
    """Whether the model in ``folder`` was deployed (else, for folders written before deployment was
    recorded, written) after this run started; a re-execution counts from its first run's start."""
    info = json.loads((folder / "cohortcast_model.json").read_text())
    when = info.get("deployed", info.get("created"))
    records = [context.instance.get_run_record_by_id(run_id)
               for run_id in {context.run.run_id, context.run.root_run_id} if run_id is not None]
    starts = [r.start_time for r in records if r is not None and r.start_time is not None]
    if when is None or not starts:
        return False
    return datetime.fromisoformat(when).timestamp() >= int(min(starts))


def _reference_of(context: dg.AssetCheckExecutionContext, folder: Path,
                  load: Callable[..., T | None]) -> tuple[T | None, str]:
    """The drift reference to compare today's data with, and what it is. A run that deployed a new
    model compares with the cohort the model before it trained on: this model's own training
    cohort is today's data (a PSI of 0 whatever the drift)."""
    if _deployed_in_this_run(context, folder):
        previous = load(folder, previous=True)
        if previous is not None:
            return previous, "previous model's training cohort (this run deployed a new model)"
        return load(folder), "training cohort (this run deployed the first model)"
    return load(folder), "training cohort"


@dg.asset_check(asset=risk_scores, partitions_def=task_partitions,
                description="Score distribution against the model's training cohort (PSI).")
def risk_scores_drift(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
    task = task_of_partition(context.partition_key).name
    today = pq.read_table(scores_path(workspace, task), columns=["risk"]).column("risk").to_numpy()
    # Not the live publication: published_cohort runs beside this check and, run first, made the
    # live version today's scores themselves (a PSI of 0 whatever the drift).
    reference, what = _reference_of(context, model_dir(workspace, task), load_reference)
    if reference is None:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={
            "reference": f"none: {model_dir(workspace, task)} has no {REFERENCE_FILE} (train the model again)"})
    psi = population_stability_index(reference, today)
    return dg.AssetCheckResult(
        passed=psi < PSI_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"risk_psi": psi, "warn_above": PSI_WARN, "retrain_above": PSI_ALARM,
                  "reference": what, "reference_patients": reference.size, "patients": today.size},
    )


INPUTS_LISTED = 5
"""How many of the most drifted inputs the input drift check lists."""


def _input_label(feature: str, descriptions: dict[str, str]) -> str:
    """``last__LOINC//8480-6`` -> ``last__LOINC//8480-6 (Systolic blood pressure)``: the token's
    description where the warehouse has one (:func:`models.publishing.describe_token`)."""
    described = describe_token(feature.split("__", 1)[-1], descriptions)
    return f"{feature} ({described})" if described else feature


@dg.asset_check(asset=risk_scores, partitions_def=task_partitions,
                description="Each model input against the model's training cohort (PSI per input).")
def risk_scores_input_drift(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
    definition = task_of_partition(context.partition_key)
    task = definition.name
    reference, what = _reference_of(context, model_dir(workspace, task), load_input_reference)
    if reference is None:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata={
            "reference": f"none: {model_dir(workspace, task)} has no {INPUT_REFERENCE_FILE} (train the model again)"})
    # Today's aggregates for the codes the reference has: the task's own table re-selects the most
    # common codes, and a code that slipped out of them would read as missing for everyone.
    selected = reference_codes(reference, *saved_unit_keys(model_dir(workspace, task) / "vocabulary.json"))
    with warehouse_read(workspace.warehouse_dir):
        inputs = tabular_features_for(workspace.warehouse_dir, definition, selected)
        codes = pl.read_parquet(workspace.warehouse_dir / "codes.parquet", columns=["code", "description"],
                                glob=False)
    drift = input_drift(reference, inputs)
    descriptions = dict(codes.iter_rows())
    worst = drift.head(INPUTS_LISTED).with_columns(
        pl.col("feature").map_elements(lambda f: _input_label(f, descriptions), return_dtype=pl.String))
    table = "\n".join(["| input | PSI | missing in training | missing today |", "| --- | --- | --- | --- |",
                       *(f"| {f} | {psi:.3f} | {ref:.1%} | {now:.1%} |" for f, psi, ref, now in worst.iter_rows())])
    # Hundreds of inputs are compared at once, so one above the warning level happens by chance in
    # a small cohort; the check warns at the level that calls for retraining, and counts the rest.
    return dg.AssetCheckResult(
        passed=bool(drift["psi"].max() < PSI_ALARM),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"max_input_psi": float(drift["psi"].max()),
                  "inputs": drift.height,
                  "inputs_above_warn": int((drift["psi"] >= PSI_WARN).sum()),
                  "inputs_above_retrain": int((drift["psi"] >= PSI_ALARM).sum()),
                  "most_drifted": dg.MetadataValue.md(table), "reference": what},
    )


@dg.asset(group_name="publishing", partitions_def=task_partitions,
          deps=[risk_scores, "patients", "codes", "labels", NOTES, IMAGING], kinds={"duckdb", "fhir"})
def published_cohort(context: dg.AssetExecutionContext, config: ModelQualityConfig,
                     workspace: Workspace) -> dg.MaterializeResult:
    """A new live version of the task's cohort: Parquet, DuckDB and FHIR RiskAssessments."""
    task = task_of_partition(context.partition_key)
    if not scores_path(workspace, task.name).is_file():
        raise PublishError(f"task '{task.name}' has no scores at {scores_path(workspace, task.name)}: materialize "
                           "risk_scores first (the task_pipeline job does both)")
    scores = pq.read_table(scores_path(workspace, task.name))
    # The model's and the ingest's blocking checks are not in every run that publishes (the nightly
    # one re-scores from whatever model folder and warehouse it finds), so their rules run here too.
    min_auroc, max_calibration_error = quality_gates(task, config)
    # Patients, codes, notes and imaging of one ingest: a promotion finishing meanwhile waits.
    with warehouse_read(workspace.warehouse_dir):
        check_publishable(published_dir(workspace), task.name, scores, model_dir(workspace, task.name),
                          workspace.warehouse_dir, min_auroc, max_calibration_error, task.prediction_target())
        patients = pl.read_parquet(workspace.warehouse_dir / "patients.parquet",
                                   columns=["subject_id", "patient_id", "death_time", "deceased"], glob=False)
        codes = pl.concat([
            pl.read_parquet(workspace.warehouse_dir / "codes.parquet", columns=["code", "description"], glob=False),
            source_item_descriptions(scores, workspace.warehouse_dir / "notes.parquet",
                                     workspace.warehouse_dir / "imaging.parquet",
                                     warehouse_site_timezone(workspace.warehouse_dir)),
        ])
    outcome = task.description or task.name
    resolved = outcome_recorded_subjects(workspace.warehouse_dir / "tasks" / task.name / "labels.parquet", task.name)
    listed, left_out = patients_to_list(scores, patients, RiskTiers(task.publishing.high_share,
                                                                    task.publishing.medium_share), resolved)
    publication = publish(listed, patients, published_dir(workspace), task.name, task.horizon_days, outcome,
                          {"run_id": context.run.run_id,
                           **data_lineage(workspace.warehouse_dir, model_dir(workspace, task.name)),
                           # The gates this version passed: a run's config may set others than the task's.
                           "quality_gates": {"min_auroc": min_auroc, "max_calibration_error": max_calibration_error}},
                          codes=codes, left_out=left_out, outcome_recorded=resolved)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(publication.folder)),
        "version": publication.version,
        "patients": publication.n_patients,
        "high_risk_patients": publication.n_high_risk,
        "deceased_left_out": left_out["deceased"],
        "outcome_recorded_left_out": left_out["outcome_recorded"],
    })
