"""Benchmark: the fusion model against the baselines and against the truth, on a simulated hospital.

Stage: benchmark. In: a patient count and a seed (the hospital is simulated, ingested and turned into
the task's inputs under ``--workdir``, reused when already there). Out: printed tables of held-out
metrics for the fusion model, each single-modality fusion model, the baselines and the true risk
(the best any model can do on that data); the fusion model minus each of them in AUROC and Harrell's
C on the same held-out patients, with paired bootstrap 95 % intervals; and the training speed in
patients per second.

Run: ``.venv/bin/python benchmarks/model_quality.py --patients 20000 [--device cuda]``; with
``--reuse-model --reuse-ablations`` the model folders a previous run left are evaluated again instead of
trained again.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from features.ingest import ingest_landing_zone
from features.note_embeddings import NoteEncoder
from features.simulate import SimulationConfig, simulate_hospital
from features.task_inputs import build_all, task_dir
from features.tasks import load_task
from models.fusion import MODALITIES
from models.task_model import (
    Scores,
    TaskData,
    compare_with_fusion,
    evaluate,
    format_difference,
    label_weights,
    load_task_data,
    load_task_model,
    metrics_table,
    predict,
    survival_risk_score,
    train_task_model,
)
from models.training import TrainingArguments, fit_calibration

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = REPO_ROOT / "tasks" / "simulated_mace_1y.yaml"
COLUMNS = ["auroc", "auprc", "brier", "calibration_error", "harrell_c", "uno_c", "time_dependent_auc",
           "integrated_brier", "pehe", "policy_event_rate"]


def prepare(workdir: Path, patients: int, seed: int) -> tuple[Path, Path]:
    landing, warehouse = workdir / "landing", workdir / "warehouse"
    if not (landing / "truth.parquet").is_file():
        simulate_hospital(landing, SimulationConfig(n_patients=patients, seed=seed), overwrite=True, workers=2)
    if not (warehouse / "events.parquet").is_file():
        ingest_landing_zone(landing, warehouse)
    build_all(warehouse, load_task(TASK), NoteEncoder(cache_dir=warehouse / "cache" / "note_embeddings"))
    return landing / "truth.parquet", warehouse


def print_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    header = f"{'model':<32}" + "".join(f"{c[:12]:>13}" for c in COLUMNS)
    print(header)
    print("-" * len(header))
    for name, row in rows:
        print(f"{name:<32}" + "".join(f"{row[c]:>13.3f}" if c in row else f"{'':>13}" for c in COLUMNS))


def print_comparisons(comparisons: dict[str, dict[str, float]], n_resamples: int) -> None:
    print(f"\nfusion minus each model on the same held-out patients (95 % paired bootstrap interval, "
          f"{n_resamples:,} resamples)")
    header = f"{'model':<32}{'AUROC difference':>28}{'Harrell C difference':>28}"
    print(header)
    print("-" * len(header))
    for name, row in comparisons.items():
        print(f"{name:<32}" + "".join(f"{format_difference(row, m):>28}" for m in ("auroc", "harrell_c")))


def held_out_scores(data: TaskData, model_dir: Path) -> tuple[Scores, dict[str, np.ndarray], np.ndarray]:
    """A saved model's held-out scores, and the held-out labels and which have a known outcome."""
    model, calibrator, _ = load_task_model(model_dir)
    held_out = data.datasets["held_out"]
    labels = held_out.label_arrays()
    known = ~np.isnan(labels["risk_label"])
    p = predict(model, calibrator, held_out)
    return Scores(p.risk[known], survival_risk_score(p, model.config.horizon_bin)), labels, known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "benchmark_model")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--ablations", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                        help="the single-modality models to train (default: every modality)")
    parser.add_argument("--reuse-model", action="store_true",
                        help="evaluate the model folder a previous run left (with the baselines) instead of training")
    parser.add_argument("--reuse-ablations", action="store_true",
                        help="evaluate the single-modality model folders a previous run left instead of training")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("features.note_embeddings").setLevel(logging.INFO)  # progress of the long note step
    workdir = args.workdir / f"{args.patients}_{args.seed}"
    truth, warehouse = prepare(workdir, args.patients, args.seed)
    task = load_task(TASK)
    folder = task_dir(warehouse, task)
    training = TrainingArguments(max_epochs=args.epochs, seed=args.seed, device=args.device)
    architecture = {"hidden_size": args.hidden_size, "num_attention_heads": args.heads,
                    "intermediate_size": 2 * args.hidden_size}
    device = training.resolve_device()
    epochs: list[float] = []
    started = time.perf_counter()

    def log_epoch(record: dict[str, float]) -> None:
        epochs.append(time.perf_counter())
        print(f"epoch {int(record['epoch'])}: train loss {record['train_loss']:.4f}, tuning loss "
              f"{record['tuning_loss']:.4f} ({epochs[-1] - started:.0f} s)", flush=True)

    data: TaskData | None = None  # every modality's inputs, loaded once when needed
    if args.reuse_model:
        saved = json.loads((workdir / "model" / "metrics.json").read_text())
        model, calibrator, _ = load_task_model(workdir / "model")
        data = load_task_data(folder, task.horizon_days)
        # Calibrated again on the tuning split as training now ends (the labels, and with them the
        # arms, may have changed since the folder was written; older folders lack the arms').
        calibrator = fit_calibration(model, data.datasets["tuning"], data.datasets["train"])
        metrics = {**saved, **evaluate(model, calibrator, data, pl.read_parquet(truth), seed=args.seed)}
    else:
        metrics = train_task_model(folder, workdir / "model", task, training, architecture, truth,
                                   on_epoch=log_epoch)
    assert metrics is not None
    seconds = (epochs[-1] - started) if epochs else time.perf_counter() - started
    n_train = metrics["split_sizes"]["train"]
    rows = metrics_table(metrics)
    comparisons = dict(metrics["comparisons"])
    if not args.no_ablations:
        data = data or load_task_data(folder, task.horizon_days)
        fusion_scores, labels, known = held_out_scores(data, workdir / "model")
        for modality in args.ablations:
            alone_dir = workdir / f"model_{modality}"
            if args.reuse_ablations:
                # Evaluated again, as the main model is: the labels or the metrics may have changed.
                alone_model, alone_calibrator, _ = load_task_model(alone_dir)
                alone = {"models": {"fusion": evaluate(
                    alone_model, alone_calibrator, load_task_data(folder, task.horizon_days, (modality,)),
                    baselines=False, seed=args.seed)["models"]["fusion"]}}
            else:
                alone = train_task_model(folder, alone_dir, task, training, architecture, truth,
                                         baselines=False, modalities=(modality,))
            assert alone is not None
            name = f"fusion, {modality} only"
            rows.insert(1, (name, alone["models"]["fusion"]))
            alone_scores, _, _ = held_out_scores(load_task_data(folder, task.horizon_days, (modality,)), alone_dir)
            comparisons[name] = compare_with_fusion({"fusion": fusion_scores, name: alone_scores}, labels, known,
                                                    args.seed, metrics["comparison_resamples"],
                                                    label_weights(data, "held_out")[known])[name]
    print(f"task {task.name}: {args.patients:,} simulated patients (seed {args.seed}), held-out "
          f"{metrics['n_held_out']:,} ({metrics['n_held_out_labelled']:,} with a known 1-year outcome, "
          f"event rate {metrics['held_out_event_rate']:.3f})")
    print_table("held-out metrics (truth = the true risk: the best possible)", rows)
    print_comparisons(comparisons, metrics["comparison_resamples"])
    fusion = metrics["models"]["fusion"]
    if "calibration_slope" in fusion:
        print(f"\nfusion calibration: slope {fusion['calibration_slope']:.3f}, observed / expected "
              f"{fusion['observed_expected_ratio']:.3f}, error {fusion['calibration_error']:.3f}; a perfectly "
              f"calibrated model with these predictions shows {fusion['calibration_error_if_calibrated']:.3f} "
              f"(95th percentile {fusion['calibration_error_if_calibrated_95']:.3f}) on these "
              f"{metrics['n_held_out_labelled']:,} patients")
    if epochs:
        print(f"\ntraining on {device} ({torch.get_num_threads()} CPU threads): {len(epochs)} epochs of {n_train:,} "
              f"patients in {seconds:.0f} s = {len(epochs) * n_train / seconds:,.0f} patients/s "
              f"(best epoch {metrics['best_epoch']})")
    (workdir / "benchmark.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "epochs": len(epochs),
                                                        "n_train": n_train}, indent=1))


if __name__ == "__main__":
    main()
