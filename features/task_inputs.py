"""One task's labels, splits and model inputs, written under ``WAREHOUSE/tasks/<task name>/``.

Stage: tasks and model inputs. In: the warehouse's ``events.parquet`` (required), ``notes.parquet``
and ``imaging.parquet`` (optional: a missing modality is simply absent) and a task. Out, in
``tasks/<name>/``: ``cohort``, ``labels``, ``splits``, ``event_tokens`` (+ ``vocabulary.json``),
``tabular_features``, ``note_embeddings`` and ``imaging_inputs`` Parquet files and
``summary.json``. Each step is a function of the files of the steps before it, so the CLI runs them
in a row and Dagster runs each as an asset; every file is written atomically.

A step whose inputs (file sizes and modification times, the task definition, the step's
settings and :data:`STEPS_VERSION`) and outputs (its Parquet file and side files such as
``vocabulary.json``, by size and modification time) are those recorded in its ``.fingerprint`` file
is skipped: a second run on unchanged data recomputes nothing, and a deleted or changed output is
written again. Note embeddings are further cached per note text across tasks and runs. Each step
reads the warehouse with its tables held in place (:func:`features.ingest.warehouse_read`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import polars as pl
import pyarrow as pa

from features.cohorts import select_cohort
from features.errors import LandingZoneError
from features.ingest import unsettled_warehouse, warehouse_read, warehouse_site_timezone
from features.io import write_bytes_atomic, write_parquet_atomic
from features.labels import build_labels
from features.leakage import find_leaks, find_negative_offsets, find_split_overlap
from features.note_embeddings import NoteEncoder, embed_notes, imaging_before
from features.schemas import COHORT, EVENT_TOKENS, IMAGING_INPUTS, LABELS, NOTE_EMBEDDINGS, SPLITS
from features.splits import assign_splits
from features.tabular import TabularCodes, aggregate_before, select_tabular_codes
from features.tasks import TaskDefinition
from features.tokenize import EventTokenizer, saved_unit_keys

STEPS = ("cohort", "labels", "splits", "event_tokens", "tabular_features", "note_embeddings",
         "imaging_inputs")


@dataclass(frozen=True)
class StepResult:
    """What one step wrote, and whether it had to compute it."""

    path: Path
    recomputed: bool
    # Small, identifier-free numbers for logs and Dagster metadata.
    stats: dict[str, Any]


def task_dir(warehouse_dir: Path, task: TaskDefinition) -> Path:
    return Path(warehouse_dir) / "tasks" / task.name


def _file_key(path: Path) -> str:
    if not path.exists():
        return f"{path.name}:absent"
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def step_files_now(folder: Path) -> list[str]:
    """The key (name, size, modification time) of every file a step record in ``folder`` names, its
    outputs and side outputs, as the file is now: a file replaced after its record was written (by
    hand, or by a step killed between the two writes) has a key its record does not hold."""
    names: set[str] = set()
    for stamp in sorted(folder.glob("*.fingerprint.json")):
        record = json.loads(stamp.read_text(encoding="utf-8"))
        for key in [record.get("output"), *record.get("side_outputs", [])]:
            if isinstance(key, str):
                names.add(key.split(":", 1)[0])
    return [_file_key(folder / name) for name in sorted(names)]


def _run_step(out: Path, inputs: list[Path], settings: str,
              compute: Callable[[], tuple[pa.Table | None, dict[str, Any]]],
              side_outputs: tuple[Path, ...] = ()) -> StepResult:
    """Run ``compute`` unless ``out`` and ``side_outputs`` (other files ``compute`` writes) are up
    to date with ``inputs`` and ``settings``, and unchanged since they were written."""
    key = hashlib.sha256("|".join([settings, *(_file_key(p) for p in inputs)]).encode()).hexdigest()
    stamp = out.with_suffix(".fingerprint.json")
    if out.exists() and stamp.exists():
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        # A side output is checked like the main one: later steps and training read it, so a
        # deleted or edited one must be written again (an absent one's key reads "absent").
        if (recorded.get("key") == key and recorded.get("output") == _file_key(out)
                and recorded.get("side_outputs") == [_file_key(p) for p in side_outputs]):
            return StepResult(out, False, recorded.get("stats", {}))
    table, stats = compute()
    if table is not None:
        write_parquet_atomic(table, out)
    # The warehouse's files (any input outside the task folder) are named too, in the clear: scoring
    # and publishing tell by them whether the inputs are of the ingest now in place.
    write_bytes_atomic(json.dumps({"key": key, "output": _file_key(out),
                                   "side_outputs": [_file_key(p) for p in side_outputs],
                                   "warehouse_inputs": [_file_key(p) for p in inputs if p.parent != out.parent],
                                   "stats": stats}, indent=1).encode(), stamp)
    return StepResult(out, True, stats)


def warehouse_events_key(warehouse_dir: Path) -> str:
    """The key (name, size, modification time) of the warehouse's ``events.parquet`` now: every
    ingest and promotion puts another file in place, so it names the ingest the tables are of."""
    return _file_key(Path(warehouse_dir) / "events.parquet")


def inputs_events_key(folder: Path) -> str | None:
    """The key of the warehouse ``events.parquet`` a task folder's event tokens were built from
    (:func:`warehouse_events_key` then); None for a folder whose steps recorded none."""
    stamp = Path(folder) / "event_tokens.fingerprint.json"
    if not stamp.is_file():
        return None
    keys = json.loads(stamp.read_text(encoding="utf-8")).get("warehouse_inputs") or []
    return next((key for key in keys if key.split(":", 1)[0] == "events.parquet"), None)


def stale_task_inputs(warehouse_dir: Path, task_name: str) -> str | None:
    """Why the inputs in ``tasks/<task_name>/`` are not all of the ingest now in ``warehouse_dir``
    (a promotion or an ingest finished since a step read the warehouse), or None.

    Scores of such inputs would be published under the new ingest's name, with the old one's
    patients and records. A folder written by hand (no step records) has nothing to compare.
    """
    folder = Path(warehouse_dir) / "tasks" / task_name
    for stamp in sorted(folder.glob("*.fingerprint.json")):
        step = stamp.name.removesuffix(".fingerprint.json")
        recorded = json.loads(stamp.read_text(encoding="utf-8")).get("warehouse_inputs")
        if recorded is None:
            return (f"task {task_name!r}: {step} names no warehouse files it read (written by an earlier version); "
                    "build the task inputs again")
        for key in recorded:
            now = _file_key(Path(warehouse_dir) / key.split(":", 1)[0])
            if key != now:
                return (f"task {task_name!r}: {step} was built from {key} (name:bytes:mtime), the warehouse now holds "
                        f"{now} (another ingest or batch was put in place since); build the task inputs again")
    return None


def _arrow(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.select(schema.names).to_arrow().cast(schema)


def _check_settled(warehouse_dir: Path) -> None:
    """Refuse a warehouse whose promotion was cut short or is running: its tables may be of two
    batches. Every step that reads the warehouse checks it, cached or not, so that no step's output
    is built from one batch beside another's."""
    if (reason := unsettled_warehouse(Path(warehouse_dir))) is not None:
        raise LandingZoneError(reason)


Step = TypeVar("Step", bound=Callable[..., Any])


def _reads_warehouse(step: Step) -> Step:
    """Run ``step`` (whose first argument is the warehouse folder) with the warehouse's tables held
    in place (:func:`features.ingest.warehouse_read`): an ingest or a promotion that finishes
    meanwhile puts its files in place after the step, not under its lazy reads."""
    @functools.wraps(step)
    def reading(warehouse_dir: Path, *args: Any, **kwargs: Any) -> Any:
        with warehouse_read(Path(warehouse_dir)):
            return step(warehouse_dir, *args, **kwargs)

    return cast(Step, reading)


def _events(warehouse_dir: Path) -> pl.LazyFrame:
    path = Path(warehouse_dir) / "events.parquet"
    if not path.is_file():
        raise LandingZoneError(f"warehouse {warehouse_dir} has no events.parquet (run the ingest first)")
    _check_settled(warehouse_dir)
    return pl.scan_parquet(path, glob=False)


STEPS_VERSION = 17
"""Part of every step's fingerprint: raised whenever a step computes something else from the same
inputs (a corrected label rule, say), so that an upgrade recomputes existing task folders instead of
keeping outputs the new code would not give."""


def _task_settings(task: TaskDefinition, *parts: object) -> str:
    return json.dumps([STEPS_VERSION, asdict(task), *parts], default=str, sort_keys=True)


@_reads_warehouse
def build_cohort(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    _check_settled(warehouse_dir)
    out = task_dir(warehouse_dir, task) / "cohort.parquet"
    # The task's dates, as the warehouse's, are days on the site's calendar.
    task = task.on_site_clock(warehouse_site_timezone(warehouse_dir))

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        selection = select_cohort(_events(warehouse_dir), task)
        return _arrow(selection.cohort, COHORT), {"patients": selection.cohort.height,
                                                  "attrition": [list(a) for a in selection.attrition]}

    return _run_step(out, [Path(warehouse_dir) / "events.parquet"], _task_settings(task), compute)


def _cohort(warehouse_dir: Path, task: TaskDefinition) -> pl.DataFrame:
    return pl.read_parquet(task_dir(warehouse_dir, task) / "cohort.parquet", glob=False)


@_reads_warehouse
def build_task_labels(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    _check_settled(warehouse_dir)
    folder = task_dir(warehouse_dir, task)
    task = task.on_site_clock(warehouse_site_timezone(warehouse_dir))

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        labels, counts = build_labels(_events(warehouse_dir), _cohort(warehouse_dir, task), task)
        return _arrow(labels, LABELS), asdict(counts)

    return _run_step(folder / "labels.parquet", [Path(warehouse_dir) / "events.parquet",
                     folder / "cohort.parquet"], _task_settings(task), compute)


@_reads_warehouse
def build_splits(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    folder = task_dir(warehouse_dir, task)

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        splits = assign_splits(_cohort(warehouse_dir, task)["subject_id"], task.splits)
        overlap = find_split_overlap(splits)
        stats = {str(k): int(v) for k, v in splits["split"].value_counts().iter_rows()}
        stats["patients_in_two_splits"] = overlap.height
        return _arrow(splits, SPLITS), stats

    return _run_step(folder / "splits.parquet", [folder / "cohort.parquet"], _task_settings(task), compute)


def _train_ids(warehouse_dir: Path, task: TaskDefinition) -> list[int]:
    splits = pl.read_parquet(task_dir(warehouse_dir, task) / "splits.parquet", glob=False)
    return splits.filter(pl.col("split") == "train")["subject_id"].to_list()


@_reads_warehouse
def build_event_tokens(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    _check_settled(warehouse_dir)
    folder = task_dir(warehouse_dir, task)

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        cohort, events = _cohort(warehouse_dir, task), _events(warehouse_dir)
        settings = task.inputs
        tokenizer = EventTokenizer(settings.max_events, settings.value_bins, settings.min_code_count,
                                   settings.max_static_events)
        tokenizer.fit(events, cohort, _train_ids(warehouse_dir, task))
        tokenizer.save(folder / "vocabulary.json")
        tokens = tokenizer.transform(events, cohort)
        lengths = tokens["token_ids"].list.len()
        return _arrow(tokens, EVENT_TOKENS), {
            "vocabulary_size": len(tokenizer.vocabulary_),
            "mean_length": float(lengths.cast(pl.Float64).mean() or 0.0),  # type: ignore[arg-type]
            # Patients with known events left out by max_events (static facts past it included).
            "truncated_patients": int((tokens["dropped_events"] > 0).sum()),
            "leaking_patients": find_leaks(tokens, cohort, "last_input_time").height
            + find_negative_offsets(tokens).height,
        }

    return _run_step(folder / "event_tokens.parquet", [Path(warehouse_dir) / "events.parquet",
                     folder / "cohort.parquet", folder / "splits.parquet"], _task_settings(task), compute,
                     side_outputs=(folder / "vocabulary.json",))


@_reads_warehouse
def build_tabular_features(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    _check_settled(warehouse_dir)
    folder = task_dir(warehouse_dir, task)

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        cohort, events = _cohort(warehouse_dir, task), _events(warehouse_dir)
        # The tokenizer's main units and conversions: the baselines read a value in another unit as
        # the fusion model's vocabulary does (converted, or apart), and so does a model's drift check.
        selected = select_tabular_codes(events, cohort, _train_ids(warehouse_dir, task), task.inputs.tabular_codes,
                                        *saved_unit_keys(folder / "vocabulary.json"))
        table = aggregate_before(events, cohort, selected)
        return table.to_arrow(), {"columns": table.width, "codes": len(selected.codes),
                                  "numeric_codes": len(selected.numeric)}

    return _run_step(folder / "tabular_features.parquet", [Path(warehouse_dir) / "events.parquet",
                     folder / "cohort.parquet", folder / "splits.parquet", folder / "vocabulary.json"],
                     _task_settings(task), compute)


@_reads_warehouse
def tabular_features_for(warehouse_dir: Path, task: TaskDefinition, selected: TabularCodes) -> pl.DataFrame:
    """The task cohort's tabular aggregates for codes chosen elsewhere (a model's, when drift is
    measured): today's data in the columns the model was trained with, whatever codes are the most
    common today."""
    return aggregate_before(_events(warehouse_dir), _cohort(warehouse_dir, task), selected)


@_reads_warehouse
def build_note_embeddings(warehouse_dir: Path, task: TaskDefinition, encoder: NoteEncoder) -> StepResult:
    _check_settled(warehouse_dir)
    folder = task_dir(warehouse_dir, task)
    notes_path = Path(warehouse_dir) / "notes.parquet"

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        cohort = _cohort(warehouse_dir, task)
        if notes_path.is_file():
            notes = pl.read_parquet(notes_path, glob=False)
        else:  # no notes feed: the modality is absent, not faked
            notes = pl.DataFrame(schema={"note_id": pl.String, "patient_id": pl.String,
                                         "time": pl.Datetime("us"), "note_type": pl.String,
                                         "text": pl.String, "text_sha256": pl.String})
        before = encoder.n_embedded
        table = embed_notes(notes, cohort, encoder, task.inputs.max_notes)
        return _arrow(table, NOTE_EMBEDDINGS), {
            "notes": table.height, "patients_with_notes": table["subject_id"].n_unique(),
            "notes_embedded_now": encoder.n_embedded - before, "model": encoder.fingerprint,
        }

    return _run_step(folder / "note_embeddings.parquet", [notes_path, folder / "cohort.parquet"],
                     _task_settings(task, encoder.fingerprint), compute)


@_reads_warehouse
def build_imaging_inputs(warehouse_dir: Path, task: TaskDefinition) -> StepResult:
    _check_settled(warehouse_dir)
    folder = task_dir(warehouse_dir, task)
    imaging_path = Path(warehouse_dir) / "imaging.parquet"

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        cohort = _cohort(warehouse_dir, task)
        if imaging_path.is_file():
            table = imaging_before(pl.read_parquet(imaging_path, glob=False), cohort, task.inputs.max_studies)
        else:
            table = pl.from_arrow(IMAGING_INPUTS.empty_table())  # type: ignore[assignment]
        return _arrow(table, IMAGING_INPUTS), {"studies": table.height,
                                               "patients_with_imaging": table["subject_id"].n_unique()}

    return _run_step(folder / "imaging_inputs.parquet", [imaging_path, folder / "cohort.parquet"],
                     _task_settings(task), compute)


def modality_coverage(warehouse_dir: Path, task: TaskDefinition) -> dict[str, float]:
    """Share of cohort patients with at least one input of each modality before prediction time."""
    folder = task_dir(warehouse_dir, task)
    cohort = _cohort(warehouse_dir, task)
    n = max(cohort.height, 1)
    tokens = pl.read_parquet(folder / "event_tokens.parquet", columns=["subject_id", "modality_ids"], glob=False)
    exploded = tokens.explode("modality_ids").drop_nulls()
    coverage = {}
    for i, name in enumerate(("ehr", "notes", "genomics", "imaging")):
        coverage[name] = exploded.filter(pl.col("modality_ids") == i)["subject_id"].n_unique() / n
    notes = pl.read_parquet(folder / "note_embeddings.parquet", columns=["subject_id"], glob=False)
    imaging = pl.read_parquet(folder / "imaging_inputs.parquet", columns=["subject_id"], glob=False)
    coverage["note_embeddings"] = notes["subject_id"].n_unique() / n
    coverage["imaging_embeddings"] = imaging["subject_id"].n_unique() / n
    return coverage


def build_all(warehouse_dir: Path, task: TaskDefinition, encoder: NoteEncoder) -> dict[str, StepResult]:
    """Run every step of one task in order; return each step's result."""
    results = {
        "cohort": build_cohort(warehouse_dir, task),
        "labels": build_task_labels(warehouse_dir, task),
        "splits": build_splits(warehouse_dir, task),
        "event_tokens": build_event_tokens(warehouse_dir, task),
        "tabular_features": build_tabular_features(warehouse_dir, task),
        "note_embeddings": build_note_embeddings(warehouse_dir, task, encoder),
        "imaging_inputs": build_imaging_inputs(warehouse_dir, task),
    }
    summary: dict[str, Any] = {name: {"recomputed": r.recomputed, **r.stats} for name, r in results.items()}
    summary["modality_coverage"] = modality_coverage(warehouse_dir, task)
    write_bytes_atomic(json.dumps(summary, indent=1, default=str).encode(),
                       task_dir(warehouse_dir, task) / "summary.json")
    return results
