from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from features.errors import CohortDefinitionError
from pipelines.assets import tasks as task_assets
from pipelines.resources import Workspace

ASSETS = [task_assets.cohort, task_assets.labels, task_assets.subject_splits, task_assets.event_tokens,
          task_assets.tabular_features, task_assets.note_embeddings, task_assets.imaging_inputs]
CHECKS = [task_assets.event_tokens_leakage, task_assets.tabular_features_leakage,
          task_assets.note_embeddings_leakage, task_assets.imaging_inputs_leakage,
          task_assets.subject_splits_disjoint]


def test_task_partitions_are_the_task_files() -> None:
    assert {"simulated_mace_1y", "synthea_death_1y"} <= set(task_assets.task_partitions.get_partition_keys())


def test_a_task_file_whose_name_differs_from_its_file_name_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy of a task file that kept the original's name would write into the original's folders.
    shutil.copy(task_assets.TASKS_DIR / "simulated_mace_1y.yaml", tmp_path / "mace_variant.yaml")
    shutil.copy(task_assets.TASKS_DIR / "simulated_mace_1y.yaml", tmp_path / "simulated_mace_1y.yaml")
    monkeypatch.setattr(task_assets, "TASKS_DIR", tmp_path)
    assert task_assets.task_of_partition("simulated_mace_1y").name == "simulated_mace_1y"
    with pytest.raises(CohortDefinitionError, match=rf"^task file {tmp_path / 'mace_variant.yaml'}: name "
                                                    r"'simulated_mace_1y' differs from its file name \(expected "
                                                    r"name: mace_variant; "):
        task_assets.task_of_partition("mace_variant")


@pytest.mark.slow
def test_task_assets_materialize_and_checks_catch_a_leak(
    small_warehouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(small_warehouse, tmp_path / "warehouse")
    resources = {"workspace": Workspace(root=str(tmp_path))}
    # Notes cut to 32 tokens keep the test fast; which notes are embedded does not depend on it.
    run_config = dg.RunConfig({"note_embeddings": task_assets.NoteEncoderConfig(max_length=32)})
    result = dg.materialize([*ASSETS, *CHECKS], partition_key="simulated_mace_1y", resources=resources,
                            run_config=run_config)
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

    # A check run alone (no asset in the run, as when launched from the UI's check page) takes its
    # task from its partition. (dg.materialize and partition_key= cannot select checks only: Dagster
    # 1.13 looks for the partitions of the selected assets, and there are none; the UI sets the tag.)
    job = dg.define_asset_job("check_alone", selection=dg.AssetSelection.checks(task_assets.subject_splits_disjoint))
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[job], resources=resources)
    alone = defs.resolve_job_def("check_alone").execute_in_process(tags={"dagster/partition": "simulated_mace_1y"})
    assert [(c.check_name, c.passed) for c in alone.get_asset_check_evaluations()] == [
        ("subject_splits_disjoint", True)]
    assert alone.get_asset_materialization_events() == []

    monkeypatch.setattr(task_assets.task_inputs, "build_tabular_features", leaky_step)
    rerun = dg.materialize([task_assets.tabular_features, task_assets.tabular_features_leakage],
                           partition_key="simulated_mace_1y", resources=resources, raise_on_error=False)
    failed = [c for c in rerun.get_asset_check_evaluations() if not c.passed]
    assert [c.metadata["leaking_rows"].value for c in failed] == [1]
