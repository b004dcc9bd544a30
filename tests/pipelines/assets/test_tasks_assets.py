from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipelines.assets import tasks as task_assets
from pipelines.resources import Workspace
from tests.features.warehouse import write_warehouse

ASSETS = [task_assets.cohort, task_assets.labels, task_assets.subject_splits, task_assets.event_tokens,
          task_assets.tabular_features, task_assets.note_embeddings, task_assets.imaging_inputs]
CHECKS = [task_assets.event_tokens_leakage, task_assets.tabular_features_leakage,
          task_assets.note_embeddings_leakage, task_assets.imaging_inputs_leakage,
          task_assets.subject_splits_disjoint]


def test_task_partitions_are_the_task_files() -> None:
    assert {"simulated_mace_1y", "synthea_death_1y"} <= set(task_assets.task_partitions.get_partition_keys())


@pytest.mark.slow
def test_task_assets_materialize_and_checks_catch_a_leak(
    small_hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_warehouse(small_hospital, tmp_path / "warehouse")
    resources = {"workspace": Workspace(root=str(tmp_path))}
    result = dg.materialize([*ASSETS, *CHECKS], partition_key="simulated_mace_1y", resources=resources)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5 and all(c.passed for c in checks)
    folder = tmp_path / "warehouse" / "tasks" / "simulated_mace_1y"
    labels = pl.read_parquet(folder / "labels.parquet")
    assert labels.height == 300 and labels["boolean_value"].null_count() > 0

    # Plant a leak: a buggy feature step dates one row after its patient's prediction time.
    real_step = task_assets.task_inputs.build_tabular_features

    def leaky_step(warehouse_dir: Path, task: object) -> object:
        step = real_step(warehouse_dir, task)  # type: ignore[arg-type]
        table = pl.read_parquet(step.path)
        table.with_columns(
            pl.when(pl.int_range(pl.len()) == 0).then(pl.col("prediction_time") + timedelta(days=1))
            .otherwise(pl.col("last_input_time")).alias("last_input_time")
        ).write_parquet(step.path)
        return step

    monkeypatch.setattr(task_assets.task_inputs, "build_tabular_features", leaky_step)
    rerun = dg.materialize([task_assets.tabular_features, task_assets.tabular_features_leakage],
                           partition_key="simulated_mace_1y", resources=resources, raise_on_error=False)
    failed = [c for c in rerun.get_asset_check_evaluations() if not c.passed]
    assert [c.metadata["leaking_rows"].value for c in failed] == [1]
