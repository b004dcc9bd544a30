"""Imaging embedding tables of the landing zone into rows of the ``imaging`` table.

Stage: ingest. In: ``imaging/*.parquet`` with columns ``patient_id, study_id, time, modality,
body_site, embedding`` (:data:`features.schemas.IMAGING_INPUT`). Out: rows of
:data:`features.schemas.IMAGING` and quarantine rows. Every embedding of one file must have the
file's usual length (its most common one) and only finite values: a model cannot use anything else.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from features.fhir.validate import FHIR_ID, RecordError
from features.schemas import IMAGING_INPUT
from features.tables import (
    FileError,
    TableRead,
    iter_rows,
    read_column,
    require_columns,
    to_patient_id,
    to_string,
    to_time,
)


def _usual_length(path: Path) -> int | None:
    column = read_column(path, "embedding")
    try:
        lengths = pc.list_value_length(column).drop_null().to_pylist()
    except pa.ArrowNotImplementedError:  # not a list column: every row is rejected by the row check
        return None
    return Counter(lengths).most_common(1)[0][0] if lengths else None


def read_imaging_file(path: Path, source_file: str, latest: datetime) -> TableRead:
    """Read one imaging embeddings table."""
    result = TableRead("imaging", source_file, rows={"imaging": []})
    try:
        if path.suffix.lower() != ".parquet":
            raise FileError("unsupported_file", "imaging embeddings must be Parquet (a list<float> column)")
        require_columns(path, "imaging table", IMAGING_INPUT.names)
        length = _usual_length(path)
        for number, row in iter_rows(path):
            result.records_in += 1
            try:
                patient_id = to_patient_id(row)
                study_id = to_string(row, "study_id")
                if FHIR_ID.fullmatch(study_id) is None:
                    raise RecordError("bad_id", f"study_id {study_id!r:.60} is not a valid id")
                time = to_time(row, "time", latest)
                modality = to_string(row, "modality")
                body_site = to_string(row, "body_site")
                embedding = row.get("embedding")
                if not isinstance(embedding, list) or not embedding:
                    raise RecordError(
                        "bad_type", f"embedding should be a non-empty list of floats, found {type(embedding).__name__}"
                    )
                if len(embedding) != length:
                    raise RecordError(
                        "bad_embedding",
                        f"embedding has {len(embedding)} values, expected {length} (the file's usual length)",
                    )
                for value in embedding:
                    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                        raise RecordError(
                            "bad_embedding", f"embedding holds a non-finite or non-numeric value ({value!r:.20})"
                        )
            except RecordError as err:
                row = (
                    {**row, "embedding": f"<{len(row['embedding'])} values>"}
                    if isinstance(row.get("embedding"), list)
                    else row
                )
                result.reject(
                    number,
                    row,
                    err.code,
                    err.reason,
                    row.get("study_id") if isinstance(row.get("study_id"), str) else None,
                )
                continue
            result.rows["imaging"].append(
                (patient_id, study_id, time, modality, body_site, embedding, source_file, number)
            )
    except FileError as err:
        result.reject_file(err)
    return result
