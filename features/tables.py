"""Read the tabular landing-zone feeds (notes, genomics, imaging) strictly, by column and by row.

Stage: ingest. In: ``.parquet``, ``.csv`` and ``.tsv`` files. Out: the file's column names and its
rows, numbered from 1, in bounded batches as Arrow tables (:func:`iter_batches`); the column checks
and the batch loop the readers share (:func:`read_by_column`); and the per-row field converters
for the rows the column checks leave. Converters accept a value of the right Arrow type, or (for
CSV/TSV, where everything is text) a string that parses to it; anything else raises
:class:`features.fhir.validate.RecordError`, which becomes one quarantine row.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.fhir.columnar import FAST_EARLIEST, fhir_time, site_time_as_utc
from features.fhir.validate import (
    EARLIEST,
    FHIR_ID,
    SITE_ZONE,
    RecordError,
    as_utc,
    check_storable,
    parse_datetime,
)

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
MAX_FIELD_CHARS = 64 * 1024 * 1024
"""Longest CSV/TSV field read: the csv module's default of 131,072 characters is shorter than some
discharge summaries and pathology reports. A longer field (a quote never closed, say) rejects the
file instead of holding it all in memory."""
csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
NOT_UTF8 = re.compile("[\udc80-\udcff]")
"""Bytes that are not UTF-8, as the ``surrogateescape`` error handler leaves them in text."""
BATCH_ROWS = 20_000
BATCH_VALUES = 1_000_000
"""At most this many values (rows x columns) per batch of :func:`iter_batches`: a wide table's
rows hold thousands of values each."""
RAW_LIMIT = 500
LINE_END_SAMPLE_BYTES = 65_536
"""How much of a CSV/TSV file's start is searched for ``\r\r\n`` line ends."""
BINARY_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters no text table holds (a tab, line feed or carriage return it may)."""


class FileError(Exception):
    """A whole table file cannot be read; ``code`` and ``reason`` go to one quarantine row."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Spill = Callable[["TableRead"], None]
"""Stages what a :class:`TableRead` holds, then empties it."""


@dataclass
class TableRead:
    """What one table file gave: rows per output table, rejects, and how many records it held."""

    source_kind: str
    source_file: str
    records_in: int = 0
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    # Rows checked a column at a time, per output table (merged with ``rows`` in row order).
    frames: dict[str, list[pa.Table]] = field(default_factory=dict)
    # (record_number, resource_id, raw_text, reason_code, reason)
    rejects: list[tuple[int, str | None, str, str, str]] = field(default_factory=list)
    # Called by the readers after each batch, to stage what the read holds and empty it, so that
    # memory holds a batch of a large table rather than the whole file (set by the ingest).
    spill: Spill | None = None
    # The whole file became one quarantine row: rows spilled before that are void.
    whole_file_rejected: bool = False

    def batch_done(self) -> None:
        if self.spill is not None:
            self.spill(self)

    def empty(self) -> None:
        """Forget the rows, frames and rejects held (once they are staged)."""
        for rows in self.rows.values():
            rows.clear()
        for frames in self.frames.values():
            frames.clear()
        self.rejects.clear()

    def reject(self, number: int, row: Any, code: str, reason: str, ident: str | None = None) -> None:
        self.rejects.append((number, ident, _raw_text_as_read(row), code, reason))

    def reject_file(self, err: FileError, path: Path) -> None:
        """The whole file becomes one quarantine row, whatever was read of it before ``err``; its raw
        text is the start of ``path`` (:func:`file_preview`)."""
        self.empty()
        self.whole_file_rejected = True
        self.records_in = 1
        self.rejects.append((0, "", file_preview(path), err.code, err.reason))


ROW_SHAPE_MARKERS = ("__blank_line__", "__bad_width__", "__not_utf8__")
"""Keys of the rows :func:`iter_batches` could not read as rows of the header's columns."""


def _raw_text_as_read(row: Any) -> str:
    """:func:`raw_text` of a row as the file holds it: a row :func:`iter_batches` marked
    (:data:`ROW_SHAPE_MARKERS`) as its fields, and a blank line as no text, never the marker."""
    if isinstance(row, dict) and len(row) == 1 and (marker := next(iter(row))) in ROW_SHAPE_MARKERS:
        return "" if marker == "__blank_line__" else raw_text(row[marker])
    return raw_text(row)


def file_preview(path: Path) -> str:
    """What a data engineer needs to see of a file rejected whole, in at most :data:`RAW_LIMIT`
    characters: a Parquet file's columns and row count, else the start of the file as text (the
    header and first rows of a table), or, for binary content (bytes that are not UTF-8 or control
    characters: a compressed file, say), its first bytes as Python writes them.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     table = Path(folder) / "notes.csv"
    ...     _ = table.write_bytes(b"patient_id,note_id,patient_id\\np1,n1,p2\\n")
    ...     print(file_preview(table))
    ...     _ = table.write_bytes(b"\\x1f\\x8b\\x08\\x00")
    ...     print(file_preview(table))
    patient_id,note_id,patient_id
    p1,n1,p2
    <BLANKLINE>
    b'\\x1f\\x8b\\x08\\x00'
    """
    if path.suffix.lower() == ".parquet":
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError):
            pass  # not Parquet after all: its first bytes say what it is
        else:
            columns = ", ".join(metadata.schema.to_arrow_schema().names)
            return f"Parquet file, {metadata.num_rows} rows, columns: {columns}"[:RAW_LIMIT]
    try:
        with path.open("rb") as handle:
            head = handle.read(RAW_LIMIT)
    except OSError as exc:
        return f"(file cannot be read: {exc.strerror})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A character cut where the head ends is not binary content.
        cut = len(head) == RAW_LIMIT and exc.start >= len(head) - 3
        text = head[:exc.start].decode("utf-8") if cut else ""
        if not text:
            return repr(head)[:RAW_LIMIT]
    if BINARY_TEXT.search(text):
        return repr(head)[:RAW_LIMIT]
    return text


def raw_text(row: Any) -> str:
    """A row as short JSON text for the quarantine table."""
    try:
        return orjson.dumps(row, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()[:RAW_LIMIT]
    except TypeError:
        return repr(row)[:RAW_LIMIT]


def table_columns(path: Path) -> list[str]:
    """The column names of a table file, or :class:`FileError`."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise FileError("unsupported_file", f"{''.join(path.suffixes)[-20:] or 'a name without a suffix'} is not a "
                        f"table format cohortcast reads (expected {', '.join(TABLE_SUFFIXES)}; decompress .gz files)")
    try:
        if path.suffix.lower() == ".parquet":
            return _named_plainly([name.strip() for name in pq.read_schema(path).names])
        with _csv_reader(path) as reader:
            header = next(reader, None)
    except (OSError, csv.Error) as exc:
        raise FileError("unreadable_file", f"file cannot be read as a table: {str(exc)[:150]}") from None
    except pa.ArrowException as exc:  # ArrowInvalid on bytes that are not Parquet (empty, truncated, other)
        raise _unreadable_parquet(exc) from None
    if not header:
        raise FileError("empty_file", "file is empty (no header line)")
    if any(NOT_UTF8.search(name) for name in header):
        with path.open("rb") as handle:
            if handle.read(2) == b"\x1f\x8b":
                raise FileError("unsupported_file", f"file is gzip-compressed, though named {path.suffix} "
                                "(decompress it: tables are read uncompressed)")
        raise FileError("not_utf8", "header line holds bytes that are not UTF-8 (export the file as UTF-8)")
    return _named_plainly([name.strip() for name in header])


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _named_plainly(columns: list[str]) -> list[str]:
    """``columns``, or :class:`FileError` when a name holds a line break or another control
    character: a wide panel's column names become codes (``FEATURE//IL6``), and such a name is a
    header cell merged with the next one, never a feature."""
    for position, name in enumerate(columns, start=1):
        if _CONTROL_CHARACTER.search(name):
            raise FileError("bad_column_name", f"column {position}'s name {name[:40]!r} holds a line break or another "
                            "control character (expected one line of text per column name)")
    return columns


def require_columns(path: Path, what: str, names: list[str]) -> list[str]:
    """The table's columns, or :class:`FileError` naming the contract columns it lacks or repeats."""
    columns = table_columns(path)
    check_columns(columns, what, names)
    return columns


def check_columns(columns: list[str], what: str, names: list[str]) -> None:
    """Raise :class:`FileError` when a table lacks one of the contract columns ``names`` or names one
    twice.

    A column given twice (``patient_id`` at both ends of a joined extract) would be read as its
    last copy: a row whose copies differ would be filed under the second patient, unseen. Which
    copy the source meant is unknown, so the file is one quarantine row. Other columns may repeat.
    A missing column whose name the table holds in other letter case is named with it.

    Examples
    --------
    >>> def reason(columns: list[str]) -> str:
    ...     try:
    ...         check_columns(columns, "notes table", ["patient_id", "note_id"])
    ...     except FileError as err:
    ...         return f"{err.code}: {err.reason.split(' (')[0]}"
    ...     return "fine"
    >>> reason(["patient_id", "note_id", "patient_id"]), reason(["note_id", "patient_id", "x", "x"])
    ('duplicate_columns: notes table names column(s) patient_id 2 times', 'fine')
    >>> reason(["Patient_ID", "note_id"])
    'missing_columns: notes table lacks column(s) patient_id'
    """
    missing = [name for name in names if name not in columns]
    if missing:
        by_case = {column.lower(): column for column in columns}
        found = [by_case[name.lower()] for name in missing if name.lower() in by_case]
        hint = f"; found {', '.join(found)}: names are matched with their letter case" if found else ""
        raise FileError(
            "missing_columns", f"{what} lacks column(s) {', '.join(missing)} (expected {', '.join(names)}{hint})"
        )
    repeated = [f"{name} {columns.count(name)} times" for name in names if columns.count(name) > 1]
    if repeated:
        raise FileError("duplicate_columns", f"{what} names column(s) {', '.join(repeated)} (expected each once: "
                        "which copy a row means is unknown)")


def _unreadable_parquet(exc: Exception) -> FileError:
    return FileError("unreadable_file", f"file is not a readable Parquet file: {str(exc)[:150]}")


def read_column(path: Path, name: str) -> pa.ChunkedArray:
    """One column of a Parquet file (``name`` as :func:`table_columns` gives it, trimmed), or
    :class:`FileError` when its data cannot be read."""
    try:
        stored = [column for column in pq.read_schema(path).names if column.strip() == name][:1] or [name]
        return pq.read_table(path, columns=stored).column(0)
    except (pa.ArrowException, OSError) as exc:  # OSError: e.g. a corrupt compressed page
        raise _unreadable_parquet(exc) from None


def _plain_columns(batch: pa.RecordBatch) -> pa.Table:
    """A Parquet batch with its column names trimmed (as a CSV header's are) and Arrow's view types
    as the plain types the readers' kernels take: pyarrow writes a ``string_view`` column's type into
    the file, and it reads back as one."""
    columns = []
    for column in batch.columns:
        if pa.types.is_string_view(column.type):
            column = column.cast(pa.large_string())
        elif pa.types.is_binary_view(column.type):
            column = column.cast(pa.large_binary())
        elif pa.types.is_list_view(column.type) or pa.types.is_large_list_view(column.type):
            # By value: pyarrow's cast of a list view to a list writes invalid offsets.
            column = pa.array(column.to_pylist(), type=pa.large_list(column.type.value_type))
        columns.append(column)
    return pa.Table.from_arrays(columns, names=[name.strip() for name in batch.schema.names])


def iter_batches(path: Path) -> Iterator[tuple[list[int], pa.Table, list[tuple[int, dict[str, Any]]]]]:
    """Yield a table file in batches of up to :data:`BATCH_ROWS` rows and :data:`BATCH_VALUES`
    values: (row numbers, those rows as an Arrow table, the rows that do not fit the header as
    ``(number, row)``).

    Parquet columns keep their types. CSV/TSV columns are text, with '' as null; a row with
    another number of fields than the header is ``{"__bad_width__": values}``, a row with bytes
    that are not UTF-8 ``{"__not_utf8__": values}`` (each such byte shown as U+FFFD), and a blank
    line ``{"__blank_line__": ""}``: all are for :func:`check_row_shape`. A Parquet file whose data
    cannot be decoded (a corrupt page behind a valid footer), or a CSV/TSV file whose quoting
    breaks (a quote never closed, which would read every later row as one field), raises
    :class:`FileError` where the bad data starts; the caller then rejects the whole file.
    """
    if path.suffix.lower() == ".parquet":
        number = 0
        width = len(pq.read_schema(path).names)
        batches = pq.ParquetFile(path).iter_batches(batch_size=max(1, min(BATCH_ROWS, BATCH_VALUES // width)))
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable_parquet(exc) from None
            if batch is None:
                return
            yield list(range(number + 1, number + 1 + batch.num_rows)), _plain_columns(batch), []
            number += batch.num_rows
    with path.open("rb") as handle:
        # Lines ended \r\r\n (a CSV written in text mode on Windows) read as a record and an
        # empty line each: the blank lines' reason says so, once the start of the file shows it.
        doubled_line_ends = b"\r\r\n" in handle.read(LINE_END_SAMPLE_BYTES)
    with _csv_reader(path) as reader:
        header = [name.strip() for name in next(reader)]
        batch_rows = max(1, min(BATCH_ROWS, BATCH_VALUES // len(header)))
        numbers: list[int] = []
        fitting: list[list[str]] = []
        odd: list[tuple[int, dict[str, Any]]] = []
        number = 0
        while True:
            try:
                values = next(reader, None)
            except csv.Error as exc:
                why = ("a field that starts with a quote is read as quoted, so it must end with one, its own "
                       'quotes doubled (a note beginning with a quotation: """Doing well"" per patient")'
                       if "expected after" in str(exc) else
                       "a quote opened and never closed joins the rows after it")
                raise FileError("unreadable_file", f"CSV/TSV quoting breaks in record {number + 1} (read to "
                                f"line {reader.line_num}): {exc}; {why}") from None
            if values is None:
                break
            number += 1
            # One check per row (a wide panel has thousands of values); ASCII text needs no search.
            joined = "".join(values)
            if not joined.isascii() and NOT_UTF8.search(joined):
                odd.append((number, {"__not_utf8__": [NOT_UTF8.sub("\ufffd", value) for value in values]}))
            elif not values:  # a blank line: no record, but a line of the file, so accounted for
                odd.append((number, {"__blank_line__": "\r\r\n" if doubled_line_ends else ""}))
            elif len(values) == len(header):
                numbers.append(number)
                fitting.append(values)
            else:
                odd.append((number, {"__bad_width__": values}))
            if len(numbers) + len(odd) == batch_rows:
                yield numbers, _text_table(header, fitting), odd
                numbers, fitting, odd = [], [], []
        if numbers or odd:
            yield numbers, _text_table(header, fitting), odd


def fetch_rows(path: Path, numbers: set[int]) -> dict[int, str]:
    """Rows ``numbers`` (record numbers as :func:`iter_batches` counts them) of a table file, each
    as :func:`raw_text` of the row as the file holds it, read as the per-row checks read it
    (:func:`python_rows`): the raw text of a record dropped after it was staged (a duplicate, an
    orphan), which was normalised there (a time in UTC, a wide panel as one row per feature)."""
    found: dict[int, str] = {}
    for batch_numbers, batch, _odd in iter_batches(path):
        wanted = [i for i, number in enumerate(batch_numbers) if number in numbers]
        if wanted:
            rows = python_rows(batch.take(pa.array(wanted)))
            found.update((batch_numbers[i], raw_text(row)) for i, row in zip(wanted, rows, strict=True))
            if len(found) == len(numbers):
                break
    return found


@contextmanager
def _csv_reader(path: Path) -> Iterator[Any]:
    """A CSV/TSV file's rows, as lists of text.

    UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8": it is not part of the first
    column's name). A byte that is not UTF-8 is kept as a surrogate (``surrogateescape``), so that
    it fails its row, not the file, and is never replaced unseen. Strict quoting: a quote opened
    and never closed raises ``csv.Error``, instead of a field that runs to the end of the file.
    """
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        yield csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", strict=True)


def check_row_shape(row: dict[str, Any]) -> None:
    """Raise :class:`RecordError` for a CSV/TSV row :func:`iter_batches` could not read as a row of
    the header's columns."""
    if row.get("__blank_line__") == "\r\r\n":
        raise RecordError("blank_line", "blank line: this file ends its lines with \\r\\r\\n, so an empty line follows "
                          "each record (a CSV written in text mode on Windows, such as Python's csv module without "
                          "newline=''); write it with \\n or \\r\\n line ends")
    if "__blank_line__" in row:
        raise RecordError("blank_line", "blank line (a table holds one record per line)")
    if "__bad_width__" in row:
        raise RecordError("bad_row", "row has a different number of fields than the header")
    if "__not_utf8__" in row:
        raise RecordError("not_utf8", "row holds bytes that are not UTF-8 (shown as U+FFFD; export the file as "
                          "UTF-8)")


BatchSplit = Callable[[pa.Table, "npt.NDArray[np.int64]"], tuple["npt.NDArray[np.bool_]", pa.Table | None]]
"""(batch, its row numbers) -> (the rows the column checks clear, those rows as output rows or None)."""


def read_by_column(
    path: Path, result: TableRead, table: str, split: BatchSplit, read_row: Callable[[int, dict[str, Any]], None]
) -> None:
    """Read a table file in batches: the rows ``split`` clears are kept as one frame of ``table``
    per batch; the others go through ``read_row``, which alone words quarantine reasons, in file
    order; then the batch is done (:meth:`TableRead.batch_done`).

    With a repeated column name no row is cleared: a row then keeps the column's last value, as
    the per-row checks see it.
    """
    for numbers, batch, odd in iter_batches(path):
        result.records_in += len(numbers) + len(odd)
        record_numbers = np.asarray(numbers, dtype=np.int64)
        if len(set(batch.column_names)) == batch.num_columns:
            cleared, frame = split(batch, record_numbers)
            if frame is not None:
                result.frames[table].append(frame)
        else:
            cleared = np.zeros(batch.num_rows, dtype=bool)
        left = python_rows(batch.filter(pa.array(~cleared)))
        others = sorted([*zip(record_numbers[~cleared].tolist(), left, strict=True), *odd], key=lambda item: item[0])
        for number, row in others:
            read_row(number, row)
        result.batch_done()


@dataclass(frozen=True)
class UnreadableTime:
    """A stored time or date no calendar holds (beyond years 1 to 9999: a nanosecond count written
    into a microsecond column, a sentinel such as year 99999), as its raw count and unit."""

    count: int
    unit: str

    def __str__(self) -> str:
        return f"{self.count} {self.unit} since 1970-01-01"


_TIME_UNITS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
_CALENDAR = (datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999))


def _calendar_bounds(kind: pa.DataType) -> tuple[pa.Scalar, pa.Scalar]:
    """The first and last instant of years 1 to 9999 as ``kind``'s stored count (days for a date32,
    milliseconds for a date64, the timestamp's unit)."""
    micros = [(bound - datetime(1970, 1, 1)) // timedelta(microseconds=1) for bound in _CALENDAR]
    if pa.types.is_date32(kind):
        return pa.scalar(micros[0] // 86_400_000_000, pa.int32()), pa.scalar(micros[1] // 86_400_000_000, pa.int32())
    per_second = 1_000 if pa.types.is_date64(kind) else {"s": 1, "ms": 1_000, "us": 1_000_000,
                                                          "ns": 1_000_000_000}[kind.unit]
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        # Read in its own zone, a time within a day of the ends of the calendar in UTC may not be on it.
        micros = [micros[0] + 86_400_000_000, micros[1] - 86_400_000_000]
    low, high = (count * per_second // 1_000_000 for count in micros)
    # Nanoseconds reach only 1677 to 2262: the whole stored range is on the calendar.
    return pa.scalar(max(low, -(2**63)), pa.int64()), pa.scalar(min(high, 2**63 - 1), pa.int64())


def python_rows(batch: pa.Table) -> list[dict[str, Any]]:
    """``batch.to_pylist()``, with a time or date beyond what Python's calendar holds as an
    :class:`UnreadableTime`, for :func:`to_time` to quarantine its row, where ``to_pylist`` raises
    for the whole batch."""
    columns: list[tuple[str, list[Any]]] = []
    for name, column in zip(batch.column_names, batch.columns, strict=True):
        outside = _outside_calendar(column)
        values = column.to_pylist() if outside is None else _times_with_unreadable(column, outside)
        columns.append((name, values))
    # A repeated column name keeps its last column, as ``to_pylist`` does.
    return [{name: values[i] for name, values in columns} for i in range(batch.num_rows)]


def _stored_counts(column: pa.ChunkedArray) -> pa.ChunkedArray:
    storage = pa.int32() if pa.types.is_date32(column.type) else pa.int64()
    return column.cast(storage)


def _outside_calendar(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Which values of a time or date column lie beyond years 1 to 9999 (null stays false); None
    for a column of another type, or one whose every value is on the calendar."""
    kind = column.type
    if not (pa.types.is_timestamp(kind) or pa.types.is_date32(kind) or pa.types.is_date64(kind)):
        return None
    low, high = _calendar_bounds(kind)
    counts = _stored_counts(column)
    outside = pc.fill_null(pc.or_(pc.less(counts, low), pc.greater(counts, high)), False)
    return outside if pc.any(outside).as_py() else None


def _times_with_unreadable(column: pa.ChunkedArray, outside: pa.ChunkedArray) -> list[Any]:
    """The column's values, those ``outside`` the calendar as :class:`UnreadableTime`."""
    readable = pc.if_else(outside, pa.scalar(None, column.type), column).to_pylist()
    unit = "days" if pa.types.is_date32(column.type) else (
        "milliseconds" if pa.types.is_date64(column.type) else _TIME_UNITS[column.type.unit])
    counts = _stored_counts(column).to_pylist()
    return [UnreadableTime(count, unit) if out else value
            for value, out, count in zip(readable, outside.to_pylist(), counts, strict=True)]


def _text_table(header: list[str], rows: list[list[str]]) -> pa.Table:
    columns = [pa.array(column, pa.string()) for column in zip(*rows, strict=True)] if rows else [
        pa.array([], pa.string()) for _ in header]
    empty = pa.scalar(None, pa.string())
    return pa.Table.from_arrays([pc.if_else(pc.equal(column, ""), empty, column) for column in columns], names=header)


VISIBLE_TEXT = "[A-Za-z0-9]"
"""Text the per-row check :func:`to_string` surely accepts as non-blank: it holds a letter or digit."""


def is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def column_times(column: pa.ChunkedArray, latest: datetime,
                 zone: str = SITE_ZONE) -> tuple[pa.Array, npt.NDArray[np.bool_]] | None:
    """A time column as naive UTC microseconds, and the rows whose time :func:`to_time` surely
    reads as that value; None when the column is neither a timestamp (seconds to microseconds)
    nor text.

    A timestamp with a zone is kept as UTC, which the cast leaves as a naive time; one without is
    the site's wall-clock time (``zone``). Text (a CSV table's times) is read as :func:`to_time`
    reads it, a FHIR date or dateTime with a space allowed for the ``T``, by the FHIR fast path's
    parser; the forms it does not clear go to the per-row check, and so do wall-clock times that
    do not occur in ``zone`` (the hour a clock skips).
    """
    if pa.types.is_timestamp(column.type) and column.type.unit in ("s", "ms", "us"):
        if (outside := _outside_calendar(column)) is not None:
            # Left to the per-row check, which quarantines them: a time no calendar holds (a
            # nanosecond count in a millisecond column) would not cast to microseconds.
            column = pc.if_else(outside, pa.scalar(None, column.type), column)
        values = column.cast(pa.timestamp("us")).combine_chunks()
        earliest = EARLIEST
        if column.type.tz is None and zone != "UTC":
            values = pl.select(site_time_as_utc(pl.lit(pl.Series(values)), zone)).to_series().to_arrow()
            # The per-row check judges 1800 by the wall-clock time written: within a day of it, left to it.
            earliest = FAST_EARLIEST
        in_range = pc.and_(pc.less_equal(values, pa.scalar(latest, pa.timestamp("us"))),
                           pc.greater_equal(values, pa.scalar(earliest, pa.timestamp("us"))))
        return values, pc.fill_null(in_range, False).to_numpy(zero_copy_only=False)
    if not is_text(column.type):
        return None
    # ASCII whitespace only: a string Python's strip() would trim further then fails the date
    # pattern here and is left to the per-row check, never read differently.
    text = pl.col("time").str.strip_chars(" \t\n\r\x0b\x0c").str.replace(" ", "T", literal=True, n=1)
    parsed = fhir_time(text, latest, zone=zone)
    frame = pl.DataFrame({"time": pl.Series(column.combine_chunks()).cast(pl.String)})
    read = frame.select(parsed.value.alias("value"), parsed.ok.alias("ok"))
    return read["value"].cast(pl.Datetime("us")).to_arrow(), read["ok"].to_numpy()


def clear_columns(
    table: pa.Table, ids: list[str], texts: list[str], time: str | None = None, latest: datetime = datetime.max,
    zone: str = SITE_ZONE,
) -> npt.NDArray[np.bool_]:
    """The rows whose ``ids`` are FHIR ids, ``texts`` hold a letter or digit and ``time`` is read
    by :func:`column_times` and not after ``latest``: rows that :func:`to_patient_id`,
    :func:`to_string` and :func:`to_time` surely accept. None cleared when a column is not of
    those types (the per-row checks then word why)."""
    none = np.zeros(table.num_rows, dtype=bool)
    if not all(is_text(table.column(name).type) for name in [*ids, *texts]):
        return none
    checks = [pc.match_substring_regex(table.column(name), f"^(?:{FHIR_ID.pattern})$") for name in ids]
    checks += [pc.match_substring_regex(table.column(name), VISIBLE_TEXT) for name in texts]
    masks = [pc.fill_null(check, False).to_numpy(zero_copy_only=False) for check in checks]
    if time is not None:
        times = column_times(table.column(time), latest, zone)
        if times is None:
            return none
        masks.append(times[1])
    cleared: npt.NDArray[np.bool_] = np.logical_and.reduce(masks)
    return cleared


def require(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise RecordError("missing_value", f"column {name} is empty")
    if isinstance(value, float) and math.isnan(value):
        raise RecordError("missing_value", f"column {name} is NaN")
    return value


def to_patient_id(row: dict[str, Any]) -> str:
    value = require(row, "patient_id")
    if not isinstance(value, str):
        # An id is text: 1 and "01" would be one patient as numbers (export the column as text).
        raise RecordError("bad_type", f"column patient_id should be text, found {type(value).__name__} {value!r:.40}")
    if FHIR_ID.fullmatch(value) is None:
        raise RecordError("bad_id", f"patient_id {value!r:.60} is not a valid FHIR id")
    return value


def to_string(row: dict[str, Any], name: str) -> str:
    value = require(row, name)
    if not isinstance(value, str):
        raise RecordError("bad_type", f"column {name} should be text, found {type(value).__name__} {value!r:.40}")
    if not value.strip():
        raise RecordError("missing_value", f"column {name} is blank (only spaces or line breaks)")
    return value


def to_id(row: dict[str, Any], name: str) -> str:
    """A record id (``note_id``, ``study_id``): text that is a valid FHIR id."""
    value = to_string(row, name)
    if FHIR_ID.fullmatch(value) is None:
        raise RecordError("bad_id", f"{name} {value!r:.60} is not a valid id")
    return value


def to_time(row: dict[str, Any], name: str, latest: datetime, zone: str = SITE_ZONE) -> datetime:
    """A row's time as naive UTC: a time without a zone is the site's wall-clock time (``zone``)."""
    value = require(row, name)
    if isinstance(value, UnreadableTime):
        raise RecordError("bad_date", f"column {name} holds {value}, outside the dates a calendar can hold (years 1 "
                          "to 9999; a count in another unit than the column's, such as nanoseconds in a "
                          "microsecond column?)")
    if isinstance(value, datetime):
        try:
            utc = as_utc(value, zone)
        except OverflowError:
            # A placeholder such as 0001-01-01 east of UTC, or 9999-12-31 west of it.
            raise RecordError("bad_date", f"column {name} {value.isoformat()} is outside the dates a calendar can "
                                          "hold (years 1 to 9999 in UTC)") from None
        if utc > latest:
            raise RecordError("future_date", f"column {name} {utc:%Y-%m-%dT%H:%M:%S} is after the export time")
        # A time without a zone is judged by the year written on the site's calendar, as FHIR's are.
        written = utc if value.tzinfo is not None else value
        if written < EARLIEST:
            raise RecordError("bad_date", f"column {name} {written:%Y-%m-%dT%H:%M:%S} is before 1800")
        return utc
    if isinstance(value, date):
        # A day without a time of day: read as the FHIR date it is (known by its end, checked alike).
        return parse_datetime(value.isoformat(), f"column {name}", latest, zone)
    if isinstance(value, str):
        return parse_datetime(value.strip().replace(" ", "T", 1), f"column {name}", latest, zone)
    raise RecordError("bad_type", f"column {name} should be a time, found {type(value).__name__} {value!r:.40}")


def to_float(row: dict[str, Any], name: str) -> float:
    value = require(row, name)
    if isinstance(value, str):
        # Python's float() also reads other scripts' digits and '_' separators ('١٢', '1_000'),
        # which no lab system writes as a number: such text is a shifted or mangled field.
        try:
            if not value.isascii() or "_" in value:
                raise ValueError(value)
            value = float(value)
        except ValueError:
            raise RecordError("bad_type", f"column {name} should be a number, found {value!r:.40}") from None
    if isinstance(value, Decimal):  # a decimal column, as SQL exports write NUMERIC
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError("bad_type", f"column {name} should be a number, found {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value):
        raise RecordError("bad_value", f"column {name} is not a finite number ({value!r})")
    return check_storable(float(value), f"column {name}")


INTEGER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.0*)?")
"""An integer as text, ASCII digits only, with an all-zero fraction allowed (``1.0``: a column of
integers with a missing value is written as floats by pandas)."""


def to_int(row: dict[str, Any], name: str) -> int:
    value = require(row, name)
    if isinstance(value, str) and INTEGER_TEXT.fullmatch(stripped := value.strip()):
        value = int(stripped.split(".")[0])
    elif (isinstance(value, float) and value.is_integer()) or (
            isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError("bad_type", f"column {name} should be an integer, found {type(value).__name__} {value!r:.40}")
    return value
