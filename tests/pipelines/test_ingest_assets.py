"""The ingest assets, checks, batch partitions and sensor, on the small simulated hospital."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest

from features.ingest import (
    PROMOTED_BATCH_FILE,
    SUMMARY_FILE,
    FileAccount,
    IngestSummary,
    ingest_landing_zone,
    warehouse_files,
)
from features.schemas import CODES, EVENTS, INTERNAL_TABLES, QUARANTINE
from pipelines.assets.ingest import (
    INGEST_ASSETS,
    CodeUnitsConfig,
    codes_in_one_unit,
    duplicates_reported,
    events_not_after_export,
    events_subjects_exist,
    export_matches_manifest,
    fhir_library_read_every_record,
    ingest_accounting_balances,
    ingested_tables,
    quarantine_share_within_limit,
)
from pipelines.resources import Workspace
from pipelines.sensors import BATCH_PARTITIONS, LANDING_QUIET_SECONDS, ingested_batch, landing_batch_sensor


@dg.asset
def unrelated_asset() -> int:
    """An asset of another run, which writes nothing of the warehouse."""
    return 1


CHECKS = [ingest_accounting_balances, events_subjects_exist, events_not_after_export, duplicates_reported,
          quarantine_share_within_limit, export_matches_manifest, fhir_library_read_every_record, codes_in_one_unit]


def test_materialize_ingest_with_checks(small_hospital: Path, tmp_path: Path) -> None:
    from pipelines.definitions import defs

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables, *CHECKS],
            resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(small_hospital), "workers": 1}}}},
            instance=instance,
        )
        # Started outside the ingest job (as from the asset's page), it still starts every task's pipeline.
        publish = defs.resolve_sensor_def("publish_after_ingest")
        requests = list(publish(dg.build_run_status_sensor_context(  # type: ignore[operator]
            sensor_name="publish_after_ingest", dagster_instance=instance, dagster_run=result.dagster_run,
            dagster_event=result.get_run_success_event())))
        assert [(r.partition_key, r.run_key) for r in requests] == [
            (task, f"after-ingest/{result.run_id}/{task}") for task in ("simulated_mace_1y", "synthea_death_1y")]
        other = dg.materialize([unrelated_asset], instance=instance)
        (skipped,) = publish(dg.build_run_status_sensor_context(  # type: ignore[operator]
            sensor_name="publish_after_ingest", dagster_instance=instance, dagster_run=other.dagster_run,
            dagster_event=other.get_run_success_event()))
        assert skipped.skip_message == f"run {other.run_id} of __ephemeral_asset_job__ did not write the warehouse"
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert sorted(e.check_name for e in evaluations) == [
        "codes_in_one_unit",
        "duplicates_reported",
        "events_not_after_export",
        "events_subjects_exist",
        "export_matches_manifest",
        "fhir_library_read_every_record",
        "ingest_accounting_balances",
        "quarantine_share_within_limit",
    ]
    # The simulated Bundle feed weighs its patients in pounds: a warning, the pounds read as kilograms.
    (units,) = [e for e in evaluations if e.check_name == "codes_in_one_unit"]
    assert not units.passed and units.severity == dg.AssetCheckSeverity.WARN
    assert re.fullmatch(r"\| LOINC//29463-7 \| kg \(\d+\), \[lb_av\] \(\d+, converted\) \| no \|",
                        units.metadata["codes"].value.splitlines()[2])
    assert all(e.passed for e in evaluations if e.check_name != "codes_in_one_unit")
    keys = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert {"events", "patients", "notes", "imaging", "genomics", "quarantine"} <= keys
    events = pl.read_parquet(tmp_path / "warehouse" / "events.parquet")
    assert set(events["modality"]) == {"ehr", "notes", "genomics", "imaging"}


@pytest.mark.parametrize("column", ["time", "known_time"])
def test_an_event_dated_or_known_after_the_export_fails_its_check(
        small_warehouse: Path, tmp_path: Path, column: str) -> None:
    warehouse = tmp_path / "warehouse"
    shutil.copytree(small_warehouse, warehouse)
    export_time = IngestSummary.from_json(warehouse / SUMMARY_FILE).export_time
    events = pl.read_parquet(warehouse / "events.parquet")
    late = events.head(1).with_columns(pl.lit(export_time + timedelta(days=30)).alias(column))
    pl.concat([events, late]).write_parquet(warehouse / "events.parquet")
    result = events_not_after_export(workspace=Workspace(root=str(tmp_path)))
    assert not result.passed and result.metadata["events_after_export"].value == 1


def test_a_code_charted_in_two_units_warns_and_is_listed(small_warehouse: Path, tmp_path: Path) -> None:
    warehouse = tmp_path / "warehouse"
    shutil.copytree(small_warehouse, warehouse)
    events = pl.read_parquet(warehouse / "events.parquet")
    weights = events.filter(pl.col("code") == "LOINC//29463-7")["unit"].value_counts(sort=True)
    (kilograms, pounds) = weights["count"]
    assert weights["unit"].to_list() == ["kg", "[lb_av]"]
    workspace = Workspace(root=str(tmp_path))
    # The simulated Bundle feed weighs in pounds; a site that has looked at that names the code.
    known = codes_in_one_unit(config=CodeUnitsConfig(known_codes=["LOINC//29463-7"]), workspace=workspace)
    assert known.passed and known.metadata["codes_in_several_units"].value == 1
    assert known.metadata["codes"].value.splitlines()[2] == (
        f"| LOINC//29463-7 | kg ({kilograms}), [lb_av] ({pounds}, converted) | yes |")
    # A feed that starts sending heart rates in beats per second is warned of: a new code in two units.
    rates = events.filter(pl.col("code") == "LOINC//8867-4")
    per_second = rates.head(3).with_columns(pl.lit("/s").alias("unit"), pl.col("numeric_value") / 60)
    pl.concat([events, per_second]).write_parquet(warehouse / "events.parquet")
    result = codes_in_one_unit(config=CodeUnitsConfig(known_codes=["LOINC//29463-7"]), workspace=workspace)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert (result.metadata["codes_in_several_units"].value, result.metadata["not_known"].value) == (2, 1)
    assert result.metadata["codes"].value.splitlines()[2] == (
        f"| LOINC//8867-4 | /min ({rates.height}), /s (3, converted) | no |")


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


def test_records_the_fhir_library_raises_on_for_no_known_reason_fail_a_check_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    class Broken:
        """An Observation model of a broken or mismatched fhir.resources."""

        @staticmethod
        def model_validate(resource: dict[str, Any]) -> None:
            raise AttributeError("'NoneType' object has no attribute 'fields'")

    def model(resource_type: str) -> Any:
        return Broken if resource_type == "Observation" else get_fhir_model_class(resource_type)

    monkeypatch.setattr("features.fhir.validate.r4_model", model)
    monkeypatch.setattr("features.fhir.columnar.r4_model", model)
    landing = tmp_path / "landing"
    (landing / "fhir").mkdir(parents=True)
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-02-03"}
    observation = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                   "effectiveDateTime": "2020-01-02T10:00:00Z",
                   "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}
    (landing / "fhir" / "export.ndjson").write_bytes(orjson.dumps(patient) + b"\n" + orjson.dumps(observation) + b"\n")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables, fhir_library_read_every_record],
            resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(landing), "workers": 1,
                                                                "strict": True}}}},
            instance=instance,
        )
    assert result.success  # the record is accounted for; the check, not the run, says what went wrong
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert {key: value.value for key, value in evaluation.metadata.items()} == {
        "records": 1, "reason_code": "fhir_library_error"}
    quarantine = pl.read_parquet(tmp_path / "warehouse" / "quarantine.parquet")
    assert quarantine.select("source_file", "record_number", "resource_id", "reason_code").rows() == [
        ("fhir/export.ndjson", 2, "o1", "fhir_library_error")]
    assert pl.read_parquet(tmp_path / "warehouse" / "patients.parquet")["patient_id"].to_list() == ["p1"]


def test_a_file_mostly_quarantined_warns_without_failing_the_run(small_hospital: Path, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(small_hospital, landing)
    # A feed that broke upstream: half of one Observation file's lines are cut short.
    observations = landing / "fhir" / "Observation.000.ndjson"
    lines = observations.read_bytes().splitlines()
    observations.write_bytes(b"\n".join(line[:40] if i % 2 else line for i, line in enumerate(lines)) + b"\n")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables, quarantine_share_within_limit],
            resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(landing), "workers": 1}},
                                "quarantine_quarantine_share_within_limit": {"config": {"max_share": 0.2}}}},
            instance=instance,
        )
    assert result.success  # a warning: the run and what follows it go on
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    metadata = {key: value.value for key, value in evaluation.metadata.items()}
    assert metadata["files_over"] == 1 and metadata["max_share"] == 0.2
    table = metadata["worst_files"].splitlines()
    assert table[0] == "source_file | records_in | quarantined | share | top_reason | top_reason_count"
    cut = len(lines) // 2
    assert table[2] == f"fhir/Observation.000.ndjson | {len(lines)} | {cut} | 0.5000 | invalid_json | {cut}"


def age(folder: Path, seconds: float) -> None:
    """Date ``folder`` and everything under it ``seconds`` ago, as if the copy had ended then."""
    then = time.time() - seconds
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            os.utime(os.path.join(parent, name), (then, then))
    os.utime(folder, (then, then))


def test_sensor_adds_partition_and_ingests_batch(small_hospital: Path, tmp_path: Path) -> None:
    batches = tmp_path / "batches"
    shutil.copytree(small_hospital / "fhir", batches / "2024-06-01" / "fhir")
    age(batches / "2024-06-01", LANDING_QUIET_SECONDS + 60)
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


def test_a_batch_that_does_not_match_its_manifest_fails_before_any_promotion(
    small_hospital: Path, tmp_path: Path
) -> None:
    batch = tmp_path / "batches" / "2024-06-01"
    shutil.copytree(small_hospital / "fhir", batch / "fhir")
    manifest = {"transactionTime": "2026-01-01T00:00:00Z",
                "output": [{"type": "Observation", "url": "https://ehr.example.org/bulk/Observation.009.ndjson"}]}
    (batch / "fhir" / "manifest.json").write_text(json.dumps(manifest))
    (batch / "_SUCCESS").touch()
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        def tick() -> list[tuple[str | None, str | None]]:
            context = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
            result = landing_batch_sensor(context)
            for request in result.dynamic_partitions_requests:
                instance.add_dynamic_partitions(BATCH_PARTITIONS.name, list(request.partition_keys))
            return [(request.partition_key, request.run_key) for request in result.run_requests]

        def ingest() -> dg.ExecuteInProcessResult:
            return dg.materialize(
                [ingested_batch], partition_key="2024-06-01", instance=instance, raise_on_error=False,
                resources={"workspace": workspace}, run_config={"ops": {"ingested_batch": {"config": {"workers": 1}}}},
            )

        assert tick() == [("2024-06-01", "2024-06-01")]
        run = ingest()
        assert not run.success  # so promote_newest_batch, which follows successful runs only, never promotes it
        (failure,) = run.get_step_failure_events()
        assert failure.step_failure_data.error.message.startswith(  # type: ignore[union-attr]
            "dagster._core.definitions.events.Failure: batch 2024-06-01: the landing zone does not match its "
            "manifest: Observation.009.ndjson: listed in fhir/manifest.json, not in the landing zone")
        assert not (tmp_path / "warehouse" / "patients.parquet").exists()
        assert tick() == []  # the folder has not changed since
        # The copy went on while that run read it: the listed file, then the lander's marker,
        # arrived after the run started and before it ended.
        (batch / "fhir" / "Observation.000.ndjson").rename(batch / "fhir" / "Observation.009.ndjson")
        stats = instance.get_run_stats(run.run_id)
        assert stats.start_time is not None and stats.end_time is not None
        during = (stats.start_time + stats.end_time) / 2
        for path in [batch, batch / "fhir", *batch.rglob("*")]:
            os.utime(path, (during, during))
        ((partition, key),) = tick()
        assert partition == "2024-06-01" and key is not None and key.startswith("2024-06-01/changed-")
        assert ingest().success
        assert tick() == []


def test_sensor_waits_until_a_batch_copied_in_place_is_quiet(tmp_path: Path) -> None:
    batches = tmp_path / "batches"
    fhir = batches / "2024-06-01" / "fhir"
    fhir.mkdir(parents=True)
    (fhir / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')  # the copy is going on
    (batches / "2024-06-02").mkdir()
    age(batches / "2024-06-02", LANDING_QUIET_SECONDS + 60)  # an empty folder is not a batch yet, however old
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:

        def tick() -> dg.SensorResult:
            context = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
            result = landing_batch_sensor(context)
            for request in result.dynamic_partitions_requests:
                instance.add_dynamic_partitions(BATCH_PARTITIONS.name, list(request.partition_keys))
            return result  # type: ignore[no-any-return]

        waiting = tick()
        assert waiting.run_requests == [] and waiting.dynamic_partitions_requests == []
        assert waiting.skip_reason is not None
        assert waiting.skip_reason.skip_message == (
            "batches still landing (no _SUCCESS written last, and empty or changed in the last 120 s): "
            "2024-06-01, 2024-06-02"
        )
        (fhir / "Observation.000.ndjson").write_text("{}\n")
        age(batches / "2024-06-01", LANDING_QUIET_SECONDS + 60)
        # rsync -a keeps the export's times on the files it writes, but the folder it creates and
        # renames them in is dated now.
        partial = fhir / ".Condition.000.ndjson.a1b2c3"
        partial.write_text("{}\n")
        os.utime(partial, (0, 0))
        assert tick().run_requests == []
        partial.rename(fhir / "Condition.000.ndjson")
        assert tick().run_requests == []
        age(batches / "2024-06-01", LANDING_QUIET_SECONDS + 60)
        landed = tick()
        assert [(request.partition_key, request.run_key) for request in landed.run_requests] == [
            ("2024-06-01", "2024-06-01")
        ]
        assert landed.skip_reason is None
        assert instance.get_dynamic_partitions(BATCH_PARTITIONS.name) == ["2024-06-01"]
        assert tick().skip_reason.skip_message == (  # type: ignore[union-attr]
            "batches still landing (no _SUCCESS written last, and empty or changed in the last 120 s): 2024-06-02"
        )


def test_sensor_ingests_a_batch_with_a_success_marker_at_once(tmp_path: Path) -> None:
    batch = tmp_path / "batches" / "2024-06-03"
    (batch / "fhir").mkdir(parents=True)
    (batch / "fhir" / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
    (batch / "_SUCCESS").touch()  # written by the lander after the last file
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        result = landing_batch_sensor(dg.build_sensor_context(instance=instance, resources={"workspace": workspace}))
    assert [request.partition_key for request in result.run_requests] == ["2024-06-03"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["2024-06-03"]


def test_a_success_marker_copied_before_the_rest_of_the_batch_does_not_count(tmp_path: Path) -> None:
    # Spark and Hadoop exports carry a _SUCCESS from their writer; rsync and cp -r copy a folder's
    # own files before its sub-folders, so the marker lands first and the FHIR files after it.
    batch = tmp_path / "batches" / "2024-06-03"
    batch.mkdir(parents=True)
    (batch / "_SUCCESS").touch()
    os.utime(batch / "_SUCCESS", (time.time() - 30, time.time() - 30))
    (batch / "fhir").mkdir()
    (batch / "fhir" / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        def tick() -> dg.SensorResult:
            return landing_batch_sensor(  # type: ignore[no-any-return]
                dg.build_sensor_context(instance=instance, resources={"workspace": workspace}))

        assert tick().run_requests == []
        (batch / "_SUCCESS").touch()  # the lander writes it again, last
        assert [request.partition_key for request in tick().run_requests] == ["2024-06-03"]


def test_sensor_says_when_the_batches_folder_is_missing(tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path / "elsewhere"))
    with dg.instance_for_test() as instance:
        result = landing_batch_sensor(dg.build_sensor_context(instance=instance, resources={"workspace": workspace}))
    assert result.run_requests == []
    assert result.skip_reason.skip_message == (  # type: ignore[union-attr]
        f"no batches folder {tmp_path / 'elsewhere' / 'batches'} (the workspace's batches/; set "
        "COHORTCAST_WORKSPACE to the deployment's workspace)")


def test_newest_ingested_batch_becomes_the_warehouse(small_hospital: Path, tmp_path: Path) -> None:
    from pipelines.definitions import defs

    batches = tmp_path / "batches"
    shutil.copytree(small_hospital, batches / "2024-06-02")
    shutil.copytree(small_hospital / "fhir", batches / "2024-06-01" / "fhir")
    workspace = Workspace(root=str(tmp_path))
    promote = defs.resolve_sensor_def("promote_newest_batch")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS.name, ["2024-06-01", "2024-06-02"])
        runs = {
            batch: dg.materialize(
                [ingested_batch], partition_key=batch, instance=instance, resources={"workspace": workspace},
                run_config={"ops": {"ingested_batch": {"config": {"workers": 1}}}},
            )
            for batch in ("2024-06-02", "2024-06-01")  # the older batch ingested last
        }

        def sensor_result(batch: str) -> dg.RunRequest | dg.SkipReason:
            context = dg.build_run_status_sensor_context(
                sensor_name="promote_newest_batch", dagster_instance=instance,
                dagster_run=runs[batch].dagster_run, dagster_event=runs[batch].get_run_success_event(),
            )
            return promote(context)  # type: ignore[operator,no-any-return]

        skipped = sensor_result("2024-06-01")
        assert isinstance(skipped, dg.SkipReason)
        assert skipped.skip_message == (
            "batch 2024-06-01 is not promoted: batch 2024-06-02, ingested already, is newer"
        )
        request = sensor_result("2024-06-02")
        assert isinstance(request, dg.RunRequest)
        # Named by the ingest run: a batch ingested again is promoted again.
        assert request.run_key == f"promote/2024-06-02/{runs['2024-06-02'].run_id}"
        assert promote.job_name == "ingest"
        config = {**request.run_config["ops"]["ingested_tables"]["config"], "keep_ingested_batches": 1}
        promoted = dg.materialize(
            [ingested_tables, *CHECKS], run_config={"ops": {"ingested_tables": {"config": config}}},
            instance=instance, resources={"workspace": workspace},
        )
    assert promoted.success
    # Keeping one ingested batch: the older batch's copy is deleted, its export is not.
    assert sorted(p.name for p in (tmp_path / "warehouse" / "batches").iterdir()) == ["2024-06-02"]
    assert (batches / "2024-06-01" / "fhir").is_dir()
    # Every check passes but the simulated Bundle feed's weights in pounds (a warning).
    assert [e.check_name for e in promoted.get_asset_check_evaluations() if not e.passed] == ["codes_in_one_unit"]
    assert len(promoted.get_asset_check_evaluations()) == len(CHECKS)
    warehouse = tmp_path / "warehouse"
    for name in warehouse_files():
        assert (warehouse / name).samefile(warehouse / "batches" / "2024-06-02" / name), name
    events = {e.asset_key.to_user_string(): e for e in promoted.get_asset_materialization_events()}
    assert set(events) == set(INGEST_ASSETS)
    rows = events["events"].event_specific_data.materialization.metadata["rows"].value  # type: ignore[union-attr]
    assert rows == pl.scan_parquet(warehouse / "events.parquet").select(pl.len()).collect().item()
    assert not (warehouse / "simulated_landing_zone").exists()


def test_promoting_a_batch_that_was_not_ingested_fails_and_keeps_the_warehouse(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables], instance=instance, resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": {"from_batch": "2024-07-01"}}}},
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.cause.message  # type: ignore[union-attr]
    assert "patients.parquet is missing" in message and "ingest the batch (again)" in message
    assert not (tmp_path / "warehouse" / "patients.parquet").exists()


def write_ingested_batch(folder: Path) -> None:
    """A batch's complete, balanced ingest of empty tables."""
    folder.mkdir(parents=True)
    schemas = {**INTERNAL_TABLES, "events": EVENTS, "codes": CODES, "quarantine": QUARANTINE}
    for name in warehouse_files()[:-1]:
        pq.write_table(schemas[name.removesuffix(".parquet")].empty_table(), folder / name)
    summary = IngestSummary(
        landing_dir=folder.name, warehouse_dir=str(folder), export_time=datetime(2024, 6, 1), strict=False,
        files=(FileAccount("fhir", "fhir/Patient.000.ndjson", 1, 1, 0),), table_rows=dict.fromkeys(INGEST_ASSETS, 1),
        quarantined_by_reason={}, duplicates=0, fhir_resources_in=1, elapsed_seconds=0.0,
    )
    (folder / SUMMARY_FILE).write_bytes(summary.to_json())


def test_promoting_an_older_batch_over_a_newer_one_fails_and_keeps_the_warehouse(tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    for batch in ("2024-06-01", "2024-06-02"):
        write_ingested_batch(workspace.batch_warehouse_dir(batch))
    warehouse = workspace.warehouse_dir
    with dg.instance_for_test() as instance:

        def promote(batch: str, **config: object) -> dg.ExecuteInProcessResult:
            return dg.materialize(
                [ingested_tables], instance=instance, resources={"workspace": workspace}, raise_on_error=False,
                run_config={"ops": {"ingested_tables": {"config": {"from_batch": batch, **config}}}},
            )

        assert promote("2024-06-02").success
        older = promote("2024-06-01")  # the older batch's promotion re-executed
        assert not older.success
        (failure,) = older.get_step_failure_events()
        assert failure.step_failure_data.error.cause.message == (  # type: ignore[union-attr]
            f"features.errors.LandingZoneError: promote batch 2024-06-01: warehouse {warehouse} holds batch "
            "2024-06-02, which is newer (expected 2024-06-02 or a later batch); the warehouse keeps its tables "
            "(allow_older_batch rolls back on purpose)\n"
        )
        newer = workspace.batch_warehouse_dir("2024-06-02") / "patients.parquet"
        assert (warehouse / "patients.parquet").samefile(newer)
        assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-02\n"
        assert promote("2024-06-01", allow_older_batch=True).success  # a rollback, asked for
    assert (warehouse / "patients.parquet").samefile(workspace.batch_warehouse_dir("2024-06-01") / "patients.parquet")
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-01\n"
    assert sorted(p.name for p in (warehouse / "batches").iterdir()) == ["2024-06-01", "2024-06-02"]


def test_ingest_refuses_both_an_export_and_a_batch(small_hospital: Path, tmp_path: Path) -> None:
    config = {"landing_dir": str(small_hospital), "from_batch": "2024-06-01"}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables], instance=instance, resources={"workspace": Workspace(root=str(tmp_path))},
            run_config={"ops": {"ingested_tables": {"config": config}}}, raise_on_error=False,
        )
    (failure,) = result.get_step_failure_events()
    assert (
        f"ingested_tables: landing_dir '{small_hospital}' and from_batch '2024-06-01' are both set (expected one"
        in failure.step_failure_data.error.message  # type: ignore[union-attr]
    )


def test_an_export_with_a_problem_does_not_replace_the_warehouse(small_hospital: Path, tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    cut = shutil.copytree(small_hospital, tmp_path / "cut")
    manifest = {"transactionTime": "2026-01-01T00:00:00Z",
                "output": [{"type": "Observation", "url": "https://ehr.example.org/bulk/Observation.009.ndjson"}]}
    (cut / "fhir" / "manifest.json").write_text(json.dumps(manifest))
    with dg.instance_for_test() as instance:
        def ingest(landing: Path) -> dg.ExecuteInProcessResult:
            return dg.materialize(
                [ingested_tables, *CHECKS], instance=instance, resources={"workspace": workspace}, raise_on_error=False,
                run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(landing), "workers": 1}}}},
            )

        assert ingest(small_hospital).success
        before = {name: (tmp_path / "warehouse" / name).read_bytes() for name in warehouse_files()}
        refused = ingest(cut)
    # The nightly re-scoring reads the warehouse whatever a failed run's checks say: it keeps its tables.
    assert not refused.success
    (failure,) = refused.get_step_failure_events()
    assert failure.step_failure_data.error.cause.message.startswith(  # type: ignore[union-attr]
        f"features.errors.LandingZoneError: ingest {cut}: the landing zone does not match its manifest: "
        "Observation.009.ndjson: listed in fhir/manifest.json, not in the landing zone")
    assert {name: (tmp_path / "warehouse" / name).read_bytes() for name in warehouse_files()} == before


def test_the_workspaces_site_time_zone_reads_the_dates(tmp_path: Path) -> None:
    landing = tmp_path / "export" / "fhir"
    landing.mkdir(parents=True)
    (landing / "Patient.ndjson").write_bytes(b'{"resourceType":"Patient","id":"p1","deceasedDateTime":"2020-05-01"}\n')
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ingested_tables], instance=instance,
            resources={"workspace": Workspace(root=str(tmp_path), site_timezone="America/Chicago")},
            run_config={"ops": {"ingested_tables": {"config": {"landing_dir": str(landing.parent), "workers": 1}}}},
        )
    assert result.success
    # The end of 1 May in Chicago (CDT, UTC-5), not in UTC.
    assert pl.read_parquet(tmp_path / "warehouse" / "patients.parquet")["death_time"].to_list() == [
        datetime(2020, 5, 2, 4, 59, 59, 999999)]


def test_definitions_load() -> None:
    from pipelines.definitions import defs

    assert defs.resolve_job_def("ingest_batch") is not None
    assert defs.resolve_sensor_def("landing_batch_sensor") is not None
    assert defs.resolve_sensor_def("promote_newest_batch") is not None
    # A deployment's ingest never re-runs the simulator.
    ingest = defs.resolve_job_def("ingest")
    assert "simulated_landing_zone" not in {node.name for node in ingest.graph.node_defs}


def test_a_folder_not_named_by_date_is_no_batch(small_hospital: Path, tmp_path: Path) -> None:
    # An operator tidies up with `mv 2024-06-01 batches/archive`: read as a batch, "archive" would
    # sort after every dated batch and be promoted over the newest data.
    batches = tmp_path / "batches"
    shutil.copytree(small_hospital / "fhir", batches / "archive" / "fhir")
    (batches / "archive" / "_SUCCESS").touch()
    # The date written without dashes would sort after 2024-06-02, and hold back every later batch.
    shutil.copytree(batches / "archive", batches / "20240601T0200Z")
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        result = landing_batch_sensor(dg.build_sensor_context(instance=instance, resources={"workspace": workspace}))
        assert result.run_requests == [] and result.dynamic_partitions_requests == []
        assert result.skip_reason is not None and result.skip_reason.skip_message == (
            "left alone, not batches (a batch is a folder, whose name starts with its landing date written YYYY-MM-DD, "
            "such as 2024-06-01 or 2024-06-01T02:00:00Z, and holds only letters, digits and . _ - : +; unpack an "
            "archive into one): 20240601T0200Z, archive")
        promoted = dg.materialize(
            [ingested_tables], instance=instance, resources={"workspace": workspace}, raise_on_error=False,
            run_config={"ops": {"ingested_tables": {"config": {"from_batch": "archive"}}}})
    assert not promoted.success
    (failure,) = promoted.get_step_failure_events()
    assert "from_batch 'archive' is not a batch name (expected a folder name under batches/ that starts with its " \
           "landing date written YYYY-MM-DD, such as 2024-06-01 or 2024-06-01T02:00:00Z)" \
           in failure.step_failure_data.error.message  # type: ignore[union-attr]


def test_a_batch_whose_ingest_failed_is_ingested_again_once_changed_even_with_its_times_kept(
        tmp_path: Path) -> None:
    batch = tmp_path / "batches" / "2024-06-01"
    (batch / "fhir").mkdir(parents=True)
    (batch / "fhir" / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
    long_ago = time.time() - 3 * 86400
    age(batch, LANDING_QUIET_SECONDS + 60)
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS.name, ["2024-06-01"])
        # A run lost before its step ran (a run worker killed, say): no step failure.
        instance.add_run(dg.DagsterRun(job_name="ingest_batch", run_id="run-lost", status=dg.DagsterRunStatus.FAILURE,
                                       tags={"dagster/partition": "2024-06-01"}))

        def tick() -> list[tuple[str | None, str | None]]:
            context = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
            return [(request.partition_key, request.run_key) for request in landing_batch_sensor(context).run_requests]

        assert tick() == []  # nothing changed since the run was created
        time.sleep(0.01)
        # The rest of the export arrives by `cp -p`: every file and folder keeps the export's time,
        # days before the run; only the inode change times tell.
        (batch / "fhir" / "Condition.000.ndjson").write_text("{}\n")
        for path in [batch, batch / "fhir", *batch.rglob("*")]:
            os.utime(path, (long_ago, long_ago))
        ((partition, key),) = tick()
        assert partition == "2024-06-01" and key is not None and key.startswith("2024-06-01/changed-")
        # Once a newer batch is ingested, the failed one would never be promoted: not run again.
        instance.report_runless_asset_event(dg.AssetMaterialization(ingested_batch.key, partition="2024-06-02"))
        assert tick() == []
        instance.wipe_assets([ingested_batch.key])
        assert len(tick()) == 1
        # A run an operator canceled is theirs to re-execute: a change does not start it again.
        instance.add_run(dg.DagsterRun(job_name="ingest_batch", run_id="run-canceled",
                                       status=dg.DagsterRunStatus.CANCELED, tags={"dagster/partition": "2024-06-01"}))
        time.sleep(0.01)
        (batch / "fhir" / "Condition.000.ndjson").write_text("{}\n{}\n")
        age(batch, LANDING_QUIET_SECONDS + 60)
        assert tick() == []


def test_a_batch_ingested_half_copied_is_ingested_again_when_the_rest_arrives(small_hospital: Path,
                                                                                 tmp_path: Path) -> None:
    # A copy that paused longer than the quiet period, without a manifest, was ingested with only
    # its first files, passed every check and became the warehouse; the rest of the export, when it
    # arrived, was never read.
    batch = tmp_path / "batches" / "2024-06-01"
    (batch / "fhir").mkdir(parents=True)
    first = sorted((small_hospital / "fhir").iterdir())
    shutil.copy2(next(p for p in first if p.name.startswith("Patient")), batch / "fhir")
    age(batch, LANDING_QUIET_SECONDS + 60)
    workspace = Workspace(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        def tick() -> list[tuple[str | None, str | None]]:
            context = dg.build_sensor_context(instance=instance, resources={"workspace": workspace})
            return [(request.partition_key, request.run_key) for request in landing_batch_sensor(context).run_requests]

        assert tick() == [("2024-06-01", "2024-06-01")]
        instance.add_dynamic_partitions(BATCH_PARTITIONS.name, ["2024-06-01"])

        def ingest() -> int:
            run = dg.materialize([ingested_batch], partition_key="2024-06-01", instance=instance,
                                 resources={"workspace": workspace},
                                 run_config={"ops": {"ingested_batch": {"config": {"workers": 1}}}})
            assert run.success
            return pl.read_parquet(workspace.batch_warehouse_dir("2024-06-01") / "events.parquet").height

        half = ingest()
        assert tick() == []  # nothing changed since: the successful ingest stands
        time.sleep(0.01)
        for path in first:
            if not (batch / "fhir" / path.name).exists():
                shutil.copy2(path, batch / "fhir")
        assert tick() == []  # still landing
        age(batch, LANDING_QUIET_SECONDS + 60)
        ((partition, key),) = tick()
        assert partition == "2024-06-01" and key is not None and key.startswith("2024-06-01/changed-")
        assert ingest() > half
        assert tick() == []
        # Once a newer batch is ingested, this one is never promoted again: a change of its folder
        # (a chmod by a backup tool) ingests nothing.
        instance.report_runless_asset_event(dg.AssetMaterialization(ingested_batch.key, partition="2024-06-02"))
        time.sleep(0.01)
        (batch / "fhir" / "late.ndjson").write_bytes(b"")
        age(batch, LANDING_QUIET_SECONDS + 60)
        assert tick() == []


def test_a_promotion_whose_old_copies_cannot_be_deleted_still_succeeds(
        small_hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The warehouse is the new batch's once promoted: failing the run over the clean-up would skip
    # its materializations, checks and publishing.
    workspace = Workspace(root=str(tmp_path))
    ingest_landing_zone(small_hospital, workspace.batch_warehouse_dir("2024-06-01"), workers=1)

    def held_open(*args: object) -> list[str]:
        raise PermissionError(1, "Operation not permitted", "events.parquet")

    monkeypatch.setattr("pipelines.assets.ingest.prune_ingested_batches", held_open)
    with dg.instance_for_test() as instance:
        promoted = dg.materialize(
            [ingested_tables, *CHECKS], instance=instance, resources={"workspace": workspace},
            run_config={"ops": {"ingested_tables": {"config": {"from_batch": "2024-06-01"}}}})
        warnings = [record.user_message for record in instance.all_logs(promoted.run_id)
                    if record.level == logging.WARNING]
    assert promoted.success
    assert (tmp_path / "warehouse" / PROMOTED_BATCH_FILE).read_text().strip() == "2024-06-01"
    assert any(message.startswith(
        f"the warehouse holds batch 2024-06-01, but older ingested copies under {tmp_path / 'warehouse' / 'batches'} "
        "could not be deleted ([Errno 1] Operation not permitted: 'events.parquet'); the next promotion tries again")
        for message in warnings), warnings
