"""The ingest stage: a landing zone into normalized tables, quarantine, MEDS events and accounting.

Stage: ingest. In: a landing zone (``fhir/`` NDJSON, NDJSON.gz and Bundle files; ``notes/``,
``genomics/`` and ``imaging/`` tables; anything else, such as a simulator's ``truth.parquet``, is
ignored). Out, in the warehouse folder: one Parquet file per table of
:data:`features.schemas.INTERNAL_TABLES` that ingest owns, ``quarantine.parquet`` and
``ingest_summary.json``.

How it runs, with memory bounded by the read unit and polars' streaming batches, not by the export:

1. FHIR files are cut into read units (16 MB NDJSON line ranges, whole ``.gz`` and Bundle files),
   and consecutive small units are grouped into batches of about 16 MB; ``workers`` processes
   parse, validate and flatten the batches, each staged as one Arrow IPC part per table. NDJSON
   ranges, ``.gz`` files (in blocks of decompressed lines) and the batch's Bundle entries go
   through the columnar fast path (:mod:`features.fhir.columnar`), which clears the records it
   can check column-wise; every other record goes through the per-record path
   (:mod:`features.fhir.flatten`), which alone writes quarantine reasons.
2. The tables feeds are read row by row and staged the same way.
3. The patients, ``medication_codes`` (Medication resources) and ``binaries`` (Binary resources)
   tables are finalized first, then the others side by side on threads, each by a streaming polars
   query: duplicates (same type and id) resolve to the newest copy, by ``meta.lastUpdated``, then
   ``meta.versionId`` (staged apart as ``record_versions``), then the first in file order (files
   sorted by path, then line or entry number); rows whose patient is not in ``patients`` are
   dropped; both become quarantine rows naming why. So does every copy of a resource that a Bundle
   entry deletes (``request.method`` ``DELETE``; the deletions are finished first and kept as the
   ``deletions`` table). Medication orders that name their drug by a
   ``Medication/<id>`` reference, and DocumentReferences whose text is a ``Binary`` resource (an
   attachment URL), are staged apart and join ``medications`` and ``notes`` with that resource's
   codes or text; those whose resource is not in the export (or is not text) are quarantined.
4. ``events`` is streamed from the final tables; then the accounting is counted independently from
   the inputs (records read) and the outputs (distinct records in tables plus quarantine rows).

Every output is written in a staging folder inside the warehouse and put in place at the end, one
rename per file and the accounting last: a killed run leaves the previous ingest whole. One writer
at a time holds the warehouse's lock (``.ingest.lock``); the next one deletes what a killed one left.
:func:`promote_warehouse` makes the tables of an ingest written elsewhere (a landing batch's) the
warehouse's, file by file in the same way, and records the batch in ``promoted_batch.txt`` so that an
older batch is refused; :func:`prune_ingested_batches` then deletes old batches' ingested copies.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import multiprocessing
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.errors import LandingZoneError
from features.events import build_codes, build_events, merged_patients, most_common
from features.fhir.columnar import SCHEMAS, Context, read_lines, read_ndjson, with_bundle_references
from features.fhir.flatten import Origin, Row, flatten_resource, record_version
from features.fhir.read import (
    UNIT_BYTES,
    BundleDelete,
    RawRecord,
    RawReject,
    ReadUnit,
    doubled_key_reason,
    fetch_raw,
    fhir_kind,
    iter_gzip_blocks,
    iter_unit,
    may_give_a_key_twice,
    plan_units,
    read_ndjson_range,
)
from features.fhir.specs import CODED_TABLES, is_r4_resource_type
from features.fhir.validate import SITE_ZONE, RecordError, json_text, parse_datetime, site_zone, validate_r4
from features.genomics import read_genomics_file
from features.imaging import read_imaging_file, usual_embedding_length
from features.io import (
    link_file_atomic,
    sink_parquet_atomic,
    staging_dir,
    take_pid_lock,
    write_bytes_atomic,
    write_parquet_atomic,
)
from features.notes import read_notes_file
from features.schemas import CODES, EVENTS, INTERNAL_TABLES, QUARANTINE, STAGED_TABLES
from features.tables import FileError, Spill, TableRead, fetch_rows

TABLES = [
    "patients",
    "encounters",
    *CODED_TABLES,
    "medication_codes",
    "binaries",
    "observations",
    "notes",
    "imaging_studies",
    "genomics",
    "imaging",
    "raw_unknown",
    "deletions",
]
"""The normalized tables ingest writes. The deletions, the patients, the drugs and the Binary texts
are finished first: every other table is checked against them."""

ID_COLUMNS: dict[str, list[str]] = {
    "patients": ["patient_id"],
    "encounters": ["encounter_id"],
    **{name: ["resource_type", "resource_id"] for name in CODED_TABLES},
    "observations": ["resource_id"],
    "notes": ["note_id"],
    "imaging_studies": ["study_id"],
    "genomics": ["patient_id", "code", "variant"],
    "imaging": ["study_id"],
    "medication_codes": ["medication_id"],
    "binaries": ["binary_id"],
    "raw_unknown": ["resource_type", "resource_id"],
    # Never duplicates: two entries deleting one resource are two deletions, each applied.
    "deletions": ["resource_type", "resource_id", "source_file", "record_number"],
}
"""What makes two records duplicates, per table."""

RESOURCE_TYPE_OF_TABLE = {
    "patients": "Patient",
    "encounters": "Encounter",
    "observations": "Observation",
    "imaging_studies": "ImagingStudy",
    "medication_codes": "Medication",
    "binaries": "Binary",
}
DELETED_TYPE_OF_TABLE = {**RESOURCE_TYPE_OF_TABLE, "notes": "DocumentReference"}
"""The resource type a Bundle's DELETE names to remove a row of each table of one type (notes are
DocumentReferences; a notes-table row of the same id is the same document)."""
SUMMARY_FILE = "ingest_summary.json"
# In a warehouse fed by landing batches: the name of the batch last promoted into it.
PROMOTED_BATCH_FILE = "promoted_batch.txt"
# Names the ingested batch folder while its files are put in place (a promotion cut short is finished from it).
PROMOTING_FILE = ".promoting"
# The writer lock of a warehouse folder, and the prefix of the staging folders ingests write in.
LOCK_FILE = ".ingest.lock"
# Readers hold it shared while they read a warehouse's tables, writers exclusively while they put
# files in place (warehouse_read).
READ_LOCK_FILE = ".read.lock"
STAGING_PREFIX = ".ingest-staging-"
# The subfolder of a staging folder that holds the finished warehouse files until they are put in place.
FINAL_FOLDER = "final"
RAW_LIMIT = 500
_NAN = re.compile(rb"(?<![A-Za-z\"])-?(NaN|Inf|Infinity)(?![A-Za-z\"])")


@dataclass(frozen=True)
class FileAccount:
    """Records of one source file: every record read is either out (in a table) or quarantined."""

    source_kind: str
    source_file: str
    records_in: int
    records_out: int
    quarantined: int

    @property
    def balanced(self) -> bool:
        return self.records_in == self.records_out + self.quarantined


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run read, wrote and quarantined (``ingest_summary.json``)."""

    landing_dir: str
    warehouse_dir: str
    # Nothing may be dated after this (naive UTC).
    export_time: datetime
    strict: bool
    files: tuple[FileAccount, ...]
    table_rows: dict[str, int]
    quarantined_by_reason: dict[str, int]
    # Records dropped as older (or, without a version, later) copies of a record with the same type
    # and id (also in quarantine).
    duplicates: int
    fhir_resources_in: int
    elapsed_seconds: float
    # Where export_time came from: "given" (the caller's) or "ingest time" (the clock).
    export_time_source: str = "ingest time"
    # The Bulk export's transactionTime (its manifest.json), when the landing zone holds one: FHIR
    # records dated after it are quarantined too. Notes, genomics and imaging tables, extracted
    # from other systems and often later, are held to export_time alone.
    fhir_export_time: datetime | None = None
    # How the landing zone differs from its Bulk export's manifest.json: a listed file missing,
    # or holding another number of records than listed (a copy cut short). Empty without a manifest.
    manifest_mismatches: tuple[str, ...] = ()
    # The site's time zone (IANA): dates, and times without an offset, were read on its clock.
    site_timezone: str = SITE_ZONE

    @property
    def complete(self) -> bool:
        """Whether the landing zone holds every file of its manifest, with the records it lists."""
        return not self.manifest_mismatches

    @property
    def records_in(self) -> int:
        return sum(account.records_in for account in self.files)

    @property
    def records_out(self) -> int:
        return sum(account.records_out for account in self.files)

    @property
    def quarantined(self) -> int:
        return sum(account.quarantined for account in self.files)

    @property
    def balanced(self) -> bool:
        return all(account.balanced for account in self.files)

    def to_json(self) -> bytes:
        document = asdict(self)
        document["export_time"] = self.export_time.isoformat()
        document["fhir_export_time"] = self.fhir_export_time.isoformat() if self.fhir_export_time else None
        document["totals"] = {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "quarantined": self.quarantined,
            "balanced": self.balanced,
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, path: Path) -> IngestSummary:
        """Read an ``ingest_summary.json``.

        Raises
        ------
        LandingZoneError
            When the file is not a whole summary as an ingest writes it (cut short by a full disk,
            edited by hand).
        """
        try:
            document = orjson.loads(path.read_bytes())
            document.pop("totals", None)
            document["export_time"] = datetime.fromisoformat(document["export_time"])
            fhir_time = document.get("fhir_export_time")
            document["fhir_export_time"] = datetime.fromisoformat(fhir_time) if fhir_time else None
            document["files"] = tuple(FileAccount(**account) for account in document["files"])
            document["manifest_mismatches"] = tuple(document.get("manifest_mismatches", ()))
            return cls(**document)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LandingZoneError(f"{path} is not an ingest summary as cohortcast writes it "
                                   f"({type(exc).__name__}: {str(exc)[:80]}); ingest again") from None


@dataclass
class _UnitResult:
    source_file: str
    records_in: int
    quarantined: int


@dataclass
class _Landing:
    fhir: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)
    genomics: list[tuple[Path, str]] = field(default_factory=list)
    imaging: list[tuple[Path, str]] = field(default_factory=list)
    # Files no reader takes (a folder named otherwise, a CSV among the FHIR files): one quarantine row each.
    unread: list[tuple[Path, str]] = field(default_factory=list)
    # Bulk Data manifests (manifest.json): the export's time and the files it wrote.
    manifests: list[tuple[Path, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Staging
# ------------------------------------------------------------------------------------------------


def rows_to_table(rows: list[Row], schema: pa.Schema) -> pa.Table:
    """Rows (tuples in schema order) as an Arrow table of ``schema``."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema.names]
    return pa.Table.from_arrays(
        [pa.array(column, type=f.type) for column, f in zip(columns, schema, strict=True)], schema=schema
    )


def _write_part(table: pa.Table, path: Path) -> None:
    """Stage a part as an Arrow IPC file (LZ4): staging is read once, right after, where Parquet's
    encoding costs more than it saves; LZ4 keeps the staged data about Parquet's size."""
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)


def _stage(staging: Path, table: str, rows: list[Row], part: str) -> None:
    if rows:
        folder = staging / table
        folder.mkdir(parents=True, exist_ok=True)
        _write_part(rows_to_table(rows, STAGED_TABLES[table]), folder / f"{part}.arrow")


def _parse_line(raw: bytes) -> Any:
    # orjson rejects blank input and a byte-order mark, so a line it parses needs no other check
    # (a key given twice is searched for once the line is known to be a resource: _check_doubled_keys).
    # The checks that name what is wrong run only for lines that fail.
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not raw.strip():
            raise RecordError("blank_line", "blank line (NDJSON holds one resource per line)") from None
        if raw.startswith(b"\xef\xbb\xbf"):
            raise RecordError(
                "byte_order_mark", "line starts with a UTF-8 byte-order mark (BOM); NDJSON must be UTF-8 without BOM"
            ) from None
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RecordError(
                "not_utf8",
                f"line is not UTF-8 text (bad byte {raw[bad.start : bad.start + 1]!r} at column {bad.start + 1})",
            ) from None
        if _NAN.search(raw):
            raise RecordError("invalid_json", "line holds NaN, Inf or Infinity, which JSON does not allow") from None
        message = str(exc).split(":", 1)[0]
        raise RecordError("invalid_json", f"line is not valid JSON ({message}; truncated or malformed)") from None


def _check_doubled_keys(raw: bytes, resource: dict[str, Any]) -> None:
    """Refuse a line that gives a key twice in an object, which orjson resolves silently (the last
    value wins). The fast path's decoder refuses such lines, so only lines read one by one are
    screened, of every type: even one kept as its text has values the ingest acts on (an
    OperationOutcome's severity, any resource's meta.lastUpdated), and it is refused from a Bundle
    or a single-resource file alike."""
    if may_give_a_key_twice(raw, resource):
        reason = doubled_key_reason(raw)
        if reason is not None:
            raise RecordError("duplicate_key", reason)


def _resource_type(resource: Any) -> str:
    if not isinstance(resource, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
            type(resource), "null"
        )
        raise RecordError("not_object", f"JSON {kind} is not a FHIR resource (expected an object)")
    rt = resource.get("resourceType")
    if rt is None:
        raise RecordError("missing_resource_type", "object has no resourceType")
    if not isinstance(rt, str) or not is_r4_resource_type(rt):
        raise RecordError("unknown_resource_type", f"resourceType {rt!r:.60} is not a FHIR R4 resource type")
    return rt


def _plan_unit(
    unit_index: int,
    unit: ReadUnit,
    latest: datetime,
    strict: bool,
    zone: str,
    frames: dict[str, list[pa.Table]],
    pool: _EntryPool,
) -> tuple[int, Iterable[RawRecord | RawReject]]:
    """Start reading one unit: (records the fast path cleared, records left for the per-record path).

    NDJSON, plain or gzipped, goes through the columnar fast path now (its tables go to
    ``frames``); Bundle entries join ``pool``, cleared later for the whole batch at once.
    """
    if unit.kind == "ndjson":
        fast = _fast_ndjson(unit, latest, strict, zone, frames)
        if fast is not None:
            return fast
    if unit.kind == "ndjson.gz":
        return _fast_gzip(unit, latest, strict, zone, frames)
    if unit.kind == "json":
        records = list(iter_unit(unit))
        pool.add(unit_index, unit.source_file, records)
        return 0, records
    return 0, iter_unit(unit)


def _fast_block(
    data: bytes, source_file: str, first_line: int, latest: datetime, strict: bool, zone: str,
    frames: dict[str, list[pa.Table]],
) -> tuple[int, list[RawRecord]]:
    """Run the columnar fast path on a block of NDJSON lines whose first is ``first_line``: its
    tables go to ``frames``; return (records cleared, records left for the per-record path)."""
    read = read_ndjson(data, source_file, first_line, latest, strict, zone)
    for table, rows in read.tables.items():
        if rows.num_rows:
            frames[table].append(rows)
    left = [
        RawRecord(first_line + index, _strip_cr(line))
        for index, line in zip(read.slow.tolist(), read.slow_lines(data), strict=True)
    ]
    return len(read.starts) - len(left), left


def _fast_ndjson(
    unit: ReadUnit, latest: datetime, strict: bool, zone: str, frames: dict[str, list[pa.Table]]
) -> tuple[int, list[RawRecord]] | None:
    """Run the columnar fast path on an NDJSON unit: (records cleared, records left), or None when
    the unit is for the per-record path alone (unreadable or empty)."""
    try:
        data = read_ndjson_range(unit)
    except OSError:
        return None
    if not data:
        return None
    return _fast_block(data, unit.source_file, unit.first_line, latest, strict, zone, frames)


def _fast_gzip(
    unit: ReadUnit, latest: datetime, strict: bool, zone: str, frames: dict[str, list[pa.Table]]
) -> tuple[int, list[RawRecord | RawReject]]:
    """Run the columnar fast path on a ``.ndjson.gz`` file: (records cleared, records left).

    The file is decompressed in blocks of whole lines of about :data:`UNIT_BYTES` (so memory
    stays bounded whatever its size), by the reader the per-record path uses too: a damaged
    stream ends at the same line, with the same quarantine row.
    """
    cleared = 0
    left: list[RawRecord | RawReject] = []
    for block in iter_gzip_blocks(unit, UNIT_BYTES):
        if isinstance(block, RawReject):
            left.append(block)
            continue
        first_line, data = block
        count, slow = _fast_block(data, unit.source_file, first_line, latest, strict, zone, frames)
        cleared += count
        left.extend(slow)
    return cleared, left


def _instant(value: str | None, latest: datetime, zone: str) -> datetime | None:
    """A FHIR instant as naive UTC, or None when absent or malformed (it only orders copies)."""
    if value is None:
        return None
    try:
        return parse_datetime(value, "Bundle.timestamp", latest, zone)
    except RecordError:
        return None


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _read_records(
    records: Iterable[RawRecord | RawReject],
    source_file: str,
    cleared: int,
    latest: datetime,
    strict: bool,
    zone: str,
    buffers: dict[str, list[Row]],
    rejects: list[Row],
) -> _UnitResult:
    """The per-record path: ``cleared`` records of the unit were already read by the fast path."""
    records_in = cleared
    rejected = len(rejects)
    origin = Origin(source_file, 0, latest, zone=zone)
    for record in records:
        records_in += 1
        if isinstance(record, RawReject):
            rejects.append(
                (
                    "fhir",
                    source_file,
                    record.number,
                    None,
                    None,
                    record.raw[:RAW_LIMIT],
                    record.code,
                    record.reason,
                )
            )
            continue
        if isinstance(record.parsed, BundleDelete):
            deletion = record.parsed
            buffers["deletions"].append(
                (deletion.resource_type, deletion.resource_id, _instant(deletion.bundle_time, latest, zone),
                 source_file, record.number)
            )
            continue
        resource: Any = None
        try:
            resource = _parse_line(record.raw) if record.parsed is None else record.parsed
            _resource_type(resource)
            if record.parsed is None:
                _check_doubled_keys(record.raw, resource)
            origin.record_number = record.number
            origin.full_urls = record.full_urls
            # The pipeline's own checks first: their reasons name the value and the rule (a date
            # that is not a real date, a withdrawal, which must withdraw older copies even when
            # the record is not valid R4 for some other reason).
            table, rows = flatten_resource(resource, origin, record.raw or None)
            if strict:
                validate_r4(resource)
            buffers[table].extend(rows)
            version = record_version(resource, origin)
            if version is not None:
                buffers["record_versions"].append(version)
        except RecordError as err:
            is_dict = isinstance(resource, dict)
            rt = resource.get("resourceType") if is_dict else None
            rid = resource.get("id") if is_dict else None
            if err.code == "entered_in_error" and isinstance(rt, str) and isinstance(rid, str):
                # The newest version withdraws the record: the older copies of it must not stay behind.
                stamp = record_version(resource, origin)
                buffers["withdrawals"].append((rt, rid, stamp[2] if stamp else None, source_file, record.number))
            raw = record.raw if record.raw else json_text(resource)
            rejects.append(
                (
                    "fhir",
                    source_file,
                    record.number,
                    rt if isinstance(rt, str) else None,
                    rid if isinstance(rid, str) else None,
                    raw[: RAW_LIMIT * 4].decode("utf-8", "replace")[:RAW_LIMIT],
                    err.code,
                    err.reason,
                )
            )
    return _UnitResult(source_file, records_in, len(rejects) - rejected)


class _EntryPool:
    """Bundle entries of a batch, by resource type, for the columnar fast path.

    Bundles are small (one per patient or encounter), so their entries are pooled over the batch
    and each type is decoded once, as NDJSON re-serialized by orjson, with references to other
    entries resolved through the Bundle's ``fullUrl`` map
    (:func:`~features.fhir.columnar.with_bundle_references`).
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[bytes]] = defaultdict(list)
        self.files: dict[str, list[str]] = defaultdict(list)
        self.numbers: dict[str, list[int]] = defaultdict(list)
        # (unit index, position of the record in its unit's list), per pooled line.
        self.places: dict[str, list[tuple[int, int]]] = defaultdict(list)
        # Per unit: the positions of its records the pool does not take.
        self.unpooled: dict[int, list[int]] = {}

    def add(self, unit_index: int, source_file: str, records: list[RawRecord | RawReject]) -> None:
        unpooled = self.unpooled.setdefault(unit_index, [])
        for position, record in enumerate(records):
            # Only Bundle entries (parsed, no raw text of their own); a lone resource keeps its text.
            rt = (
                record.parsed.get("resourceType")
                if isinstance(record, RawRecord) and not record.raw and isinstance(record.parsed, dict)
                else None
            )
            if not isinstance(rt, str) or rt not in SCHEMAS:
                unpooled.append(position)
                continue
            assert isinstance(record, RawRecord) and isinstance(record.parsed, dict)
            resource: dict[str, Any] = record.parsed
            if record.full_urls:
                resource = with_bundle_references(resource, record.full_urls)
            try:
                line = orjson.dumps(resource)
            except orjson.JSONEncodeError:
                # Nested deeper than orjson writes: the per-record path reads it as parsed.
                unpooled.append(position)
                continue
            self.lines[rt].append(line)
            self.files[rt].append(source_file)
            self.numbers[rt].append(record.number)
            self.places[rt].append((unit_index, position))

    def clear(self, latest: datetime, strict: bool, zone: str,
              frames: dict[str, list[pa.Table]]) -> dict[int, list[int]]:
        """Run the fast path per type; return, per unit, the positions of the records it left."""
        left = {unit_index: list(positions) for unit_index, positions in self.unpooled.items()}
        if not self.lines:
            return left
        for rt, lines in self.lines.items():
            files = pl.Series(self.files[rt], dtype=pl.String)
            numbers = pl.Series(self.numbers[rt], dtype=pl.Int64)
            read = read_lines(b"\n".join(lines) + b"\n", rt, files, numbers, Context(latest, strict=strict, zone=zone))
            for table, rows in read.tables.items():
                if rows.num_rows:
                    frames[table].append(rows)
            for index in read.slow.tolist():
                unit_index, position = self.places[rt][index]
                left[unit_index].append(position)
        for positions in left.values():
            positions.sort()
        return left


def _process_batch(
    index: int, units: list[ReadUnit], latest: datetime, strict: bool, zone: str, staging: Path
) -> list[_UnitResult]:
    """Read a batch of consecutive read units; stage their rows and rejects as one Arrow IPC part per table.

    Small files (one Bundle per encounter, say) are batched so that each table gets one part per
    ~:data:`UNIT_BYTES` of input, not one per file: a part costs milliseconds to open, write and
    later scan, far more than the few rows a small Bundle gives. Units are read in order, so
    rows stay in file order.
    """
    # The batch makes millions of short-lived dicts (parsed Bundles) and keeps hundreds of thousands
    # of row tuples: with the cyclic garbage collector on, its passes over them cost about as much
    # as the JSON parsing itself. Nothing here makes reference cycles, so reference counting frees
    # everything. The collector comes back on only after the batch's objects are freed: turned on
    # while they live, its first pass would walk them all (a second per batch of Bundles).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _process_batch_unmanaged(index, units, latest, strict, zone, staging)
    finally:
        if collecting:
            gc.enable()


def _process_batch_unmanaged(
    index: int, units: list[ReadUnit], latest: datetime, strict: bool, zone: str, staging: Path
) -> list[_UnitResult]:
    """:func:`_process_batch`'s work, with the garbage collector off."""
    buffers: dict[str, list[Row]] = defaultdict(list)
    frames: dict[str, list[pa.Table]] = defaultdict(list)
    rejects: list[Row] = []
    pool = _EntryPool()
    planned = [_plan_unit(i, unit, latest, strict, zone, frames, pool) for i, unit in enumerate(units)]
    left = pool.clear(latest, strict, zone, frames)
    del pool
    results = []
    for i, (unit, (count, records)) in enumerate(zip(units, planned, strict=True)):
        if i in left:
            assert isinstance(records, list)
            count = len(records) - len(left[i])
            records = [records[position] for position in left[i]]
        results.append(_read_records(records, unit.source_file, count, latest, strict, zone, buffers, rejects))
    del planned  # the parsed Bundles: freed before staging
    part = f"{index:07d}"
    order = {unit.source_file: position for position, unit in enumerate(units)}
    for table in sorted(set(buffers) | set(frames)):
        _stage_parts(staging, table, frames.get(table, []), buffers.get(table, []), order, part)
    _stage(staging, "quarantine", rejects, part)
    return results


def _stage_parts(
    staging: Path, table: str, frames: list[pa.Table], rows: list[Row], order: dict[str, int], part: str
) -> None:
    """Stage a batch's fast-path tables and per-record rows of one table as one part, in file order.

    The pieces come in the order their paths finished (NDJSON units, then the batch's Bundle
    entries, then per-record rows), so a part of several pieces is sorted back to (unit, record
    number) order, stably (an Observation's rows stay together in their order): the order the
    per-record path alone would give.
    """
    if not frames:
        _stage(staging, table, rows, part)
        return
    pieces = [*frames, rows_to_table(rows, STAGED_TABLES[table])] if rows else frames
    combined = pa.concat_tables(pieces)
    if len(pieces) > 1:
        frame = pl.from_arrow(combined)
        assert isinstance(frame, pl.DataFrame)
        frame = frame.sort(
            pl.col("source_file").replace_strict(order, return_dtype=pl.Int64),
            pl.col("record_number"),
            maintain_order=True,
        )
        combined = frame.to_arrow().cast(STAGED_TABLES[table])
    folder = staging / table
    folder.mkdir(parents=True, exist_ok=True)
    _write_part(combined, folder / f"{part}.arrow")


def _process_batch_star(args: tuple[int, list[ReadUnit], datetime, bool, str, Path]) -> list[_UnitResult]:
    return _process_batch(*args)


def _unit_bytes(unit: ReadUnit) -> int:
    if unit.end >= 0:
        return unit.end - unit.start
    try:
        size = os.stat(unit.path).st_size
    except OSError:
        return 0
    # A gzip stream holds several times its size in text.
    return size * 5 if unit.kind == "ndjson.gz" else size


def _batches(units: list[ReadUnit], limit: int | None = None) -> list[list[ReadUnit]]:
    """Consecutive units grouped up to about ``limit`` (default :data:`UNIT_BYTES`) bytes of input each."""
    limit = UNIT_BYTES if limit is None else limit
    batches: list[list[ReadUnit]] = []
    current: list[ReadUnit] = []
    size = 0
    for unit in units:
        n = _unit_bytes(unit)
        if current and size + n > limit:
            batches.append(current)
            current, size = [], 0
        current.append(unit)
        size += n
    if current:
        batches.append(current)
    return batches


def _stage_table_read(staging: Path, read: TableRead, part: str) -> int:
    """Stage what a table read holds as one part; return its quarantine rows."""
    for table, rows in read.rows.items():
        _stage_parts(staging, table, read.frames.get(table, []), rows, {read.source_file: 0}, part)
    _stage(
        staging,
        "quarantine",
        [
            (read.source_kind, read.source_file, number, None, ident, raw, code, reason)
            for number, ident, raw, code, reason in read.rejects
        ],
        part,
    )
    return len(read.rejects)


def unread_file(path: Path, source_file: str, spill: Spill | None = None) -> TableRead:
    """A landing-zone file no reader takes, as one quarantine row that says where its kind belongs."""
    read = TableRead("other", source_file, spill=spill)
    if source_file.startswith("fhir/"):
        reason = "file is not read: FHIR files end in .ndjson, .ndjson.gz or .json"
    else:
        reason = ("file is not read: a landing zone holds FHIR files under fhir/ and tables under notes/, genomics/ "
                  "and imaging/ (move it there, or out of the landing zone)")
    read.reject_file(FileError("unread_file", reason), path)
    return read


def _read_and_stage(
    staging: Path, read: Callable[[Path, str, Spill], TableRead], path: Path, rel: str, part: str
) -> _UnitResult:
    """Read a notes, genomics or imaging table, staging its rows a batch at a time (parts
    ``<part>-00000``, ``<part>-00001``, ...); a file rejected whole voids the parts staged before."""
    parts: list[str] = []
    quarantined = 0

    def spill(batch: TableRead) -> None:
        nonlocal quarantined
        parts.append(f"{part}-{len(parts):05d}")
        quarantined += _stage_table_read(staging, batch, parts[-1])
        batch.empty()

    table_read = read(path, rel, spill)
    if table_read.whole_file_rejected:
        for name in parts:
            for folder in staging.iterdir():
                (folder / f"{name}.arrow").unlink(missing_ok=True)
        quarantined = 0
    quarantined += _stage_table_read(staging, table_read, f"{part}-{len(parts):05d}")
    return _UnitResult(table_read.source_file, table_read.records_in, quarantined)


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------


BULK_MANIFEST = "manifest.json"
"""The Bulk Data export's manifest (its ``transactionTime`` and the files it wrote): it lies beside
the NDJSON files it lists, and is no FHIR record."""
LANDED_MARKER = "_SUCCESS"
"""The empty file a lander writes into a batch after its last file (as Hadoop and Spark writers do)."""
SIMULATOR_FILES = ("simulation.json", "truth.parquet")
"""What the simulator writes beside a landing zone's folders (its settings, and the truth models are
measured against); not read when ``simulation.json`` is there."""


@dataclass(frozen=True)
class BulkManifest:
    """What a Bulk Data export's ``manifest.json`` says: when the export was taken and the files it wrote."""

    path: str
    transaction_time: datetime | None
    # (file name, records listed or None), from each ``output`` entry's ``url`` and ``count``.
    files: tuple[tuple[str, int | None], ...]
    # The same of the ``error`` entries (OperationOutcome files), which a lander may copy too.
    error_files: tuple[tuple[str, int | None], ...]
    # Why the manifest, or part of it, could not be read.
    problems: tuple[str, ...]


def read_bulk_manifest(path: Path, source_file: str, zone: str = SITE_ZONE) -> BulkManifest | None:
    """Read a Bulk Data manifest; what cannot be read is listed in ``problems``, never raised.

    None when the file is JSON but no Bulk manifest (neither ``transactionTime`` nor ``output``: a
    lander's own list, say). Text that is not JSON is a problem: a manifest copied part-way.
    """
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return BulkManifest(source_file, None, (), (), (f"{source_file} is not valid JSON (copied part-way?)",))
    if not isinstance(document, dict) or not {"transactionTime", "output"} & document.keys():
        return None
    problems: list[str] = []
    stamp = document.get("transactionTime")
    transaction_time = None
    try:
        transaction_time = parse_datetime(stamp, f"{source_file} transactionTime", datetime.max, zone)
    except RecordError as err:
        problems.append(err.reason)
    lists: dict[str, list[tuple[str, int | None]]] = {"output": [], "error": []}
    for key, listed in lists.items():
        entries = document.get(key, [])
        if not isinstance(entries, list):
            problems.append(f"{source_file} {key} is not a list")
            continue
        for index, entry in enumerate(entries):
            url = entry.get("url") if isinstance(entry, dict) else None
            count = entry.get("count") if isinstance(entry, dict) else None
            name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if isinstance(url, str) else ""
            if not name:
                problems.append(f"{source_file} {key}[{index}] has no url")
                continue
            known = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None
            listed.append((name, known))
    return BulkManifest(source_file, transaction_time, tuple(lists["output"]), tuple(lists["error"]),
                        tuple(problems))


UNPARSED_REASONS = ("blank_line", "invalid_json", "not_utf8", "truncated_gzip")
"""Quarantine reasons of lines that hold no whole resource: not counted against a manifest's ``count``."""


def manifest_mismatches(manifest: BulkManifest, records: dict[str, int]) -> list[str]:
    """How the FHIR files read differ from what ``manifest`` lists. ``records``: resources read per
    source file (blank lines not counted).

    Only files in the manifest's folder and below are compared (two exports side by side each
    have their own). A listed file is matched by name (the URL's last part: the URLs are the
    server's), also when the lander gzipped it or unzipped it. Servers that name files by opaque
    URLs (``.../Binary/101``) leave nothing to match by name: then the NDJSON files must be at
    least as many as the ``output`` entries, and, when every entry (``error`` files included) has
    a ``count``, hold as many records in all.
    """
    folder = manifest.path.rsplit("/", 1)[0] + "/" if "/" in manifest.path else ""
    by_name: dict[str, int] = defaultdict(int)
    for source_file, read in records.items():
        if source_file.startswith(folder):
            by_name[source_file.rsplit("/", 1)[-1]] += read
    found = list(manifest.problems)
    opaque = [(name, listed) for name, listed in manifest.files if fhir_kind(Path(name)) is None]
    named = [(name, listed) for name, listed in manifest.files if fhir_kind(Path(name)) is not None]
    for name, listed in named:
        forms = (name, f"{name}.gz", name.removesuffix(".gz"))
        present = [form for form in dict.fromkeys(forms) if form in by_name]
        if not present:
            found.append(f"{name}: listed in {manifest.path}, not in the landing zone")
        elif listed is not None and (read := by_name[present[0]]) != listed:
            found.append(f"{name}: {read} records, {manifest.path} lists {listed}")
    if opaque:
        ndjson = {name: count for name, count in by_name.items() if fhir_kind(Path(name)) in ("ndjson", "ndjson.gz")}
        if len(ndjson) < len(manifest.files):
            found.append(f"{len(ndjson)} NDJSON files in the landing zone, {manifest.path} lists "
                         f"{len(manifest.files)}")
        counts = [listed for _, listed in (*manifest.files, *manifest.error_files)]
        if all(count is not None for count in counts):
            expected = sum(count for count in counts if count is not None)
            if sum(ndjson.values()) != expected:
                found.append(f"{sum(ndjson.values())} NDJSON records in the landing zone, {manifest.path} lists "
                             f"{expected}")
    return found


SIDE_TABLE_FOLDERS = ("notes", "genomics", "imaging")
"""The landing zone's folders of tables (not FHIR): their rows carry no version."""


def _discover(landing_dir: Path) -> _Landing:
    """Find the landing zone's files, sorted by path (the order duplicates resolve in). A file no
    reader takes is listed as ``unread`` (one quarantine row each), so that a folder named
    ``note/`` or a CSV put among the FHIR files is seen, not left out without a trace."""
    landing = _Landing()

    def files(folder: Path) -> list[Path]:
        # A lander's marker is no data in any folder: Spark and Hadoop writers leave one in each
        # folder they write, beside the one that says the whole batch has landed.
        return sorted(p for p in folder.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and p.name != LANDED_MARKER)

    def rel(path: Path) -> str:
        return path.relative_to(landing_dir).as_posix()

    fhir_root = landing_dir / "fhir"
    other = set(SIDE_TABLE_FOLDERS)
    every = files(landing_dir)
    if fhir_root.is_dir():
        candidates = [p for p in every if p.relative_to(landing_dir).parts[0] == "fhir"]
    else:
        # A bare export folder (no fhir/ sub-folder): FHIR files anywhere but in the tables' folders.
        candidates = [p for p in every if p.relative_to(landing_dir).parts[0] not in other]
    landing.fhir = [(p, rel(p)) for p in candidates if fhir_kind(p) is not None and p.name.lower() != BULK_MANIFEST]
    manifests = [p for p in candidates if p.name.lower() == BULK_MANIFEST]
    if not manifests and (landing_dir / BULK_MANIFEST).is_file():
        manifests = [landing_dir / BULK_MANIFEST]
    landing.manifests = [(p, rel(p)) for p in manifests]
    taken = {path for path, _ in landing.fhir} | set(manifests)
    if (landing_dir / SIMULATOR_FILES[0]).is_file():
        taken |= {landing_dir / name for name in SIMULATOR_FILES}
    landing.unread = [(p, rel(p)) for p in every
                      if p not in taken and p.relative_to(landing_dir).parts[0] not in other]
    for name in sorted(other):
        folder = landing_dir / name
        if folder.is_dir():
            # Every file, whatever its format: one the readers cannot read is one quarantine row
            # (a .tsv.gz panel), not a feed left out unseen.
            found = [(p, p.relative_to(landing_dir).as_posix()) for p in files(folder)]
            setattr(landing, name, found)
    return landing


# ------------------------------------------------------------------------------------------------
# Finalizing: duplicates, orphans, accounting
# ------------------------------------------------------------------------------------------------


def _empty(table: str) -> pl.LazyFrame:
    return pl.from_arrow(STAGED_TABLES[table].empty_table()).lazy()  # type: ignore[union-attr]


def _staged_parts(staging: Path, table: str) -> list[Path]:
    """A table's staged parts, in part order (none when nothing was staged for it)."""
    folder = staging / table
    return sorted(folder.glob("*.arrow")) if folder.is_dir() else []


def _staged_bytes(staging: Path, table: str) -> int:
    return sum(part.stat().st_size for part in _staged_parts(staging, table))


def _staged(staging: Path, table: str) -> pl.LazyFrame:
    parts = _staged_parts(staging, table)
    return pl.scan_ipc(parts, glob=False) if parts else _empty(table)


_HIGH_CARDINALITY = re.compile(r"(_id|^text|_json|_sha256|^source|text_value)$")


def _sink_table(frame: pl.LazyFrame, path: Path, schema: pa.Schema) -> Path:
    """:func:`features.io.sink_parquet_atomic` with cheaper encoding: no dictionary for columns of
    (nearly) unique values (ids, texts) and min/max statistics for non-text columns only. Both
    cost about as much as the rest of the write on the large tables and serve no reader here.
    """
    dictionary = [name for name in schema.names if not _HIGH_CARDINALITY.search(name)]
    statistics = [f.name for f in schema if not (pa.types.is_string(f.type) or pa.types.is_list(f.type))]
    return sink_parquet_atomic(frame, path, schema, use_dictionary=dictionary, write_statistics=statistics)


def _repeated_ids(staged: pl.LazyFrame, ids: list[str]) -> pl.LazyFrame:
    """The ids that may name records at two places: a superset of the duplicated ids.

    Ids and places are compared by hash (a collision only adds an id), so that the exact search
    for duplicates, with its sort of every record by place, runs on these ids alone: in a clean
    export, on none.
    """
    hashed = staged.select(
        pl.struct(ids).hash().alias("__id"), pl.struct("source_file", "record_number").hash().alias("__at"), *ids
    )
    repeated = hashed.select("__id", "__at").unique().group_by("__id").len().filter(pl.col("len") > 1)
    return hashed.join(repeated, on="__id", how="semi").select(ids).unique()


def _drops(
    frame: pl.DataFrame | pl.LazyFrame, resource_type: pl.Expr, resource_id: pl.Expr, reason_code: pl.Expr,
    reason: pl.Expr,
) -> pl.DataFrame:
    """Records dropped while finishing the tables, in the form the quarantine takes them: where
    each was read, what it is, and why."""
    return frame.lazy().select(
        "source_file",
        "record_number",
        resource_type.cast(pl.String).alias("resource_type"),
        resource_id.cast(pl.String).alias("resource_id"),
        reason_code.alias("reason_code"),
        reason.alias("reason"),
    ).collect()


_NOT_IN_EXPORT = ", which is not in this export (or was quarantined: see its own row)"


def _newest_first(keys: pl.DataFrame, ids: list[str], versions: pl.LazyFrame) -> pl.DataFrame:
    """The copies of repeated ids (``keys``: ids and where each copy was read, in file order) with
    their versions (``last_updated``, ``version_id``, and ``version_rank``, by which versionIds
    compare), the copy to keep of each id first.

    An export that holds a resource twice (two pages of a Bulk export, a Bundle beside the NDJSON,
    a record amended after the first extract) holds an older and a newer copy: the newer one has
    the death, the corrected code or the refuted diagnosis. So the copy kept is the latest by
    ``meta.lastUpdated`` (UTC instants); then by the highest ``meta.versionId`` (compared as whole
    numbers when every copy that gives one gives a whole number, else as text); then the first in
    file order, as for copies that state no version. A copy that states a version ranks before one
    that does not: the order must be one order over all copies, and only a stated version can show
    that a copy is newer.
    """
    location = ["source_file", "record_number"]
    stated = versions.join(keys.lazy().select(location), on=location, how="semi").collect()
    copies = keys.join(stated, on=location, how="left", maintain_order="left")
    version = pl.col("version_id")
    whole = version.str.contains("^[0-9]+$")
    numeric = whole.fill_null(True).all().over(ids)
    # Whole numbers of any length compare as text once their leading zeros are cut and they are
    # padded to one width (a FHIR id has at most 64 characters).
    rank = pl.when(numeric).then(version.str.strip_chars_start("0").str.zfill(64)).otherwise(version)
    return copies.with_columns(version_rank=rank).sort(
        ["last_updated", "version_rank", *location], descending=[True, True, False, False], nulls_last=True,
        maintain_order=True,
    )


def _instant_text(column: str) -> pl.Expr:
    """A UTC time column as a FHIR instant (``2025-05-31T22:00:00Z``), for quarantine reasons."""
    return pl.col(column).dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")


def _deleted_copies(staged: pl.LazyFrame, ids: list[str], resource_type: pl.Expr, deletions: pl.LazyFrame,
                    versions: pl.LazyFrame) -> pl.DataFrame:
    """The copies of a table's resources that a Bundle's DELETE comes after, one row per copy
    (``source_file``, ``record_number``, ``ids``) with the first such deletion (``deleted_by_file``,
    ``deleted_by_record``).

    A deletion is one more version of its resource, ordered as copies are: a copy whose
    ``meta.lastUpdated`` is after the deleting Bundle's time (its ``meta.lastUpdated`` or
    ``timestamp``) was re-created since and stays; without both times, file order (the landing
    order) decides. A copy in the deleting Bundle itself always stays: a transaction applies its
    DELETEs before its POSTs and PUTs. A withdrawal (``withdrawn``: a version marked
    entered-in-error) is ordered the same way, but by record order within its own file too.
    """
    location = ["source_file", "record_number"]
    targets = deletions.select(
        pl.col("resource_type").alias("__type"), pl.col("resource_id").alias("__id"), "deleted_at",
        pl.col("source_file").alias("deleted_by_file"), pl.col("record_number").alias("deleted_by_record"),
        "withdrawn",
    )
    updated = pl.col("last_updated")
    same_file = pl.col("source_file") == pl.col("deleted_by_file")
    earlier = (pl.col("source_file") < pl.col("deleted_by_file")) | (
        pl.col("withdrawn") & same_file & (pl.col("record_number") < pl.col("deleted_by_record")))
    after_deletion = (
        pl.when(updated.is_not_null() & pl.col("deleted_at").is_not_null())
        .then(updated <= pl.col("deleted_at"))
        .otherwise(earlier)
    )
    return (
        staged.with_columns(resource_type.alias("__type"), pl.col(ids[-1]).cast(pl.String).alias("__id"))
        .join(targets, on=["__type", "__id"], how="inner")
        .join(versions.select(*location, "last_updated"), on=location, how="left")
        .filter((~same_file | pl.col("withdrawn")) & after_deletion)
        .sort([*location, "deleted_by_file", "deleted_by_record"])
        .group_by(location, maintain_order=True)
        .agg(pl.col(c).first() for c in dict.fromkeys([*ids, "deleted_by_file", "deleted_by_record", "withdrawn"]))
        .collect()
    )


def _winners(keys: pl.DataFrame, ids: list[str]) -> pl.DataFrame:
    """Each id's first copy in ``keys`` (newest first), as ``kept_*`` columns."""
    return keys.group_by(ids, maintain_order=True).agg(
        *([pl.col("patient_id").first().alias("kept_patient")] if "patient_id" in keys.columns
          and "patient_id" not in ids else []),
        pl.col("source_file").first().alias("kept_file"),
        pl.col("record_number").first().alias("kept_record"),
        pl.col("last_updated").first().alias("kept_updated"),
        pl.col("version_id").first().alias("kept_version"),
        pl.col("version_rank").first().alias("kept_rank"),
    )


def _losers(keys: pl.DataFrame, ids: list[str]) -> pl.DataFrame:
    """The rows of ``keys`` whose id's first copy is another record, with that record as ``kept_*``."""
    return keys.join(_winners(keys, ids), on=ids, how="left", nulls_equal=True).filter(
        (pl.col("source_file") != pl.col("kept_file")) | (pl.col("record_number") != pl.col("kept_record"))
    )


def _dropped_copies(keys: pl.DataFrame, ids: list[str], location: list[str]) -> pl.DataFrame:
    """The rows of ``keys`` (the copies of repeated ids, newest first) of the records to drop, each
    with the kept copy of its id as ``kept_*``.

    A record is kept or dropped whole. Where a record holds several ids (a wide genomics row, one
    per feature), a record that loses one id is dropped, and the winners of its other ids are
    chosen again among the records left: a panel that repeats one feature of an earlier file must
    not, once dropped, still win the features it alone gave a later file (which would then be
    dropped citing a copy that is not kept, and the patient lose the value). Each round drops the
    records beaten by a record that loses nothing, so the first record still contested is dropped
    every round, and the rounds end.
    """
    dropped_locations = keys.clear().select(location)
    while True:
        # The order of ``keys`` (newest first) decides the winners: every join keeps it.
        alive = keys.join(dropped_locations, on=location, how="anti", maintain_order="left")
        losers = _losers(alive, ids)
        if losers.height == 0:
            break
        beaten_by_a_survivor = losers.join(
            losers.select(pl.col("source_file").alias("kept_file"), pl.col("record_number").alias("kept_record")),
            on=["kept_file", "kept_record"], how="anti", maintain_order="left")
        dropped_locations = pl.concat([dropped_locations, beaten_by_a_survivor.select(location).unique()])
    # Each dropped row cites the kept copy of its id; a row whose id no kept record holds cites none
    # (its record is dropped for another of its ids, whose kept copy it cites).
    return (keys.join(dropped_locations, on=location, how="semi", maintain_order="left")
            .join(_winners(alive, ids), on=ids, how="inner", nulls_equal=True, maintain_order="left"))


def _finalize_table(
    table: str, staged: pl.LazyFrame, patient_ids: pl.Series | None, warehouse_dir: Path, versions: pl.LazyFrame,
    deletions: pl.LazyFrame | None = None, quarantined_patients: pl.Series | None = None,
) -> tuple[int, pl.DataFrame, dict[str, int]]:
    """Write one final table; return its row count, the records dropped (with reason) and the
    records it holds per source file (counted from the written file, for the accounting).

    Of the copies of one id, the newest is kept (:func:`_newest_first`, by the staged
    ``record_versions``); each other copy is a ``duplicate`` quarantine row naming the copy kept and why,
    or an ``id_conflict`` row where it is another patient's and no version tells them apart. The
    copies of a resource that a Bundle entry deletes (``deletions``) and that the deletion
    comes after (:func:`_deleted_copies`) are left out first, each a ``deleted`` quarantine row
    naming the entry; so are those a newer version marked entered-in-error withdraws (``withdrawn``
    rows of ``deletions``), each a ``withdrawn`` row. The newest copy is chosen among the others (a
    copy re-created after the deletion, say). A copy whose patient is not in the export is an
    ``orphan_reference`` row; one that states no version takes no part in choosing the copy kept.
    """
    ids = ID_COLUMNS[table]
    location = ["source_file", "record_number"]
    deleted_type = pl.col("resource_type") if "resource_type" in ids else pl.lit(DELETED_TYPE_OF_TABLE.get(table))
    deleted = None
    if deletions is not None and ("resource_type" in ids or table in DELETED_TYPE_OF_TABLE):
        withdrawn = pl.col("withdrawn")
        deleted = _drops(
            _deleted_copies(staged, ids, deleted_type, deletions, versions), deleted_type, pl.col(ids[-1]),
            pl.when(withdrawn).then(pl.lit("withdrawn")).otherwise(pl.lit("deleted")),
            deleted_type + pl.lit("/") + pl.col(ids[-1]).cast(pl.String)
            + pl.when(withdrawn).then(pl.lit(" is withdrawn by ")).otherwise(pl.lit(" is deleted by "))
            + pl.col("deleted_by_file") + pl.lit(" entry ") + pl.col("deleted_by_record").cast(pl.String)
            + pl.when(withdrawn).then(pl.lit(" (a later version, entered-in-error)"))
            .otherwise(pl.lit(" (request DELETE)")),
        )
    remaining = staged if deleted is None else staged.join(deleted.lazy().select(location), on=location, how="anti")
    if quarantined_patients is None:
        quarantined_patients = pl.Series("patient_id", [], dtype=pl.String)
    unmatched = None
    if patient_ids is not None and "patient_id" in staged.collect_schema().names():
        unmatched = (
            staged.filter(~pl.col("patient_id").is_in(patient_ids.implode()))
            .group_by(location, maintain_order=True)
            .agg(pl.col(c).first() for c in dict.fromkeys([*ids, "patient_id"]))
            .collect()
        )
        # A copy of no known patient that states no version cannot be the newer copy: it must not
        # win an id from a copy that is usable (an orphan note row listed before its patient's).
        unversioned = unmatched.lazy().select(location).join(versions.select(location), on=location, how="anti")
        remaining = remaining.join(unversioned, on=location, how="anti")
    candidates = remaining.join(_repeated_ids(remaining, ids), on=ids, how="semi", nulls_equal=True)
    # Whose each copy is, where the id does not say: a table's note or study id held by two
    # patients is a clash of ids (two feeds numbering alike), not a copy.
    owner = ["patient_id"] if "patient_id" in staged.collect_schema().names() and "patient_id" not in ids else []
    keys = candidates.select(*dict.fromkeys([*ids, *location, *owner])).unique(subset=[*ids, *location],
                                                                               keep="first").sort(location).collect()
    if keys.height:
        keys = _newest_first(keys, ids, versions)
    else:
        keys = keys.with_columns(
            last_updated=pl.lit(None, dtype=pl.Datetime("us")),
            version_id=pl.lit(None, dtype=pl.String),
            version_rank=pl.lit(None, dtype=pl.String),
        )
    dropped = _dropped_copies(keys, ids, location)
    # Why the kept copy won: the first of its sort keys that differs from this copy's.
    why = (
        pl.when(pl.col("kept_updated").ne_missing(pl.col("last_updated")))
        .then(
            pl.lit("newer: lastUpdated ")
            + _instant_text("kept_updated")
            + pl.coalesce(pl.lit(", this copy's ") + _instant_text("last_updated"), pl.lit(", this copy has none"))
        )
        .when(pl.col("kept_rank").ne_missing(pl.col("version_rank")))
        .then(
            pl.lit("newer: versionId ")
            + pl.col("kept_version")
            + pl.coalesce(pl.lit(", this copy's ") + pl.col("version_id"), pl.lit(", this copy has none"))
        )
        .otherwise(pl.lit("first in file order"))
    )
    rtype = pl.col("resource_type") if "resource_type" in ids else pl.lit(RESOURCE_TYPE_OF_TABLE.get(table))
    label = (
        pl.when(rtype.is_not_null())
        .then(rtype + pl.lit("/") + pl.col(ids[-1]).cast(pl.String))
        .otherwise(
            pl.lit(f"{table} row ")
            + pl.concat_str([pl.col(c).cast(pl.String) for c in ids], separator="/", ignore_nulls=True)
        )
    )
    # A copy whose patient is not the kept copy's is a clash of ids, unless the kept copy is a
    # newer version of the same FHIR resource (a later version may move a record to another
    # patient). A side table's row has no version: it and a DocumentReference of its id always clash.
    newer = pl.col("kept_updated").ne_missing(pl.col("last_updated")) | pl.col("kept_rank").ne_missing(
        pl.col("version_rank"))
    from_table = pl.any_horizontal(pl.col(c).str.starts_with(f"{folder}/")
                                   for c in ("source_file", "kept_file") for folder in SIDE_TABLE_FOLDERS)
    clash = ((pl.col("patient_id") != pl.col("kept_patient")) & (~newer | from_table)) if owner else pl.lit(False)
    duplicates = _drops(
        dropped,
        rtype,
        pl.col(ids[-1]),
        pl.when(clash).then(pl.lit("id_conflict")).otherwise(pl.lit("duplicate")),
        pl.when(clash).then(
            label + pl.lit(" of Patient/") + (pl.col("patient_id") if owner else pl.lit(""))
            + pl.lit(" has the id of Patient/") + (pl.col("kept_patient") if owner else pl.lit(""))
            + pl.lit("'s in ") + pl.col("kept_file") + pl.lit(" record ") + pl.col("kept_record").cast(pl.String)
            + pl.lit(", which is kept (") + why
            + pl.lit("): ids must be unique across patients (feeds that number their records alike need a "
                     "prefix each)")
        ).otherwise(
        pl.lit("duplicate of ")
        + label
        + pl.lit(": the copy in ")
        + pl.col("kept_file")
        + pl.lit(" record ")
        + pl.col("kept_record").cast(pl.String)
        + pl.lit(" is kept (")
        + why
        + pl.lit(")")),
    )
    # A record is kept or dropped whole, and counted once: a wide genomics row holds one row per
    # feature, and any feature seen before drops the row (no patient is left with half a panel).
    duplicates = duplicates.unique(subset=location, keep="first", maintain_order=True)
    if deleted is not None:
        duplicates = pl.concat([duplicates, deleted])
    drop = duplicates.select(location)
    if unmatched is not None:
        orphans = _drops(
            unmatched.join(drop, on=location, how="anti", maintain_order="left"),
            rtype,
            pl.col(ids[-1]),
            pl.lit("orphan_reference"),
            pl.lit(f"{table} record refers to Patient/")
            + pl.col("patient_id")
            + pl.when(pl.col("patient_id").is_in(quarantined_patients.implode()))
            .then(pl.lit(", which was quarantined (see its own row)"))
            .otherwise(pl.lit(", which is not in this export")),
        )
        drop_all = pl.concat([duplicates, orphans])
    else:
        drop_all = duplicates
    final = staged
    if drop_all.height:
        final = staged.join(drop_all.select(location).lazy(), on=location, how="anti", maintain_order="left")
    path = _sink_table(final, warehouse_dir / f"{table}.parquet", INTERNAL_TABLES[table])
    return pq.read_metadata(path).num_rows, drop_all, _records_out(path)


def resolve_medication_references(
    references: pl.LazyFrame, medication_codes: Path
) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Give the medication records that name their drug by reference their Medication's codes.

    Returns the ``medications`` rows of the records whose Medication is in ``medication_codes``
    (the final table), and a quarantine row (as :func:`_finalize_table` drops them) for each of
    the others: an order without its drug cannot be used.
    """
    codes = pl.scan_parquet(medication_codes, glob=False).select("medication_id", "code", "codes", "display")
    joined = references.join(codes, on="medication_id", how="left", maintain_order="left")
    resolved = joined.filter(pl.col("code").is_not_null()).select(INTERNAL_TABLES["medications"].names)
    unresolved = _drops(
        joined.filter(pl.col("code").is_null()),
        pl.col("resource_type"),
        pl.col("resource_id"),
        pl.lit("orphan_reference"),
        pl.col("resource_type") + pl.lit(" names its drug by Medication/") + pl.col("medication_id")
        + pl.lit(_NOT_IN_EXPORT),
    )
    return resolved, unresolved


def resolve_note_references(
    references: pl.LazyFrame, staged_binaries: pl.LazyFrame, binaries: Path
) -> tuple[pl.LazyFrame, pl.DataFrame]:
    """Give the DocumentReferences whose text is in a Binary resource that text.

    Returns the ``notes`` rows of the references whose Binary is in ``binaries`` (the final
    table: one copy per id) with text content, and a quarantine row for each of the others.
    """
    location = ["source_file", "record_number"]
    kept = staged_binaries.join(pl.scan_parquet(binaries, glob=False).select(location), on=location, how="semi")
    joined = references.join(
        kept.select("binary_id", "content_type", "text", "text_sha256"), on="binary_id", how="left",
        maintain_order="left",
    )
    # A blank text says nothing (a notes table refuses one too).
    has_text = pl.col("text").str.strip_chars().str.len_chars().fill_null(0) > 0
    resolved = joined.filter(has_text).select(INTERNAL_TABLES["notes"].names)
    named = pl.lit("DocumentReference's text is Binary/") + pl.col("binary_id")
    missing = pl.col("content_type").is_null()
    unresolved = _drops(
        joined.filter(~has_text),
        pl.lit("DocumentReference"),
        pl.col("note_id"),
        pl.when(missing).then(pl.lit("orphan_reference")).otherwise(pl.lit("no_note_text")),
        pl.when(missing)
        .then(named + pl.lit(_NOT_IN_EXPORT))
        .when(pl.col("text").is_not_null())
        .then(named + pl.lit(", whose text is blank"))
        .when(pl.col("content_type").str.strip_chars().str.to_lowercase().str.starts_with("text/"))
        .then(named + pl.lit(", which has no data"))
        .otherwise(named + pl.lit(", of content type ") + pl.col("content_type") + pl.lit("; only text/* is read")),
    )
    return resolved, unresolved


def _raw_texts(
    dropped: pl.DataFrame, staged: dict[str, pl.LazyFrame], landing_dir: Path, fhir_kinds: dict[str, str]
) -> list[str]:
    """The raw text of each dropped record: re-read from its FHIR file or its table file (the row as
    the file holds it), or else its staged row."""
    texts: dict[tuple[str, int], str] = {}
    for (source_file,), group in dropped.group_by("source_file", maintain_order=True):
        numbers = set(group["record_number"].to_list())
        kind = fhir_kinds.get(str(source_file))
        if kind is not None:
            for number, text in fetch_raw(landing_dir / str(source_file), kind, numbers, RAW_LIMIT).items():
                texts[(str(source_file), number)] = text
        elif str(source_file).split("/", 1)[0] in SIDE_TABLE_FOLDERS:
            for number, text in fetch_rows(landing_dir / str(source_file), numbers).items():
                texts[(str(source_file), number)] = text
        else:
            table = str(group["table"][0])
            rows = (
                staged[table]
                .filter((pl.col("source_file") == source_file) & pl.col("record_number").is_in(list(numbers)))
                .drop("embedding", strict=False)
                .collect()
            )
            for row in rows.iter_rows(named=True):
                texts.setdefault(
                    (str(source_file), row["record_number"]), orjson.dumps(row, default=str).decode()[:RAW_LIMIT]
                )
    return [texts.get((f, n), "") for f, n in zip(dropped["source_file"], dropped["record_number"], strict=True)]


def _records_out(path: Path) -> dict[str, int]:
    """Distinct records (source file and record number) per source file in a written table."""
    per_file = (
        pl.scan_parquet(path, glob=False).select("source_file", "record_number").unique()
        .group_by("source_file").len().collect()
    )
    return dict(per_file.iter_rows())


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _check_dirs(landing_dir: Path, warehouse_dir: Path) -> None:
    _check_landing(landing_dir)
    _check_output(warehouse_dir)


def _check_landing(landing_dir: Path) -> None:
    if not landing_dir.is_dir():
        raise LandingZoneError(f"landing zone {landing_dir} is not a folder (missing or not a directory)")


def _check_output(warehouse_dir: Path) -> None:
    try:
        warehouse_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LandingZoneError(f"output folder {warehouse_dir} cannot be created: {exc.strerror or exc}") from None
    if not os.access(warehouse_dir, os.W_OK | os.X_OK):
        raise LandingZoneError(f"output folder {warehouse_dir} is not writable")


@contextmanager
def _writer_lock(warehouse_dir: Path, action: str, wait_seconds: float = 0.0) -> Iterator[None]:
    """Hold the writer lock of ``warehouse_dir`` while an ingest or a promotion writes it.

    Two writers of one warehouse would interleave their files (each file is replaced whole, but the
    set would mix two exports), so a second one waits up to ``wait_seconds`` and is then refused,
    not queued: whatever started it can try again. The lock is an advisory ``flock`` on
    ``.ingest.lock``, which the operating system releases when its holder exits, killed or not. So
    once it is held, any staging folder or half-written file in the warehouse was left by a run
    that died, and is deleted.

    Raises
    ------
    LandingZoneError
        When another process still holds the lock after ``wait_seconds``.
    """
    with (warehouse_dir / LOCK_FILE).open("a+b") as handle:
        if (holder := take_pid_lock(handle, wait_seconds)) is not None:
            waited = f" for {wait_seconds:g} s" if wait_seconds else ""
            raise LandingZoneError(
                f"{action}: warehouse {warehouse_dir} is being written by another ingest or promotion "
                f"(process {holder} holds {LOCK_FILE}{waited}); wait for it to finish, or write elsewhere"
            )
        remove_leftovers(warehouse_dir)
        yield


@contextmanager
def warehouse_read(warehouse_dir: Path) -> Iterator[None]:
    """Keep ``warehouse_dir``'s tables from being replaced while the caller reads them.

    Readers scan tables lazily: a table replaced between the plan (which reads its footer) and the
    read is read with the old footer, and fails ("page error") or mixes two exports. Readers hold a
    shared ``flock`` on ``.read.lock``; an ingest or a promotion takes it exclusively while it puts
    its files in place (a few renames), so it waits for the readers of the moment to finish and
    new readers wait for it. A warehouse folder this process cannot create the file in (another
    user's, read-only) is read without it.
    """
    path = Path(warehouse_dir) / READ_LOCK_FILE
    handle: IO[bytes] | None
    try:
        handle = path.open("a+b") if Path(warehouse_dir).is_dir() else None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        handle = path.open("rb") if path.is_file() else None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        yield


@contextmanager
def _placing_files(warehouse_dir: Path) -> Iterator[None]:
    """Hold the warehouse's readers off (:func:`warehouse_read`) while files are put in place:
    waits for those reading now to finish."""
    with (Path(warehouse_dir) / READ_LOCK_FILE).open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def remove_leftovers(warehouse_dir: Path) -> list[str]:
    """Clear what killed ingests and promotions left in ``warehouse_dir``: staging folders and
    half-written warehouse files. Call only while holding its writer lock. Returns their names.

    An ingest killed while it put its finished files in place (its staging folder holds the
    accounting, written last) left the warehouse half old, half new: its remaining files are put
    in place first, the accounting last, as the run would have done. So are a killed promotion's,
    from the batch its ``.promoting`` names.
    """
    names = (*warehouse_files(), PROMOTED_BATCH_FILE, PROMOTING_FILE)
    removed: list[str] = []
    marker = warehouse_dir / PROMOTING_FILE
    if marker.is_file():
        ingested = Path(marker.read_text().strip())
        # A promotion killed while it linked the batch's files: link them all again. Without the
        # batch's folder (deleted since), the marker stays and readers keep refusing the warehouse.
        if (ingested / SUMMARY_FILE).is_file():
            _link_batch(ingested, warehouse_dir)
            removed.append(PROMOTING_FILE)
    for path in sorted(warehouse_dir.iterdir()):
        if path.name.startswith(STAGING_PREFIX) and path.is_dir():
            if _placing(path):
                _put_in_place(path / FINAL_FOLDER, warehouse_dir, resuming=True)
            shutil.rmtree(path)
        elif path.name.endswith(".partial") and any(path.name.startswith(f".{name}.") for name in names):
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return removed


def _placing(staging: Path) -> bool:
    """Whether an ingest's staging folder had reached putting its files in place: its accounting,
    written last, is finished."""
    return (staging / FINAL_FOLDER / SUMMARY_FILE).is_file()


def _put_in_place(final: Path, warehouse_dir: Path, resuming: bool = False) -> None:
    """Move an ingest's finished files from ``final`` into ``warehouse_dir``, one rename each
    (``final`` is inside the warehouse, on its file system), the accounting last, so that the
    summary never describes tables not yet there. ``resuming`` a killed run's moves skips the files
    it had moved already."""
    with _placing_files(warehouse_dir):
        for name in warehouse_files():
            if not resuming or (final / name).is_file():
                os.replace(final / name, warehouse_dir / name)


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Start worker processes with polars on one thread each.

    The workers already use every core between them; each one's polars thread pool (one thread
    per core, spinning while it waits for work) made a 2-worker run on 2 cores spend about a third
    more CPU time than the same work in one process. Polars reads its pool size once, from the
    environment, when it is imported, so the setting is given to the child processes through the
    environment they inherit, only while they start; this process's own polars is unaffected.
    """
    previous = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["POLARS_MAX_THREADS"]
        else:
            os.environ["POLARS_MAX_THREADS"] = previous


def _ready() -> None:
    """A worker's first task: nothing, once its interpreter has started and imported this module."""


@contextmanager
def _worker_pool(workers: int, input_bytes: int) -> Iterator[ProcessPoolExecutor | None]:
    """The processes that read the FHIR batches, started at once: each one's start (an interpreter
    and the imports, about half a second) then overlaps the planning of the read units, which
    reads every large file once to number its lines. None when one process will do (one worker
    asked for, or input for a single batch)."""
    if workers <= 1 or input_bytes <= UNIT_BYTES:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # Each submit while no worker is idle starts one more process, up to ``workers``.
        with _single_threaded_children():
            for _ in range(workers):
                pool.submit(_ready)
        yield pool


def _run_units(
    units: list[ReadUnit],
    latest: datetime,
    strict: bool,
    zone: str,
    staging: Path,
    pool: ProcessPoolExecutor | None,
    progress: Callable[[int, int], None] | None,
) -> Iterable[_UnitResult]:
    batches = _batches(units)
    starts = [0]
    for batch in batches:
        starts.append(starts[-1] + len(batch))
    jobs = [(start, batch, latest, strict, zone, staging) for start, batch in zip(starts, batches, strict=False)]
    total = len(units)
    done = map(_process_batch_star, jobs) if pool is None or len(jobs) <= 1 else pool.map(_process_batch_star, jobs)
    for job, results in zip(jobs, done, strict=True):
        yield from results
        if progress:
            progress(job[0] + len(results), total)


def ingest_landing_zone(
    landing_dir: Path,
    warehouse_dir: Path,
    strict: bool = False,
    workers: int = 2,
    export_time: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    refuse_problems: bool = False,
    min_patient_share: float = 0.0,
    site_timezone: str = SITE_ZONE,
) -> IngestSummary:
    """Ingest a landing zone into ``warehouse_dir``; return (and write) the accounting.

    Parameters
    ----------
    landing_dir
        The landing zone: ``fhir/`` (or FHIR files directly), ``notes/``, ``genomics/``,
        ``imaging/``.
    warehouse_dir
        Where the tables, ``quarantine.parquet`` and ``ingest_summary.json`` go.
    strict
        Also validate each FHIR resource fully with ``fhir.resources.R4B`` (slower).
    workers
        Processes reading FHIR in parallel; the output does not depend on it.
    export_time
        The time of the export (naive UTC, or aware): records dated later are quarantined.
        Defaults to now. FHIR records are also held to the Bulk export's ``transactionTime`` when
        the landing zone holds its ``manifest.json`` (``fhir_export_time`` in the summary).
    progress
        Called with (units done, units total) as FHIR read units finish.
    refuse_problems
        Leave the warehouse's tables as they were when the new ones have any of
        :func:`ingest_problems` (accounting, manifest, patients, dates, duplicates), as a promoted
        batch must not: for a warehouse that others read (the pipeline's), not for a folder a data
        engineer inspects.
    min_patient_share
        With ``refuse_problems``: also refuse tables with fewer patients than this share of the
        warehouse's (an export cut short; :func:`promote_warehouse`). 0 turns it off.
    site_timezone
        The site's IANA time zone (``America/Chicago``). A FHIR date (``2019-04-12``), which has
        no zone, is the site's calendar day and is known by its end there; a time without an
        offset (in FHIR, or in a notes or imaging table) is the site's wall-clock time. Times with
        an offset are read as given. Every time is stored as naive UTC.

    A ``manifest.json`` is also compared with the FHIR files read: a listed file missing, or
    holding another number of records than listed, is in the summary's ``manifest_mismatches``
    (the ingest still runs; a batch is not promoted with any).

    Raises
    ------
    LandingZoneError
        When nothing can run: the landing zone is missing or holds no file to ingest, the output
        folder is unwritable, or another ingest or promotion is writing it; with
        ``refuse_problems``, when the new tables have a problem (the warehouse keeps its tables).
        Bad records never raise: they are quarantined (a file that holds no record is one
        quarantined row).
    """
    started = time.perf_counter()
    landing_dir, warehouse_dir = Path(landing_dir), Path(warehouse_dir)
    site_zone(site_timezone)
    _check_landing(landing_dir)
    landing = _discover(landing_dir)
    manifests = [manifest for path, rel in landing.manifests
                 if (manifest := read_bulk_manifest(path, rel, site_timezone)) is not None]
    stamps = [manifest.transaction_time for manifest in manifests if manifest.transaction_time is not None]
    source = "ingest time" if export_time is None else "given"
    if export_time is None:
        export_time = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    elif export_time.tzinfo is not None:
        export_time = export_time.astimezone(UTC).replace(tzinfo=None)
    # The Bulk export's own time: an ingest run days later must not take FHIR records dated after
    # the export (a clock or feed error) as real.
    # Several exports side by side (a folder and manifest each): the latest of their times, so that
    # no export's own records are taken for later than it.
    fhir_export_time = max(stamps) if stamps else None
    if not (landing.fhir or landing.notes or landing.genomics or landing.imaging):
        # An export that failed upstream lands as an empty folder: ingested, it would replace every
        # table with an empty one and leave the warehouse with no patients.
        count = len(landing.unread)
        unread = (f", only {count} file{'s' if count > 1 else ''} no reader takes ({landing.unread[0][1]}"
                  f"{', ...' if count > 1 else ''})" if landing.unread else "")
        raise LandingZoneError(f"landing zone {landing_dir} holds no file to ingest{unread} (expected FHIR .ndjson, "
                               ".ndjson.gz or .json files, or notes/, genomics/ or imaging/ tables); the "
                               "warehouse keeps its tables")
    # Made only now: a refused landing zone leaves no empty output folder behind.
    _check_output(warehouse_dir)
    with _writer_lock(warehouse_dir, f"ingest {landing_dir}"):
        return _ingest_locked(_IngestRun(
            landing_dir, landing, warehouse_dir, strict, workers, export_time, source, fhir_export_time, manifests,
            site_timezone, min_patient_share if refuse_problems else None, progress, started,
        ))


@dataclass(frozen=True)
class _IngestRun:
    """What one :func:`ingest_landing_zone` run reads, where it writes, and how (its settings)."""

    landing_dir: Path
    landing: _Landing
    warehouse_dir: Path
    strict: bool
    workers: int
    export_time: datetime
    """Naive UTC; records dated later are quarantined."""
    export_time_source: str
    fhir_export_time: datetime | None
    """The Bulk manifests' latest ``transactionTime`` (naive UTC), when the landing zone has one."""
    manifests: list[BulkManifest]
    zone: str
    """The site's IANA time zone."""
    refuse_below_patient_share: float | None
    """Not None: tables with a problem, or fewer patients than this share, are not put in place."""
    progress: Callable[[int, int], None] | None
    started: float
    """``time.perf_counter()`` when the run started."""


def _ingest_locked(run: _IngestRun) -> IngestSummary:
    """:func:`ingest_landing_zone` once it holds the warehouse's writer lock; with
    ``refuse_below_patient_share`` (not None), tables with a problem are not put in place.

    Every output is written into a staging folder inside the warehouse (so on its file system)
    and put in place at the end by one rename per file, the accounting last: a run killed before
    then leaves the previous ingest whole, not a mix of two exports' tables.
    """
    staging = staging_dir(run.warehouse_dir, STAGING_PREFIX)
    tables_dir = staging / FINAL_FOLDER
    tables_dir.mkdir()
    placing = False
    try:
        # One embedding length for every imaging file, found on the side thread when it first reads one.
        imaging_length = functools.cache(lambda: usual_embedding_length([path for path, _ in run.landing.imaging]))
        readers: list[tuple[str, list[tuple[Path, str]], Callable[[Path, str, Spill], TableRead]]] = [
            ("notes", run.landing.notes,
             lambda p, rel, spill: read_notes_file(p, rel, run.export_time, spill, run.zone)),
            ("genomics", run.landing.genomics, read_genomics_file),
            ("imaging", run.landing.imaging,
             lambda p, rel, spill: read_imaging_file(p, rel, run.export_time, imaging_length(), spill, run.zone)),
            ("other", run.landing.unread, unread_file),
        ]
        tables = [(kind, path, rel, read) for kind, found, read in readers for path, rel in found]
        # Input size as the batching counts it (a .gz file several times its size), before planning.
        fhir_bytes = sum(_unit_bytes(ReadUnit(str(path), rel, str(fhir_kind(path)))) for path, rel in run.landing.fhir)
        # The notes, genomics and imaging tables are read on a thread while the FHIR workers run:
        # this process would otherwise wait idle for them. Their parts ("t...") sort after the
        # FHIR parts (numbers), as their folders do after fhir/.
        with _worker_pool(run.workers, fhir_bytes) as pool, ThreadPoolExecutor(max_workers=1) as side:
            side_reads = [
                (kind, side.submit(_read_and_stage, staging, read, path, rel, f"t{i:07d}"))
                for i, (kind, path, rel, read) in enumerate(tables)
            ]
            units = [unit for path, rel in run.landing.fhir for unit in plan_units(path, rel, UNIT_BYTES)]
            fhir_latest = min(run.export_time, run.fhir_export_time or run.export_time)
            results: list[tuple[str, _UnitResult]] = [
                ("fhir", result)
                for result in _run_units(units, fhir_latest, run.strict, run.zone, staging, pool, run.progress)
            ]
            results.extend((kind, job.result()) for kind, job in side_reads)

        staged = {table: _staged(staging, table) for table in TABLES}
        versions = _staged(staging, "record_versions")
        finalized = {"deletions": _finalize_table("deletions", staged["deletions"], None, tables_dir, versions)}
        # Most exports delete and withdraw nothing: then no table is searched for deleted resources.
        removals = [pl.scan_parquet(tables_dir / "deletions.parquet", glob=False).with_columns(withdrawn=False)
                    ] if finalized["deletions"][0] else []
        if _staged_parts(staging, "withdrawals"):
            removals.append(_staged(staging, "withdrawals").with_columns(withdrawn=True))
        deletions = pl.concat(removals) if removals else None
        first = ("deletions", "patients", "medication_codes", "binaries")
        finalized.update({table: _finalize_table(table, staged[table], None, tables_dir, versions, deletions)
                          for table in first[1:]})
        patient_ids = pl.read_parquet(tables_dir / "patients.parquet", columns=["patient_id"], glob=False)["patient_id"]
        # Patients whose every copy was quarantined: their records' reason says so, not "not in the export".
        # (Quarantined when read, or deleted by a Bundle entry when the patients were finished.)
        read_quarantine = _staged(staging, "quarantine").collect()  # what reading quarantined; final now
        quarantined_patients = pl.concat([
            read_quarantine
            .filter((pl.col("resource_type") == "Patient") & pl.col("resource_id").is_not_null())
            .select(pl.col("resource_id").alias("patient_id")),
            finalized["patients"][1].select(pl.col("resource_id").alias("patient_id")),
        ]).unique()["patient_id"]
        quarantined_patients = quarantined_patients.filter(~quarantined_patients.is_in(patient_ids.implode()))
        orders, unresolved_orders = resolve_medication_references(
            _staged(staging, "medication_references"), tables_dir / "medication_codes.parquet"
        )
        staged["medications"] = pl.concat([staged["medications"], orders])
        notes, unresolved_notes = resolve_note_references(
            _staged(staging, "note_references"), staged["binaries"], tables_dir / "binaries.parquet"
        )
        staged["notes"] = pl.concat([staged["notes"], notes])
        # Records of a patient merged into another (an MPI merge, Patient.link replaced-by) are
        # the survivor's.
        merged = merged_patients(
            pl.read_parquet(tables_dir / "patients.parquet", columns=["patient_id", "replaced_by"], glob=False)
        )
        if merged:
            for table in TABLES:
                if table not in first and "patient_id" in INTERNAL_TABLES[table].names:
                    staged[table] = staged[table].with_columns(pl.col("patient_id").replace(merged))
        # The other tables only need the patients, the drug codes and the Binary texts: they are
        # written side by side (polars and the Parquet writer run outside the interpreter lock, so
        # threads share the cores). Largest first, so that the threads end together rather than on
        # the largest alone.
        others = sorted((table for table in TABLES if table not in first), key=lambda t: -_staged_bytes(staging, t))
        with ThreadPoolExecutor(max_workers=max(1, run.workers)) as threads:
            pending = {
                table: threads.submit(_finalize_table, table, staged[table], patient_ids, tables_dir, versions,
                                      deletions, quarantined_patients)
                for table in others
            }
            finalized.update({table: job.result() for table, job in pending.items()})
        table_rows = {table: finalized[table][0] for table in TABLES}
        dropped = [
            drops.with_columns(table=pl.lit(table))
            for table, drops in [
                *((t, finalized[t][1]) for t in TABLES),
                ("medications", unresolved_orders),
                ("notes", unresolved_notes),
            ]
            if drops.height
        ]
        events_path = _sink_table(build_events(tables_dir, run.zone), tables_dir / "events.parquet", EVENTS)
        table_rows["events"] = pq.read_metadata(events_path).num_rows
        codes_path = _sink_table(build_codes(tables_dir), tables_dir / "codes.parquet", CODES)
        table_rows["codes"] = pq.read_metadata(codes_path).num_rows

        fhir_kinds = {rel: str(fhir_kind(path)) for path, rel in run.landing.fhir}
        kind_of_file = {result.source_file: kind for kind, result in results}
        quarantine = read_quarantine
        if dropped:
            extra = pl.concat(dropped)
            extra = extra.with_columns(
                source_kind=pl.col("source_file").replace_strict(kind_of_file, default="fhir"),
                raw_text=pl.Series(_raw_texts(extra, staged, run.landing_dir, fhir_kinds), dtype=pl.String),
            )
            quarantine = pl.concat([quarantine, extra.select(QUARANTINE.names)], how="vertical_relaxed")
        quarantine = quarantine.sort("source_file", "record_number", "reason_code", maintain_order=True)
        write_parquet_atomic(quarantine.to_arrow().cast(QUARANTINE), tables_dir / "quarantine.parquet")
        table_rows["quarantine"] = quarantine.height

        records_in: dict[str, int] = defaultdict(int)
        for _, result in results:
            records_in[result.source_file] += result.records_in
        quarantined = dict(quarantine.group_by("source_file").len().iter_rows())
        # Lines that hold no whole resource (blank, cut short, not UTF-8, the end of a cut .gz): a copy
        # cut in the middle of its last line must not pass for complete against the manifest's count.
        unparsed = dict(quarantine.filter(pl.col("reason_code").is_in(UNPARSED_REASONS)).group_by("source_file").len()
                        .iter_rows())
        out: dict[str, int] = defaultdict(int)
        for table in TABLES:
            for source_file, n in finalized[table][2].items():
                out[source_file] += n
        files = tuple(
            FileAccount(kind_of_file[name], name, records_in[name], out.get(name, 0), quarantined.get(name, 0))
            for name in sorted(records_in)
        )
        by_reason = dict(
            sorted(quarantine.group_by("reason_code").len().iter_rows(), key=lambda item: (-item[1], item[0]))
        )
        summary = IngestSummary(
            landing_dir=str(run.landing_dir),
            warehouse_dir=str(run.warehouse_dir),
            export_time=run.export_time,
            strict=run.strict,
            files=files,
            table_rows=table_rows,
            quarantined_by_reason=by_reason,
            duplicates=by_reason.get("duplicate", 0),
            fhir_resources_in=sum(result.records_in for kind, result in results if kind == "fhir"),
            elapsed_seconds=round(time.perf_counter() - run.started, 3),
            export_time_source=run.export_time_source,
            fhir_export_time=run.fhir_export_time,
            site_timezone=run.zone,
            manifest_mismatches=tuple(
                mismatch for manifest in run.manifests
                for mismatch in manifest_mismatches(
                    manifest, {name: records_in[name] - unparsed.get(name, 0) for name in fhir_kinds})
            ),
        )
        write_bytes_atomic(summary.to_json(), tables_dir / SUMMARY_FILE)
        if run.refuse_below_patient_share is not None:
            problems = ingest_problems(tables_dir)
            if share_problem := too_few_patients(summary, run.warehouse_dir, run.refuse_below_patient_share):
                problems.append(share_problem)
            if problems:
                raise LandingZoneError(f"ingest {run.landing_dir}: {first_of(problems)}; the warehouse keeps its "
                                       "tables (cohortcast ingest into another folder shows the new ones)")
        # The warehouse still holds the previous ingest, whole. Cut short from here on, the staging
        # folder stays, and the next writer finishes the job (remove_leftovers).
        placing = True
        _put_in_place(tables_dir, run.warehouse_dir)
        # Every table is now this ingest's: a promotion cut short before it no longer matters, and
        # the batch a promotion put here is no longer what the warehouse holds (lineage names it).
        (run.warehouse_dir / PROMOTING_FILE).unlink(missing_ok=True)
        (run.warehouse_dir / PROMOTED_BATCH_FILE).unlink(missing_ok=True)
        placing = False
        return summary
    finally:
        if not placing:
            shutil.rmtree(staging, ignore_errors=True)


def warehouse_files() -> list[str]:
    """The files an ingest writes into its warehouse folder, the accounting last."""
    return [*(f"{table}.parquet" for table in (*TABLES, "events", "codes", "quarantine")), SUMMARY_FILE]


MIN_PATIENT_SHARE = 0.5
"""A promoted batch holds at least this share of the warehouse's patients (:func:`promote_warehouse`)."""
PROMOTION_LOCK_WAIT_SECONDS = 600.0
"""How long a promotion waits for another writer of its warehouse. A promotion links files (well
under a second), so two sensor-started ones that overlap should queue, not fail: the newer one's
run would not be started again, and the warehouse would keep the older batch."""


def promote_warehouse(ingested_dir: Path, warehouse_dir: Path, allow_older_batch: bool = False,
                      lock_wait_seconds: float = PROMOTION_LOCK_WAIT_SECONDS,
                      min_patient_share: float = MIN_PATIENT_SHARE) -> IngestSummary:
    """Make the tables of an ingest written in ``ingested_dir`` (a landing batch's) those of ``warehouse_dir``.

    A batch is a whole export (a nightly Bulk ``$export``, say), so its tables replace the
    warehouse's rather than add to them: each file is put in place by one rename (a hard link, no
    copy, on the same file system) and ``ingest_summary.json`` last, so the accounting always
    describes complete tables. Returns the batch's accounting.

    The batch is named by its folder (``ingested_dir.name``); batch names sort in landing order. The
    name is recorded in the warehouse's ``promoted_batch.txt`` before the tables are put in place, so
    a promotion cut short can be finished (by the same batch or a newer one) but not undone by an
    older one: a re-run of an older batch's promotion would otherwise replace newer data.

    Parameters
    ----------
    allow_older_batch
        Promote the batch even when the warehouse holds a newer one: a deliberate rollback.
    lock_wait_seconds
        How long to wait while another ingest or promotion writes the warehouse.
    min_patient_share
        Refuse a batch with fewer patients than this share of the warehouse's: a whole export does
        not lose half its patients overnight, an export or a copy cut short does. 0 turns it off.

    Raises
    ------
    LandingZoneError
        When ``ingested_dir`` holds no complete ingest (a file is missing), has any of
        :func:`ingest_problems` (accounting, manifest, patients, dates, duplicates), has too few
        patients (``min_patient_share``), or, unless ``allow_older_batch``, the warehouse holds a
        newer batch; the warehouse is then left as it was.
    """
    ingested_dir, warehouse_dir = Path(ingested_dir), Path(warehouse_dir)
    batch, record = ingested_dir.name, warehouse_dir / PROMOTED_BATCH_FILE
    _check_complete_ingest(ingested_dir)
    _check_dirs(ingested_dir, warehouse_dir)
    action = f"promote batch {batch}"
    # The batch is checked and linked under its writer lock: a re-ingest of it finished between the
    # checks and the linking would put unchecked tables in the warehouse.
    with _writer_lock(ingested_dir, action, lock_wait_seconds):
        _check_complete_ingest(ingested_dir)
        summary = IngestSummary.from_json(ingested_dir / SUMMARY_FILE)
        problems = ingest_problems(ingested_dir)
        if problems:
            raise LandingZoneError(f"{action}: {first_of(problems)}; the warehouse keeps its tables")
        # What the warehouse holds is read under its lock: a promotion of a newer batch that
        # finished between a check and the writing would otherwise be undone by this older one.
        with _writer_lock(warehouse_dir, action, lock_wait_seconds):
            held = record.read_text().strip() if record.is_file() else ""
            if held > batch and not allow_older_batch:
                raise LandingZoneError(
                    f"{action}: warehouse {warehouse_dir} holds batch {held}, which is newer (expected {held} or "
                    "a later batch); the warehouse keeps its tables (allow_older_batch rolls back on purpose)"
                )
            if share_problem := too_few_patients(summary, warehouse_dir, min_patient_share):
                raise LandingZoneError(f"{action}: {share_problem}; the warehouse keeps its tables")
            _link_batch(ingested_dir, warehouse_dir)
    # Its accounting predates the table too: the empty one just written has no rows.
    return replace(summary, table_rows={"deletions": 0, **summary.table_rows})


def _check_complete_ingest(ingested_dir: Path) -> None:
    names = warehouse_files()
    # A batch ingested before deletions were read has no deletions table: it deleted nothing.
    missing = [name for name in names if not (ingested_dir / name).is_file() and name != "deletions.parquet"]
    if missing:
        raise LandingZoneError(
            f"promote {ingested_dir}: {missing[0]} is missing ({len(missing)} of {len(names)} ingest files); "
            "ingest the batch (again) before promoting it"
        )


def too_few_patients(summary: IngestSummary, warehouse_dir: Path, min_patient_share: float) -> str | None:
    """Why new tables hold too few patients to replace ``warehouse_dir``'s, or None.

    A whole export does not lose half its patients overnight; an export or a copy cut short does.
    ``min_patient_share`` 0, or a warehouse with no tables yet, never refuses.
    """
    current = warehouse_dir / "patients.parquet"
    if min_patient_share <= 0 or not current.is_file():
        return None
    before, after = pq.read_metadata(current).num_rows, summary.table_rows["patients"]
    if after >= min_patient_share * before:
        return None
    return (f"it holds {after} patients, the warehouse {before} (expected at least {min_patient_share:g} of them; "
            "an export cut short? min_patient_share 0 lets it in)")


def _link_batch(ingested_dir: Path, warehouse_dir: Path) -> None:
    """Put a batch's files in place in ``warehouse_dir``, under its writer lock.

    The files are linked one at a time, so a promotion killed part-way leaves tables of two
    batches side by side. ``.promoting`` names the batch while they are: the next writer finishes
    the promotion (:func:`remove_leftovers`), and readers refuse the warehouse until then
    (:func:`unsettled_warehouse`).
    """
    with _placing_files(warehouse_dir):
        write_bytes_atomic(f"{ingested_dir.absolute()}\n".encode(), warehouse_dir / PROMOTING_FILE)
        write_bytes_atomic(f"{ingested_dir.name}\n".encode(), warehouse_dir / PROMOTED_BATCH_FILE)
        for name in warehouse_files():
            if (ingested_dir / name).is_file():
                link_file_atomic(ingested_dir / name, warehouse_dir / name)
            else:
                write_parquet_atomic(INTERNAL_TABLES["deletions"].empty_table(), warehouse_dir / name)
        (warehouse_dir / PROMOTING_FILE).unlink()


def warehouse_site_timezone(warehouse_dir: Path) -> str:
    """The site time zone the warehouse's tables were read in (its ``ingest_summary.json``); UTC
    for a warehouse without one."""
    path = Path(warehouse_dir) / SUMMARY_FILE
    return IngestSummary.from_json(path).site_timezone if path.is_file() else SITE_ZONE


def unsettled_warehouse(warehouse_dir: Path) -> str | None:
    """Why ``warehouse_dir``'s tables may be of two ingests side by side, or cannot be read, or None.

    An ingest or a promotion puts its files in place one at a time; one cut short there is finished
    by the next writer of the warehouse, and until then a reader would mix two exports' tables. A
    table whose Parquet footer cannot be read (cut short by a copy or a full disk) would stop a
    reader with a traceback.
    """
    warehouse_dir = Path(warehouse_dir)
    marker = warehouse_dir / PROMOTING_FILE
    if marker.is_file():
        batch = Path(marker.read_text().strip()).name
        return (f"warehouse {warehouse_dir}: the promotion of batch {batch} was cut short or is running (its "
                f"{PROMOTING_FILE} is there); run the promotion again (ingest job, from_batch {batch})")
    if warehouse_dir.is_dir() and any(
        path.name.startswith(STAGING_PREFIX) and _placing(path) for path in warehouse_dir.iterdir()
    ):
        return (f"warehouse {warehouse_dir}: an ingest was cut short while it put its tables in place, or is "
                "doing so; the next ingest or promotion finishes it")
    for name in warehouse_files():
        path = warehouse_dir / name
        if name.endswith(".parquet") and path.is_file():
            try:
                pq.read_metadata(path)
            except (pa.ArrowInvalid, OSError) as exc:
                # A copy or a disk that cut a table short: its footer is gone.
                why = str(exc).split(". ")[0][:100]
                return f"warehouse {warehouse_dir}: {name} cannot be read ({why}); ingest again"
    return None


BATCH_NAME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[T._:+-][0-9A-Za-z._:+-]*)?")
"""A landing batch's folder name: it starts with its landing date written ``YYYY-MM-DD``, maybe
followed by a time (``2024-06-01``, ``2024-06-01T02:00:00Z``), so that names sort in landing order.
A folder named otherwise (``archive``, ``export-2024-06-02``) is no batch: read as one, it would sort
after every dated batch and be taken for the newest; so would the same date written another way
(``20240601T0200Z`` sorts after ``2024-06-02``)."""


def is_batch_name(name: str) -> bool:
    """Whether ``name`` is a landing batch's folder name (:data:`BATCH_NAME`)."""
    return BATCH_NAME.fullmatch(name) is not None


def batch_names(batches_dir: Path) -> list[str]:
    """The batch folders under ``batches_dir``, in name (landing) order. Hidden folders are not
    batches yet, or no longer: a batch still being copied in, or one being deleted. Folders whose
    name does not start with a date (:data:`BATCH_NAME`) are not batches either
    (:func:`stray_batch_entries`)."""
    if not batches_dir.is_dir():
        return []
    return sorted(p.name for p in batches_dir.iterdir() if p.is_dir() and is_batch_name(p.name))


def stray_batch_entries(batches_dir: Path) -> list[str]:
    """Visible entries under ``batches_dir`` that are not batches: folders whose names do not start
    with a date, and files (an export delivered as ``2024-06-01.tar.gz``: a batch is a folder)."""
    if not batches_dir.is_dir():
        return []
    return sorted(p.name for p in batches_dir.iterdir()
                  if not p.name.startswith(".") and not (p.is_dir() and is_batch_name(p.name)))


def prune_ingested_batches(batches_dir: Path, promoted: str, keep: int) -> list[str]:
    """Delete the ingested copies of batches older than ``promoted``, keeping the newest ``keep``.

    Each nightly batch is ingested into its own folder under ``batches_dir`` and stays there after
    it is promoted: without pruning, every night adds a whole warehouse. Folders sort in landing
    order by name; ``promoted`` and newer ones (still ingesting, or waiting) are never deleted, nor
    are the ``keep`` newest (``promoted`` included) kept for comparison and rollback. A folder is
    first renamed to a hidden name, so it never looks like a complete batch while it is deleted.
    Returns the names deleted, oldest first.
    """
    if keep < 1:
        raise ValueError(f"prune_ingested_batches: keep must be at least 1 (the promoted batch), found {keep}")
    batches_dir = Path(batches_dir)
    older = [name for name in batch_names(batches_dir) if name < promoted]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for name in doomed:
        os.replace(batches_dir / name, batches_dir / f"{DELETING_PREFIX}{name}")
    # Those hidden before and not deleted (a file held open on a network share, say) go now too.
    # Every one is tried: one stuck copy must not keep the others, and each night's, on the disk.
    failed: list[OSError] = []
    for hidden in sorted(batches_dir.glob(f"{DELETING_PREFIX}*")):
        try:
            shutil.rmtree(hidden)
        except OSError as exc:
            failed.append(exc)
    if failed:
        raise OSError(f"{len(failed)} ingested copies under {batches_dir} could not be deleted (first: {failed[0]})")
    return doomed


DELETING_PREFIX = ".deleting-"
"""An ingested batch's copy renamed so while :func:`prune_ingested_batches` deletes it."""


# ------------------------------------------------------------------------------------------------
# Invariants of a written warehouse (the pipeline's asset checks call these)
# ------------------------------------------------------------------------------------------------


def records_without_patient(warehouse_dir: Path) -> dict[str, int]:
    """Rows whose patient is not in ``patients``, per table (``events`` by ``subject_id``); tables
    with none are left out.

    The ingest quarantines such records (``orphan_reference``) and builds ``events`` from the
    tables by a join on the patients: this reads the written files again, so that a table
    written without that step, or events built from another set of patients, are found.
    """
    patients = pl.scan_parquet(warehouse_dir / "patients.parquet", glob=False)
    found: dict[str, int] = {}
    for table in (*TABLES, "events"):
        column = "subject_id" if table == "events" else "patient_id"
        if table == "patients" or (table != "events" and column not in INTERNAL_TABLES[table].names):
            continue
        path = warehouse_dir / f"{table}.parquet"
        if not path.is_file():  # the deletions table of a batch ingested before deletions were read
            continue
        count = int(
            pl.scan_parquet(path, glob=False).join(patients.select(column), on=column, how="anti")
            .select(pl.len()).collect().item()
        )
        if count:
            found[table] = count
    return found


def duplicate_records(warehouse_dir: Path) -> dict[str, int]:
    """Per table, how many of its ids (:data:`ID_COLUMNS`) are held by rows of more than one
    source record (file and record number): copies the ingest should have resolved to one (the
    rows of one record, an Observation's components say, share its id). Tables with none are
    left out."""
    found: dict[str, int] = {}
    for table in TABLES:
        path = warehouse_dir / f"{table}.parquet"
        if table == "deletions" or not path.is_file():
            continue
        count = int(
            pl.scan_parquet(path, glob=False)
            .group_by(ID_COLUMNS[table])
            .agg(pl.struct("source_file", "record_number").n_unique().alias("records"))
            .filter(pl.col("records") > 1)
            .select(pl.len()).collect().item()
        )
        if count:
            found[table] = count
    return found


def first_of(problems: list[str]) -> str:
    """The first of ``problems`` (one line each), and how many more there are."""
    return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def ingest_problems(warehouse_dir: Path) -> list[str]:
    """Why the tables an ingest wrote into ``warehouse_dir`` must not be used; empty when none.

    One line each: accounting that does not balance, a Bulk manifest the landing zone does not
    match (a copy cut short), rows of a patient not in ``patients``, events after the export time,
    duplicate records left in a table. A batch is promoted only without any
    (:func:`promote_warehouse`); the pipeline's checks report the same on the warehouse.
    """
    summary = IngestSummary.from_json(warehouse_dir / SUMMARY_FILE)
    problems: list[str] = []
    unbalanced = [account.source_file for account in summary.files if not account.balanced]
    if unbalanced:
        problems.append(f"records_in != records_out + quarantined for {len(unbalanced)} source files "
                        f"(first {unbalanced[0]})")
    problems += [f"the landing zone does not match its manifest: {line}" for line in summary.manifest_mismatches]
    problems += [f"{table}: {count} rows of a patient not in patients"
                 for table, count in records_without_patient(warehouse_dir).items()]
    if late := events_after(warehouse_dir, summary.export_time):
        problems.append(f"events: {late} dated after the export time {summary.export_time:%Y-%m-%dT%H:%M:%S}")
    problems += [f"{table}: {count} ids held by more than one record (duplicates not resolved)"
                 for table, count in duplicate_records(warehouse_dir).items()]
    return problems


def events_after(warehouse_dir: Path, export_time: datetime) -> int:
    """Number of events dated, or known (``known_time``: recorded, issued), after ``export_time``."""
    return int(
        pl.scan_parquet(warehouse_dir / "events.parquet", glob=False)
        .filter((pl.col("time") > export_time) | (pl.col("known_time") > export_time))
        .select(pl.len())
        .collect()
        .item()
    )


def quarantined_with(warehouse_dir: Path, reason_code: str) -> int:
    """Number of quarantine rows with ``reason_code``: ``duplicate`` counts the other copies of a
    kept record (older, or later in file order), ``fhir_library_error`` the records on which
    ``fhir.resources`` raised for no known reason (strict mode)."""
    return int(
        pl.scan_parquet(warehouse_dir / "quarantine.parquet", glob=False)
        .filter(pl.col("reason_code") == reason_code)
        .select(pl.len())
        .collect()
        .item()
    )


def quarantine_shares(summary: IngestSummary, warehouse_dir: Path) -> pl.DataFrame:
    """Per source file with quarantined records: ``records_in``, ``quarantined``, their ``share``
    and the most common ``reason_code`` (``top_reason``, with ``top_reason_count``), largest share
    first. The accounting balances even when a feed breaks upstream (a new date style, a renamed
    code system): its file's quarantined share is what shows it."""
    accounts = pl.DataFrame(
        [(a.source_file, a.records_in, a.quarantined) for a in summary.files if a.quarantined],
        schema={"source_file": pl.String, "records_in": pl.Int64, "quarantined": pl.Int64},
        orient="row",
    )
    reasons = (
        most_common(pl.scan_parquet(warehouse_dir / "quarantine.parquet", glob=False), "source_file", "reason_code")
        .rename({"reason_code": "top_reason", "count": "top_reason_count"})
        .collect()
    )
    return (
        accounts.join(reasons, on="source_file", how="left")
        .with_columns(share=pl.col("quarantined") / pl.col("records_in"))
        .select("source_file", "records_in", "quarantined", "share", "top_reason", "top_reason_count")
        .sort(["share", "source_file"], descending=[True, False])
    )
