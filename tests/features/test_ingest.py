"""Ingest on real Synthea exports and on the simulated hospital: every record accounted for."""

from __future__ import annotations

import fcntl
import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import features.ingest as ingest
from features.cohorts import select_cohort
from features.errors import LandingZoneError
from features.identifiers import subject_id_for
from features.ingest import (
    PROMOTED_BATCH_FILE,
    SUMMARY_FILE,
    IngestSummary,
    batch_names,
    ingest_landing_zone,
    promote_warehouse,
    prune_ingested_batches,
    quarantine_shares,
    remove_leftovers,
    stray_batch_entries,
    warehouse_files,
    warehouse_read,
)
from features.labels import build_labels
from features.schemas import INTERNAL_TABLES
from features.task_inputs import build_cohort
from features.tasks import parse_task
from features.tokenize import events_before

EXPORT = datetime(2025, 1, 1)


@pytest.fixture(scope="module")
def bulk(shared_fhir_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestSummary, Path]:
    out = tmp_path_factory.mktemp("bulk")
    return ingest_landing_zone(shared_fhir_dir / "synthea-bulk-10", out, workers=1, export_time=EXPORT), out


@pytest.fixture(scope="module")
def bundles(shared_fhir_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestSummary, Path]:
    out = tmp_path_factory.mktemp("bundles")
    return ingest_landing_zone(shared_fhir_dir / "synthea-bundles", out, workers=2, export_time=EXPORT), out


def test_bulk_export_every_record_accounted(bulk: tuple[IngestSummary, Path]) -> None:
    summary, out = bulk
    assert summary.records_in == 7160
    assert summary.records_out == 7160
    assert summary.quarantined == 0
    assert summary.balanced
    assert summary.table_rows["patients"] == 13
    assert summary.table_rows["encounters"] == 1215
    assert summary.table_rows["conditions"] == 555
    assert summary.table_rows["medications"] == 1745
    assert summary.table_rows["procedures"] == 2056
    assert summary.table_rows["immunizations"] == 161
    assert summary.table_rows["allergies"] == 11
    # Device, Location, Organization, Practitioner, PractitionerRole: kept raw and counted.
    assert summary.table_rows["raw_unknown"] == 16 + 44 + 43 + 43 + 43
    assert IngestSummary.from_json(out / SUMMARY_FILE) == summary


def test_bulk_export_all_notes_decoded(bulk: tuple[IngestSummary, Path]) -> None:
    _, out = bulk
    notes = pl.read_parquet(out / "notes.parquet")
    assert notes.height == 1215
    assert notes["text"].str.len_chars().min() > 100
    assert notes["note_type"].value_counts().sort("note_type").rows() == [
        ("emergency_department_note", 303),
        ("history_and_physical_note", 912),
    ]
    first = notes.filter(pl.col("note_id") == "00212c89-d070-985e-b695-b5f12fffd23e").row(0, named=True)
    assert first["text"].startswith("\n1987-11-19\n\n# Chief Complaint\n- Cough")
    assert first["time"] == datetime(1987, 11, 19, 5, 22, 16, 824000)  # -05:00 converted to UTC


def test_bulk_export_patients(bulk: tuple[IngestSummary, Path]) -> None:
    _, out = bulk
    patients = pl.read_parquet(out / "patients.parquet")
    assert patients.height == 13
    assert patients["death_time"].is_not_null().sum() == 3
    row = patients.filter(pl.col("patient_id") == "129c6ac7-8d06-89de-ad63-0204a93e76c3").row(0, named=True)
    assert row["subject_id"] == subject_id_for("129c6ac7-8d06-89de-ad63-0204a93e76c3")


def test_bundles_every_record_accounted(bundles: tuple[IngestSummary, Path]) -> None:
    summary, _ = bundles
    assert summary.records_in == 8036
    assert summary.balanced
    assert summary.table_rows["patients"] == 28
    # Organizations and Practitioners repeat across the per-patient Bundles: later copies are
    # quarantined as duplicates, the first kept.
    assert summary.quarantined_by_reason == {"duplicate": 16}
    assert summary.duplicates == 16
    assert summary.records_out == 8036 - 16


def test_bundles_observations_with_values_and_units(bundles: tuple[IngestSummary, Path]) -> None:
    _, out = bundles
    obs = pl.read_parquet(out / "observations.parquet")
    # 3,584 Observations: 3,096 valueQuantity, 247 valueCodeableConcept, 241 panels of 2 components.
    assert obs.height == 3096 + 247 + 2 * 241
    assert obs["resource_id"].n_unique() == 3584
    assert obs.filter(pl.col("numeric_value").is_not_null() & pl.col("unit").is_not_null()).height == 3096 + 482
    assert obs.filter(pl.col("text_value").is_not_null()).height == 247
    systolic = obs.filter(pl.col("resource_id") == "1754ec95-ae74-488e-b72f-514b5a9b6a16").sort("code").rows(named=True)
    assert [(r["code"], r["parent_code"], r["unit"]) for r in systolic] == [
        ("LOINC//8462-4", "LOINC//55284-4", "mm[Hg]"),
        ("LOINC//8480-6", "LOINC//55284-4", "mm[Hg]"),
    ]
    assert systolic[1]["numeric_value"] == pytest.approx(129.9017326312195)


def test_bundles_urn_uuid_references_resolve(bundles: tuple[IngestSummary, Path]) -> None:
    _, out = bundles
    patients = set(pl.read_parquet(out / "patients.parquet")["patient_id"])
    for table in ("encounters", "conditions", "observations", "procedures", "immunizations"):
        assert set(pl.read_parquet(out / f"{table}.parquet")["patient_id"]) <= patients


def test_tables_match_their_schemas(bundles: tuple[IngestSummary, Path]) -> None:
    _, out = bundles
    for table in (*bundles[0].table_rows, "quarantine"):
        assert pq.read_schema(out / f"{table}.parquet").equals(INTERNAL_TABLES[table], check_metadata=False), table


def test_events_meds_codes(bundles: tuple[IngestSummary, Path]) -> None:
    _, out = bundles
    events = pl.read_parquet(out / "events.parquet")
    prefixes = set(events["code"].str.split("//").list.first())
    assert {"MEDS_BIRTH", "MEDS_DEATH", "SEX", "LOINC", "SNOMED", "RXNORM", "CVX"} <= prefixes
    # Encounters are coded by their type; the class is the value.
    encounters = events.filter(pl.col("source").str.starts_with("encounters/"))
    assert encounters.height == pl.read_parquet(out / "encounters.parquet").height
    assert set(encounters["text_value"].unique()) <= {"ENCOUNTER//AMB", "ENCOUNTER//IMP", "ENCOUNTER//EMER"}
    assert encounters["code"].str.starts_with("SNOMED//").all()
    assert events.filter(pl.col("code") == "MEDS_DEATH").height == 8
    assert events.filter(pl.col("code").str.starts_with("SEX//"))["time"].is_null().all()
    assert events["time"].max() <= EXPORT


def test_bundle_codes_are_all_described(bundles: tuple[IngestSummary, Path]) -> None:
    summary, out = bundles
    codes = pl.read_parquet(out / "codes.parquet")
    events = pl.read_parquet(out / "events.parquet")
    assert codes["code"].to_list() == sorted(events["code"].unique().to_list())
    assert summary.table_rows["codes"] == codes.height == 327
    # Synthea names every code it uses, visit types included (from the encounters' type display).
    assert codes["description"].null_count() == 0
    described = dict(zip(codes["code"], codes["description"], strict=True))
    assert described["LOINC//8480-6"] == "Systolic Blood Pressure"
    assert described["SNOMED//185349003"] == "Encounter for check up (procedure)"
    systolic = codes.filter(pl.col("code") == "LOINC//8480-6")["parent_codes"].to_list()
    assert systolic == [["LOINC//55284-4"]]


def test_simulated_hospital_all_modalities(small_hospital: Path, tmp_path: Path) -> None:
    summary = ingest_landing_zone(small_hospital, tmp_path, workers=2)
    assert summary.balanced
    assert summary.quarantined == 0
    assert "truth.parquet" not in {account.source_file for account in summary.files}
    events = pl.read_parquet(tmp_path / "events.parquet")
    assert set(events["modality"]) == {"ehr", "notes", "genomics", "imaging"}
    subjects = set(pl.read_parquet(tmp_path / "patients.parquet")["subject_id"])
    assert set(events["subject_id"]) <= subjects
    assert summary.table_rows["patients"] == 300
    assert summary.table_rows["imaging"] == pq.read_metadata(small_hospital / "imaging" / "embeddings.parquet").num_rows


def test_result_does_not_depend_on_workers(small_hospital: Path, tmp_path: Path) -> None:
    export = datetime(2030, 1, 1)
    ingest_landing_zone(small_hospital, tmp_path / "one", workers=1, export_time=export)
    ingest_landing_zone(small_hospital, tmp_path / "two", workers=2, export_time=export)
    for table in ("events", "observations", "quarantine"):
        assert pl.read_parquet(tmp_path / "one" / f"{table}.parquet").equals(
            pl.read_parquet(tmp_path / "two" / f"{table}.parquet")
        )


def test_a_date_without_a_time_is_not_an_input_at_a_prediction_time_on_that_day(tmp_path: Path) -> None:
    # A condition recorded as "2016-01-01" may have been diagnosed at any hour of that day: at a
    # prediction time of 2016-01-01T00:00 it is not yet known. The one charted at 2015-12-31T23:00
    # is. A death recorded only as "2016" does not make the patient dead before 2016-01-01, and
    # lies within a horizon reaching past the end of 2016.
    def condition(rid: str, onset: str, code: str) -> dict[str, object]:
        return {"resourceType": "Condition", "id": rid, "subject": {"reference": "Patient/p1"}, "onsetDateTime": onset,
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}}

    records = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1950-06-01", "deceasedDateTime": "2016"},
        condition("c-dated", "2016-01-01", "44054006"),
        condition("c-timed", "2015-12-31T23:00:00Z", "38341003"),
        condition("c-day-before", "2015-12-31", "195967001"),
    ]
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "export.ndjson").write_bytes(b"\n".join(map(orjson.dumps, records)) + b"\n")
    assert ingest_landing_zone(landing.parent, tmp_path / "out", export_time=datetime(2026, 1, 1)).balanced
    events = pl.read_parquet(tmp_path / "out" / "events.parquet")
    task = parse_task({"name": "fixed_day", "cohort": {"prediction_time": {"fixed": "2016-01-01"}},
                       "outcome": {"death": True}, "horizon_days": 400})
    cohort = select_cohort(events, task).cohort
    assert cohort["subject_id"].to_list() == [subject_id_for("p1")]
    inputs = events_before(events, cohort).filter(pl.col("code").str.starts_with("SNOMED//")).collect()
    assert sorted(inputs["code"]) == ["SNOMED//195967001", "SNOMED//38341003"]
    labels, _counts = build_labels(events, cohort, task)
    assert labels.select("boolean_value", "event").rows() == [(True, True)]
    assert labels["duration_days"].item() == pytest.approx(366.0)  # to the last microsecond of 2016


def test_a_bulk_export_folder_s_manifest_is_not_read_as_a_record(tmp_path: Path) -> None:
    # A Bulk Data $export as its client saves it: the NDJSON files and the manifest listing them.
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.000.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    (export / "manifest.json").write_text(json.dumps({
        "transactionTime": "2025-01-01T00:00:00Z", "request": "https://ehr.example.org/fhir/$export",
        "requiresAccessToken": True, "output": [{"type": "Patient", "url": "Patient.000.ndjson"}], "error": []}))
    summary = ingest_landing_zone(export, tmp_path / "warehouse", workers=1, export_time=datetime(2026, 1, 1))
    assert [(f.source_file, f.records_in, f.records_out) for f in summary.files] == [("Patient.000.ndjson", 1, 1)]
    assert summary.quarantined_by_reason == {}


def test_a_landing_zone_without_files_to_ingest_leaves_the_warehouse_as_it_was(
    bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    warehouse = shutil.copytree(bulk[1], tmp_path / "warehouse")
    before = {p.name: p.read_bytes() for p in warehouse.iterdir() if p.is_file()}
    empty = tmp_path / "export"
    (empty / "fhir").mkdir(parents=True)
    (empty / "fhir" / "README.txt").write_text("export failed\n")
    with pytest.raises(LandingZoneError, match=rf"^landing zone {re.escape(str(empty))} holds no file to ingest, "
                                              r"only 1 file no reader takes \(fhir/README.txt\) \(expected FHIR "):
        ingest_landing_zone(empty, warehouse)
    assert {p.name: p.read_bytes() for p in warehouse.iterdir() if p.is_file()} == before
    with pytest.raises(LandingZoneError, match="holds no file to ingest"):
        ingest_landing_zone(empty, tmp_path / "new" / "warehouse")
    assert not (tmp_path / "new").exists()  # no empty output folder left behind


def test_missing_landing_zone_raises(tmp_path: Path) -> None:
    with pytest.raises(LandingZoneError, match="is not a folder"):
        ingest_landing_zone(tmp_path / "nope", tmp_path / "out")


def test_unwritable_output_raises(tmp_path: Path) -> None:
    (tmp_path / "landing" / "fhir").mkdir(parents=True)
    (tmp_path / "landing" / "fhir" / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"p1"}\n')
    (tmp_path / "file").write_text("x")
    with pytest.raises(LandingZoneError, match="cannot be created"):
        ingest_landing_zone(tmp_path / "landing", tmp_path / "file" / "out")


_KILLED_INGEST = """
import os, signal, sys
from datetime import datetime
from pathlib import Path
import features.ingest as ingest
{patch}
ingest.ingest_landing_zone(Path(sys.argv[1]), Path(sys.argv[2]), workers=1, export_time=datetime(2025, 1, 1))
"""


def killed_ingest(patch: str, landing: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path) -> Path:
    """A warehouse holding the Bulk export's ingest, into which an ingest of ``landing`` was started
    in another process and killed (SIGKILL) by ``patch``, Python run before it."""
    warehouse = tmp_path / "warehouse"
    shutil.copytree(bulk[1], warehouse)
    killed = subprocess.run([sys.executable, "-c", _KILLED_INGEST.format(patch=patch), str(landing), str(warehouse)],
                            capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    return warehouse


def test_a_killed_ingest_leaves_the_previous_warehouse_whole(
    shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    before = {name: (bulk[1] / name).read_bytes() for name in warehouse_files()}
    # Killed once every table and the events are written, before the last of the warehouse files.
    patch = "ingest.build_codes = lambda *args: os.kill(os.getpid(), signal.SIGKILL)"
    warehouse = killed_ingest(patch, shared_fhir_dir / "synthea-bundles", bulk, tmp_path)
    assert {name: (warehouse / name).read_bytes() for name in warehouse_files()} == before
    # The dead run's staging folder holds the new tables it never put in place.
    (leftover,) = warehouse.glob(".ingest-staging-*")
    assert pl.read_parquet(leftover / "final" / "patients.parquet").height == 28

    summary = ingest_landing_zone(shared_fhir_dir / "synthea-bundles", warehouse, workers=1, export_time=EXPORT)
    assert not list(warehouse.glob(".ingest-staging-*"))
    assert sorted(p.name for p in warehouse.iterdir()) == sorted([*warehouse_files(), ".ingest.lock", ".read.lock"])
    assert IngestSummary.from_json(warehouse / SUMMARY_FILE) == summary
    assert pl.read_parquet(warehouse / "patients.parquet").height == 28


def test_a_second_writer_of_a_warehouse_is_refused(
    shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    warehouse = tmp_path / "warehouse"
    shutil.copytree(bulk[1], warehouse)
    before = {name: (warehouse / name).read_bytes() for name in warehouse_files()}
    # Another process's lock, as a running ingest holds it (flock locks belong to the open file).
    with (warehouse / ".ingest.lock").open("r+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = rf"warehouse {warehouse} is being written by another ingest or promotion \(process \d+ holds"
        with pytest.raises(LandingZoneError, match=rf"^ingest .*synthea-bundles: {busy}"):
            ingest_landing_zone(shared_fhir_dir / "synthea-bundles", warehouse, workers=1, export_time=EXPORT)
        with pytest.raises(LandingZoneError, match=rf"^promote batch {bulk[1].name}: {busy}"):
            promote_warehouse(bulk[1], warehouse, lock_wait_seconds=0)
        with pytest.raises(LandingZoneError, match=r"holds \.ingest\.lock for 0\.5 s\); wait for it"):
            promote_warehouse(bulk[1], warehouse, lock_wait_seconds=0.5)
    assert {name: (warehouse / name).read_bytes() for name in warehouse_files()} == before
    ingest_landing_zone(shared_fhir_dir / "synthea-bundles", warehouse, workers=1, export_time=EXPORT)
    assert pl.read_parquet(warehouse / "patients.parquet").height == 28


def test_a_batch_being_ingested_again_is_not_promoted_until_that_ingest_ends(
    bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    # The batch's checks and the linking happen under the batch's own writer lock: a re-ingest that
    # ended between them would put tables nobody checked in the warehouse.
    batch = shutil.copytree(bulk[1], tmp_path / "batches" / "2024-06-02")
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    with (batch / ".ingest.lock").open("a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LandingZoneError, match=rf"^promote batch 2024-06-02: warehouse {batch} is being written"):
            promote_warehouse(batch, warehouse, lock_wait_seconds=0)
    assert not (warehouse / "patients.parquet").exists()
    assert promote_warehouse(batch, warehouse, lock_wait_seconds=0) == bulk[0]


def test_a_promotion_waits_for_the_writer_before_it(bulk: tuple[IngestSummary, Path], tmp_path: Path) -> None:
    # Two promotions started close together (a sensor's runs) queue: the second is not lost.
    batch = shutil.copytree(bulk[1], tmp_path / "batches" / "2024-06-02")
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    held = (warehouse / ".ingest.lock").open("a+b")
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    release = threading.Timer(1.0, held.close)
    release.start()
    started = time.monotonic()
    assert promote_warehouse(batch, warehouse, lock_wait_seconds=30) == bulk[0]
    assert 0.9 < time.monotonic() - started < 30
    release.join()
    assert (warehouse / "patients.parquet").samefile(batch / "patients.parquet")


def test_a_promotion_puts_its_files_in_place_only_once_the_readers_of_the_moment_are_done(
        bulk: tuple[IngestSummary, Path], tmp_path: Path) -> None:
    # A task step reads the warehouse lazily: a table replaced between its plan and its read would be
    # read with the old footer. The promotion waits for it; the step reads the old tables whole.
    batch = shutil.copytree(bulk[1], tmp_path / "batches" / "2024-06-02")
    warehouse = shutil.copytree(bulk[1], tmp_path / "warehouse")
    pl.DataFrame({"patient_id": ["old"]}).write_parquet(warehouse / "patients.parquet")
    promoted = threading.Event()
    with warehouse_read(warehouse):
        promotion = threading.Thread(target=lambda: (promote_warehouse(batch, warehouse, min_patient_share=0),
                                                     promoted.set()))
        promotion.start()
        assert not promoted.wait(1.0)
        assert pl.read_parquet(warehouse / "patients.parquet")["patient_id"].to_list() == ["old"]
    promotion.join(30)
    assert promoted.is_set()
    assert (warehouse / "patients.parquet").samefile(batch / "patients.parquet")


def test_a_reader_waits_while_files_are_put_in_place(tmp_path: Path) -> None:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    entered = threading.Event()

    def read() -> None:
        with warehouse_read(warehouse):
            entered.set()

    # As an ingest or a promotion holds it while it renames its files into the warehouse.
    with (warehouse / ".read.lock").open("a+b") as placing:
        fcntl.flock(placing.fileno(), fcntl.LOCK_EX)
        reader = threading.Thread(target=read)
        reader.start()
        assert not entered.wait(1.0)
    reader.join(30)
    assert entered.is_set()
    # Readers share it: a second one is not held up by the first.
    with warehouse_read(warehouse), warehouse_read(warehouse):
        pass


def test_leftovers_of_killed_writers_are_deleted_and_nothing_else(tmp_path: Path) -> None:
    for name in (".ingest-staging-abc", "batches", "notes"):
        (tmp_path / name).mkdir()
    for name in (".events.parquet.x1y2.partial", ".ingest_summary.json.q.partial", ".model.bin.z.partial", "a.txt"):
        (tmp_path / name).write_bytes(b"")
    assert remove_leftovers(tmp_path) == [
        ".events.parquet.x1y2.partial", ".ingest-staging-abc", ".ingest_summary.json.q.partial"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.bin.z.partial", "a.txt", "batches", "notes"]


def test_promote_warehouse_puts_every_file_of_a_batch_in_place(
    bulk: tuple[IngestSummary, Path], bundles: tuple[IngestSummary, Path], tmp_path: Path, shared_fhir_dir: Path
) -> None:
    summary, batch = bulk
    warehouse = tmp_path / "warehouse"
    shutil.copytree(bundles[1], warehouse)
    # 13 patients after 28: refused, unless a smaller batch is allowed.
    with pytest.raises(LandingZoneError) as refused:
        promote_warehouse(batch, warehouse)
    assert str(refused.value) == (
        "promote batch bulk0: it holds 13 patients, the warehouse 28 (expected at least 0.5 of them; an export cut "
        "short? min_patient_share 0 lets it in); the warehouse keeps its tables")
    assert pl.read_parquet(warehouse / "patients.parquet").height == 28
    promoted = promote_warehouse(batch, warehouse, min_patient_share=0)
    assert promoted == IngestSummary.from_json(batch / SUMMARY_FILE) == summary
    for name in warehouse_files():
        # A hard link: the batch's file itself, not a copy.
        assert (warehouse / name).samefile(batch / name), name
    assert pl.read_parquet(warehouse / "patients.parquet").height == 13
    assert IngestSummary.from_json(warehouse / SUMMARY_FILE).landing_dir.endswith("synthea-bulk-10")
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "bulk0\n"
    # An export ingested into the warehouse directly replaces the batch: lineage must not name it.
    ingest_landing_zone(shared_fhir_dir / "synthea-bulk-10", warehouse, workers=1, export_time=EXPORT)
    assert not (warehouse / PROMOTED_BATCH_FILE).exists()


def test_promote_warehouse_refuses_an_incomplete_or_unbalanced_batch(
    bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    (warehouse / "patients.parquet").write_bytes(b"the previous tables")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(bulk[1], incomplete)
    (incomplete / "events.parquet").unlink()
    count = len(warehouse_files())
    missing = rf"events.parquet is missing \(1 of {count} ingest files\); ingest the batch"
    with pytest.raises(LandingZoneError, match=missing):
        promote_warehouse(incomplete, warehouse)
    unbalanced = tmp_path / "unbalanced"
    shutil.copytree(bulk[1], unbalanced)
    text = (unbalanced / SUMMARY_FILE).read_text()
    (unbalanced / SUMMARY_FILE).write_text(text.replace('"records_out": ', '"records_out": 1', 1))
    with pytest.raises(LandingZoneError, match="records_in != records_out \\+ quarantined"):
        promote_warehouse(unbalanced, warehouse)
    assert sorted(p.name for p in warehouse.iterdir()) == ["patients.parquet"]
    assert (warehouse / "patients.parquet").read_bytes() == b"the previous tables"


def test_promote_warehouse_refuses_a_batch_older_than_the_one_it_holds(
    bulk: tuple[IngestSummary, Path], bundles: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    newer, older = tmp_path / "batches" / "2024-06-02", tmp_path / "batches" / "2024-06-01"
    shutil.copytree(bulk[1], newer)  # 13 patients
    shutil.copytree(bundles[1], older)
    warehouse = tmp_path / "warehouse"
    promote_warehouse(newer, warehouse)
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-02\n"
    message = (
        f"promote batch 2024-06-01: warehouse {warehouse} holds batch 2024-06-02, which is newer (expected "
        "2024-06-02 or a later batch); the warehouse keeps its tables (allow_older_batch rolls back on purpose)"
    )
    with pytest.raises(LandingZoneError) as refused:
        promote_warehouse(older, warehouse)
    assert str(refused.value) == message
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-02\n"
    for name in warehouse_files():
        assert (warehouse / name).samefile(newer / name), name
    assert promote_warehouse(newer, warehouse) == bulk[0]  # the same batch again: a re-run finishing it
    assert promote_warehouse(older, warehouse, allow_older_batch=True) == bundles[0]
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-01\n"
    for name in warehouse_files():
        assert (warehouse / name).samefile(older / name), name


def test_a_newer_batch_promoted_meanwhile_is_not_undone_by_an_older_one(
    bulk: tuple[IngestSummary, Path], bundles: tuple[IngestSummary, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    newer, older = tmp_path / "batches" / "2024-06-02", tmp_path / "batches" / "2024-06-01"
    shutil.copytree(bulk[1], newer)
    shutil.copytree(bundles[1], older)
    warehouse = tmp_path / "warehouse"
    check_dirs = ingest._check_dirs

    def newer_promoted_meanwhile(landing_dir: Path, warehouse_dir: Path) -> None:
        check_dirs(landing_dir, warehouse_dir)
        if landing_dir == older:  # the sensor's promotion of the newer batch runs in between
            promote_warehouse(newer, warehouse_dir)

    monkeypatch.setattr(ingest, "_check_dirs", newer_promoted_meanwhile)
    with pytest.raises(LandingZoneError, match="holds batch 2024-06-02, which is newer"):
        promote_warehouse(older, warehouse)
    for name in warehouse_files():
        assert (warehouse / name).samefile(newer / name), name


def test_a_batch_ingested_before_deletions_were_read_promotes_with_none(
    bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    batch = tmp_path / "batches" / "2024-06-01"
    shutil.copytree(bulk[1], batch)
    (batch / "deletions.parquet").unlink()
    warehouse = tmp_path / "warehouse"
    assert promote_warehouse(batch, warehouse) == bulk[0]
    assert pl.read_parquet(warehouse / "deletions.parquet").height == 0
    # Its accounting predates the table as well: promoted, it reports the empty table's rows.
    summary = json.loads((batch / SUMMARY_FILE).read_text())
    del summary["table_rows"]["deletions"]
    (batch / SUMMARY_FILE).write_text(json.dumps(summary))
    assert promote_warehouse(batch, warehouse).table_rows == bulk[0].table_rows
    assert (warehouse / "patients.parquet").samefile(batch / "patients.parquet")


_DIE_WHILE_PLACING = """
replace = os.replace

def replace_then_die(source, target):
    replace(source, target)
    # The first file put in place from the staging folder (not a write into it).
    if Path(source).parent.name == "final" != Path(target).parent.name and Path(target).name == "patients.parquet":
        os.kill(os.getpid(), signal.SIGKILL)

ingest.os.replace = replace_then_die
"""


def test_an_ingest_killed_while_putting_its_files_in_place_is_finished_by_the_next_writer(
    shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    warehouse = killed_ingest(_DIE_WHILE_PLACING, shared_fhir_dir / "synthea-bundles", bulk, tmp_path)
    # Half placed: the new patients beside the old accounting.
    assert pl.read_parquet(warehouse / "patients.parquet").height == 28
    assert IngestSummary.from_json(warehouse / SUMMARY_FILE) == bulk[0]
    (leftover,) = warehouse.glob(".ingest-staging-*")
    assert remove_leftovers(warehouse) == [leftover.name]
    summary = IngestSummary.from_json(warehouse / SUMMARY_FILE)
    assert summary.landing_dir.endswith("synthea-bundles") and summary.balanced
    assert pl.read_parquet(warehouse / "events.parquet")["subject_id"].n_unique() == pl.read_parquet(
        warehouse / "patients.parquet").height == 28
    assert not list(warehouse.glob(".ingest-staging-*"))


def test_a_copy_that_cannot_be_deleted_does_not_keep_the_others(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (".deleting-2024-05-01", "2024-06-01", "2024-06-02", "2024-06-03"):
        (tmp_path / name).mkdir()
    real = shutil.rmtree

    def held_open(path: Path, *args: object, **kwargs: object) -> None:  # a file held open on a network share
        if Path(path).name == ".deleting-2024-05-01":
            raise OSError(39, "Directory not empty", str(path))
        real(path)

    monkeypatch.setattr(shutil, "rmtree", held_open)
    with pytest.raises(OSError, match=rf"1 ingested copies under {tmp_path} could not be deleted \(first: \[Errno 39\] "
                                      "Directory not empty"):
        prune_ingested_batches(tmp_path, "2024-06-03", keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".deleting-2024-05-01", "2024-06-03"]


def test_prune_ingested_batches_keeps_the_promoted_newer_and_newest_older(tmp_path: Path) -> None:
    for name in ("2024-06-01", "2024-06-02", "2024-06-03", "2024-06-04", "2024-06-05", ".2024-06-06"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.parquet").write_bytes(b"tables")
    # 2024-06-05 is newer than the promoted batch (still ingesting): never deleted.
    assert prune_ingested_batches(tmp_path, "2024-06-04", keep=2) == ["2024-06-01", "2024-06-02"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".2024-06-06", "2024-06-03", "2024-06-04", "2024-06-05"]
    assert prune_ingested_batches(tmp_path, "2024-06-04", keep=2) == []
    # A copy a previous prune hid but could not delete (a file held open on a network share) goes now.
    (tmp_path / ".deleting-2024-05-31").mkdir()
    (tmp_path / ".deleting-2024-05-31" / "events.parquet").write_bytes(b"tables")
    assert prune_ingested_batches(tmp_path, "2024-06-04", keep=2) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".2024-06-06", "2024-06-03", "2024-06-04", "2024-06-05"]
    assert batch_names(tmp_path) == ["2024-06-03", "2024-06-04", "2024-06-05"]
    for name in ("2024-06-07T02:00:00Z", "20240608T0200+0200", "archive", "export-2024-06-09"):
        (tmp_path / name).mkdir()
    # A date written without its dashes would sort after every dated batch: no batch either.
    assert batch_names(tmp_path)[-2:] == ["2024-06-05", "2024-06-07T02:00:00Z"]
    (tmp_path / "2024-06-10.tar.gz").write_bytes(b"an archive")
    assert stray_batch_entries(tmp_path) == ["2024-06-10.tar.gz", "20240608T0200+0200", "archive", "export-2024-06-09"]
    with pytest.raises(ValueError, match="keep must be at least 1 \\(the promoted batch\\), found 0"):
        prune_ingested_batches(tmp_path, "2024-06-04", keep=0)


def test_result_does_not_depend_on_batching(
    shared_fhir_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small files (one Bundle per patient here) are read in batches of about UNIT_BYTES; with a
    # batch per file instead, every table, the quarantine and the accounting come out the same.
    import features.ingest

    landing = shared_fhir_dir / "synthea-bundles"
    batched = ingest_landing_zone(landing, tmp_path / "batched", workers=1, export_time=EXPORT)
    monkeypatch.setattr(features.ingest, "UNIT_BYTES", 1)
    one_each = ingest_landing_zone(landing, tmp_path / "one_each", workers=2, export_time=EXPORT)
    assert batched.files == one_each.files
    assert batched.table_rows == one_each.table_rows
    for table in (*INTERNAL_TABLES, "events", "quarantine"):
        path = tmp_path / "batched" / f"{table}.parquet"
        if path.exists():
            assert pl.read_parquet(path).equals(pl.read_parquet(tmp_path / "one_each" / f"{table}.parquet"))



def test_quarantine_shares_name_each_files_share_and_main_reason(tmp_path: Path) -> None:
    # A feed that broke upstream: 3 of 4 Conditions with a date style the export never used
    # before, beside a clean patient file and a Condition file with one orphan.
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}

    def condition(rid: str, onset: str, subject: str = "Patient/p1") -> bytes:
        return orjson.dumps({
            "resourceType": "Condition", "id": rid, "subject": {"reference": subject},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}, "onsetDateTime": onset,
        })

    fhir = tmp_path / "landing" / "fhir"
    fhir.mkdir(parents=True)
    (fhir / "Patient.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
    broken = [condition("a", "2020-01-02"), condition("b", "02/01/2020"), condition("c", "03/01/2020"),
              condition("d", "04/01/2020", subject="Patient/nobody")]
    (fhir / "Condition.broken.ndjson").write_bytes(b"\n".join(broken) + b"\n")
    fine = [condition(f"e{i}", "2020-01-02") for i in range(9)] + [condition("f", "2020-01-02", "Patient/nobody")]
    (fhir / "Condition.fine.ndjson").write_bytes(b"\n".join(fine) + b"\n")
    summary = ingest_landing_zone(tmp_path / "landing", tmp_path / "out", workers=1, export_time=EXPORT)

    expected = pl.DataFrame(
        {
            "source_file": ["fhir/Condition.broken.ndjson", "fhir/Condition.fine.ndjson"],
            "records_in": [4, 10],
            "quarantined": [3, 1],
            "share": [0.75, 0.1],
            # "d" has both faults; its date is checked first, the patient only once every file is read.
            "top_reason": ["bad_date", "orphan_reference"],
            "top_reason_count": [3, 1],
        },
        schema_overrides={"top_reason_count": pl.UInt32},
    )
    assert_frame_equal(quarantine_shares(summary, tmp_path / "out"), expected)


def test_files_no_reader_takes_are_quarantined(
    shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(shared_fhir_dir / "synthea-bulk-10", landing / "fhir")
    (landing / "fhir" / "README.txt").write_text("about this export\n")
    (landing / "note").mkdir()  # a misspelt notes/
    (landing / "note" / "notes.csv").write_text("patient_id,note_id,time,note_type,text\n")
    (landing / "Patient.extra.ndjson").write_text("{}\n")  # beside fhir/, not in it
    (landing / "_SUCCESS").touch()  # the lander's marker is not data ...
    (landing / "fhir" / "_SUCCESS").touch()  # ... nor Spark's in each folder it writes
    (landing / "notes").mkdir()
    (landing / "notes" / "_SUCCESS").touch()
    summary = ingest_landing_zone(landing, tmp_path / "out", workers=1, export_time=EXPORT)
    unread = (
        pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
        .filter(pl.col("reason_code") == "unread_file")
        .select("source_kind", "source_file", "record_number", "reason")
    )
    elsewhere = ("file is not read: a landing zone holds FHIR files under fhir/ and tables under notes/, genomics/ "
                 "and imaging/ (move it there, or out of the landing zone)")
    assert_frame_equal(unread, pl.DataFrame({
        "source_kind": ["other"] * 3,
        "source_file": ["Patient.extra.ndjson", "fhir/README.txt", "note/notes.csv"],
        "record_number": [0, 0, 0],
        "reason": [elsewhere, "file is not read: FHIR files end in .ndjson, .ndjson.gz or .json", elsewhere],
    }))
    assert summary.balanced and summary.quarantined == bulk[0].quarantined + 3
    assert summary.records_out == bulk[0].records_out


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def test_a_bulk_manifest_gives_the_fhir_export_time_and_the_files_to_expect(
    shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    fhir = shutil.copytree(shared_fhir_dir / "synthea-bulk-10", landing / "fhir")
    listed = {path.name: _lines(path) for path in sorted(fhir.glob("*.ndjson"))}
    manifest = {
        "transactionTime": "2029-12-31T19:00:00-05:00",
        "output": [{"type": name.split(".")[0], "url": f"https://ehr.example.org/bulk/job1/{name}?part=1",
                    "count": count} for name, count in listed.items()],
        "error": [{"type": "OperationOutcome", "url": "https://ehr.example.org/bulk/job1/errors.ndjson"}],
    }
    (fhir / "manifest.json").write_text(json.dumps(manifest))
    # A lander that gzipped a file, and a blank line at the end of another: both still match.
    gzipped = fhir / "Device.000.ndjson"
    (fhir / "Device.000.ndjson.gz").write_bytes(gzip.compress(gzipped.read_bytes()))
    gzipped.unlink()
    with (fhir / "Procedure.000.ndjson").open("ab") as procedures:
        procedures.write(b"\n")
    complete = ingest_landing_zone(landing, tmp_path / "complete", workers=1)
    assert (complete.fhir_export_time, complete.export_time_source) == (datetime(2030, 1, 1), "ingest time")
    assert complete.complete and complete.manifest_mismatches == ()
    assert complete.quarantined_by_reason == {"blank_line": 1}
    assert {**complete.table_rows, "quarantine": 0} == bulk[0].table_rows

    # A copy cut short: one file not there yet, another cut in the middle of its last line.
    (fhir / "Device.000.ndjson.gz").unlink()
    procedures_file = fhir / "Procedure.000.ndjson"
    kept = procedures_file.read_bytes().splitlines(keepends=True)[:-1]  # the blank line gone
    procedures_file.write_bytes(b"".join(kept)[: -len(kept[-1]) // 2])
    cut = ingest_landing_zone(landing, tmp_path / "cut", workers=1)
    assert cut.manifest_mismatches == (
        "Device.000.ndjson: listed in fhir/manifest.json, not in the landing zone",
        f"Procedure.000.ndjson: {listed['Procedure.000.ndjson'] - 1} records, fhir/manifest.json lists "
        f"{listed['Procedure.000.ndjson']}",
    )
    assert IngestSummary.from_json(tmp_path / "cut" / SUMMARY_FILE).manifest_mismatches == cut.manifest_mismatches
    assert ingest.ingest_problems(tmp_path / "cut")[0] == (
        "the landing zone does not match its manifest: Device.000.ndjson: listed in fhir/manifest.json, not in the "
        "landing zone")
    warehouse = shutil.copytree(tmp_path / "complete", tmp_path / "warehouse")
    with pytest.raises(LandingZoneError, match=r"^promote batch cut: the landing zone does not match its manifest: "
                                               r"Device.000.ndjson: .* \(\+1 more\); the warehouse keeps its tables$"):
        promote_warehouse(tmp_path / "cut", warehouse)
    # Ingested straight into a warehouse that others read, the cut copy leaves its tables as they were.
    before = {name: (warehouse / name).read_bytes() for name in warehouse_files()}
    with pytest.raises(LandingZoneError, match=rf"^ingest {landing}: the landing zone does not match its manifest: "
                                               r"Device.000.ndjson: .* \(\+1 more\); the warehouse keeps its tables "
                                               r"\(cohortcast ingest into another folder shows the new ones\)$"):
        ingest_landing_zone(landing, warehouse, workers=1, refuse_problems=True)
    assert {name: (warehouse / name).read_bytes() for name in warehouse_files()} == before
    assert not list(warehouse.glob(f"{ingest.STAGING_PREFIX}*"))


def test_an_ingest_that_refuses_problems_keeps_a_larger_warehouse(
    shared_fhir_dir: Path, bundles: tuple[IngestSummary, Path], tmp_path: Path
) -> None:
    warehouse = shutil.copytree(bundles[1], tmp_path / "warehouse")
    before = {name: (warehouse / name).read_bytes() for name in warehouse_files()}
    bulk_export = shared_fhir_dir / "synthea-bulk-10"
    with pytest.raises(LandingZoneError) as refused:
        ingest_landing_zone(bulk_export, warehouse, workers=1, export_time=EXPORT, refuse_problems=True,
                            min_patient_share=0.5)
    assert str(refused.value) == (
        f"ingest {bulk_export}: it holds 13 patients, the warehouse 28 (expected at least 0.5 of them; an export cut "
        "short? min_patient_share 0 lets it in); the warehouse keeps its tables (cohortcast ingest into another "
        "folder shows the new ones)")
    assert {name: (warehouse / name).read_bytes() for name in warehouse_files()} == before
    # Without a share to keep, the smaller export (which has no problem) replaces the tables.
    ingest_landing_zone(bulk_export, warehouse, workers=1, export_time=EXPORT, refuse_problems=True)
    assert pl.read_parquet(warehouse / "patients.parquet").height == 13


def test_manifests_of_other_shapes(tmp_path: Path) -> None:
    fhir = tmp_path / "landing" / "fhir"
    condition = {"resourceType": "Condition", "id": "c-siteB", "subject": {"reference": "Patient/p-siteB"},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                 "onsetDateTime": "2024-03-01T10:00:00Z"}
    for site, taken in (("siteA", "2024-01-01"), ("siteB", "2024-06-01")):
        (fhir / site).mkdir(parents=True)
        records = [{"resourceType": "Patient", "id": f"p-{site}", "gender": "female"}]
        records += [condition] if site == "siteB" else []
        (fhir / site / "Patient_1.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
        # Two exports side by side, each with its own manifest; files named by opaque URLs (HAPI's
        # Binary ids), so only the totals can be compared, the error file's included.
        manifest = {"transactionTime": f"{taken}T00:00:00Z",
                    "output": [{"type": "Patient", "url": f"https://{site}.example.org/fhir/Binary/101",
                                "count": len(records)}],
                    "error": [{"type": "OperationOutcome", "url": f"https://{site}.example.org/fhir/Binary/102",
                               "count": 1}]}
        (fhir / site / "manifest.json").write_text(json.dumps(manifest))
        outcome = {"resourceType": "OperationOutcome", "id": f"oo-{site}",
                   "issue": [{"severity": "warning", "code": "processing"}]}
        (fhir / site / "OperationOutcome_1.ndjson").write_bytes(orjson.dumps(outcome) + b"\n")
    (tmp_path / "landing" / "manifest.json").write_text('[{"file": "checksums"}]')  # a lander's own: not Bulk
    summary = ingest_landing_zone(tmp_path / "landing", tmp_path / "out", workers=1)
    # siteB's condition is after siteA's export but not after its own: the latest time holds.
    assert (summary.manifest_mismatches, summary.fhir_export_time) == ((), datetime(2024, 6, 1))
    assert summary.table_rows["conditions"] == 1
    (fhir / "siteB" / "manifest.json").write_text(json.dumps({"output": [{"url": "https://b/Binary/9", "count": 5}]}))
    (fhir / "siteA" / "manifest.json").write_text('{"transactionTime": "2024-01-01T00:00:00Z", "output": [')
    summary = ingest_landing_zone(tmp_path / "landing", tmp_path / "out2", workers=1)
    assert summary.manifest_mismatches == (
        "fhir/siteA/manifest.json is not valid JSON (copied part-way?)",
        "fhir/siteB/manifest.json transactionTime should be a date string, found NoneType None",
        "3 NDJSON records in the landing zone, fhir/siteB/manifest.json lists 5",
    )


def test_fhir_records_after_the_manifests_transaction_time_are_quarantined(tmp_path: Path) -> None:
    fhir = tmp_path / "landing" / "fhir"
    fhir.mkdir(parents=True)
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}}
    (fhir / "export.ndjson").write_bytes(b"\n".join(orjson.dumps(record) for record in [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"},
        {**condition, "id": "c1", "onsetDateTime": "2014-06-01T10:00:00Z"},
        {**condition, "id": "c2", "onsetDateTime": "2016-06-01T10:00:00Z"},
    ]) + b"\n")
    # A notes table extracted later than the FHIR export: held to the ingest's time, not the export's.
    (tmp_path / "landing" / "notes").mkdir()
    (tmp_path / "landing" / "notes" / "notes.csv").write_text(
        "patient_id,note_id,time,note_type,text\np1,n1,2016-06-02T10:00:00Z,progress,Seen today.\n")
    (tmp_path / "landing" / "manifest.json").write_text('{"transactionTime": "2015-01-01T00:00:00Z", "output": []}')
    summary = ingest_landing_zone(tmp_path / "landing", tmp_path / "out", workers=1, export_time=EXPORT)
    assert (summary.export_time, summary.fhir_export_time) == (EXPORT, datetime(2015, 1, 1))
    assert summary.quarantined_by_reason == {"future_date": 1}
    reason = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")["reason"].item()
    assert reason == "Condition.onsetDateTime '2016-06-01T10:00:00Z' is after the export time 2015-01-01T00:00:00"
    assert summary.table_rows["notes"] == 1


def test_ingest_problems_reads_the_written_tables_again(bulk: tuple[IngestSummary, Path], tmp_path: Path) -> None:
    warehouse = shutil.copytree(bulk[1], tmp_path / "warehouse")
    assert ingest.ingest_problems(warehouse) == []
    encounters = pl.read_parquet(warehouse / "encounters.parquet")
    first = encounters.head(1)
    damaged = pl.concat([
        encounters,
        first.with_columns(record_number=pl.col("record_number") + 100_000),  # a second copy kept
        first.with_columns(encounter_id=pl.lit("e-orphan"), patient_id=pl.lit("nobody")),
    ])
    damaged.write_parquet(warehouse / "encounters.parquet")
    events = pl.read_parquet(warehouse / "events.parquet")
    pl.concat([events, events.head(1).with_columns(subject_id=pl.lit(-1, pl.Int64))]).write_parquet(
        warehouse / "events.parquet")
    assert ingest.records_without_patient(warehouse) == {"encounters": 1, "events": 1}
    assert ingest.duplicate_records(warehouse) == {"encounters": 1}
    assert ingest.ingest_problems(warehouse) == [
        "encounters: 1 rows of a patient not in patients",
        "events: 1 rows of a patient not in patients",
        "encounters: 1 ids held by more than one record (duplicates not resolved)",
    ]


def test_a_promotion_cut_short_is_refused_by_readers_and_finished_by_the_next_writer(
    bulk: tuple[IngestSummary, Path], bundles: tuple[IngestSummary, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = shutil.copytree(bulk[1], tmp_path / "batches" / "2024-06-02")
    warehouse = shutil.copytree(bundles[1], tmp_path / "warehouse")
    link = ingest.link_file_atomic
    linked: list[str] = []

    def link_then_stop(source: Path, path: Path) -> Path:
        if len(linked) == 3:
            raise KeyboardInterrupt  # the process stopped part-way
        linked.append(path.name)
        return link(source, path)

    monkeypatch.setattr(ingest, "link_file_atomic", link_then_stop)
    with pytest.raises(KeyboardInterrupt):
        promote_warehouse(batch, warehouse, min_patient_share=0)
    monkeypatch.setattr(ingest, "link_file_atomic", link)
    assert [(warehouse / name).samefile(batch / name) for name in warehouse_files()].count(True) == 3
    reason = ingest.unsettled_warehouse(warehouse)
    assert reason == (f"warehouse {warehouse}: the promotion of batch 2024-06-02 was cut short or is running (its "
                      ".promoting is there); run the promotion again (ingest job, from_batch 2024-06-02)")
    task = parse_task({"name": "t", "cohort": {"prediction_time": {"fixed": "2016-01-01"}},
                       "outcome": {"death": True}, "horizon_days": 365})
    with pytest.raises(LandingZoneError, match=re.escape(reason)):
        build_cohort(warehouse, task)
    # The next writer of the warehouse (here a plain ingest's lock) finishes the promotion first.
    with ingest._writer_lock(warehouse, "test"):
        pass
    assert ingest.unsettled_warehouse(warehouse) is None
    assert all((warehouse / name).samefile(batch / name) for name in warehouse_files())
    assert (warehouse / PROMOTED_BATCH_FILE).read_text() == "2024-06-02\n"


def test_folders_with_glob_characters_in_their_names(shared_fhir_dir: Path, bulk: tuple[IngestSummary, Path],
                                                     tmp_path: Path) -> None:
    landing = tmp_path / "batch [1]*?"
    shutil.copytree(shared_fhir_dir / "synthea-bulk-10", landing / "fhir")
    summary = ingest_landing_zone(landing, tmp_path / "out [1]", workers=1, export_time=EXPORT)
    assert summary.table_rows == bulk[0].table_rows
    assert ingest.ingest_problems(tmp_path / "out [1]") == []


def test_a_damaged_table_or_summary_is_named_not_a_traceback(bulk: tuple[IngestSummary, Path], tmp_path: Path) -> None:
    warehouse = shutil.copytree(bulk[1], tmp_path / "warehouse")
    assert ingest.unsettled_warehouse(warehouse) is None
    events = (warehouse / "events.parquet").read_bytes()
    (warehouse / "events.parquet").write_bytes(events[:100])
    reason = ingest.unsettled_warehouse(warehouse)
    assert reason is not None and reason.startswith(f"warehouse {warehouse}: events.parquet cannot be read (")
    assert reason.endswith("; ingest again")
    with pytest.raises(LandingZoneError, match=re.escape(reason)):
        build_cohort(warehouse, parse_task({"name": "t", "cohort": {"prediction_time": {"fixed": "2016-01-01"}},
                                            "outcome": {"death": True}, "horizon_days": 365}))
    summary = warehouse / SUMMARY_FILE
    summary.write_bytes(summary.read_bytes()[:200])
    with pytest.raises(LandingZoneError, match=re.escape(f"{summary} is not an ingest summary as cohortcast writes "
                                                         "it (JSONDecodeError: ")):
        IngestSummary.from_json(summary)


def test_bundle_events_keep_the_two_units_an_egfr_code_comes_in(bundles: tuple[IngestSummary, Path]) -> None:
    # The export charts LOINC 33914-3 (eGFR) per 1.73 m2 of body surface 86 times and in plain mL/min
    # 20 times: two quantities under one code, which the model inputs must not bin together.
    _, out = bundles
    egfr = pl.read_parquet(out / "events.parquet").filter(pl.col("code") == "LOINC//33914-3")
    assert egfr.group_by("unit").len().sort("unit").rows() == [("mL/min", 20), ("mL/min/{1.73_m2}", 86)]
