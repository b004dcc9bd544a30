"""The MEDS code metadata (``codes``) built beside ``events``."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.events import codes_in_several_units, event_frames, units_by_code
from features.fhir.specs import CODED_TABLES
from features.ingest import ingest_landing_zone
from features.schemas import INTERNAL_TABLES


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


def _schema(table: str) -> pl.Schema:
    frame = pl.from_arrow(INTERNAL_TABLES[table].empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


def test_conditions_vaccines_allergies_and_drug_statements_are_known_from_the_later_of_onset_and_recorded_time(
) -> None:
    # A diagnosis entered in 2018 with onset 2015 happened in 2015 but is known from 2018: before,
    # nobody knew of it; so is a vaccine given elsewhere in 2010 and reported in 2019, and a drug
    # the patient said in 2019 they had taken since 2012 (MedicationStatement.dateAsserted). A record
    # without recorded_time, or recorded before its onset, is known from its onset (no known_time).
    names = ["patients", "encounters", *CODED_TABLES, "observations", "notes", "imaging_studies", "imaging", "genomics"]
    tables = {name: pl.LazyFrame(schema=_schema(name)) for name in names}
    tables["patients"] = pl.LazyFrame(
        [{"patient_id": "p1", "subject_id": 7, "source_file": "f", "record_number": 1}], schema=_schema("patients")
    )

    def coded(table: str, rows: list[tuple[str, datetime, datetime | None]]) -> pl.LazyFrame:
        return pl.LazyFrame(
            [
                {"resource_id": rid, "resource_type": "Condition", "patient_id": "p1", "time": time,
                 "code": "SNOMED//44054006", "codes": ["SNOMED//44054006"], "recorded_time": recorded,
                 "source_file": "f", "record_number": 1}
                for rid, time, recorded in rows
            ],
            schema=_schema(table),
        )

    tables["conditions"] = coded("conditions", [
        ("late", datetime(2015, 6, 1), datetime(2018, 2, 1, 9)),
        ("unrecorded", datetime(2016, 1, 1), None),
        ("recorded-first", datetime(2021, 1, 1), datetime(2020, 12, 1)),
    ])
    tables["immunizations"] = coded("immunizations", [("reported", datetime(2010, 10, 1), datetime(2019, 1, 5))])
    tables["allergies"] = coded("allergies", [("allergy", datetime(2000, 1, 1), datetime(2019, 3, 4))])
    tables["medications"] = coded("medications", [("statement", datetime(2012, 5, 1), datetime(2019, 4, 2))])

    events = pl.concat(event_frames(tables)).collect()
    expected = pl.DataFrame(
        {
            "subject_id": [7] * 6,
            "time": [datetime(2015, 6, 1), datetime(2016, 1, 1), datetime(2021, 1, 1), datetime(2012, 5, 1),
                     datetime(2010, 10, 1), datetime(2000, 1, 1)],
            "known_time": [datetime(2018, 2, 1, 9), None, None, datetime(2019, 4, 2), datetime(2019, 1, 5),
                           datetime(2019, 3, 4)],
            "code": ["SNOMED//44054006"] * 6,
            "numeric_value": [None] * 6,
            "unit": [None] * 6,
            "text_value": [None] * 6,
            "modality": ["ehr"] * 6,
            "source": ["conditions/late", "conditions/unrecorded", "conditions/recorded-first",
                       "medications/statement", "immunizations/reported", "allergies/allergy"],
        },
        schema=events.schema,
    )
    assert_frame_equal(events, expected)


def test_observation_events_carry_the_unit_of_their_value(tmp_path: Path) -> None:
    def weighed(rid: str, quantity: dict[str, object]) -> bytes:
        return orjson.dumps({
            "resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2020-01-02", "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "valueQuantity": quantity})

    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-01-01"}),
        # The UCUM code is the unit, before the display text; a quantity without either has none.
        weighed("w1", {"value": 70.5, "unit": "kilogram", "system": "http://unitsofmeasure.org", "code": "kg"}),
        weighed("w2", {"value": 155.0, "unit": "lb"}),
        weighed("w3", {"value": 71.0}),
        orjson.dumps({"resourceType": "Observation", "id": "s1", "status": "final",
                      "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-01-02",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
                      "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "8517006"}]}}),
    ]
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "export.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    ingest_landing_zone(landing.parent, tmp_path / "out", workers=1, export_time=datetime(2025, 1, 1))

    events = (pl.read_parquet(tmp_path / "out" / "events.parquet")
              .filter(pl.col("code").str.starts_with("LOINC//")).sort("source")
              .select("source", "numeric_value", "unit", "text_value"))
    expected = pl.DataFrame(
        {"source": ["observations/s1", "observations/w1", "observations/w2", "observations/w3"],
         "numeric_value": [None, 70.5, 155.0, 71.0], "unit": [None, "kg", "lb", None],
         "text_value": ["SNOMED//8517006", None, None, None]},
        schema={"source": pl.String, "numeric_value": pl.Float32, "unit": pl.String, "text_value": pl.String})
    assert_frame_equal(events, expected)


def test_codes_in_several_units_lists_each_unit_most_values_first() -> None:
    events = pl.LazyFrame({
        "code": ["LOINC//w"] * 4 + ["LOINC//bp"] * 2 + ["LOINC//smoking"] * 2,
        "numeric_value": [70.0, 80.0, 150.0, 75.0, 120.0, 130.0, None, None],
        "unit": ["kg", "kg", "[lb_av]", None, "mm[Hg]", "mm[Hg]", None, "x"],
    })
    several = codes_in_several_units(events)
    expected = pl.DataFrame({"code": ["LOINC//w"] * 3, "unit": ["kg", "[lb_av]", None], "values": [2, 1, 1]})
    assert_frame_equal(several, expected)
    assert units_by_code(several).rows() == [("LOINC//w", "kg (2), [lb_av] (1, converted), no unit (1, kept apart)")]


@pytest.mark.parametrize(("zone", "birth"), [
    ("Asia/Kolkata", datetime(2020, 3, 9, 18, 30)),  # 00:00 on the 10th at UTC+5:30
    ("America/New_York", datetime(2020, 3, 10, 4, 0)),  # 00:00 on the 10th at UTC-4 (summer time began on the 8th)
    ("UTC", datetime(2020, 3, 10)),
])
def test_birth_is_the_first_instant_of_the_birth_date_on_the_sites_calendar(
    tmp_path: Path, zone: str, birth: datetime
) -> None:
    # A newborn seen at 02:00 on the day of birth, site time: the visit follows the birth.
    lines = [
        orjson.dumps({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "2020-03-10"}),
        orjson.dumps({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "IMP"},
                      "subject": {"reference": "Patient/p1"}, "period": {"start": "2020-03-10T02:00:00"}}),
    ]
    landing = tmp_path / "landing" / "fhir"
    landing.mkdir(parents=True)
    (landing / "export.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    ingest_landing_zone(landing.parent, tmp_path / "out", workers=1, export_time=datetime(2025, 1, 1),
                        site_timezone=zone)

    events = pl.read_parquet(tmp_path / "out" / "events.parquet").filter(pl.col("time").is_not_null())
    assert events.sort("time").select("code", "time").rows() == [
        ("MEDS_BIRTH", birth), ("ENCOUNTER//IMP", birth + timedelta(hours=2))]
