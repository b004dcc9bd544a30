"""Notes tables of the landing zone into rows of the ``notes`` table.

Stage: ingest. In: ``notes/*.parquet|csv|tsv`` with columns ``patient_id, note_id, time, note_type,
text`` (:data:`features.schemas.NOTES_INPUT`). Out: rows of :data:`features.schemas.NOTES` and
quarantine rows. Notes carried by FHIR ``DocumentReference`` resources are read by
:mod:`features.fhir.flatten` into the same table.

Rows are checked a column at a time in batches (:func:`features.tables.clear_columns`); only the
rows those checks do not clear go through the per-row checks, which alone word quarantine reasons,
so both give the same rows. A text table's times are strings, read by the FHIR date parser.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from features.fhir.columnar import note_type_slugs
from features.fhir.flatten import note_type_slug
from features.fhir.validate import SITE_ZONE, RecordError
from features.schemas import NOTES, NOTES_INPUT
from features.tables import (
    FileError,
    Spill,
    TableRead,
    check_row_shape,
    clear_columns,
    column_times,
    read_by_column,
    require_columns,
    to_id,
    to_patient_id,
    to_string,
    to_time,
)


def read_notes_file(
    path: Path, source_file: str, latest: datetime, spill: Spill | None = None, zone: str = SITE_ZONE
) -> TableRead:
    """Read one notes table; every row becomes a ``notes`` row or a rejection. ``spill`` as in
    :class:`TableRead`; a time without a zone is the site's wall-clock time (``zone``)."""
    result = TableRead("notes", source_file, rows={"notes": []}, frames={"notes": []}, spill=spill)
    try:
        require_columns(path, "notes table", NOTES_INPUT.names)
        split = partial(_notes_frame, latest=latest, zone=zone, source_file=source_file)
        read_row = partial(_read_row, latest=latest, zone=zone, source_file=source_file, result=result)
        read_by_column(path, result, "notes", split, read_row)
    except FileError as err:
        result.reject_file(err, path)
    return result


def _notes_frame(table: pa.Table, record_numbers: npt.NDArray[np.int64], *, latest: datetime, zone: str,
                 source_file: str) -> tuple[npt.NDArray[np.bool_], pa.Table | None]:
    """The rows of a batch :func:`clear_columns` clears, as ``notes`` rows (None if none)."""
    cleared = clear_columns(table, ["patient_id", "note_id"], ["note_type", "text"], "time", latest, zone)
    if not cleared.any():
        return cleared, None
    kept = table.filter(pa.array(cleared))
    text = kept.column("text").cast(pa.string())
    digests = [hashlib.sha256(value.encode("utf-8")).hexdigest() for value in text.to_pylist()]
    times = column_times(kept.column("time"), latest, zone)
    assert times is not None  # clear_columns cleared rows: the column is of a time type
    copied = [kept.column(name).cast(NOTES.field(name).type) for name in ("note_id", "patient_id")]
    copied += [times[0], note_type_slugs(pl.Series(kept.column("note_type").cast(pa.string()))).to_arrow()]
    place = [pa.repeat(pa.scalar(source_file, pa.string()), kept.num_rows), pa.array(record_numbers[cleared])]
    return cleared, pa.table([*copied, text, pa.array(digests, pa.string()), *place], schema=NOTES)


def _read_row(number: int, row: dict[str, Any], *, latest: datetime, zone: str, source_file: str,
              result: TableRead) -> None:
    """Check one row; add its notes row to ``result``, or its quarantine row."""
    try:
        check_row_shape(row)
        patient_id = to_patient_id(row)
        note_id = to_id(row, "note_id")
        time = to_time(row, "time", latest, zone)
        # Spelled as a DocumentReference's type is (``Progress note`` -> ``progress_note``): one
        # code per kind of note, whichever feed brought it.
        note_type = note_type_slug(to_string(row, "note_type"))
        text = to_string(row, "text")
    except RecordError as err:
        result.reject(
            number, row, err.code, err.reason, row.get("note_id") if isinstance(row.get("note_id"), str) else None
        )
        return
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    result.rows["notes"].append((note_id, patient_id, time, note_type, text, digest, source_file, number))
