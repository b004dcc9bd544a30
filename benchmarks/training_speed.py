"""Benchmark: how fast the fusion model trains, in patients per second, on CPU or on a GPU.

Stage: benchmark. In: a task folder built by ``features.task_inputs.build_all`` (``--task-dir``), the
task's definition, a device and the settings to compare (batch sizes, data-loader processes, hidden
sizes, bf16 or float32). Out: a printed table, one row per setting: patients per second over whole
epochs (the training steps and each epoch's evaluation of the tuning split, as ``model_quality.py``
counts them), the tuning loss reached, and on a GPU its mean utilisation and peak memory.

Every setting trains a fresh model for ``--epochs`` epochs without early stopping, after one untimed
epoch that pays the one-off costs (CUDA context, kernel selection, data-loader start).

Run: ``.venv/bin/python benchmarks/training_speed.py --task-dir WAREHOUSE/tasks/simulated_mace_1y
--device cuda --batch-sizes 128 512 --workers 0 4``.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from features.tasks import load_task
from models.fusion import FusionForRiskPrediction
from models.task_model import TaskData, fusion_config, load_task_data
from models.training import TrainingArguments, train, training_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK = REPO_ROOT / "tasks" / "simulated_mace_1y.yaml"


@dataclass(frozen=True)
class Setting:
    batch_size: int
    workers: int
    hidden_size: int
    bf16: bool


@dataclass(frozen=True)
class Measurement:
    precision: str  # what train() computed in: "bf16 autocast" or "float32"
    seconds: float
    patients_per_second: float
    tuning_loss: float
    gpu_utilisation_percent: float | None
    peak_gpu_memory_mib: float | None


class UtilisationSampler:
    """Samples the GPU's utilisation (the percent of time a kernel ran, as nvidia-smi reports it) every
    ``interval_s`` seconds in a background thread while the block runs.

    NVML is opened once: ``torch.cuda.utilization`` opens it again on every call, which at this rate
    costs the training process CPU time it needs to launch kernels.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.2) -> None:
        import pynvml  # nvidia-ml-py, which CUDA builds of torch use for the same reading

        pynvml.nvmlInit()
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None
                                                         else torch.cuda.current_device())
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(int(self._pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else float("nan")


def measure(data: TaskData, setting: Setting, epochs: int, device: torch.device, seed: int,
            utilisation_interval_s: float = 0.2) -> Measurement:
    """Train a fresh model for ``epochs`` epochs under ``setting``; time it."""
    config = fusion_config(data, hidden_size=setting.hidden_size, num_attention_heads=2,
                           intermediate_size=2 * setting.hidden_size)
    model = FusionForRiskPrediction(config)
    args = TrainingArguments(max_epochs=epochs, patience=epochs + 1, batch_size=setting.batch_size,
                             dataloader_num_workers=setting.workers, device=str(device), bf16=setting.bf16,
                             seed=seed)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = UtilisationSampler(device, utilisation_interval_s) if on_gpu and utilisation_interval_s > 0 else None
    started = time.perf_counter()
    with sampler if sampler is not None else nullcontext():
        result = train(model, data.datasets["train"], data.datasets["tuning"], args)
    seconds = time.perf_counter() - started
    return Measurement(
        precision=training_precision(args),
        seconds=seconds,
        patients_per_second=epochs * len(data.datasets["train"]) / seconds,
        tuning_loss=result.history[-1]["tuning_loss"],
        gpu_utilisation_percent=sampler.mean() if sampler is not None else None,
        peak_gpu_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-dir", type=Path, required=True)
    parser.add_argument("--task", type=Path, default=TASK)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "float32"], default=["bf16"],
                        help="bf16 autocast or float32 (bf16 applies on a GPU that computes it natively; "
                             "CPU training is float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--utilisation-interval-s", type=float, default=0.2,
                        help="how often the GPU's utilisation is read; 0 does not read it")
    args = parser.parse_args()
    device = TrainingArguments(device=args.device).resolve_device()
    data = load_task_data(args.task_dir, load_task(args.task).horizon_days)
    n_train = len(data.datasets["train"])
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{n_train:,} train and {len(data.datasets['tuning']):,} tuning patients; {args.epochs} epochs per "
          f"setting; {where}; torch {torch.__version__}")
    settings = [Setting(b, w, h, p == "bf16") for b, w, h, p in
                itertools.product(args.batch_sizes, args.workers, args.hidden_sizes, args.precisions)]
    # One untimed epoch pays the one-off costs, so the first setting is not charged for them.
    warm_up = measure(data, settings[0], 1, device, args.seed)
    print(f"untimed first epoch (one-off costs included): {warm_up.seconds:.1f} s")
    header = (f"{'batch':>6}{'loader procs':>13}{'hidden':>7}{'precision':>14}{'seconds':>9}{'patients/s':>12}"
              f"{'tuning loss':>12}{'GPU util %':>11}{'GPU peak MiB':>13}")
    print(header)
    print("-" * len(header))
    for setting in settings:
        m = measure(data, setting, args.epochs, device, args.seed, args.utilisation_interval_s)
        util = f"{m.gpu_utilisation_percent:.0f}" if m.gpu_utilisation_percent is not None else "n/a"
        memory = f"{m.peak_gpu_memory_mib:,.0f}" if m.peak_gpu_memory_mib is not None else "n/a"
        print(f"{setting.batch_size:>6}{setting.workers:>13}{setting.hidden_size:>7}{m.precision:>14}"
              f"{m.seconds:>9.1f}{m.patients_per_second:>12,.0f}{m.tuning_loss:>12.4f}{util:>11}{memory:>13}",
              flush=True)


if __name__ == "__main__":
    main()
