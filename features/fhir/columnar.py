"""The columnar fast path of the ingest: NDJSON straight into Arrow, checked column-wise.

Stage: ingest. In: a block of NDJSON lines with their record numbers (a read unit of a Bulk-FHIR
file, read type by type, or a batch's Bundle entries of one type re-serialized one per line). Out:
:class:`FastRead`: rows of the normalized tables (Arrow, in :mod:`features.schemas` order) and of
``record_versions`` for the records it could clear, and the record numbers of every other record,
which the caller hands to the per-record Python path (:mod:`features.fhir.flatten`). That path
alone writes quarantine reasons: this module only ever decides that a record is clean.

How a record is cleared, conservatively (anything unusual goes to the Python path):

1. Text checks on the raw line: it starts with ``{``, has no ``\\r``, no byte-order mark, no
   ``null`` (so that a missing field and a null one, which the Python path tells apart, never
   meet here), no ``NaN``/``Infinity`` (orjson rejects them, the Arrow decoder does not), is
   valid UTF-8 and is not nested deeper than orjson allows.
2. ``pyarrow.json`` decodes the block with an explicit schema holding only the fields the Python
   path reads; it rejects a wrong JSON type in any of them, duplicate keys and malformed JSON, and
   then the line it names (with its neighbours) goes to the Python path and the rest is decoded
   again, a bounded number of times per block (:data:`MAX_DECODES`).
3. Column checks mirror :mod:`features.fhir.flatten` for the common forms only: ids match the FHIR
   id pattern; dates are ``YYYY-MM-DD`` or ``YYYY-MM-DDThh:mm:ss`` with optional microseconds and
   zone, real, not before 1800 and not after the export, and an end (a death) is compared with its
   start (the birth) at the coarser precision of the two (:func:`not_before`); references are
   ``Type/<id>`` or ``urn:uuid:<id>`` (or an entry of the Bundle); code systems are in the
   vocabulary map, and a concept's one code is chosen among its codings as there
   (:func:`chosen_coding`); numbers are finite and not zero (``-0`` and ``0`` differ once
   decoded); a quantity's comparator is absent or one of the FHIR codes; a record's version
   (``meta.lastUpdated``, ``meta.versionId``) is an instant of those forms with its zone and a
   FHIR id; rare alternatives (``valueBoolean``, periods where a dateTime is usual, a status whose
   first coding has no code, any other ``meta``) are left to the Python path.
4. In strict mode a line must also validate against its ``fhir.resources.R4B`` model.

Rows come out in line order (an Observation's own row, then its components), as the Python path
makes them, so that the caller can merge both paths' rows back into file order.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.json as pj

from features.fhir.flatten import (
    base64_bytes,
    charset_text,
    is_plain_text,
    note_type_slug,
    readable_text,
    text_charset,
)
from features.fhir.specs import (
    CODE_PADDING,
    ENCOUNTER_REFERENCE_FIELD,
    ENTERED_IN_ERROR,
    MEDICATION_TYPES,
    PATIENT_REFERENCE_FIELD,
    QUANTITY_COMPARATORS,
    RECORDED_TYPES,
    STATUS_ELEMENTS,
    TABLE_OF_TYPE,
    UCUM_SYSTEMS,
    VOCABULARY_PREFIXES,
)
from features.fhir.validate import DATE_LENGTH, EARLIEST, SITE_ZONE, is_valid_r4, r4_model
from features.identifiers import subject_ids
from features.schemas import FLOAT32_MAX, STAGED_TABLES

_LAST_MICROSECOND_OF_DAY = timedelta(days=1, microseconds=-1)

MAX_BRACKETS = 500
"""A line with more opening brackets may be nested deeper than orjson's limit (1024): Python path."""

_ID = r"[A-Za-z0-9\-.]{1,64}"
_DATE_TEXT = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?$"
)
"""The date forms cleared here: a subset of :data:`features.fhir.validate._DATETIME` (no partial
dates, at most microseconds, no leap second), so that parsing agrees with ``datetime.fromisoformat``."""
_INSTANT_TEXT = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$"
)
"""The ``meta.lastUpdated`` forms cleared here: :data:`_DATE_TEXT` with a time and a zone (a FHIR instant)."""

# ------------------------------------------------------------------------------------------------
# Explicit schemas: every field the Python path reads for a type, and nothing else
# ------------------------------------------------------------------------------------------------

_S = pa.string()
_CODING = pa.struct([("system", _S), ("code", _S), ("display", _S)])
_CONCEPT = pa.struct([("coding", pa.list_(_CODING)), ("text", _S)])
# Where no display is read: every decoded field costs decoding time.
_CODE = pa.struct([("system", _S), ("code", _S)])
_CODES = pa.struct([("coding", pa.list_(_CODE))])
_REF = pa.struct([("reference", _S)])
_PERIOD = pa.struct([("start", _S), ("end", _S)])
_QUANTITY = pa.struct([("value", pa.float64()), ("comparator", _S), ("unit", _S), ("system", _S), ("code", _S)])
_VALUES = [("valueQuantity", _QUANTITY), ("valueCodeableConcept", _CODES)]
_BASE = [("resourceType", _S), ("id", _S)]

_CODED_FIELDS: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
    # type: (code field, time fields in order, status field, status is a CodeableConcept)
    # (mirrors features.fhir.flatten._CODED)
    "Condition": ("code", ("onsetDateTime", "onsetPeriod", "recordedDate"), "clinicalStatus", True),
    "Procedure": ("code", ("performedDateTime", "performedPeriod"), "status", False),
    "MedicationRequest": ("medicationCodeableConcept", ("authoredOn",), "status", False),
    "MedicationStatement": (
        "medicationCodeableConcept",
        ("effectiveDateTime", "effectivePeriod", "dateAsserted"),
        "status",
        False,
    ),
    "MedicationAdministration": (
        "medicationCodeableConcept",
        ("effectiveDateTime", "effectivePeriod"),
        "status",
        False,
    ),
    "Immunization": ("vaccineCode", ("occurrenceDateTime", "recorded"), "status", False),
    "AllergyIntolerance": ("code", ("onsetDateTime", "recordedDate"), "clinicalStatus", True),
    "DiagnosticReport": ("code", ("effectiveDateTime", "effectivePeriod", "issued"), "status", False),
}


def _coded_schema(rt: str) -> pa.Schema:
    code_field, time_fields, status_field, status_concept = _CODED_FIELDS[rt]
    fields = [
        *_BASE,
        (PATIENT_REFERENCE_FIELD.get(rt, "subject"), _REF),
        (ENCOUNTER_REFERENCE_FIELD.get(rt, "encounter"), _REF),
        (code_field, _CONCEPT),
        (status_field, _CODES if status_concept else _S),
        *[(name, _PERIOD if name.endswith(("Period", "period")) else _S) for name in time_fields],
    ]
    if rt == "Condition":
        fields.append(("abatementDateTime", _S))
    if code_field == "medicationCodeableConcept":
        fields.append(("medicationReference", _REF))
    if rt == "MedicationRequest":
        # Any value but a boolean fails to decode: the per-record path quarantines it.
        fields += [("doNotPerform", pa.bool_()), ("intent", _S)]
    return pa.schema(fields)


SCHEMAS: dict[str, pa.Schema] = {
    "Patient": pa.schema(
        [
            *_BASE,
            ("gender", _S),
            ("birthDate", _S),
            ("deceasedDateTime", _S),
            ("deceasedBoolean", pa.bool_()),
            ("link", pa.list_(pa.struct([("type", _S)]))),
        ]
    ),
    "Encounter": pa.schema(
        [
            *_BASE,
            ("subject", _REF),
            ("period", _PERIOD),
            ("class", pa.struct([("code", _S)])),
            ("type", pa.list_(_CONCEPT)),
            ("reasonCode", pa.list_(_CODES)),
        ]
    ),
    "Observation": pa.schema(
        [
            *_BASE,
            ("subject", _REF),
            ("encounter", _REF),
            ("code", _CONCEPT),
            ("effectiveDateTime", _S),
            ("issued", _S),
            ("category", pa.list_(_CODES)),
            *_VALUES,
            ("component", pa.list_(pa.struct([("code", _CONCEPT), *_VALUES]))),
        ]
    ),
    "DocumentReference": pa.schema(
        [
            *_BASE,
            ("subject", _REF),
            ("date", _S),
            ("type", _CONCEPT),
            (
                "content",
                pa.list_(pa.struct([("attachment", pa.struct([("contentType", _S), ("data", _S), ("url", _S)]))])),
            ),
        ]
    ),
    "ImagingStudy": pa.schema(
        [
            *_BASE,
            ("subject", _REF),
            ("started", _S),
            ("modality", pa.list_(_CODE)),
            ("series", pa.list_(pa.struct([("modality", _CODE), ("bodySite", _CODING)]))),
            ("description", _S),
        ]
    ),
    "Medication": pa.schema([*_BASE, ("code", _CONCEPT)]),
    **{rt: _coded_schema(rt) for rt in _CODED_FIELDS},
}
"""Resource types with a fast path, and the fields decoded for each (with where each type says it
was entered in error, and its version, added below)."""
for _rt, _elements in STATUS_ELEMENTS.items():
    for _element in _elements:
        if _element not in SCHEMAS[_rt].names:
            SCHEMAS[_rt] = SCHEMAS[_rt].append(pa.field(_element, _CODES if _element == "verificationStatus" else _S))
for _rt in SCHEMAS:
    # Which of several copies of a resource is the newest (features.fhir.flatten.record_version).
    SCHEMAS[_rt] = SCHEMAS[_rt].append(pa.field("meta", pa.struct([("lastUpdated", _S), ("versionId", _S)])))


def entered_in_error(frame: pl.DataFrame, resource_type: str) -> pl.Series:
    """The decoded records that say they were entered in error
    (:func:`features.fhir.flatten.entered_in_error_at`): the per-record path quarantines them."""
    elements = STATUS_ELEMENTS.get(resource_type, ())
    if not elements:
        return pl.Series(np.zeros(frame.height, dtype=bool))
    said = pl.lit(False)
    for element in elements:
        column = pl.col(element)
        if element == "verificationStatus":
            codes = column.struct.field("coding").list.eval(pl.element().struct.field("code") == ENTERED_IN_ERROR)
            said = said | codes.list.any().fill_null(False)
        else:
            said = said | (column == ENTERED_IN_ERROR).fill_null(False)
    return frame.select(said.alias("said")).to_series()


def record_versions(frame: pl.DataFrame, latest: datetime) -> pl.DataFrame | None:
    """Per decoded record, its version as :func:`features.fhir.flatten.record_version` reads it
    (``last_updated``, ``version_id``), and whether the fast path may read it (``usual``): a
    lastUpdated in a form of :data:`_INSTANT_TEXT` and in range, a versionId that is a FHIR id. A
    record with any other ``meta`` is left to the per-record path, which reads that as absent.
    None when no record states a version (most exports): there is nothing to read."""
    meta = pl.col("meta")
    stamp, version = meta.struct.field("lastUpdated"), meta.struct.field("versionId")
    if not frame.select((stamp.is_not_null() | version.is_not_null()).any()).item():
        return None
    parsed = _parsed_time(stamp)
    return frame.select(
        last_updated=parsed,
        version_id=version,
        usual=(stamp.is_null() | (stamp.str.contains(_INSTANT_TEXT) & parsed.is_between(EARLIEST, latest)))
        .fill_null(False)
        & (version.is_null() | fhir_id(version)),
    )


# ------------------------------------------------------------------------------------------------
# Lines and text checks
# ------------------------------------------------------------------------------------------------


@dataclass
class FastRead:
    """What the fast path made of a block: tables of cleared records, and the records it left."""

    tables: dict[str, pa.Table]
    # Indexes (0-based, into the block's lines) of the records for the Python path, ascending.
    slow: np.ndarray
    # Where each line of the block starts and ends (without its newline).
    starts: np.ndarray
    ends: np.ndarray

    def slow_lines(self, data: bytes) -> list[bytes]:
        """The text of the lines left to the Python path."""
        return [data[self.starts[i] : self.ends[i]] for i in self.slow.tolist()]


def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets (end exclusive, without the newline) of every line of ``data``.

    Lines are what :func:`features.fhir.read._split_lines` yields: a final newline ends the last
    line, it does not start an empty one.
    """
    if not data:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    view = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(view == 10)
    ends = newlines if data.endswith(b"\n") else np.append(newlines, len(data))
    starts = np.concatenate(([0], newlines + 1))[: len(ends)]
    return starts.astype(np.int64), ends.astype(np.int64)


_SUSPICIOUS = r"\r|null|NaN|Infinity"
"""Text that sends a line to the Python path: a carriage return (the Python path strips one at
the end), ``null`` (a missing and a null field differ there), ``NaN``/``Infinity`` (not JSON). So
does a line that does not start with ``{`` (blank, byte-order mark, not an object). Literal
alternatives only: the regex engine then searches them all at once."""
_BARE_INF = r"[:,\[][ \t]*-?Inf[ \t]*[,\]}]"
"""The token ``Inf`` as a JSON value, which the decoder accepts and JSON does not. Searched only in
lines holding the text ``Inf``: as a literal it would also send every "Infarction" to the Python path."""

_PRESENCE_ONLY: dict[str, str] = {
    "Observation": "|".join(
        [*(f'"value{kind}"' for kind in ("Integer", "Decimal", "Boolean", "String", "DateTime", "Time", "Ratio",
                                         "Range", "Period")), '"dataAbsentReason"', r"\\u00[0-7]"]
    ),
}
"""Fields whose mere presence sends a line to the Python path (rare forms it alone reads), found
in the text so that the decoder need not build columns for them. An escaped ASCII character
(``\\u0000`` to ``\\u007f``) sends the line too: a key written with one (``"value\\u0052atio"``)
would slip past the literal search; other escapes (non-ASCII text) cannot spell a key."""


def line_texts(data: bytes, starts: np.ndarray) -> pl.Series:
    """Every line as a string (with its newline), zero-copy over ``data``, which must be UTF-8."""
    offsets = np.append(starts, len(data)).astype(np.int64)
    array = pa.Array.from_buffers(pa.large_string(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    array.validate(full=True)
    series = pl.from_arrow(array)
    assert isinstance(series, pl.Series)
    return series


def suspicious_lines(lines: pl.Series, resource_type: str) -> np.ndarray:
    """Lines the fast path must not decide on (a boolean mask), from their text alone."""
    length = lines.str.len_bytes()
    flagged = lines.str.contains(_SUSPICIOUS) | ~lines.str.starts_with("{") | (length <= 1)
    if resource_type in _PRESENCE_ONLY:
        # A separate search: one regex of many literals is several times slower than two of few.
        flagged = flagged | lines.str.contains(_PRESENCE_ONLY[resource_type])
    suspicious = flagged.to_numpy(writable=True)
    with_inf = np.flatnonzero(lines.str.contains("Inf", literal=True).to_numpy())
    if len(with_inf):
        suspicious[with_inf[lines.gather(with_inf).str.contains(_BARE_INF).to_numpy()]] = True
    # Deep nesting: orjson stops at 1024 levels, the decoder does not; only long lines can be deep.
    long = np.flatnonzero((length > 2 * MAX_BRACKETS).to_numpy())
    if len(long):
        brackets = lines.gather(long).str.count_matches(r"[\[{]").to_numpy()
        suspicious[long[brackets > MAX_BRACKETS]] = True
    return suspicious


def valid_utf8_lines(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A boolean mask of the lines that are valid UTF-8 (orjson rejects the others)."""
    valid = np.ones(len(starts), dtype=bool)
    if data.isascii():
        return valid
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        for line, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            try:
                data[start:end].decode("utf-8")
            except UnicodeDecodeError:
                valid[line] = False
    return valid


def valid_r4_lines(data: bytes, starts: np.ndarray, ends: np.ndarray, resource_type: str) -> np.ndarray:
    """A boolean mask of the lines that validate as ``resource_type`` against FHIR R4 (strict mode).

    A line that fails goes to the Python path, which validates it again and words the reason.
    """
    model = r4_model(resource_type)
    return np.fromiter(
        (is_valid_r4(model, data[start:end]) for start, end in zip(starts.tolist(), ends.tolist(), strict=True)),
        dtype=bool,
        count=len(starts),
    )


def decode(data: bytes, resource_type: str) -> tuple[pa.Table | None, int | None]:
    """Decode NDJSON lines with the type's explicit schema: (table, None), or (None, the row the
    decoder stopped at, when its message names one)."""
    try:
        table = pj.read_json(
            pa.py_buffer(data),
            read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data) + 1)),
            parse_options=pj.ParseOptions(
                explicit_schema=SCHEMAS[resource_type], unexpected_field_behavior="ignore", newlines_in_values=False
            ),
        )
    except pa.ArrowInvalid as exc:
        row = _ERROR_ROW.search(str(exc))
        return None, int(row.group(1)) if row else None
    return table, None


_ERROR_ROW = re.compile(r"in row (\d+)")
MAX_DECODES = 48
"""Decoder calls allowed per block to work around lines it rejects; past them, the lines not yet
decoded go to the Python path."""


def decode_lines(lines: pl.Series, resource_type: str) -> tuple[pa.Table, np.ndarray]:
    """Decode lines (each with its newline), working around the ones the decoder rejects.

    Returns the table of the decoded lines and a mask of which lines they are. A range that fails
    is split at the row the decoder names (with its neighbours: the row can be off by one) or,
    when it names none or the range gave more rows than lines (two objects on a line), halved;
    a single line that fails is the Python path's.
    """
    count = len(lines)
    decoded = np.zeros(count, dtype=bool)
    pieces: list[tuple[int, pa.Table]] = []
    pending = [(0, count)]
    calls = 0
    while pending and calls < MAX_DECODES:
        start, stop = pending.pop()
        calls += 1
        table, bad_row = decode(_joined(lines.slice(start, stop - start)), resource_type)
        if table is not None and table.num_rows == stop - start:
            pieces.append((start, table))
            decoded[start:stop] = True
        elif stop - start > 1:
            if table is None and bad_row is not None and bad_row < stop - start:
                ranges = [(start, start + max(bad_row - 1, 0)), (min(start + bad_row + 2, stop), stop)]
            else:
                middle = (start + stop) // 2
                ranges = [(start, middle), (middle, stop)]
            pending.extend(r for r in reversed(ranges) if r[1] > r[0])
    pieces.sort(key=lambda piece: piece[0])
    tables = [table for _, table in pieces]
    return (pa.concat_tables(tables) if tables else SCHEMAS[resource_type].empty_table()), decoded


def _joined(lines: pl.Series) -> bytes:
    return str(lines.str.join("").item()).encode("utf-8")


# ------------------------------------------------------------------------------------------------
# Column checks (each returns the value and whether the row is clear)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """A column expression and the rows on which the fast path may use it."""

    value: pl.Expr
    ok: pl.Expr


def _text(expr: pl.Expr) -> pl.Expr:
    return expr.is_not_null() & (expr.str.len_bytes() > 0)


def fhir_id(expr: pl.Expr) -> pl.Expr:
    """Whether a string column holds valid FHIR ids (as :func:`features.fhir.validate.check_id`)."""
    return expr.is_not_null() & expr.str.contains(f"^{_ID}$")


def _parsed_time(expr: pl.Expr, zone: str = SITE_ZONE) -> pl.Expr:
    """A FHIR date/dateTime string as naive UTC, unchecked (:func:`fhir_time` checks it)."""
    # A date is the last microsecond of its day and no offset is the site's wall-clock time, as in
    # the Python path (:func:`features.fhir.validate.parse_datetime`), which also caps a date at the
    # export time: a date of the export's own day is therefore not cleared here (its end is after
    # the export) and is read there. Each form is parsed by its own format (a failed parse is
    # cheap; rewriting every string to one form is not).
    zoned = expr.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%#z", strict=False, time_unit="us", time_zone="UTC")
    naive = expr.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us")
    day_end = expr.str.to_datetime("%Y-%m-%d", strict=False, time_unit="us") + _LAST_MICROSECOND_OF_DAY
    if zone != "UTC":
        # A wall-clock time that occurs twice is its first occurrence, and a day's end its last
        # (``as_utc``); one that does not occur is left null, so to the Python path.
        naive, day_end = site_time_as_utc(naive, zone, "earliest"), site_time_as_utc(day_end, zone, "latest")
    return pl.coalesce(zoned.dt.replace_time_zone(None), naive, day_end)


def site_time_as_utc(local: pl.Expr, zone: str, ambiguous: Literal["earliest", "latest"] = "earliest") -> pl.Expr:
    """Naive wall-clock times in ``zone`` as naive UTC; null where a time does not occur there."""
    return (local.dt.replace_time_zone(zone, ambiguous=ambiguous, non_existent="null")
            .dt.convert_time_zone("UTC").dt.replace_time_zone(None))


def site_date_start(day: pl.Expr, zone: str) -> pl.Expr:
    """The first instant (naive UTC) of each date on the site's calendar (``zone``). Where clocks
    jump from 00:00 to 01:00, the day starts at 01:00."""
    midnight = day.cast(pl.Datetime("us"))
    return pl.coalesce(site_time_as_utc(midnight, zone), site_time_as_utc(midnight + pl.duration(hours=1), zone))


FAST_EARLIEST = EARLIEST + timedelta(days=1)
"""The fast path clears no time before this: the Python path judges a time without an offset by
the year written on the site's calendar, which a UTC instant within a day of 1800 does not tell."""


def fhir_time(expr: pl.Expr, latest: datetime, parsed: pl.Expr | None = None, zone: str = SITE_ZONE) -> Checked:
    """A FHIR date/dateTime string as naive UTC, cleared when it is in a common form and in range.
    ``parsed``: its :func:`_parsed_time`, when the caller made that a column already."""
    parsed = _parsed_time(expr, zone) if parsed is None else parsed
    # One use of ``parsed`` here (polars evaluates each use of an expression again).
    ok = expr.str.contains(_DATE_TEXT) & parsed.is_between(FAST_EARLIEST, latest)
    return Checked(parsed, ok.fill_null(False))


def not_before(value: pl.Expr, parsed: pl.Expr, other: pl.Expr, other_parsed: pl.Expr) -> pl.Expr:
    """Whether the date/dateTime text ``value`` is not wholly before ``other`` (the negation of
    :func:`features.fhir.validate.is_before`), for the forms cleared here (:data:`_DATE_TEXT`);
    ``parsed`` and ``other_parsed`` are their :func:`_parsed_time`. Null where either is null.

    Against a date, a dateTime is its local date as written (its first ten characters); two
    dateTimes compare as instants. Partial dates, whose coarser cut this does not make, are never
    cleared here (their :func:`fhir_time` is not ok).
    """
    dated = (value.str.len_bytes() == DATE_LENGTH) | (other.str.len_bytes() == DATE_LENGTH)
    return pl.when(dated).then(value.str.slice(0, 10) >= other.str.slice(0, 10)).otherwise(parsed >= other_parsed)


def _listed(system: pl.Expr) -> pl.Expr:
    """The prefix of a listed vocabulary, trailing slashes ignored (``specs.listed_prefix``), else null."""
    return system.str.strip_chars_end("/").replace_strict(VOCABULARY_PREFIXES, default=None, return_dtype=pl.String)


def _prefix(system: pl.Expr) -> pl.Expr:
    # Unlisted systems (their prefix is derived from the URL in Python) are left to the Python path.
    return pl.when(system.is_null() | (system == "")).then(pl.lit("UNKNOWN")).otherwise(_listed(system))


def _code_of(coding: pl.Expr) -> pl.Expr:
    """A coding's code stripped of :data:`CODE_PADDING`, as ``_coded`` reads it."""
    return coding.struct.field("code").str.strip_chars(CODE_PADDING)


def first_coding_code(concept: pl.Expr) -> Checked:
    """The code of a status CodeableConcept's first coding, as written (``_status_code``); cleared
    when the concept is absent or its first coding has a code."""
    code = concept.struct.field("coding").list.first().struct.field("code")
    return Checked(code, concept.is_null() | _text(code))


def chosen_coding(concept: pl.Expr) -> pl.Expr:
    """The coding a CodeableConcept's one code is taken from (``flatten._chosen``): its first
    coding with a code whose system is listed, else its first coding with a code; null when none
    has a code. Exact: a system is listed here as in Python (``_listed``).

    Two list filters: builders make it a column once (``__coding_*``), which the code, its check
    and its display then read, rather than filter again for each use.
    """
    with_code = concept.struct.field("coding").list.filter(_text(_code_of(pl.element())))
    listed = with_code.list.filter(_listed(pl.element().struct.field("system")).is_not_null())
    return pl.coalesce(listed.list.first(), with_code.list.first())


def chosen_code(concept: pl.Expr, coding: pl.Expr, required: bool) -> Checked:
    """``PREFIX//code`` of ``coding``, the concept's :func:`chosen_coding` (``_code``,
    ``_optional_code``); cleared when it has a listed system or none (an unlisted one's prefix is
    derived in Python)."""
    prefix = _prefix(coding.struct.field("system"))
    value = prefix + "//" + _code_of(coding)
    ok = coding.is_not_null() & prefix.is_not_null()
    return Checked(value, ok if required else (concept.is_null() | ok))


def all_codes(concept: pl.Expr) -> Checked:
    """Every coding with a code as ``PREFIX//code`` (``_coded``); cleared when each has a listed
    system or none (then :func:`chosen_code` is cleared too)."""
    coding = pl.element()
    code = _code_of(coding)
    prefix = _prefix(coding.struct.field("system"))
    codings = concept.struct.field("coding")
    values = codings.list.eval(pl.when(_text(code)).then(prefix + "//" + code)).list.drop_nulls()
    unknown = codings.list.eval(_text(code) & prefix.is_null()).list.any()
    return Checked(values, (values.list.len() > 0) & ~unknown.fill_null(False))


def display(concept: pl.Expr, coding: pl.Expr | None = None) -> pl.Expr:
    """``_display``: the concept's text, else the display of ``coding`` (its :func:`chosen_coding`,
    beside a code), else of its first coding."""
    if coding is None:
        coding = concept.struct.field("coding").list.first()
    return pl.coalesce(concept.struct.field("text"), coding.struct.field("display"))


_REFERENCE_FIELDS = ("subject", "patient", "encounter", "context", "medicationReference")
"""The references the fast path reads (a resource's patient and visit, an order's drug)."""


def with_bundle_references(resource: dict[str, Any], full_urls: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """``resource`` with each reference to an entry of its Bundle written as ``Type/id``.

    A Bundle entry refers to another by its ``fullUrl`` (``urn:uuid:...``), which names the target's
    type and id only through the Bundle. Written out as ``Type/id``, the reference reads on the fast
    path as in an NDJSON export; the fast path clears it only when that type is the expected one,
    as the per-record path resolves it. A shallow copy: the per-record path still sees the entry as
    written.
    """
    resolved: dict[str, Any] | None = None
    for name in _REFERENCE_FIELDS:
        value = resource.get(name)
        reference = value.get("reference") if isinstance(value, dict) else None
        # Any other shape (a list, a number) is left for the checks to reject.
        target = full_urls.get(reference) if isinstance(reference, str) else None
        if target is not None:
            assert isinstance(value, dict)
            resolved = resolved if resolved is not None else dict(resource)
            resolved[name] = {**value, "reference": f"{target[0]}/{target[1]}"}
    return resource if resolved is None else resolved


def reference(ref: pl.Expr, target: str, required: bool) -> Checked:
    """The id a Reference names, for ``Type/<id>`` and ``urn:uuid:<id>``.

    References to other entries of a Bundle arrive already written as ``Type/id`` (the ingest
    resolves them through the Bundle's ``fullUrl`` map). Optional references that do not resolve
    are null in the Python path, but only the plain forms are cleared here.
    """
    value = ref.struct.field("reference").str.extract(f"^(?:{target}/|urn:uuid:)({_ID})$", 1)
    ok = value.is_not_null()
    if required:
        return Checked(value, ok.fill_null(False))
    return Checked(value, (ref.is_null() | ok).fill_null(False))


# ------------------------------------------------------------------------------------------------
# Per-type builders: (frame of decoded records) -> (clear mask, rows per table)
# ------------------------------------------------------------------------------------------------

LOCATION = [pl.col("__file").alias("source_file"), pl.col("__line").alias("record_number")]


@dataclass(frozen=True)
class Context:
    """What the builders need besides the records: the export time."""

    latest: datetime
    # Also validate each line fully against FHIR R4 (``--strict``).
    strict: bool = False
    # The site's time zone (IANA): dates and times without an offset are its wall-clock time.
    zone: str = SITE_ZONE


Built = tuple[pl.Series, dict[str, pl.DataFrame]]


def _all(*checks: pl.Expr) -> pl.Expr:
    ok = pl.lit(True)
    for check in checks:
        ok = ok & check.fill_null(False)
    return ok


def _time_fields(
    frame: pl.DataFrame, names: tuple[str, ...], latest: datetime, zone: str = SITE_ZONE
) -> tuple[pl.DataFrame, pl.Expr, pl.Expr, pl.Expr]:
    """``frame`` and (time, end, ok) from the first of ``names`` present: a dateTime, or a Period
    (``_time``: its start, else its end; a Period with neither is absent). Each time is parsed once,
    into a column of the frame returned (``__time_*``): a Period's end may be read three times."""
    texts = {
        f"__time_{name}{part}": pl.col(name).struct.field(part[1:]) if part else pl.col(name)
        for name in names
        for part in ((".start", ".end") if name.endswith(("Period", "period")) else ("",))
    }
    frame = frame.with_columns(**{key: _parsed_time(text, zone) for key, text in texts.items()})

    def checked(key: str) -> Checked:
        return fhir_time(texts[key], latest, pl.col(key))

    time: pl.Expr = pl.lit(None, dtype=pl.Datetime("us"))
    end: pl.Expr = pl.lit(None, dtype=pl.Datetime("us"))
    ok: pl.Expr = pl.lit(False)
    for name in reversed(names):
        column = pl.col(name)
        if name.endswith(("Period", "period")):
            start_text, stop_text = texts[f"__time_{name}.start"], texts[f"__time_{name}.end"]
            start, stop = checked(f"__time_{name}.start"), checked(f"__time_{name}.end")
            has_start = start_text.is_not_null()
            this_ok = pl.when(has_start).then(start.ok & (stop_text.is_null() | stop.ok)).otherwise(stop.ok)
            # A start without a time of day is the end of its day, but no later than the end (flatten._time).
            capped = pl.when((start_text.str.len_bytes() <= DATE_LENGTH) & (start.value > stop.value))
            this_start = capped.then(stop.value).otherwise(start.value)
            this_time, this_end = pl.when(has_start).then(this_start).otherwise(stop.value), stop.value
            present = has_start | stop_text.is_not_null()
        else:
            value = checked(f"__time_{name}")
            this_ok, this_time, this_end = value.ok, value.value, pl.lit(None, dtype=pl.Datetime("us"))
            present = column.is_not_null()
        time = pl.when(present).then(this_time).otherwise(time)
        end = pl.when(present).then(this_end).otherwise(end)
        ok = pl.when(present).then(this_ok).otherwise(ok)
    return frame, time, end, ok


def _finish(frame: pl.DataFrame, ok: pl.Expr, table: str, columns: list[pl.Expr]) -> Built:
    checked = frame.with_columns(__ok=ok.fill_null(False))
    clear = checked.get_column("__ok")
    rows = checked.filter(pl.col("__ok")).select(columns)
    return clear, {table: rows}


def build_patient(frame: pl.DataFrame, ctx: Context) -> Built:
    birth = fhir_time(pl.col("birthDate"), ctx.latest, zone=ctx.zone)
    death = fhir_time(pl.col("deceasedDateTime"), ctx.latest, zone=ctx.zone)
    # A birth date is the calendar date written, not the UTC date of its day's end (flatten's parse_date).
    birth_date = (pl.when(pl.col("birthDate").str.len_bytes() <= DATE_LENGTH)
                  .then(pl.col("birthDate").str.to_date("%Y-%m-%d", strict=False))
                  .otherwise(birth.value.dt.date()))
    ok = _all(
        pl.col("resourceType") == "Patient",
        fhir_id(pl.col("id")),
        pl.col("gender").is_null() | pl.col("gender").is_in(["male", "female", "other", "unknown"]),
        pl.col("birthDate").is_null() | birth.ok,
        pl.col("deceasedDateTime").is_null() | death.ok,
        # A death on the day of birth in a zone east of UTC is the day before in UTC: compared on
        # the local calendar, at the coarser precision (flatten_patient).
        pl.col("birthDate").is_null()
        | pl.col("deceasedDateTime").is_null()
        | not_before(pl.col("deceasedDateTime"), death.value, pl.col("birthDate"), birth.value),
        # Links (merged records) are rare: the per-record path reads them.
        pl.col("link").list.len().fill_null(0) == 0,
    )
    clear, tables = _finish(
        frame,
        ok,
        "patients",
        [
            pl.col("id").alias("patient_id"),
            pl.col("id").alias("subject_id"),
            birth_date.alias("birth_date"),
            pl.col("gender").alias("sex"),
            death.value.alias("death_time"),
            pl.when(pl.col("deceasedDateTime").is_not_null()).then(True).otherwise(pl.col("deceasedBoolean"))
            .alias("deceased"),
            pl.lit(None, dtype=pl.String).alias("replaced_by"),
            *LOCATION,
        ],
    )
    patients = tables["patients"]
    ids = subject_ids(patients.get_column("patient_id").to_list())
    tables["patients"] = patients.with_columns(subject_id=pl.Series(ids, dtype=pl.Int64))
    return clear, tables


def build_encounter(frame: pl.DataFrame, ctx: Context) -> Built:
    patient = reference(pl.col("subject"), "Patient", required=True)
    # A visit known only by its end starts then too (flatten._time).
    frame, start, end, time_ok = _time_fields(frame, ("period",), ctx.latest, ctx.zone)
    period, kind, reason_code = pl.col("period"), pl.col("type").list.first(), pl.col("reasonCode").list.first()
    frame = frame.with_columns(__coding_type=chosen_coding(kind), __coding_reason=chosen_coding(reason_code))
    type_code = chosen_code(kind, pl.col("__coding_type"), required=False)
    reason = chosen_code(reason_code, pl.col("__coding_reason"), required=False)
    ok = _all(
        pl.col("resourceType") == "Encounter",
        fhir_id(pl.col("id")),
        patient.ok,
        time_ok,
        # A visit that ended on the day it began, given as a date, is no end before its start
        # (flatten_encounter); a Period with only an end starts then.
        period.struct.field("end").is_null()
        | period.struct.field("start").is_null()
        | not_before(period.struct.field("end"), end, period.struct.field("start"), start),
        type_code.ok,
        reason.ok,
    )
    return _finish(
        frame,
        ok,
        "encounters",
        [
            pl.col("id").alias("encounter_id"),
            patient.value.alias("patient_id"),
            start.alias("start_time"),
            end.alias("end_time"),
            pl.col("class").struct.field("code").alias("encounter_class"),
            type_code.value.alias("type_code"),
            display(kind, pl.col("__coding_type")).alias("type_display"),
            reason.value.alias("reason_code"),
            pl.col("status"),
            *LOCATION,
        ],
    )


def _coded_builder(rt: str) -> Callable[[pl.DataFrame, Context], Built]:
    code_field, time_fields, status_field, status_concept = _CODED_FIELDS[rt]

    def build(frame: pl.DataFrame, ctx: Context) -> Built:
        patient = reference(pl.col(PATIENT_REFERENCE_FIELD.get(rt, "subject")), "Patient", required=True)
        visit = pl.col(ENCOUNTER_REFERENCE_FIELD.get(rt, "encounter"))
        encounter = reference(visit, "Encounter", required=False)
        frame = frame.with_columns(__coding=chosen_coding(pl.col(code_field)))
        codes = all_codes(pl.col(code_field))
        # Cleared codes (codes.ok) have a chosen code with a prefix.
        code = chosen_code(pl.col(code_field), pl.col("__coding"), required=True)
        frame, time, end, time_ok = _time_fields(frame, time_fields, ctx.latest, ctx.zone)
        common = [pl.col("resourceType") == rt, fhir_id(pl.col("id")), patient.ok, encounter.ok, time_ok]
        checks = [*common, codes.ok]
        if rt == "Condition":
            abatement = fhir_time(pl.col("abatementDateTime"), ctx.latest, zone=ctx.zone)
            checks.append(pl.col("abatementDateTime").is_null() | abatement.ok)
            end = pl.when(pl.col("abatementDateTime").is_not_null()).then(abatement.value).otherwise(end)
        status: pl.Expr = pl.col(status_field)
        if status_concept:
            status_code = first_coding_code(status)
            checks.append(status_code.ok)
            status = status_code.value
        verification: pl.Expr = pl.lit(None, dtype=pl.String)
        if "verificationStatus" in STATUS_ELEMENTS[rt]:
            verification_code = first_coding_code(pl.col("verificationStatus"))
            checks.append(verification_code.ok)
            verification = verification_code.value
        record = [
            pl.col("id").alias("resource_id"),
            pl.lit(rt).alias("resource_type"),
            patient.value.alias("patient_id"),
            pl.when(visit.is_not_null()).then(encounter.value).alias("encounter_id"),
            time.alias("time"),
            end.alias("end_time"),
        ]
        coded = [
            code.value.alias("code"),
            codes.value.alias("codes"),
            display(pl.col(code_field), pl.col("__coding")).alias("display"),
            status.alias("status"),
            verification.alias("verification_status"),
        ]
        recorded_time: pl.Expr = pl.lit(None, dtype=pl.Datetime("us"))
        if rt in RECORDED_TYPES:
            # flatten._optional_time: read (and checked) even when the onset gives the time.
            # recordedDate (issued, dateAsserted) is one of the time fields, parsed already.
            known = RECORDED_TYPES[rt]
            recorded = fhir_time(pl.col(known), ctx.latest, pl.col(f"__time_{known}"), ctx.zone)
            checks.append(pl.col(known).is_null() | recorded.ok)
            recorded_time = recorded.value
            if rt not in MEDICATION_TYPES:
                coded.append(recorded_time.alias("recorded_time"))
        if rt not in MEDICATION_TYPES:
            return _finish(frame, _all(*checks), TABLE_OF_TYPE[rt], [*record, *coded, *LOCATION])
        # flatten._do_not_perform: only a MedicationRequest has the element.
        do_not_perform = pl.col("doNotPerform") if rt == "MedicationRequest" else pl.lit(None, dtype=pl.Boolean)
        intent = pl.col("intent") if rt == "MedicationRequest" else pl.lit(None, dtype=pl.String)
        # An order may name its drug by a Medication elsewhere in the export instead of a code
        # (flatten.names_drug_by_reference); the ingest resolves it once every file is read.
        medication = reference(pl.col("medicationReference"), "Medication", required=True)
        checked = frame.with_columns(
            __coded=_all(*checks).fill_null(False),
            __referenced=_all(*common, pl.col(code_field).is_null(), medication.ok).fill_null(False),
        )
        clear = checked.get_column("__coded") | checked.get_column("__referenced")
        return clear.alias("__ok"), {
            TABLE_OF_TYPE[rt]: checked.filter(pl.col("__coded")).select(
                *record, *coded, do_not_perform.alias("do_not_perform"), intent.alias("intent"),
                recorded_time.alias("recorded_time"), *LOCATION
            ),
            "medication_references": checked.filter(pl.col("__referenced")).select(
                *record,
                status.alias("status"),
                verification.alias("verification_status"),
                do_not_perform.alias("do_not_perform"),
                intent.alias("intent"),
                recorded_time.alias("recorded_time"),
                medication.value.alias("medication_id"),
                *LOCATION,
            ),
        }

    return build


def build_medication(frame: pl.DataFrame, ctx: Context) -> Built:
    """``Medication`` resources: their drug codes (:func:`features.fhir.flatten.flatten_medication`)."""
    codes = all_codes(pl.col("code"))
    frame = frame.with_columns(__coding=chosen_coding(pl.col("code")))
    return _finish(
        frame,
        _all(pl.col("resourceType") == "Medication", fhir_id(pl.col("id")), codes.ok),
        "medication_codes",
        [
            pl.col("id").alias("medication_id"),
            chosen_code(pl.col("code"), pl.col("__coding"), required=True).value.alias("code"),
            codes.value.alias("codes"),
            display(pl.col("code"), pl.col("__coding")).alias("display"),
            *LOCATION,
        ],
    )


def _value_checks(
    holder: Callable[[str], pl.Expr], coding: pl.Expr
) -> tuple[Checked, pl.Expr, pl.Expr, pl.Expr]:
    """(numeric, comparator, unit, text) of ``value[x]`` (``_value``) for valueQuantity and
    valueCodeableConcept; ``coding`` is the valueCodeableConcept's :func:`chosen_coding`."""
    quantity = holder("valueQuantity")
    number = quantity.struct.field("value")
    comparator = quantity.struct.field("comparator")
    concept = holder("valueCodeableConcept")
    concept_code = chosen_code(concept, coding, required=True)
    # The rarer value[x] forms never reach this point (see _PRESENCE_ONLY).
    has_quantity = quantity.is_not_null()
    ok = (
        pl.when(has_quantity)
        .then(
            number.is_not_null()
            & (number.abs() <= FLOAT32_MAX)  # finite, and storable in events (float32)
            & (number != 0)
            # Any other comparator is the Python path's to quarantine and word.
            & (comparator.is_null() | comparator.is_in(QUANTITY_COMPARATORS))
        )
        .when(concept.is_not_null())
        .then(concept_code.ok)
        .otherwise(pl.lit(True))
    )
    numeric = pl.when(has_quantity).then(number)
    unit_code = quantity.struct.field("code")
    # The UCUM code before the display text, as features.fhir.flatten._unit.
    is_ucum = quantity.struct.field("system").str.strip_chars_end("/").is_in(list(UCUM_SYSTEMS))
    unit = pl.when(has_quantity).then(
        pl.when(is_ucum & unit_code.is_not_null()).then(unit_code)
        .otherwise(pl.coalesce(quantity.struct.field("unit"), unit_code)))
    text = pl.when(~has_quantity & concept.is_not_null()).then(concept_code.value)
    return Checked(numeric, ok.fill_null(False)), pl.when(has_quantity).then(comparator), unit, text


def build_observation(frame: pl.DataFrame, ctx: Context) -> Built:
    patient = reference(pl.col("subject"), "Patient", required=True)
    encounter = reference(pl.col("encounter"), "Encounter", required=False)
    code = chosen_code(pl.col("code"), pl.col("__coding"), required=True)
    time = fhir_time(pl.col("effectiveDateTime"), ctx.latest, zone=ctx.zone)
    issued = fhir_time(pl.col("issued"), ctx.latest, zone=ctx.zone)
    # The category's code alone, as ``_optional_code`` then ``split('//')`` gives it: any system
    # will do, so no category is left to the Python path.
    category = _code_of(chosen_coding(pl.col("category").list.first()))
    numeric, comparator, unit, text = _value_checks(pl.col, pl.col("__coding_value"))
    frame = frame.with_row_index("__row").with_columns(
        __coding=chosen_coding(pl.col("code")), __coding_value=chosen_coding(pl.col("valueCodeableConcept"))
    )
    frame = frame.with_columns(
        __patient=patient.value,
        __encounter=pl.when(pl.col("encounter").is_not_null()).then(encounter.value),
        __time=time.value,
        __issued=issued.value,
        __code=code.value,
        __display=display(pl.col("code"), pl.col("__coding")),
        __category=category,
        __numeric=numeric.value,
        __comparator=comparator,
        __unit=unit,
        __text=text,
        __ok=_all(
            pl.col("resourceType") == "Observation",
            fhir_id(pl.col("id")),
            patient.ok,
            encounter.ok,
            code.ok,
            time.ok,
            pl.col("issued").is_null() | issued.ok,
            numeric.ok,
        ),
    )
    components = _components(frame.filter(pl.col("component").list.len() > 0))
    bad = components.filter(~pl.col("__c_ok")).get_column("__row").unique()
    clear = frame.get_column("__ok") & ~frame.get_column("__row").is_in(bad.implode())
    frame = frame.with_columns(__ok=clear)
    shared = [
        pl.col("id").alias("resource_id"),
        pl.col("__patient").alias("patient_id"),
        pl.col("__encounter").alias("encounter_id"),
        pl.col("__time").alias("time"),
        # Only effectiveDateTime is read here: a period is the Python path's (flatten_observation).
        pl.lit(None, dtype=pl.Datetime("us")).alias("end_time"),
        pl.col("__issued").alias("issued_time"),
    ]
    tail = [pl.col("__category").alias("category"), pl.col("status"), *LOCATION]
    main = frame.filter(
        pl.col("__ok")
        & (
            pl.col("__numeric").is_not_null()
            | pl.col("__text").is_not_null()
            | (pl.col("component").list.len().fill_null(0) == 0)
        )
    ).select(
        pl.col("__row"),
        pl.lit(-1, dtype=pl.Int64).alias("__part"),
        *shared,
        pl.col("__code").alias("code"),
        pl.col("__display").alias("display"),
        pl.lit(None, dtype=pl.String).alias("parent_code"),
        pl.col("__numeric").alias("numeric_value"),
        pl.col("__comparator").alias("value_comparator"),
        pl.col("__unit").alias("unit"),
        pl.col("__text").alias("text_value"),
        # Lines with a dataAbsentReason take the Python path (_PRESENCE_ONLY).
        pl.lit(None, dtype=pl.String).alias("data_absent_reason"),
        *tail,
    )
    parts = (
        components.join(frame.select("__row", "__ok"), on="__row", how="inner")
        .filter(pl.col("__ok"))
        .select(
            pl.col("__row"),
            pl.col("__part").cast(pl.Int64),
            *shared,
            pl.col("__c_code").alias("code"),
            pl.col("__c_display").alias("display"),
            pl.col("__code").alias("parent_code"),
            pl.col("__c_numeric").alias("numeric_value"),
            pl.col("__c_comparator").alias("value_comparator"),
            pl.col("__c_unit").alias("unit"),
            pl.col("__c_text").alias("text_value"),
            pl.lit(None, dtype=pl.String).alias("data_absent_reason"),
            *tail,
        )
    )
    rows = pl.concat([main, parts]).sort("__row", "__part").drop("__row", "__part")
    return frame.get_column("__ok"), {"observations": rows}


def _components(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per component (``__part`` its index) with its code, value and whether it is clear."""
    exploded = frame.select(
        "__row",
        "__patient",
        "__encounter",
        "__time",
        "__issued",
        "__code",
        "__category",
        "status",
        "__file",
        "__line",
        "id",
        pl.col("component"),
        pl.int_ranges(pl.col("component").list.len()).alias("__part"),
    ).explode("component", "__part")

    def field_of(name: str) -> pl.Expr:
        return pl.col("component").struct.field(name)

    code = chosen_code(field_of("code"), pl.col("__c_coding"), required=True)
    numeric, comparator, unit, text = _value_checks(field_of, pl.col("__c_coding_value"))
    exploded = exploded.with_columns(
        __c_coding=chosen_coding(field_of("code")), __c_coding_value=chosen_coding(field_of("valueCodeableConcept"))
    )
    return exploded.with_columns(
        __c_code=code.value,
        __c_display=display(field_of("code"), pl.col("__c_coding")),
        __c_numeric=numeric.value,
        __c_comparator=comparator,
        __c_unit=unit,
        __c_text=text,
        __c_ok=_all(code.ok, numeric.ok),
    )


def note_type_slugs(labels: pl.Series) -> pl.Series:
    """:func:`features.fhir.flatten.note_type_slug` of each label, by column (null stays null): each
    distinct label slugged once, by the same function as per record (a hospital has a few dozen
    kinds of note)."""
    distinct = labels.drop_nulls().unique().to_list()
    return labels.replace_strict({label: note_type_slug(label) for label in distinct}, default=None,
                                 return_dtype=pl.String)


def build_document_reference(frame: pl.DataFrame, ctx: Context) -> Built:
    patient = reference(pl.col("subject"), "Patient", required=True)
    time = fhir_time(pl.col("date"), ctx.latest, zone=ctx.zone)
    attachment = pl.col("content").list.first().struct.field("attachment")
    ok = _all(
        pl.col("resourceType") == "DocumentReference",
        fhir_id(pl.col("id")),
        patient.ok,
        time.ok,
        attachment.struct.field("data").is_not_null(),
    )
    checked = frame.with_row_index("__row").with_columns(
        __ok=ok,
        __patient=patient.value,
        __time=time.value,
        __content_type=attachment.struct.field("contentType"),
        __data=attachment.struct.field("data"),
        __display=display(pl.col("type")),
    )
    candidates = checked.filter(pl.col("__ok"))
    texts = [
        _note_text(data, content_type, attachments)
        for data, content_type, attachments in zip(
            candidates.get_column("__data").to_list(), candidates.get_column("__content_type").to_list(),
            candidates.get_column("content").list.len().to_list(), strict=True
        )
    ]
    candidates = candidates.with_columns(
        __note=pl.Series(texts, dtype=pl.String),
        # A reference without a type is a document, as per record.
        __type=note_type_slugs(candidates.get_column("__display")).fill_null("document"),
    )
    decoded = candidates.filter(pl.col("__note").is_not_null())
    digests = [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in decoded.get_column("__note").to_list()]
    rows = decoded.with_columns(__digest=pl.Series(digests, dtype=pl.String)).select(
        pl.col("id").alias("note_id"),
        pl.col("__patient").alias("patient_id"),
        pl.col("__time").alias("time"),
        pl.col("__type").alias("note_type"),
        pl.col("__note").alias("text"),
        pl.col("__digest").alias("text_sha256"),
        *LOCATION,
    )
    clear = checked.get_column("__row").is_in(decoded.get_column("__row").implode())
    return clear, {"notes": rows}


def _note_text(data: str, content_type: str | None, attachments: int) -> str | None:
    """The decoded note of the first of ``attachments`` attachments, or None when only the Python
    path can tell (it is not text, cannot be decoded, or is blank, or is not plain text and a later
    attachment may be: flatten._note_text prefers it)."""
    charset = text_charset(content_type)
    if charset is None or (attachments > 1 and not is_plain_text(content_type)):
        return None
    try:
        text = readable_text(charset_text(base64_bytes(data), charset), content_type)
    except (binascii.Error, ValueError, LookupError):
        # UnicodeDecodeError is a ValueError: every failure is the Python path's to explain.
        return None
    return text if text.strip() else None


def build_imaging_study(frame: pl.DataFrame, ctx: Context) -> Built:
    patient = reference(pl.col("subject"), "Patient", required=True)
    time = fhir_time(pl.col("started"), ctx.latest, zone=ctx.zone)
    series = pl.col("series").list.first()
    site = series.struct.field("bodySite")
    site_display = site.struct.field("display")
    modality = pl.coalesce(
        pl.col("modality").list.first().struct.field("code"), series.struct.field("modality").struct.field("code")
    )
    ok = _all(pl.col("resourceType") == "ImagingStudy", fhir_id(pl.col("id")), patient.ok, time.ok)
    return _finish(
        frame,
        ok,
        "imaging_studies",
        [
            pl.col("id").alias("study_id"),
            patient.value.alias("patient_id"),
            time.value.alias("time"),
            modality.alias("modality"),
            pl.when(_text(site_display)).then(site_display).otherwise(site.struct.field("code")).alias("body_site"),
            pl.col("description").alias("description"),
            pl.col("status"),
            *LOCATION,
        ],
    )


BUILDERS: dict[str, Callable[[pl.DataFrame, Context], Built]] = {
    "Patient": build_patient,
    "Encounter": build_encounter,
    "Observation": build_observation,
    "DocumentReference": build_document_reference,
    "ImagingStudy": build_imaging_study,
    "Medication": build_medication,
    **{rt: _coded_builder(rt) for rt in _CODED_FIELDS},
}
assert set(BUILDERS) == set(SCHEMAS)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _cast(rows: pl.DataFrame, table: str) -> pa.Table:
    schema = STAGED_TABLES[table]
    return rows.select(schema.names).to_arrow().cast(schema)


def read_lines(
    data: bytes,
    resource_type: str,
    files: pl.Series,
    numbers: pl.Series,
    ctx: Context,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> FastRead:
    """Clear what the fast path can of ``data`` (NDJSON, every line meant as ``resource_type``).

    ``files`` and ``numbers`` give each line's source file and record number; ``bounds`` the
    lines' :func:`line_bounds`, when the caller has them already. A type without a fast path, or a
    block the decoder rejects, leaves every line to the caller. In strict mode (``ctx.strict``) a
    line must also validate against its FHIR R4 model to be cleared.
    """
    starts, ends = line_bounds(data) if bounds is None else bounds
    if len(starts) != len(numbers):
        raise ValueError(f"read_lines: {len(numbers)} record numbers given for {len(starts)} lines")
    everything = FastRead({}, np.arange(len(starts), dtype=np.int64), starts, ends)
    if resource_type not in SCHEMAS or not len(starts):
        return everything
    usable = valid_utf8_lines(data, starts, ends)
    if ctx.strict:
        usable &= valid_r4_lines(data, starts, ends, resource_type)
    keep = np.flatnonzero(usable)
    kept_starts = starts
    if len(keep) < len(starts):
        data = b"".join(data[s:e] + b"\n" for s, e in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True))
        kept_starts = line_bounds(data)[0]
    lines = line_texts(data, kept_starts)
    suspicious = suspicious_lines(lines, resource_type)
    if suspicious.any():
        lines = lines.filter(~pl.Series(suspicious))
        keep = keep[~suspicious]
    if suspicious.any() or len(keep) < len(starts):
        decoded, ok = decode_lines(lines, resource_type)
    else:
        # The common case: the whole block decodes as it is, without a copy.
        table, _ = decode(data, resource_type)
        decoded, ok = (
            (table, np.ones(len(keep), dtype=bool)) if table is not None else decode_lines(lines, resource_type)
        )
        if decoded.num_rows != len(keep):
            decoded, ok = decode_lines(lines, resource_type)
    keep = keep[ok]
    frame = pl.from_arrow(decoded)
    assert isinstance(frame, pl.DataFrame)
    versions = record_versions(frame, ctx.latest)
    # Withdrawn records and rarer forms of meta are the per-record path's.
    aside = entered_in_error(frame, resource_type)
    if versions is not None:
        aside = aside | ~versions.get_column("usual")
    if aside.any():
        frame = frame.filter(~aside)
        versions = versions.filter(~aside) if versions is not None else None
        keep = keep[~aside.to_numpy()]
    if not len(keep):
        return everything
    taken = pl.Series(keep)
    frame = frame.with_columns(__file=files.gather(taken), __line=numbers.gather(taken))
    clear, tables = BUILDERS[resource_type](frame, ctx)
    if versions is not None:
        stated = pl.col("last_updated").is_not_null() | pl.col("version_id").is_not_null()
        versions = versions.with_columns(
            source_file=frame.get_column("__file"), record_number=frame.get_column("__line"), __clear=clear
        ).filter(pl.col("__clear") & stated)
        if versions.height:
            tables["record_versions"] = versions
    slow = np.ones(len(starts), dtype=bool)
    slow[keep[clear.to_numpy()]] = False
    return FastRead({table: _cast(rows, table) for table, rows in tables.items()}, np.flatnonzero(slow), starts, ends)


_TYPE_AT = re.compile(rb'\{"resourceType":\s*"([A-Za-z]{1,64})"')
"""A line's resource type, when it is the line's first field (as Bulk-FHIR servers write it)."""


def line_types(data: bytes, starts: np.ndarray, ends: np.ndarray) -> dict[str | None, np.ndarray]:
    """The indexes of the lines of each resource type (None: not found at the line's start).

    A Bulk-FHIR file holds one type in practice (the contract allows any mix): every line is
    compared with the first line's opening bytes at once, and only lines that differ are read one
    by one.
    """
    count = len(starts)
    first = _TYPE_AT.match(data)
    same = np.zeros(count, dtype=bool)
    if first is not None:
        prefix = np.frombuffer(first.group(0), dtype=np.uint8)
        view = np.frombuffer(data, dtype=np.uint8)
        same = (ends - starts) >= len(prefix)
        for offset, byte in enumerate(prefix.tolist()):
            same[same] = view[starts[same] + offset] == byte
        if same.all():
            return {first.group(1).decode("ascii"): np.arange(count)}
    names: list[str | None] = [first.group(1).decode("ascii") if first else None] * count
    for line in np.flatnonzero(~same).tolist():
        match = _TYPE_AT.match(data, int(starts[line]), int(ends[line]))
        names[line] = match.group(1).decode("ascii") if match else None
    kinds = np.array(names, dtype=object)
    return {name: np.flatnonzero(kinds == name) for name in dict.fromkeys(names)}


def read_ndjson(data: bytes, source_file: str, first_line: int, latest: datetime, strict: bool = False,
                zone: str = SITE_ZONE) -> FastRead:
    """:func:`read_lines` for a range of a Bulk-FHIR file whose first line is ``first_line``.

    Lines are grouped by resource type first, so a file mixing types is read type by type; lines
    of a type without a fast path, or whose type is not found, go to the Python path.
    """
    starts, ends = line_bounds(data)
    count = len(starts)
    files = pl.repeat(source_file, count, dtype=pl.String, eager=True)
    numbers = pl.int_range(first_line, first_line + count, dtype=pl.Int64, eager=True)
    ctx = Context(latest, strict=strict, zone=zone)
    groups = line_types(data, starts, ends)
    if len(groups) == 1:
        ((resource_type, _),) = groups.items()
        if resource_type is not None:
            return read_lines(data, resource_type, files, numbers, ctx, (starts, ends))
    slow: list[np.ndarray] = []
    pieces: dict[str, list[pa.Table]] = {}
    for resource_type, lines in groups.items():
        if resource_type is None or resource_type not in SCHEMAS:
            slow.append(lines)
            continue
        subset = b"".join(data[s:e] + b"\n" for s, e in zip(starts[lines].tolist(), ends[lines].tolist(), strict=True))
        taken = pl.Series(lines)
        read = read_lines(subset, resource_type, files.gather(taken), numbers.gather(taken), ctx)
        slow.append(lines[read.slow])
        for table, rows in read.tables.items():
            pieces.setdefault(table, []).append(rows)
    tables = {table: _in_line_order(rows, table) for table, rows in pieces.items()}
    return FastRead(tables, np.sort(np.concatenate(slow)), starts, ends)


def _in_line_order(pieces: list[pa.Table], table: str) -> pa.Table:
    """Rows of one table from several types (MedicationRequest and MedicationStatement, say) back
    in line order, stably (each resource's rows stay together in their order)."""
    if len(pieces) == 1:
        return pieces[0]
    frame = pl.from_arrow(pa.concat_tables(pieces))
    assert isinstance(frame, pl.DataFrame)
    return _cast(frame.sort("record_number", maintain_order=True), table)
