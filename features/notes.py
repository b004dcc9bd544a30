"""Notes tables of the landing zone into rows of the ``notes`` table.

Stage: ingest. In: ``notes/*.parquet|csv|tsv`` with columns ``patient_id, note_id, time, note_type,
text`` (:data:`features.schemas.NOTES_INPUT`). Out: rows of :data:`features.schemas.NOTES` and
quarantine rows. Notes carried by FHIR ``DocumentReference`` resources are read by
:mod:`features.fhir.flatten` into the same table.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from features.fhir.validate import FHIR_ID, RecordError
from features.schemas import NOTES_INPUT
from features.tables import FileError, TableRead, iter_rows, require_columns, to_patient_id, to_string, to_time


def read_notes_file(path: Path, source_file: str, latest: datetime) -> TableRead:
    """Read one notes table; every row becomes a ``notes`` row or a rejection."""
    result = TableRead("notes", source_file, rows={"notes": []})
    try:
        require_columns(path, "notes table", NOTES_INPUT.names)
        rows = iter_rows(path)
        for number, row in rows:
            result.records_in += 1
            try:
                if "__bad_width__" in row:
                    raise RecordError("bad_row", "row has a different number of fields than the header")
                patient_id = to_patient_id(row)
                note_id = to_string(row, "note_id")
                if FHIR_ID.fullmatch(note_id) is None:
                    raise RecordError("bad_id", f"note_id {note_id!r:.60} is not a valid id")
                time = to_time(row, "time", latest)
                note_type = to_string(row, "note_type")
                text = to_string(row, "text")
            except RecordError as err:
                result.reject(
                    number,
                    row,
                    err.code,
                    err.reason,
                    row.get("note_id") if isinstance(row.get("note_id"), str) else None,
                )
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            result.rows["notes"].append((note_id, patient_id, time, note_type, text, digest, source_file, number))
    except FileError as err:
        result.reject_file(err)
    return result
