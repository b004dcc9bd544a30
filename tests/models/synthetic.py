"""Small hand-built model inputs with a known signal, for model tests."""

from __future__ import annotations

from datetime import datetime, timedelta

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
                       "event": event, "duration_days": duration, "treated": treated})
    tokens = pl.DataFrame(rows, schema_overrides={"token_ids": pl.List(pl.Int32), "value_bins": pl.List(pl.Int8),
                                                  "time_before_days": pl.List(pl.Float32),
                                                  "modality_ids": pl.List(pl.Int8)})
    return tokens, pl.DataFrame(notes), pl.DataFrame(studies), pl.DataFrame(labels)
