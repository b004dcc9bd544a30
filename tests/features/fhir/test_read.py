"""Bad FHIR input is quarantined with a clear reason, never a crash; the accounting still balances."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import date, datetime
from pathlib import Path

import orjson
import polars as pl
import pytest

from features.fhir.read import RawReject, ReadUnit, iter_gzip_blocks
from features.ingest import IngestSummary, ingest_landing_zone
from tests.features.fhir.test_columnar import _per_record_only

EXPORT = datetime(2025, 1, 1)
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}


def line(resource: object) -> bytes:
    return orjson.dumps(resource)


def condition(**changes: object) -> dict[str, object]:
    resource: dict[str, object] = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "onsetDateTime": "2020-01-02T03:04:05Z",
    }
    resource.update(changes)
    return resource


def ingest_files(tmp_path: Path, files: dict[str, bytes]) -> tuple[IngestSummary, pl.DataFrame]:
    landing = tmp_path / "landing"
    for name, data in files.items():
        path = landing / "fhir" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = tmp_path / "out"
    summary = ingest_landing_zone(landing, out, workers=1, export_time=EXPORT)
    assert summary.balanced
    return summary, pl.read_parquet(out / "quarantine.parquet")


def ingest_lines(tmp_path: Path, *lines: bytes) -> tuple[IngestSummary, pl.DataFrame]:
    """One NDJSON file: a valid patient on line 1, then ``lines``."""
    return ingest_files(tmp_path, {"mixed.ndjson": b"\n".join([line(PATIENT), *lines]) + b"\n"})


def only_reject(quarantine: pl.DataFrame) -> dict[str, object]:
    assert quarantine.height == 1, quarantine.to_dicts()
    return quarantine.row(0, named=True)


def test_valid_lines_pass(tmp_path: Path) -> None:
    summary, quarantine = ingest_lines(tmp_path, line(condition()))
    assert quarantine.height == 0
    assert summary.table_rows["conditions"] == 1
    assert summary.files[0].records_in == 2


def test_truncated_json(tmp_path: Path) -> None:
    summary, quarantine = ingest_lines(tmp_path, line(condition())[:40])
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (2, "invalid_json")
    assert reject["reason"].startswith("line is not valid JSON")
    assert reject["raw_text"] == line(condition())[:40].decode()
    assert reject["source_file"] == "fhir/mixed.ndjson"
    assert summary.files[0].records_out == 1


def test_not_json(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, b"hello, world")[1])
    assert reject["reason_code"] == "invalid_json"


def test_not_utf8(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, b'{"resourceType": "Patient", "id": "p\xff2"}')[1])
    assert reject["reason_code"] == "not_utf8"
    assert "bad byte b'\\xff'" in reject["reason"]


def test_byte_order_mark(tmp_path: Path) -> None:
    _summary, quarantine = ingest_files(tmp_path, {"p.ndjson": b"\xef\xbb\xbf" + line(PATIENT) + b"\n"})
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (1, "byte_order_mark")


def test_blank_line(tmp_path: Path) -> None:
    summary, quarantine = ingest_lines(tmp_path, b"", line(condition()))
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (2, "blank_line")
    assert summary.table_rows["conditions"] == 1


def test_json_not_an_object(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, b"[1, 2]")[1])
    assert reject["reason_code"] == "not_object"
    assert reject["reason"] == "JSON array is not a FHIR resource (expected an object)"


def test_no_resource_type(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, b'{"id": "x"}')[1])
    assert reject["reason_code"] == "missing_resource_type"


def test_unknown_resource_type(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, b'{"resourceType": "Patientt", "id": "x"}')[1])
    assert reject["reason"] == "resourceType 'Patientt' is not a FHIR R4 resource type"


@pytest.mark.parametrize("strict", [False, True])
def test_an_export_error_file_is_quarantined_as_the_servers_message(tmp_path: Path, strict: bool) -> None:
    # A Bulk export's error file (OperationOutcome, no id) beside its data, and a searchset
    # Bundle's outcome entry: both are the server's messages, quarantined as such, not as records
    # with a missing id.
    error = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Unable to export Observation for Patient/123"},
        {"severity": "warning", "code": "informational", "diagnostics": "partial"}]}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": PATIENT, "search": {"mode": "match"}},
        {"resource": {"resourceType": "OperationOutcome", "id": "o1",
                      "issue": [{"severity": "error", "code": "too-costly", "details": {"text": "cut at 1000"}}]},
         "search": {"mode": "outcome"}}]}
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "OperationOutcome.ndjson").write_bytes(line(error) + b"\n")
    (landing / "search.json").write_bytes(line(bundle))
    summary = ingest_landing_zone(tmp_path / "landing", tmp_path / "out", strict=strict, workers=1,
                                  export_time=EXPORT)
    quarantine = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    head = "the FHIR server's own message (OperationOutcome), not patient data"
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        ("fhir/OperationOutcome.ndjson", 1, "server_outcome",
         f"{head}: error 'processing': Unable to export Observation for Patient/123 (+1 more issues)"),
        ("fhir/search.json", 2, "server_outcome", f"{head}: error 'too-costly': cut at 1000"),
    ]
    assert summary.balanced and summary.table_rows["patients"] == 1


def test_an_outcome_that_reports_no_error_is_kept_not_quarantined(tmp_path: Path) -> None:
    # A search's paging note: no error, so no quarantined record to count against the file's share.
    note = {"resourceType": "OperationOutcome", "id": "o1",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": "page 1 of 3"}]}
    summary, quarantine = ingest_lines(tmp_path, line(note))
    assert quarantine.height == 0 and summary.table_rows["raw_unknown"] == 1


def test_reference_to_missing_patient(tmp_path: Path) -> None:
    summary, quarantine = ingest_lines(tmp_path, line(condition(subject={"reference": "Patient/ghost"})))
    reject = only_reject(quarantine)
    assert reject["reason_code"] == "orphan_reference"
    assert reject["reason"] == "conditions record refers to Patient/ghost, which is not in this export"
    assert reject["resource_id"] == "c1"
    assert reject["raw_text"].startswith('{"resourceType":"Condition"')
    assert summary.table_rows["conditions"] == 0


def test_reference_to_non_patient(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, line(condition(subject={"reference": "Group/g1"})))[1])
    assert reject["reason_code"] == "bad_reference"


def test_missing_subject(tmp_path: Path) -> None:
    resource = condition()
    del resource["subject"]
    reject = only_reject(ingest_lines(tmp_path, line(resource))[1])
    assert reject["reason"] == "Condition.subject (the patient) is missing"


def test_value_of_wrong_type(tmp_path: Path) -> None:
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "effectiveDateTime": "2020-01-01",
        "valueQuantity": {"value": "1.2", "unit": "mg/dL"},
    }
    reject = only_reject(ingest_lines(tmp_path, line(observation))[1])
    assert reject["reason"] == "Observation.valueQuantity.value should be a number, found str '1.2'"


@pytest.mark.parametrize(
    ("gender", "reason"),
    [
        (["male"], "Patient.gender should be a non-empty string, found list ['male']"),
        ({"code": "male"}, "Patient.gender should be a non-empty string, found dict {'code': 'male'}"),
        ("M", "Patient.gender 'M' is not male, female, other or unknown"),
    ],
)
def test_patient_gender_of_wrong_type_or_value(tmp_path: Path, gender: object, reason: str) -> None:
    # A list or object where a code belongs once stopped the whole ingest (unhashable in a set check).
    patient = {"resourceType": "Patient", "id": "p2", "gender": gender}
    reject = only_reject(ingest_lines(tmp_path, line(patient))[1])
    assert (reject["record_number"], reject["reason"]) == (2, reason)


def test_nan(tmp_path: Path) -> None:
    raw = b'{"resourceType":"Observation","id":"o1","valueQuantity":{"value":NaN}}'
    reject = only_reject(ingest_lines(tmp_path, raw)[1])
    assert reject["reason"] == "line holds NaN, Inf or Infinity, which JSON does not allow"


def test_impossible_date(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, line(condition(onsetDateTime="2021-02-30")))[1])
    assert reject["reason_code"] == "bad_date"
    assert "not a real date" in reject["reason"]


def test_future_date(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, line(condition(onsetDateTime="2031-01-01")))[1])
    assert reject["reason"] == "Condition.onsetDateTime '2031-01-01' is after the export time 2025-01-01T00:00:00"


def test_invalid_fhir_id(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, line(condition(id="has space")))[1])
    assert reject["reason_code"] == "bad_id"


def test_duplicate_resource_first_copy_kept(tmp_path: Path) -> None:
    later = condition(onsetDateTime="2021-01-01")
    summary, quarantine = ingest_lines(tmp_path, line(condition()), line(later))
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (3, "duplicate")
    assert summary.duplicates == 1
    kept = pl.read_parquet(tmp_path / "out" / "conditions.parquet")
    assert kept["time"].to_list() == [datetime(2020, 1, 2, 3, 4, 5)]


def test_empty_file(tmp_path: Path) -> None:
    _summary, quarantine = ingest_files(tmp_path, {"a.ndjson": line(PATIENT) + b"\n", "empty.ndjson": b""})
    reject = only_reject(quarantine)
    assert (reject["source_file"], reject["record_number"], reject["reason_code"]) == (
        "fhir/empty.ndjson",
        0,
        "empty_file",
    )


def test_gzip_ndjson(tmp_path: Path) -> None:
    summary, quarantine = ingest_files(
        tmp_path, {"p.ndjson.gz": gzip.compress(line(PATIENT) + b"\n" + line(condition()) + b"\n")}
    )
    assert quarantine.height == 0
    assert summary.table_rows["conditions"] == 1


def test_truncated_gzip(tmp_path: Path) -> None:
    body = b"".join(line({**PATIENT, "id": f"p{i}"}) + b"\n" for i in range(2000))
    data = gzip.compress(body)
    summary, quarantine = ingest_files(tmp_path, {"p.ndjson.gz": data[: len(data) // 2]})
    reject = only_reject(quarantine.filter(pl.col("reason_code") != "invalid_json"))
    assert reject["reason_code"] == "truncated_gzip"
    assert summary.table_rows["patients"] > 0
    assert summary.files[0].records_in == summary.table_rows["patients"] + quarantine.height


def test_gzip_blocks_hold_whole_lines_and_number_them(tmp_path: Path) -> None:
    path = tmp_path / "p.ndjson.gz"
    text = b"".join(b"line %05d\r\n" % i for i in range(6000)) + b"last, no newline"
    path.write_bytes(gzip.compress(text))
    blocks = list(iter_gzip_blocks(ReadUnit(str(path), "p.ndjson.gz", "ndjson.gz"), block_bytes=10_000))
    assert len(blocks) > 3 and all(isinstance(block, tuple) for block in blocks)
    assert b"".join(block[1] for block in blocks) == text  # type: ignore[index]
    firsts = [block[0] for block in blocks]  # type: ignore[index]
    counts = [block[1].count(b"\n") for block in blocks]  # type: ignore[index]
    assert firsts == [1 + sum(counts[:i]) for i in range(len(blocks))]
    assert all(block[1].endswith(b"\n") for block in blocks[:-1])  # type: ignore[index]

    path.write_bytes(gzip.compress(b""))
    (empty,) = iter_gzip_blocks(ReadUnit(str(path), "p.ndjson.gz", "ndjson.gz"))
    assert isinstance(empty, RawReject) and (empty.number, empty.code) == (0, "empty_file")

    path.write_bytes(gzip.compress(text)[:-20])
    *lines, reject = iter_gzip_blocks(ReadUnit(str(path), "p.ndjson.gz", "ndjson.gz"), block_bytes=10_000)
    read = sum(block[1].count(b"\n") for block in lines)  # type: ignore[index]
    assert isinstance(reject, RawReject) and reject.code == "truncated_gzip"
    assert reject.number == read + 1 and read >= 5990
    assert reject.reason == f"the gzip stream ends early (truncated file); {read} lines before it were read"


def bundle(kind: str, entries: list[object]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": entries})


@pytest.mark.parametrize("kind", ["collection", "transaction", "batch", "searchset"])
def test_bundle_types_with_urn_uuid(tmp_path: Path, kind: str) -> None:
    entries = [
        {"fullUrl": "urn:uuid:p9", "resource": {**PATIENT, "id": "p9"}},
        {"fullUrl": "urn:uuid:c9", "resource": condition(id="c9", subject={"reference": "urn:uuid:p9"})},
    ]
    _summary, quarantine = ingest_files(tmp_path, {"b.json": bundle(kind, entries)})
    assert quarantine.height == 0
    conditions = pl.read_parquet(tmp_path / "out" / "conditions.parquet")
    assert conditions.select("patient_id", "record_number").rows() == [("p9", 2)]


def test_bundle_entry_references_of_the_wrong_shape_or_type(tmp_path: Path) -> None:
    entries = [
        {"fullUrl": "urn:uuid:p9", "resource": {**PATIENT, "id": "p9"}},
        {"fullUrl": "urn:uuid:c1", "resource": condition(id="c1", subject={"reference": ["urn:uuid:p9"]})},
        {"fullUrl": "urn:uuid:c2", "resource": condition(id="c2", subject={"reference": "urn:uuid:c1"})},
    ]
    _summary, quarantine = ingest_files(tmp_path, {"b.json": bundle("collection", entries)})
    assert quarantine.select("record_number", "reason_code").rows() == [(2, "bad_reference"), (3, "bad_reference")]


def test_truncated_bundle_is_one_row(tmp_path: Path) -> None:
    data = bundle("collection", [{"resource": PATIENT}] * 5)
    summary, quarantine = ingest_files(tmp_path, {"b.json": data[:-30]})
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (0, "invalid_json")
    assert reject["reason"].startswith("whole file is not valid JSON")
    assert summary.files[0].records_in == 1


@pytest.mark.parametrize("kind", [["collection"], {"code": "collection"}, 3, "document-ish"])
def test_bundle_of_an_unknown_type_is_one_row(tmp_path: Path, kind: object) -> None:
    # A list or object as Bundle.type once stopped the whole ingest (unhashable in a set check).
    data = orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": [{"resource": PATIENT}]})
    summary, quarantine = ingest_files(tmp_path, {"b.json": data})
    reject = only_reject(quarantine)
    assert (reject["record_number"], reject["reason_code"]) == (0, "bad_bundle")
    assert reject["reason"].startswith(f"Bundle.type {kind!r:.40} is not a known Bundle type")
    assert summary.files[0].records_in == 1


@pytest.mark.parametrize("per_record", [False, True])
def test_transaction_entries_without_ids_take_the_one_their_entry_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_record: bool
) -> None:
    # A client's transaction: the patient and a condition created by POST, named by temporary
    # urn:uuid fullUrls (the condition refers to the patient so); a second condition updated by PUT
    # with its id in the request URL; a third with neither, which has no identity in the export.
    patient = {k: v for k, v in PATIENT.items() if k != "id"}
    created = {k: v for k, v in condition(subject={"reference": "urn:uuid:4f0c"}).items() if k != "id"}
    entries = [
        {"fullUrl": "urn:uuid:4f0c", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:77aa", "resource": created, "request": {"method": "POST", "url": "Condition"}},
        {"resource": {**created, "subject": {"reference": "Patient/4f0c"}},
         "request": {"method": "PUT", "url": "Condition/c42"}},
        {"resource": created, "request": {"method": "POST", "url": "Condition"}},
    ]
    if per_record:
        _per_record_only(monkeypatch)
    _summary, quarantine = ingest_files(tmp_path, {"b.json": bundle("transaction", entries)})
    conditions = pl.read_parquet(tmp_path / "out" / "conditions.parquet")
    assert conditions.select("resource_id", "patient_id", "record_number").rows() == [
        ("77aa", "4f0c", 2), ("c42", "4f0c", 3)]
    assert pl.read_parquet(tmp_path / "out" / "patients.parquet")["patient_id"].to_list() == ["4f0c"]
    assert quarantine.select("record_number", "reason_code").rows() == [(4, "missing_id")]


def test_bundle_entry_without_resource(tmp_path: Path) -> None:
    data = bundle("transaction", [{"resource": PATIENT}, {"request": {"method": "POST", "url": "Patient"}}])
    reject = only_reject(ingest_files(tmp_path, {"b.json": data})[1])
    assert (reject["record_number"], reject["reason"]) == (2, "Bundle entry 2 has no resource")


@pytest.mark.parametrize("per_record", [False, True])
def test_a_bundles_delete_entries_remove_every_copy_of_what_they_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_record: bool
) -> None:
    ndjson = b"\n".join([
        line(PATIENT), line({**PATIENT, "id": "p2"}), line(condition()), line(condition(id="c2")),
        line({"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p2"},
              "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
              "effectiveDateTime": "2020-01-02T03:04:05Z"}),
    ]) + b"\n"
    deletes = [
        {"request": {"method": "DELETE", "url": "Condition/c1"}},
        {"request": {"method": "DELETE", "url": "Patient/p2"}},
        {"request": {"method": "DELETE", "url": "Patient?identifier=http://hospital.example/mrn|42"}},
        {"request": {"method": "DELETE", "url": "Observation/"}},
        {"request": {"method": "DELETE", "url": "https://ehr.example/fhir/Condition/c2"}},
        {"request": {"method": "DELETE"}},
        # A transaction applies its DELETEs first: its own PUT of c1 re-creates it (entry 7).
        {"resource": condition(onsetDateTime="2020-02-02"), "request": {"method": "PUT", "url": "Condition/c1"}},
    ]
    if per_record:
        _per_record_only(monkeypatch)
    summary, quarantine = ingest_files(tmp_path, {"a.ndjson": ndjson, "b.json": bundle("transaction", deletes)})
    out = tmp_path / "out"
    assert pl.read_parquet(out / "deletions.parquet").drop("deleted_at").rows() == [
        ("Condition", "c1", "fhir/b.json", 1), ("Patient", "p2", "fhir/b.json", 2),
        ("Condition", "c2", "fhir/b.json", 5)]
    assert pl.read_parquet(out / "patients.parquet")["patient_id"].to_list() == ["p1"]
    assert pl.read_parquet(out / "conditions.parquet").select("resource_id", "source_file").rows() == [
        ("c1", "fhir/b.json")]
    assert pl.read_parquet(out / "observations.parquet").height == 0
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        ("fhir/a.ndjson", 2, "deleted", "Patient/p2 is deleted by fhir/b.json entry 2 (request DELETE)"),
        ("fhir/a.ndjson", 3, "deleted", "Condition/c1 is deleted by fhir/b.json entry 1 (request DELETE)"),
        ("fhir/a.ndjson", 4, "deleted", "Condition/c2 is deleted by fhir/b.json entry 5 (request DELETE)"),
        ("fhir/a.ndjson", 5, "orphan_reference",
         "observations record refers to Patient/p2, which was quarantined (see its own row)"),
        ("fhir/b.json", 3, "conditional_delete", "Bundle entry 3 deletes by search "
         "(Patient?identifier=http://hospital.example/mrn|42); conditional deletes are not applied"),
        ("fhir/b.json", 4, "bad_delete",
         "Bundle entry 4 is a DELETE whose request.url 'Observation/' names no resource (expected like 'Patient/123')"),
        ("fhir/b.json", 6, "bad_delete",
         "Bundle entry 6 is a DELETE without a request.url (expected like 'Patient/123')"),
    ]
    assert [(f.source_file, f.records_in, f.records_out, f.quarantined) for f in summary.files] == [
        ("fhir/a.ndjson", 5, 1, 4), ("fhir/b.json", 7, 4, 3)]


@pytest.mark.parametrize("per_record", [False, True])
def test_a_version_marked_entered_in_error_withdraws_the_older_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_record: bool
) -> None:
    def version(rid: str, updated: str | None, status: str) -> bytes:
        verification = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                    "code": status}]}
        meta = {"meta": {"lastUpdated": updated}} if updated else {}
        return line(condition(id=rid, verificationStatus=verification, **meta))

    files = {
        # c1: confirmed, then withdrawn in a later file; c2: withdrawn in 2023, confirmed again in
        # 2024 (a newer copy stays); c3: no times, the withdrawal later in the same file.
        "a.ndjson": b"\n".join([
            line(PATIENT), version("c1", "2020-01-01T00:00:00Z", "confirmed"),
            version("c2", "2024-01-01T00:00:00Z", "confirmed"),
            version("c3", None, "confirmed"), version("c3", None, "entered-in-error"),
        ]) + b"\n",
        "b.ndjson": b"\n".join([
            version("c1", "2021-06-01T00:00:00Z", "entered-in-error"),
            version("c2", "2023-01-01T00:00:00Z", "entered-in-error"),
        ]) + b"\n",
    }
    if per_record:
        _per_record_only(monkeypatch)
    summary, quarantine = ingest_files(tmp_path, files)
    conditions = pl.read_parquet(tmp_path / "out" / "conditions.parquet")
    assert conditions.select("resource_id", "source_file").rows() == [("c2", "fhir/a.ndjson")]
    withdrew = "is entered-in-error: the source system withdrew this record"
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        ("fhir/a.ndjson", 2, "withdrawn",
         "Condition/c1 is withdrawn by fhir/b.ndjson entry 1 (a later version, entered-in-error)"),
        ("fhir/a.ndjson", 4, "withdrawn",
         "Condition/c3 is withdrawn by fhir/a.ndjson entry 5 (a later version, entered-in-error)"),
        ("fhir/a.ndjson", 5, "entered_in_error", f"Condition.verificationStatus {withdrew}"),
        ("fhir/b.ndjson", 1, "entered_in_error", f"Condition.verificationStatus {withdrew}"),
        ("fhir/b.ndjson", 2, "entered_in_error", f"Condition.verificationStatus {withdrew}"),
    ]
    assert summary.balanced
    events = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert events.filter(pl.col("code").str.starts_with("SNOMED//")).height == 1


@pytest.mark.parametrize("per_record", [False, True])
def test_a_delete_removes_only_the_copies_it_comes_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_record: bool
) -> None:
    def stamped(rid: str, updated: str | None) -> bytes:
        return line(condition(id=rid, **({"meta": {"lastUpdated": updated}} if updated else {})))

    deletes = {"resourceType": "Bundle", "type": "transaction", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"},
               "entry": [{"request": {"method": "DELETE", "url": f"Condition/{rid}"}} for rid in ("c1", "c2", "c3")]}
    files = {
        # Before the deleting Bundle in file order; c1 updated after the deletion: re-created, kept.
        "a.ndjson": b"\n".join([line(PATIENT), stamped("c1", "2024-06-01T00:00:00Z")]) + b"\n",
        "b.json": orjson.dumps(deletes),
        # After it in file order; c2 updated before the deletion: deleted; c3 states no time: file
        # order says it came later, kept.
        "c.ndjson": b"\n".join([stamped("c2", "2023-01-01T00:00:00Z"), stamped("c3", None)]) + b"\n",
    }
    if per_record:
        _per_record_only(monkeypatch)
    _summary, quarantine = ingest_files(tmp_path, files)
    conditions = pl.read_parquet(tmp_path / "out" / "conditions.parquet")
    assert conditions.select("resource_id", "source_file").rows() == [("c1", "fhir/a.ndjson"), ("c3", "fhir/c.ndjson")]
    assert quarantine.select("source_file", "record_number", "reason").rows() == [
        ("fhir/c.ndjson", 1, "Condition/c2 is deleted by fhir/b.json entry 2 (request DELETE)")]
    deleted_at = pl.read_parquet(tmp_path / "out" / "deletions.parquet")["deleted_at"].unique().to_list()
    assert deleted_at == [datetime(2024, 1, 1)]


def document_reference(data: str, content_type: str = "text/plain; charset=utf-8") -> dict[str, object]:
    return {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "date": "2020-01-01T00:00:00Z",
        "type": {"text": "Progress note"},
        "content": [{"attachment": {"contentType": content_type, "data": data}}],
    }


def test_note_base64_and_charset(tmp_path: Path) -> None:
    text = "Patiënt: naïve café"
    data = base64.b64encode(text.encode("latin-1")).decode()
    _summary, quarantine = ingest_lines(tmp_path, line(document_reference(data, "text/plain; charset=ISO-8859-1")))
    assert quarantine.height == 0
    notes = pl.read_parquet(tmp_path / "out" / "notes.parquet")
    assert notes.select("text", "note_type").rows() == [(text, "progress_note")]


def test_note_invalid_base64(tmp_path: Path) -> None:
    reject = only_reject(ingest_lines(tmp_path, line(document_reference("not base64!!")))[1])
    assert reject["reason"] == "DocumentReference.content[0].attachment.data is not valid base64"


def test_note_bad_charset(tmp_path: Path) -> None:
    data = base64.b64encode(b"\xff\xfe bad").decode()
    reject = only_reject(ingest_lines(tmp_path, line(document_reference(data)))[1])
    assert reject["reason"] == "DocumentReference.content[0].attachment is not valid utf-8 text"


def test_note_in_a_codec_that_fails_without_a_decode_error(tmp_path: Path) -> None:
    # punycode raises a bare UnicodeError, which once stopped the whole ingest.
    data = base64.b64encode(b"\\x").decode()
    reject = only_reject(ingest_lines(tmp_path, line(document_reference(data, "text/plain; charset=punycode")))[1])
    assert reject["reason"] == "DocumentReference.content[0].attachment is not valid punycode text"


@pytest.mark.parametrize(
    ("field", "value"),
    [("onsetDateTime", "0001-01-01T00:00:00+01:00"), ("recordedDate", "9999-12-31T23:59:59-14:00")],
)
def test_date_outside_the_calendar_in_utc(tmp_path: Path, field: str, value: str) -> None:
    # In UTC these instants fall before year 1 or after 9999: they once overflowed the ingest.
    reject = only_reject(ingest_lines(tmp_path, line(condition(**{field: value})))[1])
    assert (reject["reason_code"], reject["reason"]) == (
        "bad_date", f"Condition.{field} {value!r} is outside the dates a calendar can hold (years 1 to 9999 in UTC)")


def test_strict_mode_rejects_what_the_fast_path_allows(tmp_path: Path) -> None:
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    bad_status = condition(id="c2", clinicalStatus="active")  # a CodeableConcept in R4, not a string
    (landing / "x.ndjson").write_bytes(line(PATIENT) + b"\n" + line(condition()) + b"\n" + line(bad_status) + b"\n")
    fast = ingest_landing_zone(tmp_path / "landing", tmp_path / "fast", workers=1, export_time=EXPORT)
    strict = ingest_landing_zone(tmp_path / "landing", tmp_path / "strict", workers=2, strict=True, export_time=EXPORT)
    assert fast.quarantined == 0
    assert strict.balanced
    reject = only_reject(pl.read_parquet(tmp_path / "strict" / "quarantine.parquet"))
    assert (reject["record_number"], reject["reason_code"]) == (3, "fhir_invalid")
    assert reject["reason"].startswith("FHIR R4 validation failed at Condition.clinicalStatus")


def _both_modes(tmp_path: Path, files: dict[str, bytes]) -> dict[bool, tuple[IngestSummary, Path]]:
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    for name, data in files.items():
        (landing / name).write_bytes(data)
    runs = {}
    for strict in (False, True):
        out = tmp_path / ("strict" if strict else "default")
        runs[strict] = ingest_landing_zone(tmp_path / "landing", out, workers=2, strict=strict, export_time=EXPORT), out
        assert runs[strict][0].balanced
    return runs


def test_strict_mode_keeps_the_pipelines_reasons_and_withdrawals(tmp_path: Path) -> None:
    # A withdrawn version that is not valid R4 for another reason (an empty display) still
    # withdraws the older copy; a date that is not a real date keeps the reason that quotes it.
    withdrawn = condition(verificationStatus={"coding": [{"code": "entered-in-error", "display": ""}]})
    runs = _both_modes(tmp_path, {"x.ndjson": b"\n".join(
        [line(PATIENT), line(condition()), line(withdrawn), line(condition(id="c3", onsetDateTime="2020-02-30"))]
    ) + b"\n"})
    for _, out in runs.values():
        assert pl.read_parquet(out / "conditions.parquet").height == 0
        quarantine = pl.read_parquet(out / "quarantine.parquet").sort("record_number")
        assert quarantine.select("record_number", "reason_code").rows() == [
            (2, "withdrawn"), (3, "entered_in_error"), (4, "bad_date")
        ]
        assert quarantine["reason"][2].startswith("Condition.onsetDateTime '2020-02-30' is not a real date")


def test_strict_mode_quarantines_what_fhir_resources_cannot_read(tmp_path: Path) -> None:
    # Each of these made fhir.resources raise KeyError, TypeError or AttributeError, which
    # stopped the whole strict run; the default mode reads every one.
    odd = [
        {**PATIENT, "id": "p2", "contained": [{"resourceType": "MedicinalProduct", "id": "m"}]},
        {**PATIENT, "id": "p3", "contained": [{"resourceType": 1, "id": "m"}]},
        {**PATIENT, "id": "p4", "_gender": "1"},
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": odd[0] | {"id": "p5"}}]}
    _both_modes(tmp_path, {"x.ndjson": b"\n".join(map(line, [PATIENT, *odd])) + b"\n",
                           "b.json": orjson.dumps(bundle)})
    assert pl.read_parquet(tmp_path / "default" / "patients.parquet").height == 5
    assert pl.read_parquet(tmp_path / "strict" / "patients.parquet")["patient_id"].to_list() == ["p1"]
    quarantine = pl.read_parquet(tmp_path / "strict" / "quarantine.parquet").sort("source_file", "record_number")
    replaced = ("Patient.contained[0].resourceType: 'MedicinalProduct' is an R4 type that R4B replaced, with no model "
                "to read it")
    assert quarantine.select("source_file", "record_number", "reason_code", "reason").rows() == [
        ("fhir/b.json", 1, "fhir_invalid", f"FHIR R4 validation failed at {replaced}"),
        ("fhir/x.ndjson", 2, "fhir_invalid", f"FHIR R4 validation failed at {replaced}"),
        ("fhir/x.ndjson", 3, "fhir_invalid",
         "FHIR R4 validation failed at Patient.contained[0].resourceType: should be a string, found int 1"),
        ("fhir/x.ndjson", 4, "fhir_invalid", "FHIR R4 validation failed at Patient._gender: a primitive's extension "
         "should be an object, found str '1'"),
    ]


def test_r4_types_r4b_replaced_are_records_and_abstract_types_are_not(tmp_path: Path) -> None:
    product = {"resourceType": "MedicinalProduct", "id": "m1"}
    runs = _both_modes(tmp_path, {"x.ndjson": b"\n".join(
        map(line, [PATIENT, product, {"resourceType": "DomainResource", "id": "d1"}])
    ) + b"\n"})
    assert pl.read_parquet(tmp_path / "default" / "raw_unknown.parquet")["resource_type"].to_list() == [
        "MedicinalProduct"
    ]
    for strict, (_, out) in runs.items():
        quarantine = pl.read_parquet(out / "quarantine.parquet").sort("record_number")
        expected = [(3, "unknown_resource_type", "resourceType 'DomainResource' is not a FHIR R4 resource type")]
        if strict:
            expected.insert(0, (2, "fhir_invalid", "MedicinalProduct is an R4 type that R4B replaced: "
                                "fhir.resources.R4B has no model to validate it"))
        assert quarantine.select("record_number", "reason_code", "reason").rows() == expected


def test_a_bundle_entry_nested_deeper_than_orjson_writes(tmp_path: Path) -> None:
    # orjson reads 1,024 levels but writes 255: re-writing the entry for the fast path once
    # stopped the ingest. The entry is read by the per-record path; strict mode cannot validate it.
    extension: dict[str, object] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(130):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": PATIENT}, {"resource": condition(extension=[extension])}]}
    runs = _both_modes(tmp_path, {"b.json": json.dumps(bundle).encode()})
    assert runs[False][0].quarantined == 0
    assert pl.read_parquet(tmp_path / "default" / "conditions.parquet")["resource_id"].to_list() == ["c1"]
    reject = only_reject(pl.read_parquet(tmp_path / "strict" / "quarantine.parquet"))
    assert (reject["record_number"], reject["reason_code"]) == (2, "fhir_invalid")
    assert reject["raw_text"].startswith('{"resourceType": "Condition", "id": "c1"')


def test_a_key_given_twice_is_quarantined_not_resolved_silently(tmp_path: Path) -> None:
    # JSON parsers keep one of the two values (orjson the last): a diagnosis filed under the second
    # patient, or an Observation read as a Patient, with nothing said.
    twice_subject = line(condition()).replace(b'"subject":{"reference":"Patient/p1"}',
                                              b'"subject":{"reference":"Patient/p1"},"subject":{"reference":"Patient/p2"}')
    twice_type = line(condition(id="c2"))[:-1] + b',"resourceType":"Patient"}'
    twice_inside = line(condition(id="c3")).replace(b'{"reference":"Patient/p1"}',
                                                    b'{"reference":"Patient/p1","reference":"Patient/p2"}')
    # A Condition made a Claim (a type the pipeline keeps as its text) by a second resourceType.
    made_unused = line(condition(id="c5"))[:-1] + b',"resourceType":"Claim"}'
    # A server's message of two severities: an error (quarantined) or information (kept)?
    outcome = (b'{"resourceType":"OperationOutcome","id":"o1","issue":[{"severity":"error","code":"exception",'
               b'"severity":"information"}]}')
    # A string holding JSON written by .NET's encoder (a quote as \u0022) hid a key given twice
    # from the screen: its rewrite has one more key end.
    escaped = line(condition(id="c6", note=[{"text": 'json {"a":1}'}])).replace(b'{\\"a\\"', b'{\\u0022a\\u0022')
    escaped = escaped.replace(b'{"reference":"Patient/p1"}', b'{"reference":"Patient/p9","reference":"Patient/p1"}')
    assert b"\\u0022a\\u0022" in escaped
    summary, quarantine = ingest_lines(tmp_path, twice_subject, twice_type, twice_inside, line(condition(id="c4")),
                                       made_unused, outcome, escaped)
    assert summary.balanced and summary.table_rows["conditions"] == 1 and summary.table_rows["raw_unknown"] == 0
    unknown = "which of its values the source meant is unknown (a JSON reader silently keeps one)"
    assert quarantine.sort("record_number").select("record_number", "reason_code", "reason").rows() == [
        (2, "duplicate_key", f"key 'subject' appears twice in the resource: {unknown}"),
        (3, "duplicate_key", f"key 'resourceType' appears twice in the resource: {unknown}"),
        (4, "duplicate_key", f"key 'reference' appears twice in subject: {unknown}"),
        (6, "duplicate_key", f"key 'resourceType' appears twice in the resource: {unknown}"),
        (7, "duplicate_key", f"key 'severity' appears twice in issue[0]: {unknown}"),
        (8, "duplicate_key", f"key 'reference' appears twice in subject: {unknown}"),
    ]


def test_a_key_given_twice_in_a_bundle_or_a_single_resource_file_is_quarantined(tmp_path: Path) -> None:
    observation = {"resourceType": "Observation", "id": "o1", "status": "final",
                   "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-01-02",
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                   "component": [{"code": {"text": "a"}, "valueQuantity": {"value": 1}},
                                 {"code": {"text": "b"}, "valueQuantity": {"value": 2}}]}
    entries = bundle("collection", [{"resource": PATIENT}, {"resource": condition()}, {"resource": observation}])
    twice_in_entries = (entries.replace(b'"subject":{"reference":"Patient/p1"}',
                                        b'"subject":{"reference":"Patient/p1"},"subject":{"reference":"Patient/p2"}', 1)
                        .replace(b'"value":2', b'"value":2,"value":200'))
    # A second entry list would hide every resource of the first: the whole file is one row.
    twice_entry_list = bundle("collection", [{"resource": PATIENT}])[:-1] + b',"entry":[]}'
    single = line(condition(id="c9")).replace(b'"code":"44054006"', b'"code":"44054006","code":"38341003"')
    # A deletion naming two resources; a Bundle dated twice (its deletions' time).
    delete = bundle("transaction", [{"request": {"method": "DELETE", "url": "Patient/p1"}}]).replace(
        b'"url":"Patient/p1"', b'"url":"Patient/p1","url":"Patient/p2"')
    dated_twice = bundle("transaction", [{"resource": PATIENT}])[:-1] + (
        b',"meta":{"lastUpdated":"2024-01-01T00:00:00Z","lastUpdated":"2023-01-01T00:00:00Z"}}')
    summary, quarantine = ingest_files(tmp_path, {"a.json": twice_in_entries, "b.json": twice_entry_list,
                                                  "c.json": single, "d.json": delete, "e.json": dated_twice})
    unknown = "which of its values the source meant is unknown (a JSON reader silently keeps one)"
    assert quarantine.sort("source_file", "record_number").select(
        "source_file", "record_number", "reason_code", "reason").rows() == [
        ("fhir/a.json", 2, "duplicate_key", f"Bundle entry 2: key 'subject' appears twice in resource: {unknown}"),
        ("fhir/a.json", 3, "duplicate_key",
         f"Bundle entry 3: key 'value' appears twice in resource.component[1].valueQuantity: {unknown}"),
        ("fhir/b.json", 0, "duplicate_key", f"key 'entry' appears twice in the Bundle: {unknown}"),
        ("fhir/c.json", 1, "duplicate_key", f"key 'code' appears twice in code.coding[0]: {unknown}"),
        ("fhir/d.json", 1, "duplicate_key", f"Bundle entry 1: key 'url' appears twice in request: {unknown}"),
        ("fhir/e.json", 0, "duplicate_key", f"key 'lastUpdated' appears twice in Bundle.meta: {unknown}"),
    ]
    assert summary.table_rows["patients"] == 1 and summary.table_rows["observations"] == 0
    assert summary.table_rows["deletions"] == 0
    assert summary.balanced and (summary.records_in, summary.quarantined) == (7, 6)


@pytest.mark.parametrize(("text", "screened"), [
    (b'{"a":1,"b":{"c":"x"}}', False),
    (b'{\n  "a" : 1,\n  "b":\t{"c": "say \\"no\\": fine"}\n}', False),  # spaced; a quote and colon in a string
    (b'{"a":1,"a":2}', True),
    (b'{"a" :1,\n"b":{"c":1, "c" : 2}}', True),
    (b'{"note":"\\"  :"}', True),  # a quote, spaces, a colon in a string: searched, nothing found
])
def test_the_screen_for_keys_given_twice(text: bytes, screened: bool) -> None:
    from features.fhir.read import doubled_key_reason, may_give_a_key_twice

    assert may_give_a_key_twice(text, orjson.loads(text)) is screened
    assert (doubled_key_reason(text) is not None) is (screened and b'"note"' not in text)


def test_cached_date_errors_name_each_field() -> None:
    # Parsed dates are cached by their text; the reason still names the field each time.
    from features.fhir.validate import RecordError, parse_datetime

    for where in ("Condition.onsetDateTime", "Encounter.period.start"):
        with pytest.raises(RecordError) as err:
            parse_datetime("2021-02-30", where, EXPORT)
        assert err.value.code == "bad_date"
        assert err.value.reason.startswith(f"{where} '2021-02-30' is not a real date")
    assert parse_datetime("2016-03-14T11:40:00-04:00", "x", EXPORT) == datetime(2016, 3, 14, 15, 40)


def test_dates_are_days_on_the_sites_calendar(tmp_path: Path) -> None:
    from features.errors import CohortcastError
    from features.fhir.validate import RecordError, parse_date, parse_datetime, parse_first_instant

    export = datetime(2025, 1, 1, 20)  # 2 January, 05:00 in Tokyo; 1 January, 15:00 in New York
    # Tokyo's 2 January has begun by the export: known by the export, not refused as future.
    assert parse_datetime("2025-01-02", "x", export, "Asia/Tokyo") == export
    assert parse_first_instant("2025-01-02", "x", export, "Asia/Tokyo") == datetime(2025, 1, 1, 15)
    assert parse_date("2025-01-02", "x", export, "Asia/Tokyo") == date(2025, 1, 2)
    with pytest.raises(RecordError, match=r"^x '2025-01-02' is after the export time 2025-01-01T20:00:00$"):
        parse_datetime("2025-01-02", "x", export, "America/New_York")
    # A month, a year and a cached text read again in another zone.
    assert parse_datetime("2019-04", "x", export, "America/New_York") == datetime(2019, 5, 1, 3, 59, 59, 999999)
    assert parse_datetime("2019", "x", export, "America/New_York") == datetime(2020, 1, 1, 4, 59, 59, 999999)
    assert parse_datetime("2019", "x", export) == datetime(2019, 12, 31, 23, 59, 59, 999999)
    # A period that ends with year 9999 (always after the export) and the zone a run names.
    with pytest.raises(RecordError, match="is after the export time"):
        parse_datetime("9999", "x", export, "Pacific/Kiritimati")
    with pytest.raises(CohortcastError, match=r"^site time zone 'America/Gotham' is not an IANA time zone name "
                                              r"\(expected like 'America/Chicago' or 'UTC'\)$"):
        ingest_landing_zone(tmp_path, tmp_path / "out", site_timezone="America/Gotham")
    assert not (tmp_path / "out").exists()


def test_cached_reference_errors_name_each_field(tmp_path: Path) -> None:
    # References are resolved through a cache; a bad one is still reported at its own field.
    bad = condition(subject={"reference": "Practitioner/p1"})
    reject = only_reject(ingest_lines(tmp_path, line(bad))[1])
    assert reject["reason"] == "Condition.subject.reference 'Practitioner/p1' does not point to a Patient"


def test_records_of_a_quarantined_patient_say_so(tmp_path: Path) -> None:
    # SQL Server's least date, a common placeholder for an unknown birth date: before 1800, refused.
    placeholder = {**PATIENT, "id": "p9", "birthDate": "1753-01-01"}
    _summary, quarantine = ingest_lines(
        tmp_path, line(placeholder), line(condition(id="c9", subject={"reference": "Patient/p9"})),
        line(condition(id="c8", subject={"reference": "Patient/p8"})),
    )
    assert quarantine.select("record_number", "reason_code", "reason").rows() == [
        (2, "bad_date", "Patient.birthDate '1753-01-01' is before 1800"),
        (3, "orphan_reference", "conditions record refers to Patient/p9, which was quarantined (see its own row)"),
        (4, "orphan_reference", "conditions record refers to Patient/p8, which is not in this export"),
    ]
