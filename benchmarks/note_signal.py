"""How much of the simulator's hidden note severity the note representations carry: is the text
encoder what holds the fusion model back?

Usage: ``python benchmarks/note_signal.py --cache DIR [--task simulated_mace_1y]`` where ``DIR``
holds a simulated ``landing/`` (with ``truth.parquet``) and its ``warehouse/`` with the task's
inputs built (``model_quality.py`` leaves one in ``.cache/benchmark_model/<patients>_<seed>``).
For each patient with notes before the prediction time, a ridge regression (penalty chosen by
cross-validation on the train split) predicts the hidden note severity from (a) the mean of the
patient's note embeddings, as the fusion model's note tokens hold them, and (b) TF-IDF word 1- to
3-grams of the same notes' text, a reader that counts every affirmed and negated phrase. Prints
the held-out R^2 and correlation of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import RidgeCV

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def held_out_fit(features: Any, severity: np.ndarray, train: np.ndarray,
                 held_out: np.ndarray) -> tuple[float, float]:
    """Held-out R^2 and correlation of a ridge regression of ``severity`` on ``features`` (a dense
    array or a sparse matrix, a row per patient)."""
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(features[train], severity[train])
    predicted = model.predict(features[held_out])
    truth = severity[held_out]
    r2 = 1 - float(((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())
    return r2, float(np.corrcoef(predicted, truth)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--task", default="simulated_mace_1y")
    args = parser.parse_args()
    task = args.cache / "warehouse" / "tasks" / args.task
    truth = pl.read_parquet(args.cache / "landing" / "truth.parquet", columns=["subject_id", "note_severity"])
    notes = pl.read_parquet(args.cache / "warehouse" / "notes.parquet", columns=["note_id", "text"])
    per_patient = (
        pl.read_parquet(task / "note_embeddings.parquet", columns=["subject_id", "note_id", "embedding"])
        .join(notes, on="note_id", how="left")
        .group_by("subject_id")
        .agg(pl.col("embedding"), pl.col("text").str.join("\n"), pl.len().alias("notes"))
        .join(truth, on="subject_id")
        .join(pl.read_parquet(task / "splits.parquet"), on="subject_id")
        .sort("subject_id")
    )
    severity = per_patient["note_severity"].to_numpy()
    train = (per_patient["split"] == "train").to_numpy()
    held_out = (per_patient["split"] == "held_out").to_numpy()
    mean_embedding = np.stack([np.asarray(vectors.to_list(), dtype=np.float32).mean(axis=0)
                               for vectors in per_patient["embedding"]])
    tfidf = TfidfVectorizer(ngram_range=(1, 3), min_df=5, sublinear_tf=True).fit(
        per_patient.filter(pl.Series(train))["text"].to_list())
    phrases = tfidf.transform(per_patient["text"].to_list())
    rows = [("mean note embedding", mean_embedding.shape[1], *held_out_fit(mean_embedding, severity, train, held_out)),
            ("TF-IDF word 1-3 grams", phrases.shape[1], *held_out_fit(phrases, severity, train, held_out))]
    print(f"{per_patient.height:,} patients with notes ({int(train.sum()):,} train, {int(held_out.sum()):,} held out), "
          f"median {per_patient['notes'].median():.0f} notes each")
    print(f"{'representation':<24} {'features':>9} {'held-out R^2':>13} {'correlation':>12}")
    for name, width, r2, correlation in rows:
        print(f"{name:<24} {width:>9,} {r2:>13.3f} {correlation:>12.3f}")


if __name__ == "__main__":
    main()
