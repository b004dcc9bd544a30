"""Tests of the per-record path on real resources with every field damaged in turn."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from features.fhir.flatten import FLATTENERS, Origin, flatten_resource
from features.fhir.validate import RecordError
from tests.features.fhir.damage import every_damage

ORIGIN = Origin("damaged.ndjson", 1, datetime(2026, 11, 1))


def real_resources(shared_fhir_dir: Path, per_type: int = 2) -> list[dict[str, Any]]:
    """The first resources of each type the per-record path flattens, from both Synthea exports."""
    found: dict[str, list[dict[str, Any]]] = {}
    resources = [orjson.loads(line) for path in sorted((shared_fhir_dir / "synthea-bulk-10").glob("*.ndjson"))
                 for line in path.read_bytes().splitlines()[:per_type]]
    for path in sorted((shared_fhir_dir / "synthea-bundles").glob("*.json"))[:3]:
        resources += [entry["resource"] for entry in orjson.loads(path.read_bytes())["entry"]]
    for resource in resources:
        kept = found.setdefault(resource["resourceType"], [])
        if resource["resourceType"] in FLATTENERS and len(kept) < per_type:
            kept.append(resource)
    return [resource for kept in found.values() for resource in kept]


def test_a_damaged_field_is_quarantined_never_an_error(shared_fhir_dir: Path) -> None:
    # One record of the wrong shape must become a quarantine row, not stop the whole ingest: every
    # other exception escapes the per-record path and ends the run (a Patient.gender list once did).
    resources = real_resources(shared_fhir_dir)
    assert {"Patient", "Encounter", "Condition", "Observation", "DocumentReference",
            "MedicationRequest"} <= {resource["resourceType"] for resource in resources}
    outcomes = {"flattened": 0, "quarantined": 0}
    for resource in resources:
        for variant in every_damage(resource):
            try:
                flatten_resource(variant, ORIGIN)
            except RecordError:
                outcomes["quarantined"] += 1
            else:
                outcomes["flattened"] += 1
    # Both happen: fields the pipeline reads are checked, the others are ignored.
    assert outcomes["quarantined"] > 1_000 and outcomes["flattened"] > 1_000, outcomes
