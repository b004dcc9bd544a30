"""The MEDS code metadata (``codes``) built beside ``events``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import orjson
import polars as pl
from polars.testing import assert_frame_equal

from features.ingest import ingest_landing_zone


def observation(rid: str, code: str, display: str | None, components: list[tuple[str, str]] | None = None) -> bytes:
    def concept(code: str, display: str | None) -> dict[str, object]:
        coding: dict[str, object] = {"system": "http://loinc.org", "code": code}
        return {"coding": [coding | ({"display": display} if display else {})]}

    resource: dict[str, object] = {
        "resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2020-01-02", "code": concept(code, display),
    }
    if components:
        resource["component"] = [{"code": concept(c, d), "valueQuantity": {"value": 120.0}} for c, d in components]
    else:
        resource["valueQuantity"] = {"value": 1.0}
    return orjson.dumps(resource)


def test_codes_describe_every_event_code_by_its_most_common_display(tmp_path: Path) -> None:
    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}),
        # Worded three ways: the most common display wins; a tie goes to the alphabetically first.
        observation("a1", "4548-4", "Hemoglobin A1c"),
        observation("a2", "4548-4", "Hemoglobin A1c"),
        observation("a3", "4548-4", "HbA1c"),
        observation("b1", "2160-0", "Creatinine"),
        observation("b2", "2160-0", "Creatinine [Mass/volume] in Serum"),
        # Never described: the code stays, without a description.
        observation("c1", "39156-5", None),
        # A panel's components name the panel as their parent.
        observation("d1", "85354-9", "Blood pressure panel", [("8480-6", "Systolic blood pressure")]),
        observation("d2", "55284-4", "Blood pressure", [("8480-6", "Systolic blood pressure")]),
    ]
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "export.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    ingest_landing_zone(landing.parent, tmp_path / "out", workers=1, export_time=datetime(2025, 1, 1))

    expected = pl.DataFrame(
        {
            "code": ["LOINC//2160-0", "LOINC//39156-5", "LOINC//4548-4", "LOINC//8480-6", "MEDS_BIRTH", "SEX//female"],
            "description": ["Creatinine", None, "Hemoglobin A1c", "Systolic blood pressure", "Birth", "Sex: female"],
            "parent_codes": [[], [], [], ["LOINC//55284-4", "LOINC//85354-9"], [], []],
        },
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )
    assert_frame_equal(pl.read_parquet(tmp_path / "out" / "codes.parquet"), expected)
