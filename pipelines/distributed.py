"""Multi-process training with ``torchrun`` (DistributedDataParallel).

Stage: model. In: the same arguments as ``cohortcast train`` plus the process-group settings that
``torchrun`` puts in the environment. Out: one model folder, written by the first process
(``WAREHOUSE/candidate_models/<task>`` unless ``--out``), deployed to ``WAREHOUSE/models/<task>`` when
it meets the task's quality gates (:func:`models.publishing.deploy_model`).

Usage, two processes on one machine (CPU: gloo; GPUs: nccl, one process per GPU)::

    torchrun --nproc_per_node=2 -m pipelines.distributed --warehouse W --task tasks/simulated_mace_1y.yaml

and across machines the usual ``--nnodes``, ``--node_rank`` and ``--master_addr`` of ``torchrun``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from features.errors import CohortcastError
from features.task_inputs import task_dir
from features.tasks import load_task
from models.publishing import PublishError, deploy_model
from models.task_model import train_task_model
from models.training import TrainingArguments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.distributed",
                                     description="Train one task's fusion model under torchrun.")
    parser.add_argument("--warehouse", type=Path, required=True)
    parser.add_argument("--task", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args(argv)
    try:
        task = load_task(args.task)
    except CohortcastError as error:
        parser.error(str(error))  # one line and exit 2, in every process torchrun started
    live = args.warehouse / "models" / task.name
    if args.out is not None and args.out.resolve() == live.resolve():
        parser.error(f"--out {args.out} is the deployed model's folder, which only a model that meets the "
                     "task's quality gates may replace: leave --out out to train and deploy through them")
    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # The other processes wait while the main one evaluates and writes the model (the baselines
    # included, which take minutes on a large cohort): longer than NCCL's default 10 minutes.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    try:
        rank = dist.get_rank()
        training = TrainingArguments(max_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                     device=f"cuda:{local_rank}" if use_cuda else "cpu")
        architecture = {"hidden_size": args.hidden_size, "intermediate_size": 2 * args.hidden_size}
        model_dir = args.out or args.warehouse / "candidate_models" / task.name
        train_task_model(task_dir(args.warehouse, task), model_dir, task, training, architecture,
                         baselines=not args.no_baselines, is_main_process=rank == 0,
                         on_epoch=lambda r: print(f"rank {rank}/{dist.get_world_size()} epoch {int(r['epoch'])} "
                                                  f"train {r['train_loss']:.4f} tuning {r['tuning_loss']:.4f}",
                                                  flush=True))
        dist.barrier()
        if rank == 0 and args.out is None:
            try:
                deploy_model(model_dir, live, task.publishing.min_auroc, task.publishing.max_calibration_error)
            except PublishError as exc:  # the training completed; the model before stays deployed
                print(exc, flush=True)
            else:
                print(f"deployed: {live}", flush=True)
    except CohortcastError as error:
        # Inputs or settings that cannot train (missing task inputs, too few outcomes, a model folder
        # that may not be replaced): every process reads the same, so each says it on one line.
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
