"""Tests of the per-record path on real resources with every field damaged in turn."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from features.fhir.flatten import FLATTENERS, Origin, flatten_resource
from features.fhir.validate import RecordError

ORIGIN = Origin("damaged.ndjson", 1, datetime(2026, 11, 1))
# A value of every JSON type, and strings a field of another type might not expect.
WRONG_VALUES: list[object] = [None, 0, -0.0, 1.5, True, "", "x", "2020-13-45", [], ["x"], {}, {"a": 1}, [{"a": 1}]]


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


def field_paths(value: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every field of a resource (the first two items of each list), depth first."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from field_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            yield from field_paths(item, (*path, index))


def damaged(resource: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    copied = copy.deepcopy(resource)
    holder: Any = copied
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return copied


def test_a_damaged_field_is_quarantined_never_an_error(shared_fhir_dir: Path) -> None:
    # One record of the wrong shape must become a quarantine row, not stop the whole ingest: every
    # other exception escapes the per-record path and ends the run (a Patient.gender list once did).
    resources = real_resources(shared_fhir_dir)
    assert {"Patient", "Encounter", "Condition", "Observation", "DocumentReference",
            "MedicationRequest"} <= {resource["resourceType"] for resource in resources}
    outcomes = {"flattened": 0, "quarantined": 0}
    for resource in resources:
        for path in field_paths(resource):
            if path == ("resourceType",):
                continue
            for value in WRONG_VALUES:
                try:
                    flatten_resource(damaged(resource, path, value), ORIGIN)
                except RecordError:
                    outcomes["quarantined"] += 1
                else:
                    outcomes["flattened"] += 1
    # Both happen: fields the pipeline reads are checked, the others are ignored.
    assert outcomes["quarantined"] > 1_000 and outcomes["flattened"] > 1_000, outcomes

