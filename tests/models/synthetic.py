"""Small hand-built model inputs with a known signal, for model tests."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

PREDICTION_TIME = datetime(2023, 1, 1)


def synthetic_task(n_patients: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """event_tokens, note_embeddings, imaging_inputs and labels for ``n_patients``.

    Token 5 multiplies the odds of the outcome by 20; the first note-embedding dimension and the
    first imaging dimension raise it too; treated patients without token 7 benefit.
    """
    rng = np.random.default_rng(seed)
    rows, notes, studies, labels = [], [], [], []
    for sid in range(1, n_patients + 1):
        n = int(rng.integers(2, 8))
        tokens = rng.integers(2, 12, n)
        note_signal = rng.normal()
        image_signal = rng.normal()
        has_note, has_image = rng.random() < 0.8, rng.random() < 0.5
        treated = bool(rng.random() < 0.5)
        logit = (-2.0 + 3.0 * (5 in tokens) + 1.5 * note_signal * has_note + 1.5 * image_signal * has_image
                 - 1.0 * (treated and 7 not in tokens))
        event = bool(rng.random() < 1 / (1 + np.exp(-logit)))
        duration = float(rng.uniform(10, 360)) if event else float(rng.uniform(200, 800))
        rows.append({
            "subject_id": sid, "prediction_time": PREDICTION_TIME, "token_ids": tokens.tolist(),
            "value_bins": rng.integers(0, 6, n).tolist(), "time_before_days": rng.uniform(0, 900, n).tolist(),
            "modality_ids": [0] * n,
        })
        if has_note:
            notes.append({"subject_id": sid, "time": PREDICTION_TIME - timedelta(days=3),
                          "embedding": [note_signal, *rng.normal(size=7).tolist()]})
        if has_image:
            studies.append({"subject_id": sid, "time": PREDICTION_TIME - timedelta(days=30), "modality": "US",
                            "embedding": [image_signal, *rng.normal(size=5).tolist()]})
        labels.append({"subject_id": sid, "boolean_value": event if (event or duration >= 365) else None,
                       "event": event, "duration_days": duration, "treated": treated, "prevalent_user": False})
    tokens = pl.DataFrame(rows, schema_overrides={"token_ids": pl.List(pl.Int32), "value_bins": pl.List(pl.Int8),
                                                  "time_before_days": pl.List(pl.Float32),
                                                  "modality_ids": pl.List(pl.Int8)})
    return tokens, pl.DataFrame(notes), pl.DataFrame(studies), pl.DataFrame(labels)


def write_task_folder(warehouse: Path, n_patients: int, seed: int, name: str = "synthetic_1y") -> Path:
    """Write a task YAML and a task folder like ``cohortcast features`` does, from :func:`synthetic_task`.

    Returns the task YAML's path; the inputs are in ``warehouse/tasks/<name>/``.
    """
    tokens, notes, studies, labels = synthetic_task(n_patients, seed)
    folder = warehouse / "tasks" / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = tokens["subject_id"]
    splits = np.where(rng.random(n_patients) < 0.6, "train", np.where(rng.random(n_patients) < 0.5, "tuning",
                                                                          "held_out"))
    pl.DataFrame({"subject_id": ids, "split": splits}).write_parquet(folder / "splits.parquet")
    pl.DataFrame({
        "subject_id": ids, "prediction_time": [PREDICTION_TIME] * n_patients, "task": [name] * n_patients,
        "age_years": rng.uniform(40, 90, n_patients), "sex": rng.choice(["female", "male"], n_patients),
    }).write_parquet(folder / "cohort.parquet")
    labels.with_columns(pl.lit(name).alias("task"), pl.lit(PREDICTION_TIME).alias("prediction_time")).write_parquet(
        folder / "labels.parquet")
    tokens.write_parquet(folder / "event_tokens.parquet")
    notes.with_columns(pl.col("embedding").cast(pl.List(pl.Float32))).write_parquet(folder / "note_embeddings.parquet")
    studies.with_columns(pl.col("embedding").cast(pl.List(pl.Float32))).write_parquet(folder / "imaging_inputs.parquet")
    vocabulary = {"[PAD]": 0, "[UNK]": 1, **{f"CODE//{i}": i for i in range(2, 12)}}
    (folder / "vocabulary.json").write_text(json.dumps({"vocabulary": vocabulary, "value_bins": 5, "bin_edges": {},
                                                        "max_events": 512, "min_code_count": 1}))
    has_five = tokens["token_ids"].list.contains(5).cast(pl.Float64)
    pl.DataFrame({
        "subject_id": ids, "prediction_time": [PREDICTION_TIME] * n_patients,
        "last_input_time": [PREDICTION_TIME] * n_patients, "count__CODE//5": has_five,
        "noise": rng.normal(size=n_patients),
    }).write_parquet(folder / "tabular_features.parquet")
    task_path = warehouse / f"{name}.yaml"
    task_path.write_text(
        f"name: {name}\ncohort:\n  prediction_time:\n    fixed: 2023-01-01T00:00:00\noutcome:\n  death: true\n"
        "horizon_days: 365\n"
    )
    return task_path
