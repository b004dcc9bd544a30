"""Damage real FHIR resources one field at a time, for the tests of both ingest paths."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

WRONG_VALUES: list[object] = [None, 0, -0.0, 1.5, True, "", "x", "2020-13-45", [], ["x"], {}, {"a": 1}, [{"a": 1}]]
"""A value of every JSON type, and strings a field of another type might not expect."""


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
    """A copy of ``resource`` with the field at ``path`` set to ``value``."""
    copied = copy.deepcopy(resource)
    holder: Any = copied
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return copied


def damages_by_field(resource: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """Per field of ``resource`` (but ``resourceType``): the resource with that field set to each of
    :data:`WRONG_VALUES` in turn."""
    for path in field_paths(resource):
        if path != ("resourceType",):
            yield [damaged(resource, path, value) for value in WRONG_VALUES]


def every_damage(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every variant of :func:`damages_by_field`, one after another."""
    for variants in damages_by_field(resource):
        yield from variants


def damages_with_fresh_ids(resource: dict[str, Any], start: int) -> Iterator[list[dict[str, Any]]]:
    """:func:`damages_by_field`, each variant with an id of its own (``<id>-<n>``, numbered on from
    ``start`` over every variant) unless the id is what is damaged, so that no two lines written
    from them are duplicates of one another."""
    number = start
    for variants in damages_by_field(resource):
        for variant in variants:
            if variant.get("id") == resource["id"]:
                variant["id"] = f"{resource['id'][:40]}-{number}"
            number += 1
        yield variants
