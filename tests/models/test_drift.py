"""Tests of the population stability index and of the reference saved with a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.drift import (
    PSI_ALARM,
    PSI_WARN,
    REFERENCE_FILE,
    load_reference,
    population_stability_index,
    save_reference,
)
from models.scoring import RiskTiers, score_task
from tests.models.conftest import TrainedTask


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20_000)
    assert population_stability_index(reference, rng.normal(size=20_000)) < 0.01
    assert PSI_WARN < population_stability_index(reference, rng.normal(0.4, 1, 20_000)) < PSI_ALARM
    assert population_stability_index(reference, rng.normal(1.5, 1, 20_000)) > PSI_ALARM


def test_psi_refuses_empty_samples() -> None:
    with pytest.raises(ValueError, match=r"needs two non-empty samples \(got 3 and 0\)"):
        population_stability_index([1, 2, 3], [])


def test_a_model_folder_saves_its_training_cohorts_risks_as_the_reference(trained_task: TrainedTask) -> None:
    saved = pl.read_parquet(trained_task.model_dir / REFERENCE_FILE)
    splits = pl.read_parquet(trained_task.task_dir / "splits.parquet")
    assert dict(saved["split"].value_counts().iter_rows()) == dict(splits["split"].value_counts().iter_rows())
    # Re-scoring the cohort the model was trained on, in the same precision, is no drift at all.
    today = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                       with_explanations=False, bf16=False).column("risk").to_numpy()
    reference = load_reference(trained_task.model_dir)
    assert reference is not None and reference.size == today.size == 800
    assert population_stability_index(reference, today) == 0.0


def test_a_model_folder_without_a_reference_has_none(tmp_path: Path) -> None:
    assert load_reference(tmp_path) is None
    save_reference(tmp_path / REFERENCE_FILE, {"train": np.array([0.1, 0.2]), "held_out": np.array([0.3])})
    assert load_reference(tmp_path).tolist() == [0.1, 0.2, 0.3]  # type: ignore[union-attr]
    assert pl.read_parquet(tmp_path / REFERENCE_FILE)["split"].to_list() == ["train", "train", "held_out"]
