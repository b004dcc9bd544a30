"""Training of the fusion model, with early stopping and calibration on the tuning split.

Stage: model. In: a :class:`~models.fusion.FusionForRiskPrediction`, the train and tuning
:class:`~models.data.FusionDataset`s and :class:`TrainingArguments`. Out: a
:class:`TrainingResult` holding the best model (by tuning loss), its Platt calibrator and the
per-epoch history.

On a CUDA device the forward pass runs under bf16 autocast; on CPU in float32. When a process
group is initialised (``torchrun`` sets one up; see ``pipelines``), the model is wrapped in
DistributedDataParallel and every process trains on its own shard of the train split; every process
evaluates the whole tuning split, so all take the same early-stopping decision.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PretrainedConfig

from features.errors import ModelSettingsError, TrainingDataError
from features.hardware import cpu_native_bf16
from models.calibration import PlattCalibrator
from models.censoring import censoring_weights
from models.data import LABEL_KEYS, FusionDataset, PatientInputs, collate
from models.fusion import FusionForRiskPrediction, survival_curve


@dataclass(frozen=True)
class TrainingArguments:
    """Optimisation settings (one comment per field, as in nanoGPT's config)."""

    max_epochs: int = 30  # upper bound; early stopping usually ends sooner
    batch_size: int = 128  # patients per step (per process under DDP)
    learning_rate: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    patience: int = 4  # epochs without a better tuning loss before stopping
    average_epochs: float = 1.0  # time constant of the weights' moving average, in epochs; 0 = no average
    seed: int = 0  # seeds torch, numpy and python: same data and seed, same model on the same device (*)
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    bf16: bool = True  # bf16 autocast on a GPU that computes it natively (ignored on CPU)
    # (*) On CUDA under bf16, only within one process: reruns in new processes differed on an H100
    # (tuning loss 1.540-1.545 after 5 epochs), also with torch's deterministic algorithms; float32 did not.
    dataloader_num_workers: int = 0  # processes that collate batches; 0 collates in this process
    min_events: int = 10  # fewest known positive, and negative, risk labels the train split must hold
    # Platt-calibrate the risk and arm heads, and the survival curves, on the tuning split. Off only
    # where the calibrated heads are never read (a survival benchmark ranking patients by the raw
    # curve), so that a tuning split too small to calibrate does not stop the run.
    calibrate: bool = True

    def __post_init__(self) -> None:
        at_least_one = {"max_epochs": self.max_epochs, "batch_size": self.batch_size, "patience": self.patience,
                        "min_events": self.min_events}
        for name, value in at_least_one.items():
            if value < 1:
                raise ModelSettingsError(f"training settings: {name} {value} (expected at least 1)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ModelSettingsError(f"training settings: learning_rate {self.learning_rate} (expected a positive "
                                     "number, such as 1e-3)")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class TrainingResult:
    model: FusionForRiskPrediction
    calibrator: PlattCalibrator
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# On a GPU, every new sequence length costs attention kernel plans; padding each sequence to a multiple
# of 16 tokens cut a 1,390-patient H100 epoch from 7.8 s to 2.0 s when first seen (benchmarks/README.md).
# On CPU no plans are kept and padding only adds work.
GPU_PAD_TO_MULTIPLE_OF = 16


def _pad_multiple(device: torch.device) -> int:
    return GPU_PAD_TO_MULTIPLE_OF if device.type == "cuda" else 1


def _attention_backends(device: torch.device) -> AbstractContextManager[None]:
    """Scaled-dot-product attention without cuDNN's kernel on a GPU: it builds a plan for each new
    sequence length, which made training up to 4x slower on an H100 than the memory-efficient kernel
    (benchmarks/README.md). On CPU the choice is left as it is."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bfloat16 autocast is emulated and slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_native_bf16()


def _trains_in_bf16(args: TrainingArguments, device: torch.device) -> bool:
    """bf16 autocast for training: on a GPU that computes bfloat16 natively, when asked. Never on CPU,
    where it made training 2.7x slower even with AMX (benchmarks/README.md); nor on GPUs older than
    Ampere, which only emulate it."""
    return device.type == "cuda" and args.bf16 and native_bf16(device)


def training_precision(args: TrainingArguments) -> str:
    """``"bf16 autocast"`` or ``"float32"``: what :func:`train` computes in under ``args``."""
    return "bf16 autocast" if _trains_in_bf16(args, args.resolve_device()) else "float32"


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def predict_logits(
    model: FusionForRiskPrediction, dataset: FusionDataset | Sequence[PatientInputs], batch_size: int = 64,
    device: torch.device | None = None, bf16: bool = False, with_loss: bool = True,
) -> dict[str, np.ndarray]:
    """Risk, hazard and arm logits of every patient of ``dataset``, in order, plus the mean loss.

    Patients are batched by sequence length, so a batch pads to similar lengths (attention costs
    grow with the square of the longest sequence in the batch); results come back in dataset order.
    Batches of 64 keep a block's activations in the CPU caches (256 was 30 % slower on 2 cores).
    On CPU, each core runs whole batches on one thread: this model's operations are too small to
    split well across cores (1.2-1.4x faster than splitting each operation on 2 cores).
    ``bf16`` runs the forward pass under bfloat16 autocast (on CPUs with AMX or AVX512-BF16 about
    1.2x faster; logits differ from float32 in the third decimal). Without ``with_loss`` (scoring,
    where outcomes are unknown) the loss is not computed and comes back as NaN.
    """
    device = device or next(model.parameters()).device
    model.eval()
    lengths = np.array([len(p.event_codes) + len(p.note_days) + len(p.imaging_days) for p in dataset])
    order = np.argsort(lengths, kind="stable")

    def run(indices: npt.NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        batch = collate([dataset[int(i)] for i in indices], pad_to_multiple_of=_pad_multiple(device))
        if not with_loss:
            batch = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        # Inference and autocast modes are per thread: entered here, in the thread that runs the batch.
        with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**_to(batch, device))
        loss = float(out.loss) if with_loss else math.nan
        return out.risk_logits.float().cpu(), out.hazard_logits.float().cpu(), out.arm_logits.float().cpu(), loss

    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    # The attention kernels allowed are process-wide flags: set once, for every batch.
    with _attention_backends(device):
        if workers > 1 and len(batches) > 1:
            with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(run, batches))
        else:
            results = [run(indices) for indices in batches]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {
        "risk_logits": torch.cat([r[0] for r in results]).numpy()[inverse],
        "hazard_logits": torch.cat([r[1] for r in results]).numpy()[inverse],
        "arm_logits": torch.cat([r[2] for r in results]).numpy()[inverse],
        "loss": np.array(np.average([r[3] for r in results], weights=[len(b) for b in batches])
                         if with_loss else np.nan),
    }


MIN_CALIBRATION_OUTCOMES = 5
"""Fewest patients with and without the outcome the tuning split needs to calibrate the risk."""


def check_trainable(name: str, dataset: FusionDataset, min_events: int) -> None:
    """Raise :class:`TrainingDataError` when a split cannot train, tune or evaluate a risk model."""
    labels = dataset.label_arrays()["risk_label"]
    known = labels[~np.isnan(labels)]
    n_pos = int(known.sum())
    if len(dataset) == 0:
        raise TrainingDataError(f"{name} split: no patients (check the task's cohort rules and the split fractions)")
    if min(n_pos, len(known) - n_pos) < min_events:
        raise TrainingDataError(
            f"{name} split: {n_pos} patients with the outcome among {len(known)} with a known label "
            f"(need at least {min_events} with and {min_events} without); use more patients, a longer horizon "
            "or broader outcome codes"
        )


def check_inputs_fit(config: PretrainedConfig, name: str, dataset: FusionDataset) -> None:
    """Raise :class:`ModelSettingsError` when a split's tokens lie outside what ``config`` embeds.

    An event code id at or beyond ``event_vocab_size``, a value bin at or beyond ``n_value_bins``
    or an imaging modality id at or beyond ``n_imaging_modalities`` would otherwise fail deep in
    an embedding lookup as a bare ``IndexError``.
    """
    def largest(arrays: list[np.ndarray]) -> int:
        return max((int(a.max()) for a in arrays if a.size), default=-1)

    for what, found, size, field_name in (
        ("event code id", largest([p.event_codes for p in dataset.patients]), config.event_vocab_size,
         "event_vocab_size"),
        ("value bin", largest([p.event_value_bins for p in dataset.patients]), config.n_value_bins, "n_value_bins"),
        ("imaging modality id", largest([p.imaging_modalities for p in dataset.patients]),
         config.n_imaging_modalities, "n_imaging_modalities"),
    ):
        if found >= size:
            raise ModelSettingsError(
                f"{name} split: {what} {found} is beyond the model's {size} (FusionConfig.{field_name}); build the "
                "config from the same vocabulary and bins as the inputs (models.task_model.fusion_config, or a "
                "TabularTokenizer's n_bins + 1 value bins)")


def check_treatment_arms(train: FusionDataset, tuning: FusionDataset, baselines: bool) -> None:
    """Raise :class:`TrainingDataError` when a treatment task's arms cannot be evaluated.

    The policy value needs a propensity model, fitted on the train split's treated and untreated
    patients; the T-learner baseline fits one outcome model per arm (both outcomes among each train
    arm's patients with a known label) and early-stops it on the same arm of the tuning split.
    Checked before training, so that a task whose treatment codes or grace period leave an arm
    empty fails in seconds, not after the whole run.
    """
    fix = ("check the task's treatment codes and grace period, or use more patients")
    for split, dataset in (("train", train), ("tuning", tuning)):
        labels = dataset.label_arrays()
        treated, risk_label = labels["treated"], labels["risk_label"]
        for arm, name in ((1.0, "treated"), (0.0, "untreated")):
            in_arm = treated == arm
            outcomes = risk_label[in_arm & ~np.isnan(risk_label)]
            if split == "train" and not in_arm.any():
                raise TrainingDataError(f"treatment: the train split has no {name} patients (the propensity "
                                        f"model needs both arms); {fix}")
            if not baselines:
                continue
            if split == "train" and len(set(outcomes.tolist())) < 2:
                raise TrainingDataError(
                    f"treatment: the train split's {name} arm has {int(outcomes.sum())} patients with the outcome "
                    f"among {outcomes.size} with a known label (the T-learner baseline needs both outcomes in each "
                    f"arm); {fix}, or train without baselines")
            if split == "tuning" and outcomes.size == 0:
                raise TrainingDataError(
                    f"treatment: the tuning split has no {name} patients with a known label (the T-learner "
                    f"baseline early-stops each arm on it); {fix}, or train without baselines")


def label_censoring_weights(dataset: FusionDataset, reference: FusionDataset, horizon_days: float) -> np.ndarray:
    """Censoring weights of the risk labels of ``dataset`` (0 where unknown), the censoring
    distribution estimated on ``reference`` (the train split): :func:`models.censoring.censoring_weights`."""
    labels, known = dataset.label_arrays(), reference.label_arrays()
    return censoring_weights(labels["risk_label"], labels["event"], labels["duration_days"], horizon_days,
                             known["risk_label"], known["event"], known["duration_days"])


def _one_cycle(optimizer: torch.optim.Optimizer, max_lr: float,
               total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The one-cycle learning rate: a warm-up over the first 10 % of the steps, then a cosine decay.

    OneCycleLR divides by the warm-up's length in steps minus one, so a warm-up of exactly one step
    (10 steps in all) fails; a run that short warms up over 2 steps, and one of at most 2 steps keeps
    the rate constant.
    """
    if total_steps <= 2:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pct_start = 0.1 if 0.1 * total_steps >= 2 else 2 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=pct_start)


def _moving_average(model: FusionForRiskPrediction, average_epochs: float,
                    steps_per_epoch: int) -> AveragedModel | None:
    """An exponential moving average of the weights over about ``average_epochs`` epochs, or None.

    Early stopping usually ends training while the one-cycle schedule's rate is still near its peak,
    where the tuning loss jumps from epoch to epoch with the last batches seen; the averaged weights
    (Polyak averaging) sit nearer the centre of that noise.
    """
    if average_epochs < 0:
        raise ValueError(f"TrainingArguments.average_epochs: expected >= 0, got {average_epochs}")
    if average_epochs == 0:
        return None
    decay = math.exp(-1.0 / (average_epochs * steps_per_epoch))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train(
    model: FusionForRiskPrediction,
    train_dataset: FusionDataset,
    tuning_dataset: FusionDataset,
    args: TrainingArguments,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train ``model``; return the epoch with the lowest tuning loss, calibrated on the tuning split.

    The risk head learns from the patients with a known outcome (complete cases), which over-represent
    early events; the calibration weights them by their censoring weights
    (:func:`label_censoring_weights`), so the calibrated risk estimates the whole cohort's risk at the
    horizon. Weighting the loss as well was measured worse: on scikit-survival's ``breast_cancer``
    (198 patients) the cross-validated C-index fell from 0.688 to 0.648, on whas500 from 0.780 to 0.777.

    Raises
    ------
    TrainingDataError
        When the train or tuning split has too few outcomes to learn or calibrate a risk.
    ModelSettingsError
        When the tuning loss is not a number after the first epoch: training diverged.
    """
    check_trainable("train", train_dataset, args.min_events)
    # Platt scaling from fewer outcomes is unstable (one case gives a near-step function).
    check_trainable("tuning", tuning_dataset, MIN_CALIBRATION_OUTCOMES if args.calibrate else 1)
    check_inputs_fit(model.config, "train", train_dataset)
    check_inputs_fit(model.config, "tuning", tuning_dataset)
    seed_everything(args.seed)
    device = args.resolve_device()
    model.to(device)  # type: ignore[arg-type]
    distributed = dist.is_available() and dist.is_initialized()
    module: torch.nn.Module = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed else model
    )
    sampler: DistributedSampler[PatientInputs] | None = (
        DistributedSampler(train_dataset, shuffle=True, seed=args.seed) if distributed else None
    )
    generator = torch.Generator().manual_seed(args.seed)
    if args.dataloader_num_workers < 0:
        raise ValueError(f"TrainingArguments.dataloader_num_workers: expected >= 0, got {args.dataloader_num_workers}")
    workers = args.dataloader_num_workers
    loader = DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
        collate_fn=partial(collate, pad_to_multiple_of=_pad_multiple(device)), generator=generator,
        # The last short batch is dropped when this process has a full one: its few patients would
        # weigh as much as a full batch. Under DDP this process holds its shard only.
        drop_last=len(sampler if sampler is not None else train_dataset) > args.batch_size,
        # Workers start again each epoch: kept alive, they would skip the per-epoch draw from
        # ``generator`` that a new loader iterator makes, and the shuffles would differ from collating
        # in this process (the same seed would give another model).
        num_workers=workers, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = _one_cycle(optimizer, args.learning_rate, max(1, args.max_epochs * len(loader)))
    autocast = _trains_in_bf16(args, device)
    averaged = _moving_average(model, args.average_epochs, len(loader))
    # Early stopping and the returned model use the averaged weights when there are any.
    evaluated = cast(FusionForRiskPrediction, averaged.module) if averaged is not None else model
    best_loss, best_epoch, best_state, stale = math.inf, -1, None, 0
    history: list[dict[str, float]] = []
    for epoch in range(args.max_epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        module.train()
        # Summed on the device: reading the loss back each step would wait for the GPU every step.
        running, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        with _attention_backends(device):  # process-wide flags: set once per epoch, not per step
            for batch in loader:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    out = module(**_to(batch, device))
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                running += out.loss.detach().double() * len(batch["event"])
                seen += len(batch["event"])
        tuning = predict_logits(evaluated, tuning_dataset, device=device)
        tuning_loss = torch.tensor(float(tuning["loss"]), dtype=torch.float64, device=device)
        if distributed:
            # One decision for every process: each computed the tuning loss on its own hardware, and
            # a process that stopped while the others trained on would wait in their all-reduce.
            dist.broadcast(tuning_loss, src=0)
            # The epoch's training loss over every process's shard, not this one's alone.
            totals = torch.stack([running, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            dist.all_reduce(totals)
            running, seen = totals[0], int(totals[1].item())
        record = {"epoch": float(epoch), "train_loss": float(running) / max(seen, 1),
                  "tuning_loss": float(tuning_loss.item())}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if not math.isfinite(record["tuning_loss"]):
            if best_state is None:
                raise ModelSettingsError(f"training diverged at epoch {epoch}: tuning loss {record['tuning_loss']} "
                                         f"(learning rate {args.learning_rate}; train again with a lower one)")
            break  # diverged after a good epoch: no later one can be better; that epoch's weights stay
        if record["tuning_loss"] < best_loss - 1e-4:
            best_loss, best_epoch, stale = record["tuning_loss"], epoch, 0
            best_state = copy.deepcopy(evaluated.state_dict())
        else:
            stale += 1
            if stale >= args.patience:
                break
    assert best_state is not None  # the first epoch's finite loss is the best so far
    model.load_state_dict(best_state)
    model.eval()
    calibrator = (fit_calibration(model, tuning_dataset, train_dataset, device=device) if args.calibrate
                  else PlattCalibrator.identity())
    return TrainingResult(model=model, calibrator=calibrator, best_epoch=best_epoch, history=history)


def fit_calibration(model: FusionForRiskPrediction, tuning_dataset: FusionDataset, train_dataset: FusionDataset,
                    device: torch.device | None = None) -> PlattCalibrator:
    """Platt-calibrate a trained model's risk head on the tuning split, and each treatment arm's head
    on the tuning patients of that arm (when the task names a treatment), all censoring-weighted
    with the censoring distribution of the train split."""
    tuning = predict_logits(model, tuning_dataset, device=device)
    arrays = tuning_dataset.label_arrays()
    labels, treated = arrays["risk_label"], arrays["treated"]
    known = ~np.isnan(labels)
    weights = label_censoring_weights(tuning_dataset, train_dataset, model.config.horizon_days)
    calibrator = PlattCalibrator(min_positives=MIN_CALIBRATION_OUTCOMES).fit(
        tuning["risk_logits"][known], labels[known], sample_weight=weights[known]
    )
    if not np.isnan(treated).all():
        calibrator.fit_arms(tuning["arm_logits"], labels, treated, sample_weight=weights)
    survival = survival_curve(torch.from_numpy(tuning["hazard_logits"])).numpy()
    calibrator.fit_survival(survival[:, model.config.horizon_bin], arrays["event"], arrays["duration_days"],
                            model.config.horizon_days)
    return calibrator
