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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from features.fhir.validate import RecordError
from features.tables import (
    FileError,
    TableRead,
    iter_rows,
    table_columns,
    to_float,
    to_int,
    to_patient_id,
    to_string,
)

VARIANT_COLUMNS = ("patient_id", "gene", "variant", "genotype")
FEATURE_COLUMNS = ("patient_id", "feature", "value")


def read_genomics_file(path: Path, source_file: str) -> TableRead:
    """Read one genomics table (any of the three forms)."""
    result = TableRead("genomics", source_file, rows={"genomics": []})
    out = result.rows["genomics"]
    try:
        columns = table_columns(path)
        if "patient_id" not in columns:
            raise FileError("missing_columns", "genomics table lacks column patient_id")
        if "gene" in columns or "genotype" in columns:
            missing = [name for name in VARIANT_COLUMNS if name not in columns]
            form = "variants"
        elif "feature" in columns:
            missing = [name for name in FEATURE_COLUMNS if name not in columns]
            form = "features"
        else:
            missing = [] if len(columns) > 1 else ["<feature columns>"]
            form = "wide"
        if missing:
            raise FileError("missing_columns", f"genomics {form} table lacks column(s) {', '.join(missing)}")
        prefix = "EXPRESSION" if "expression" in path.name.lower() else "FEATURE"
        features = [name for name in columns if name != "patient_id"]
        for number, row in iter_rows(path):
            result.records_in += 1
            try:
                if "__bad_width__" in row:
                    raise RecordError("bad_row", "row has a different number of fields than the header")
                patient_id = to_patient_id(row)
                rows: list[tuple[Any, ...]]
                if form == "variants":
                    genotype = to_int(row, "genotype")
                    if genotype not in (0, 1, 2):
                        raise RecordError("bad_value", f"genotype {genotype} is not 0, 1 or 2 alternate alleles")
                    rows = [
                        (
                            patient_id,
                            f"GENE//{to_string(row, 'gene')}",
                            to_string(row, "variant"),
                            float(genotype),
                            source_file,
                            number,
                        )
                    ]
                elif form == "features":
                    rows = [
                        (
                            patient_id,
                            f"{prefix}//{to_string(row, 'feature')}",
                            None,
                            to_float(row, "value"),
                            source_file,
                            number,
                        )
                    ]
                else:
                    rows = [
                        (patient_id, f"{prefix}//{name}", None, to_float(row, name), source_file, number)
                        for name in features
                    ]
            except RecordError as err:
                result.reject(number, row, err.code, err.reason)
                continue
            out.extend(rows)
    except FileError as err:
        result.reject_file(err)
    return result
