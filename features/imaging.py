"""Imaging embedding tables of the landing zone into rows of the ``imaging`` table.

Stage: ingest. In: ``imaging/*.parquet`` with columns ``patient_id, study_id, time, modality,
body_site, embedding`` (:data:`features.schemas.IMAGING_INPUT`). Out: rows of
:data:`features.schemas.IMAGING` and quarantine rows. Every embedding must have the landing zone's
usual length (the most common one over all its imaging files) and only finite values: a model
cannot use anything else.

Rows are checked a column at a time in batches (:func:`clear_imaging_rows`); only the rows those
checks do not clear go through the per-row checks, which alone word quarantine reasons, so both
give the same rows.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from features.fhir.validate import SITE_ZONE, RecordError
from features.schemas import FLOAT32_MAX, IMAGING, IMAGING_INPUT
from features.tables import (
    FileError,
    Spill,
    TableRead,
    clear_columns,
    column_times,
    read_by_column,
    read_column,
    require_columns,
    to_id,
    to_patient_id,
    to_string,
    to_time,
)


def usual_embedding_length(paths: list[Path]) -> int | None:
    """The most common embedding length over every row of the imaging tables ``paths`` (the
    first file's on a tie; None when no row has a non-empty list). Files that cannot be read or lack a
    column are skipped: :func:`read_imaging_file` rejects them whole.

    One length for the whole landing zone, not one per file: the model reads every study through
    one projection, so two sites' files made by different image encoders cannot share a warehouse.
    """
    counts: Counter[int] = Counter()
    for path in paths:
        if path.suffix.lower() != ".parquet":
            continue
        try:
            require_columns(path, "imaging table", IMAGING_INPUT.names)  # a file rejected whole has no say
            column = read_column(path, "embedding")
            # An empty list is no embedding (its row is quarantined): it has no say in the length.
            counts.update(length for length in pc.list_value_length(column).drop_null().to_pylist() if length > 0)
        except (FileError, pa.ArrowNotImplementedError):
            continue  # no such column, or not a list column: the file's own read words why
    return counts.most_common(1)[0][0] if counts else None


def read_imaging_file(
    path: Path, source_file: str, latest: datetime, length: int | None, spill: Spill | None = None,
    zone: str = SITE_ZONE,
) -> TableRead:
    """Read one imaging embeddings table; ``length``: the landing zone's
    :func:`usual_embedding_length`; ``spill`` as in :class:`TableRead`; a time without a zone is the
    site's wall-clock time (``zone``)."""
    result = TableRead("imaging", source_file, rows={"imaging": []}, frames={"imaging": []}, spill=spill)
    try:
        if path.suffix.lower() != ".parquet":
            raise FileError("unsupported_file", "imaging embeddings must be Parquet (a list<float> column)")
        require_columns(path, "imaging table", IMAGING_INPUT.names)
        split = partial(_imaging_frame, length=length, latest=latest, zone=zone, source_file=source_file)
        read_row = partial(_read_row, length=length, latest=latest, zone=zone, source_file=source_file,
                           result=result)
        read_by_column(path, result, "imaging", split, read_row)
    except FileError as err:
        result.reject_file(err, path)
    return result


def _imaging_frame(table: pa.Table, record_numbers: npt.NDArray[np.int64], *, length: int | None, latest: datetime,
                   zone: str, source_file: str) -> tuple[npt.NDArray[np.bool_], pa.Table | None]:
    """The rows of a batch :func:`clear_imaging_rows` clears, as ``imaging`` rows (None if none)."""
    cleared = clear_imaging_rows(table, length, latest, zone)
    if not cleared.any():
        return cleared, None
    kept = table.filter(pa.array(cleared))
    times = column_times(kept.column("time"), latest, zone)
    assert times is not None  # clear_imaging_rows cleared rows: the column is of a time type
    frame = pa.table(
        # Unchecked casts: integer embeddings beyond float32's exact range (2**24) round, as floats do.
        [times[0] if field.name == "time"
         else pc.ascii_upper(pc.ascii_trim_whitespace(kept.column(field.name))).cast(field.type)
         if field.name == "modality"
         else kept.column(field.name).cast(field.type, safe=False)
         for field in IMAGING_INPUT]
        + [pa.repeat(pa.scalar(source_file, pa.string()), kept.num_rows), pa.array(record_numbers[cleared])],
        schema=IMAGING,
    )
    return cleared, frame


_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def modality_code(modality: str) -> str:
    """``CT`` for `` ct``: DICOM's modality codes are upper case, and one modality written two ways
    would be two codes (``IMAGING//CT``, ``IMAGING//ct``) to the model. ASCII only, as
    :func:`_imaging_frame` reads a whole column."""
    return modality.strip(" \t\n\r\x0b\x0c").translate(_ASCII_UPPER)


def _read_row(number: int, row: dict[str, Any], *, length: int | None, latest: datetime, zone: str,
              source_file: str, result: TableRead) -> None:
    """Check one row; add its imaging row to ``result``, or its quarantine row."""
    try:
        patient_id = to_patient_id(row)
        study_id = to_id(row, "study_id")
        time = to_time(row, "time", latest, zone)
        modality = modality_code(to_string(row, "modality"))
        body_site = to_string(row, "body_site")
        embedding = row.get("embedding")
        if not isinstance(embedding, list):
            raise RecordError(
                "bad_type", f"embedding should be a non-empty list of floats, found {type(embedding).__name__}"
            )
        if not embedding:
            raise RecordError("bad_embedding", "embedding is an empty list (expected the study's embedding values)")
        if len(embedding) != length:
            raise RecordError(
                "bad_embedding",
                f"embedding has {len(embedding)} values, expected {length} (the landing zone's usual length: "
                "one image encoder per warehouse)",
            )
        for value in embedding:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RecordError("bad_embedding", f"embedding holds a non-numeric value ({value!r:.20}; expected "
                                                   "numbers)")
            if not math.isfinite(value):
                raise RecordError("bad_embedding", f"embedding holds a non-finite value ({value!r:.20})")
            if abs(value) > FLOAT32_MAX:
                raise RecordError("bad_embedding", f"embedding holds {value:.9g}, beyond the range stored (expected "
                                                   f"a magnitude of at most {FLOAT32_MAX:.9g}, float32)")
        embedding = [float(value) for value in embedding]
    except RecordError as err:
        shown = (
            {**row, "embedding": f"<{len(row['embedding'])} values>"} if isinstance(row.get("embedding"), list) else row
        )
        result.reject(
            number, shown, err.code, err.reason, row.get("study_id") if isinstance(row.get("study_id"), str) else None
        )
        return
    result.rows["imaging"].append((patient_id, study_id, time, modality, body_site, embedding, source_file, number))


def clear_imaging_rows(table: pa.Table, length: int | None, latest: datetime,
                       zone: str = SITE_ZONE) -> npt.NDArray[np.bool_]:
    """The rows of a batch that the per-row checks would accept as they are.

    Cleared: patient and study ids, modality, body site and time as :func:`clear_columns` clears
    them, and an embedding of numbers (not booleans), all finite, of the file's usual ``length``.
    """
    embedding = table.column("embedding")
    if (
        table.num_rows == 0
        or not length
        or not (pa.types.is_list(embedding.type) or pa.types.is_large_list(embedding.type))
        or not (pa.types.is_floating(embedding.type.value_type) or pa.types.is_integer(embedding.type.value_type))
    ):
        return np.zeros(table.num_rows, dtype=bool)
    cleared = clear_columns(table, ["patient_id", "study_id"], ["modality", "body_site"], "time", latest, zone)
    cleared &= pc.fill_null(pc.equal(pc.list_value_length(embedding), length), False).to_numpy(zero_copy_only=False)
    if not cleared.any():
        return cleared
    values = pc.list_flatten(embedding.filter(pa.array(cleared))).cast(pa.float64(), safe=False)
    with np.errstate(invalid="ignore"):
        finite = (np.abs(pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False)) <= FLOAT32_MAX).reshape(
            -1, length).all(axis=1)
    cleared[np.flatnonzero(cleared)[~finite]] = False
    return cleared
