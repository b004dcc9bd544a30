"""Benchmark: how fast a task's cohort is scored, with and without explanations.

Stage: benchmark. In: a model folder and the task folder it was trained on (by default those that
``benchmarks/model_quality.py`` leaves under ``.cache/benchmark_model/<patients>_<seed>/``). Out: a
printed table of patients per second for scoring alone (float32 and bfloat16 autocast) and for
occlusion explanations, measured on the whole cohort (explanations on a sample).

Run: ``.venv/bin/python benchmarks/scoring_speed.py [--workdir DIR] [--explain-sample 500]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl
import torch

from models.data import FusionDataset
from models.explain import explain
from models.scoring import RiskTiers, inverse_vocabulary, score_task
from models.task_model import load_task_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = "simulated_mace_1y"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "benchmark_model" / "10000_0")
    parser.add_argument("--explain-sample", type=int, default=500)
    args = parser.parse_args()
    model_dir = args.workdir / "model"
    task_dir = args.workdir / "warehouse" / "tasks" / TASK
    rows = []
    for bf16 in (False, True):
        score_task(model_dir, task_dir, TASK, RiskTiers(), with_explanations=False, bf16=bf16)  # warm-up
        started = time.perf_counter()
        scores = score_task(model_dir, task_dir, TASK, RiskTiers(), with_explanations=False, bf16=bf16)
        seconds = time.perf_counter() - started
        rows.append((f"score {'bf16' if bf16 else 'float32'} (load + predict + tiers)", scores.num_rows, seconds))
    model, calibrator, _ = load_task_model(model_dir)
    dataset = FusionDataset(pl.read_parquet(task_dir / "event_tokens.parquet"),
                            pl.read_parquet(task_dir / "note_embeddings.parquet"),
                            pl.read_parquet(task_dir / "imaging_inputs.parquet"), None,
                            model.config.text_embedding_dim, model.config.imaging_embedding_dim)
    sample = dataset.patients[: args.explain_sample]
    for bf16 in (False, True):
        started = time.perf_counter()
        explain(model, calibrator, sample, inverse_vocabulary(model_dir / "vocabulary.json"), bf16=bf16)
        rows.append((f"explanations {'bf16' if bf16 else 'float32'} (occlusion: codes, notes, studies)", len(sample),
                     time.perf_counter() - started))
    print(f"scoring speed, task {TASK}, {torch.get_num_threads()} CPU threads, model hidden size "
          f"{model.config.hidden_size}")
    header = f"{'what':<58}{'patients':>10}{'seconds':>10}{'patients/s':>12}"
    print(header)
    print("-" * len(header))
    for what, n, seconds in rows:
        print(f"{what:<58}{n:>10,}{seconds:>10.2f}{n / seconds:>12,.0f}")


if __name__ == "__main__":
    main()
