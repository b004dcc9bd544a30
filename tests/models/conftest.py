"""A tiny trained model on a synthetic task folder, shared by the scoring and publishing tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from features.tasks import load_task
from models.task_model import train_task_model
from models.training import TrainingArguments
from tests.models.synthetic import write_task_folder


@dataclass(frozen=True)
class TrainedTask:
    warehouse: Path
    task_dir: Path
    model_dir: Path


@pytest.fixture(scope="session")
def trained_task(tmp_path_factory: pytest.TempPathFactory) -> TrainedTask:
    warehouse = tmp_path_factory.mktemp("trained")
    task = load_task(write_task_folder(warehouse, 800, seed=6))
    task_dir = warehouse / "tasks" / "synthetic_1y"
    model_dir = warehouse / "models" / "synthetic_1y"
    train_task_model(task_dir, model_dir, task, TrainingArguments(max_epochs=10, batch_size=64, learning_rate=3e-3),
                     {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
                     baselines=False)
    return TrainedTask(warehouse, task_dir, model_dir)
