"""A minimal FHIR-to-events reader for tests and benchmarks of the tasks stage, used until the
ingest stage (``features.events``) exists. It reads only what the simulator writes (NDJSON files
and transaction Bundles) and only the resource types the tasks stage needs; it validates nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from features.identifiers import subject_id_for

_SYSTEMS = {
    "http://snomed.info/sct": "SNOMED",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/cvx": "CVX",
}


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        return parsed
    return parsed.astimezone(UTC).replace(tzinfo=None)


def _resources(fhir_dir: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(fhir_dir.glob("*.ndjson")):
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    for path in sorted(fhir_dir.glob("*.json")):
        bundle = json.loads(path.read_text())
        for entry in bundle.get("entry", []):
            yield entry["resource"]


def _codes(concept: dict[str, Any] | None) -> list[str]:
    out = []
    for coding in (concept or {}).get("coding", []):
        prefix = _SYSTEMS.get(coding.get("system", ""))
        if prefix:
            out.append(f"{prefix}//{coding['code']}")
    return out


def _patient(reference: str) -> int:
    return subject_id_for(reference.split("/")[-1].removeprefix("urn:uuid:"))


def minimal_events(landing_dir: Path) -> pl.DataFrame:
    """Return an ``events`` table (EVENTS schema) for a simulated landing zone."""
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str, str]] = []
    for r in _resources(landing_dir / "fhir"):
        kind = r.get("resourceType")
        if kind == "Patient":
            sid = subject_id_for(r["id"])
            rows.append((sid, None, f"SEX//{r['gender']}", None, None, "ehr", "patients"))
            rows.append((sid, _time(r["birthDate"]), "MEDS_BIRTH", None, None, "ehr", "patients"))
            if r.get("deceasedDateTime"):
                rows.append((sid, _time(r["deceasedDateTime"]), "MEDS_DEATH", None, None, "ehr", "patients"))
            continue
        if "subject" not in r and "patient" not in r:
            continue
        sid = _patient((r.get("subject") or r.get("patient"))["reference"])
        if kind == "Encounter":
            for code in _codes(r["type"][0]):
                rows.append((sid, _time(r["period"]["start"]), code, None, None, "ehr", "encounters"))
        elif kind == "Condition":
            for code in _codes(r["code"]):
                rows.append((sid, _time(r["onsetDateTime"]), code, None, None, "ehr", "conditions"))
        elif kind == "MedicationRequest":
            for code in _codes(r["medicationCodeableConcept"])[:1]:
                rows.append((sid, _time(r["authoredOn"]), code, None, None, "ehr", "medications"))
        elif kind == "Observation":
            when = _time(r.get("effectiveDateTime"))
            parts = r.get("component") or [r]
            for part in parts:
                for code in _codes(part["code"])[:1]:
                    value = part.get("valueQuantity", {}).get("value")
                    text = None
                    if "valueCodeableConcept" in part:
                        text = (_codes(part["valueCodeableConcept"]) or [None])[0]
                    rows.append((sid, when, code, value, text, "ehr", "observations"))
        elif kind == "DocumentReference":
            note_type = (_codes(r.get("type")) or ["NOTE"])[0].split("//")[-1]
            rows.append((sid, _time(r["date"]), f"NOTE//{note_type}", None, r["id"], "notes",
                         "notes"))
    notes = pq.read_table(landing_dir / "notes" / "notes.parquet").to_pylist()
    for n in notes:
        rows.append((subject_id_for(n["patient_id"]), n["time"], f"NOTE//{n['note_type']}", None,
                     n["note_id"], "notes", "notes"))
    for v in pq.read_table(landing_dir / "genomics" / "variants.parquet").to_pylist():
        rows.append((subject_id_for(v["patient_id"]), None, f"GENE//{v['gene']}", float(v["genotype"]),
                     v["variant"], "genomics", "genomics"))
    for s in pq.read_table(landing_dir / "imaging" / "embeddings.parquet",
                           columns=["patient_id", "study_id", "time", "modality"]).to_pylist():
        rows.append((subject_id_for(s["patient_id"]), s["time"], f"IMAGING//{s['modality']}", None,
                     s["study_id"], "imaging", "imaging"))
    frame = pl.DataFrame(rows, schema={
        "subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
        "numeric_value": pl.Float32, "text_value": pl.String, "modality": pl.String,
        "source": pl.String}, orient="row")
    return frame.sort(["subject_id", "time"], nulls_last=False)
