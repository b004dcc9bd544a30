"""Training assets: one fusion model per task, with its held-out evaluation.

Stage: model. In: a task's inputs under ``WAREHOUSE/tasks/<task>/`` (the ``tasks`` and
``model_inputs`` assets) and, for a simulated hospital, ``landing/truth.parquet``. Out:
``fusion_model``, a candidate model folder under ``WAREHOUSE/candidate_models/<task>/`` written by
:func:`models.task_model.train_task_model`; a blocking check of its held-out quality
(:func:`models.publishing.quality_shortfalls`, the rule ``published_cohort`` applies again); and
``deployed_model``, the folder scoring reads, ``WAREHOUSE/models/<task>/``, replaced by the candidate
only when the check passed. A rejected model therefore never displaces the last good one.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
import json
from pathlib import Path

import dagster as dg

from features.tasks import TaskDefinition
from models.publishing import PublishError, deploy_model, held_out_metrics, quality_shortfalls
from models.task_model import train_task_model, trained_with, training_fingerprint, truth_file_mismatch
from models.training import TrainingArguments
from pipelines.assets.tasks import task_of_partition, task_partitions
from pipelines.resources import Workspace

TASK_INPUTS = ["labels", "subject_splits", "event_tokens", "tabular_features", "note_embeddings", "imaging_inputs"]


class ModelQualityConfig(dg.Config):  # type: ignore[misc]
    """Overrides of the task's quality gates (``publishing`` in the task file); unset = the task's."""

    min_auroc: float | None = None
    # Expected calibration error over 10 equal-count bins of predicted risk.
    max_calibration_error: float | None = None


class TrainingRunConfig(dg.Config):  # type: ignore[misc]
    """Training knobs; the defaults suit a few thousand patients on a laptop CPU."""

    max_epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    seed: int = 0
    # Moving average of the weights over about this many epochs; 0 keeps the last weights.
    average_epochs: float = TrainingArguments.average_epochs
    # bf16 autocast on a GPU; False trains in float32, the same model from process to process.
    bf16: bool = TrainingArguments.bf16
    baselines: bool = True


def model_dir(workspace: Workspace, task_name: str) -> Path:
    """The deployed model of a task: the one scoring and publishing read."""
    return workspace.warehouse_dir / "models" / task_name


def candidate_model_dir(workspace: Workspace, task_name: str) -> Path:
    """The model a run trained, deployed only once its quality check passes."""
    return workspace.warehouse_dir / "candidate_models" / task_name


def quality_gates(task: TaskDefinition, config: ModelQualityConfig) -> tuple[float, float]:
    """``(min_auroc, max_calibration_error)``: the run's overrides, else the task file's."""
    return (task.publishing.min_auroc if config.min_auroc is None else config.min_auroc,
            task.publishing.max_calibration_error if config.max_calibration_error is None
            else config.max_calibration_error)


@dg.asset(group_name="model", partitions_def=task_partitions, deps=TASK_INPUTS, kinds={"pytorch"})
def fusion_model(context: dg.AssetExecutionContext, config: TrainingRunConfig,
                 workspace: Workspace) -> dg.MaterializeResult:
    """The task's fusion transformer, calibrated on the tuning split and evaluated on held-out patients:
    a candidate until its quality check passes."""
    task = task_of_partition(context.partition_key)
    truth = workspace.landing_dir / "truth.parquet"
    args = TrainingArguments(max_epochs=config.max_epochs, batch_size=config.batch_size,
                             learning_rate=config.learning_rate, seed=config.seed,
                             average_epochs=config.average_epochs, bf16=config.bf16)
    architecture = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                    "num_attention_heads": config.num_attention_heads, "intermediate_size": 2 * config.hidden_size}
    folder, inputs = candidate_model_dir(workspace, task.name), workspace.warehouse_dir / "tasks" / task.name
    truth_path = truth if truth.is_file() else None
    # The simulator's truth is for its own question (MACE within its horizon from its index visit):
    # another task's reference rows would compare with the wrong answers.
    if truth_path is not None and (why := truth_file_mismatch(truth_path, inputs, task.horizon_days)):
        context.log.info(f"{truth_path} left out: it does not describe task '{task.name}' ({why})")
        truth_path = None
    # The same inputs and settings train the same model (seeded): a run on unchanged data keeps it.
    trained = not trained_with(folder, training_fingerprint(inputs, args, architecture, truth_path, config.baselines,
                                                         task=task))
    if trained:
        train_task_model(inputs, folder, task, args, architecture, truth_path, baselines=config.baselines,
                         on_epoch=lambda r: context.log.info(f"epoch {int(r['epoch'])}: train {r['train_loss']:.4f} "
                                                             f"tuning {r['tuning_loss']:.4f}"))
    else:
        context.log.info(f"{folder} was trained on these inputs with these settings: not trained again")
    metrics = json.loads((folder / "metrics.json").read_text())
    fusion = metrics["models"]["fusion"]
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(folder)),
        "trained_in_this_run": trained,
        "model_card": dg.MetadataValue.md((folder / "MODEL_CARD.md").read_text()),
        "best_epoch": metrics["best_epoch"],
        **{f"held_out/{k}": float(v) for k, v in fusion.items()},
    })


@dg.asset_check(asset=fusion_model, blocking=True, partitions_def=task_partitions,
                description="Held-out AUROC and calibration error meet the run's thresholds.")
def fusion_model_quality(context: dg.AssetCheckExecutionContext, config: ModelQualityConfig,
                         workspace: Workspace) -> dg.AssetCheckResult:
    task = task_of_partition(context.partition_key)
    min_auroc, max_error = quality_gates(task, config)
    gates = {"min_auroc": min_auroc, "max_calibration_error": max_error}
    try:
        fusion = held_out_metrics(candidate_model_dir(workspace, task.name),
                                  f"quality check of {task.name}'s candidate model failed")
    except PublishError as error:  # a candidate the check cannot read fails it, with the reason
        return dg.AssetCheckResult(passed=False, metadata={"reason": str(error), **gates})
    return dg.AssetCheckResult(passed=not quality_shortfalls(fusion, min_auroc, max_error), metadata={
        "auroc": fusion["auroc"], "min_auroc": min_auroc,
        "calibration_error": fusion["calibration_error"], "max_calibration_error": max_error,
    })


@dg.asset(group_name="model", partitions_def=task_partitions, deps=[fusion_model], kinds={"pytorch"})
def deployed_model(context: dg.AssetExecutionContext, config: ModelQualityConfig,
                   workspace: Workspace) -> dg.MaterializeResult:
    """The model scoring reads: the candidate ``fusion_model``, once it meets the quality gates.

    After a failed blocking check Dagster does not run this asset; run on its own (the check is then
    not in the run), it applies the same gates itself and fails, keeping the model before."""
    task = task_of_partition(context.partition_key)
    folder = deploy_model(candidate_model_dir(workspace, task.name), model_dir(workspace, task.name),
                          *quality_gates(task, config))
    fusion = held_out_metrics(folder, f"deployed model of {task.name}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(folder)),
        "held_out/auroc": float(fusion["auroc"]),
        "held_out/calibration_error": float(fusion["calibration_error"]),
    })
