"""The ingest assets, checks, batch partitions and sensor, on the small simulated hospital."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from pipelines.assets.ingest import (
    duplicates_reported,
    events_not_after_export,
    events_subjects_exist,
    ingest_accounting_balances,
    ingested_tables,
)
from pipelines.resources import Workspace
from pipelines.sensors import BATCH_PARTITIONS, ingested_batch, landing_batch_sensor

CHECKS = [ingest_accounting_balances, events_subjects_exist, events_not_after_export, duplicates_reported]


def test_materialize_ingest_with_checks(small_hospital: Path, tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables, *CHECKS],
            resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(small_hospital), "workers": 1}}}},
            instance=instance,
        )
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert sorted(e.check_name for e in evaluations) == [
        "duplicates_reported",
        "events_not_after_export",
        "events_subjects_exist",
        "ingest_accounting_balances",
    ]
    assert all(e.passed for e in evaluations)
    keys = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert {"events", "patients", "notes", "imaging", "genomics", "quarantine"} <= keys
    events = pl.read_parquet(tmp_path / "warehouse" / "events.parquet")
    assert set(events["modality"]) == {"ehr", "notes", "genomics", "imaging"}


def test_accounting_check_fails_when_unbalanced(small_hospital: Path, tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        dg.materialize(
            [ingested_tables],
            resources={"workspace": workspace},
            instance=instance,
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(small_hospital), "workers": 1}}}},
        )
    summary_path = tmp_path / "warehouse" / "ingest_summary.json"
    summary_path.write_text(summary_path.read_text().replace('"records_out": ', '"records_out": 1', 1))
    result = ingest_accounting_balances(workspace=workspace)
    assert not result.passed


def test_sensor_adds_partition_and_ingests_batch(small_hospital: Path, tmp_path: Path) -> None:
    batches = tmp_path / "batches"
    shutil.copytree(small_hospital / "fhir", batches / "2024-06-01" / "fhir")
    (batches / ".2024-06-02").mkdir()  # still landing: ignored
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
        result = landing_batch_sensor(context)
        assert [request.partition_key for request in result.run_requests] == ["2024-06-01"]
        assert result.dynamic_partitions_requests[0].partition_keys == ["2024-06-01"]

        instance.add_dynamic_partitions(BATCH_PARTITIONS.name, ["2024-06-01"])
        run = dg.materialize(
            [ingested_batch],
            partition_key="2024-06-01",
            instance=instance,
            resources={"workspace": workspace},
            run_config={"ops": {"ingested_batch": {"config": {"workers": 1}}}},
        )
        assert run.success
        assert (tmp_path / "warehouse" / "batches" / "2024-06-01" / "events.parquet").is_file()
        again = landing_batch_sensor(dg.build_sensor_context(instance=instance, resources={"workspace": workspace}))
        assert again.run_requests == []


def test_definitions_load() -> None:
    from pipelines.definitions import defs

    assert defs.resolve_job_def("ingest_batch") is not None
    assert defs.resolve_sensor_def("landing_batch_sensor") is not None
