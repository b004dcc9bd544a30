"""Genomics tables of the landing zone into rows of the ``genomics`` table.

Stage: ingest. In: ``genomics/*.parquet|csv|tsv`` in one of three forms, told apart by columns:

* variant calls, long: ``patient_id, gene, variant, genotype`` (0/1/2 alternate alleles)
  -> code ``GENE//<gene>``, ``variant``, ``value`` = genotype;
* numeric features, long: ``patient_id, feature, value``;
* numeric features, wide: ``patient_id`` and one numeric column per feature.

Numeric features get code ``EXPRESSION//<feature>`` when the file name says ``expression``, else
``FEATURE//<feature>``. Out: rows of :data:`features.schemas.GENOMICS` and quarantine rows. A wide
row is one record: a single bad value quarantines the patient's row (naming the column), so that no
patient is left with half a panel.

Tables are checked a column at a time, in batches (:func:`clear_wide_rows`,
:func:`clear_long_rows`): an expression matrix holds thousands of genes per patient, a variant
table millions of rows. Only the rows those checks do not clear go through the per-row checks,
which alone word quarantine reasons, so both give the same rows.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from features.fhir.validate import FHIR_ID, RecordError
from features.schemas import FLOAT32_MAX, GENOMICS
from features.tables import (
    BatchSplit,
    FileError,
    Spill,
    TableRead,
    check_columns,
    check_row_shape,
    clear_columns,
    is_text,
    read_by_column,
    table_columns,
    to_float,
    to_int,
    to_patient_id,
    to_string,
)

VARIANT_COLUMNS = ("patient_id", "gene", "variant", "genotype")
FEATURE_COLUMNS = ("patient_id", "feature", "value")
# Numbers written plainly: Python's float() and the column parser read these to the same value
# (both round correctly); anything else (spaces, '1_000', 'inf') is left to the per-row checks, which
# refuse all but spaces.
_PLAIN_NUMBER = r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


def read_genomics_file(path: Path, source_file: str, spill: Spill | None = None) -> TableRead:
    """Read one genomics table (any of the three forms); ``spill`` as in :class:`TableRead`."""
    result = TableRead("genomics", source_file, rows={"genomics": []}, frames={"genomics": []}, spill=spill)
    try:
        columns = table_columns(path)
        check_columns(columns, "genomics table", ["patient_id"])
        if "gene" in columns or "genotype" in columns:
            check_columns(columns, "genomics variants table", list(VARIANT_COLUMNS))
            form = "variants"
        elif "feature" in columns:
            check_columns(columns, "genomics features table", list(FEATURE_COLUMNS))
            form = "features"
        else:
            form = "wide"
            if len(columns) < 2:
                raise FileError("missing_columns", "genomics wide table lacks column(s) <feature columns>")
        prefix = "EXPRESSION" if "expression" in path.name.lower() else "FEATURE"
        features = [name for name in columns if name != "patient_id"]
        if form == "wide":
            _check_feature_columns(columns, features)
        split: BatchSplit = (
            partial(_wide_frame, features=features, prefix=prefix, source_file=source_file) if form == "wide"
            else partial(_long_frame, form=form, prefix=prefix, source_file=source_file)
        )
        read_row = partial(_read_row, form=form, features=features, prefix=prefix, source_file=source_file,
                           result=result)
        read_by_column(path, result, "genomics", split, read_row)
    except FileError as err:
        result.reject_file(err, path)
    return result


UNNAMED_COLUMN = re.compile(r"|Unnamed: \d+|__index_level_\d+__")
"""Column names a table's row index is written under (pandas' ``to_csv`` and ``to_parquet``, R's
``write.csv`` leave the first empty), or that a trailing delimiter makes."""


def _check_feature_columns(columns: list[str], features: list[str]) -> None:
    """Raise :class:`FileError` when a wide table's feature columns cannot each be one feature: a
    name given twice (two probes of one gene), or a column with no name (a written row index,
    whose row numbers would be read as a feature)."""
    unnamed = [f"{position + 1}" for position, name in enumerate(columns) if UNNAMED_COLUMN.fullmatch(name)]
    if unnamed:
        raise FileError("unnamed_columns", f"wide genomics table has unnamed column(s) at position(s) "
                        f"{', '.join(unnamed[:5])} (a row index or a trailing delimiter; write the table without "
                        "them, e.g. pandas to_csv(index=False))")
    repeated = sorted({name for name in features if features.count(name) > 1})
    if repeated:
        raise FileError("duplicate_columns", f"wide genomics table names feature(s) {', '.join(repeated[:5])} more "
                        "than once (expected one column per feature; name each probe apart)")


def _read_row(number: int, row: dict[str, Any], *, form: str, features: list[str], prefix: str, source_file: str,
              result: TableRead) -> None:
    """Check one row; add its genomics rows to ``result``, or its quarantine row."""
    try:
        check_row_shape(row)
        patient_id = to_patient_id(row)
        rows: list[tuple[Any, ...]]
        if form == "variants":
            genotype = to_int(row, "genotype")
            if genotype not in (0, 1, 2):
                raise RecordError("bad_value", f"genotype {genotype} is not 0, 1 or 2 alternate alleles")
            # Names without the spaces around them: 'CYP2C19 ' is the gene CYP2C19.
            rows = [(patient_id, f"GENE//{to_string(row, 'gene').strip()}", to_string(row, "variant").strip(),
                     float(genotype), source_file, number)]
        elif form == "features":
            rows = [(patient_id, f"{prefix}//{to_string(row, 'feature').strip()}", None, to_float(row, "value"),
                     source_file, number)]
        else:
            rows = [(patient_id, f"{prefix}//{name}", None, to_float(row, name), source_file, number)
                    for name in features]
    except RecordError as err:
        result.reject(number, row, err.code, err.reason)
        return
    result.rows["genomics"].extend(rows)


def _wide_frame(table: pa.Table, record_numbers: npt.NDArray[np.int64], *, features: list[str], prefix: str,
                source_file: str) -> tuple[npt.NDArray[np.bool_], pa.Table | None]:
    """The rows of a wide batch :func:`clear_wide_rows` clears, as ``genomics`` rows (None if none)."""
    cleared, values = clear_wide_rows(table, features)
    kept = np.flatnonzero(cleared)
    if not len(kept):
        return cleared, None
    # One patient's features stay together, in column order: the per-row order.
    rows = pa.array(np.repeat(kept, len(features)))
    codes = pa.array([f"{prefix}//{name}" for name in features], pa.string())
    frame = pa.table(
        [pc.take(table.column("patient_id"), rows).cast(pa.string()),
         pc.take(codes, pa.array(np.tile(np.arange(len(features)), len(kept)))), pa.nulls(len(rows), pa.string()),
         pa.array(values[kept].ravel()), pa.repeat(pa.scalar(source_file, pa.string()), len(rows)),
         pc.take(pa.array(record_numbers), rows)],
        schema=GENOMICS,
    )
    return cleared, frame


def _long_frame(table: pa.Table, record_numbers: npt.NDArray[np.int64], *, form: str, prefix: str,
                source_file: str) -> tuple[npt.NDArray[np.bool_], pa.Table | None]:
    """The rows of a long batch :func:`clear_long_rows` clears, as ``genomics`` rows (None if none)."""
    cleared, values = clear_long_rows(table, form)
    if not cleared.any():
        return cleared, None
    kept = table.filter(pa.array(cleared))
    name, code_prefix = ("gene", "GENE//") if form == "variants" else ("feature", f"{prefix}//")
    variant = (pc.utf8_trim_whitespace(kept.column("variant").cast(pa.string())) if form == "variants"
               else pa.nulls(kept.num_rows, pa.string()))
    frame = pa.table(
        [kept.column("patient_id").cast(pa.string()),
         pc.binary_join_element_wise(code_prefix, pc.utf8_trim_whitespace(kept.column(name).cast(pa.string())), ""),
         variant,
         pa.array(values[cleared]), pa.repeat(pa.scalar(source_file, pa.string()), kept.num_rows),
         pa.array(record_numbers[cleared])],
        schema=GENOMICS,
    )
    return cleared, frame


def clear_long_rows(table: pa.Table, form: str) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """The rows of a long batch that the per-row checks would accept as they are, and their values.

    Variants: a FHIR patient id, a gene and a variant holding a letter or digit, and a genotype of
    0, 1 or 2 (an integer column, or the digit alone in a text column). Features: a FHIR patient
    id, a feature holding a letter or digit, and a finite number as in :func:`clear_wide_rows`.
    """
    n = table.num_rows
    texts = ["gene", "variant"] if form == "variants" else ["feature"]
    cleared = clear_columns(table, ["patient_id"], texts)
    if form == "variants":
        genotype = table.column("genotype")
        if pa.types.is_integer(genotype.type):
            # Unsafe: a value beyond 2**53 (a sentinel such as INT64_MIN) is no genotype either way.
            values = pc.fill_null(pc.cast(genotype, pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False)
        elif is_text(genotype.type):
            digit = pc.fill_null(pc.match_substring_regex(genotype, "^[012]$"), False)
            values = pl.Series(pc.if_else(digit, genotype, None)).cast(pl.Float64).fill_null(np.nan).to_numpy()
        else:
            return np.zeros(n, dtype=bool), np.full(n, np.nan)
        cleared &= np.isin(values, (0.0, 1.0, 2.0))
    else:
        values = _numbers(table.column("value"))
        with np.errstate(invalid="ignore"):
            cleared &= np.abs(values) <= FLOAT32_MAX  # finite, and storable in events (float32)
    return cleared, values


def _numbers(column: pa.ChunkedArray) -> npt.NDArray[np.float64]:
    """A column's values as floats where the per-row :func:`to_float` surely reads them alike (a
    numeric column, or a plainly written number in a text column), else NaN."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return np.asarray(
            pc.fill_null(pc.cast(column, pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False),
            dtype=np.float64,
        )
    if pa.types.is_decimal(column.type):
        # Each value as the per-row check reads it (Python's float of the Decimal): a cast could
        # round the last digit otherwise.
        return np.array([np.nan if value is None else float(value) for value in column.to_pylist()], dtype=np.float64)
    if is_text(column.type):
        plain = pc.fill_null(pc.match_substring_regex(column, _PLAIN_NUMBER), False)
        return pl.Series(pc.if_else(plain, column, None)).cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy()
    return np.full(len(column), np.nan)


def clear_wide_rows(table: pa.Table, features: list[str]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """The rows of a wide batch that the per-row checks would accept as they are, and every row's
    feature values (rows x features; meaningless where a row is not cleared).

    Cleared: a patient id that is a FHIR id, and in every feature column a finite number, of a
    numeric column (not boolean) or written plainly in a text column. Text columns are checked
    together, as one column: a panel has thousands.
    """
    n = table.num_rows
    patient = table.column("patient_id")
    values = np.full((n, len(features)), np.nan)
    if not is_text(patient.type) or n == 0:
        return np.zeros(n, dtype=bool), values
    cleared = pc.fill_null(pc.match_substring_regex(patient, f"^(?:{FHIR_ID.pattern})$"), False).to_numpy(
        zero_copy_only=False
    )
    text: list[int] = []
    for j, name in enumerate(features):
        column = table.column(name)
        if is_text(column.type):
            text.append(j)
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values[:, j] = _numbers(column)
        else:
            cleared[:] = False
    if text:
        joined = pa.chunked_array(
            [chunk.cast(pa.large_string()) for j in text for chunk in table.column(features[j]).chunks],
            pa.large_string(),
        )
        values[:, text] = _numbers(joined).reshape(len(text), n).T
    with np.errstate(invalid="ignore"):
        cleared &= (np.abs(values) <= FLOAT32_MAX).all(axis=1)  # finite, and storable in events (float32)
    return cleared, values

