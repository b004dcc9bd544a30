"""Read FHIR files of a landing zone as numbered raw records, in bounded pieces.

Stage: ingest. In: ``fhir/*.ndjson``, ``*.ndjson.gz`` (Bulk FHIR, one resource per line, any mix
of types) and ``*.json`` (a ``Bundle`` of type collection, transaction, batch or searchset, or a
single resource). Out: :class:`RawRecord` objects (record number, bytes, and for Bundles the
entry's ``fullUrl`` map; a Bundle entry that deletes a resource holds a :class:`BundleDelete`) and
:class:`RawReject` objects for what cannot even be split into records (an unreadable file, a
truncated ``.gz`` stream, a Bundle entry without a resource).

Large NDJSON files are cut into :class:`ReadUnit` byte ranges at line boundaries, so that workers
read them in parallel with bounded memory; record numbers stay the file's own line numbers.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson

from features.fhir.specs import is_r4_resource_type
from features.fhir.validate import FHIR_ID, json_text

FHIR_SUFFIXES = (".ndjson", ".ndjson.gz", ".json")
UNIT_BYTES = 16 * 1024 * 1024
"""Target size of one NDJSON read unit: a worker holds about this much raw text at a time."""
BUNDLE_TYPES = frozenset(
    {
        "collection",
        "transaction",
        "batch",
        "searchset",
        "transaction-response",
        "batch-response",
        "history",
        "message",
        "document",
    }
)


@dataclass(frozen=True)
class ReadUnit:
    """A piece of one FHIR file that one worker reads: a line range of NDJSON or a whole file."""

    path: str
    # The file relative to the landing zone: what quarantine rows and tables name.
    source_file: str
    kind: str  # "ndjson", "ndjson.gz" or "json"
    start: int = 0
    end: int = -1
    # Line number of the first line at ``start`` (1-based).
    first_line: int = 1


_NO_URLS: Mapping[str, tuple[str, str]] = MappingProxyType({})


class RawRecord:
    """One record of a file: its number, raw bytes, and for Bundle entries the parsed resource and
    the Bundle's fullUrl map. A plain slotted class: one is made per resource, in the hot loop."""

    __slots__ = ("full_urls", "number", "parsed", "raw")

    def __init__(
        self, number: int, raw: bytes, parsed: object = None, full_urls: Mapping[str, tuple[str, str]] = _NO_URLS
    ) -> None:
        self.number = number
        self.raw = raw
        # Parsed already (Bundle entries), else None.
        self.parsed = parsed
        self.full_urls = full_urls


@dataclass(frozen=True)
class BundleDelete:
    """A Bundle entry that deletes the resource ``resource_type/resource_id`` (``request.method``
    ``DELETE``): it has no resource of its own; ``entry`` is the entry as found, ``bundle_time`` the
    Bundle's ``meta.lastUpdated`` or else ``timestamp`` as written (None when it has neither)."""

    resource_type: str
    resource_id: str
    entry: dict[str, Any]
    bundle_time: str | None = None


@dataclass
class RawReject:
    number: int
    raw: str
    code: str
    reason: str


def fhir_kind(path: Path) -> str | None:
    """``ndjson``, ``ndjson.gz`` or ``json`` for a FHIR file name, else None."""
    name = path.name.lower()
    if name.endswith(".ndjson.gz"):
        return "ndjson.gz"
    if name.endswith(".ndjson"):
        return "ndjson"
    if name.endswith(".json"):
        return "json"
    return None


def plan_units(path: Path, source_file: str, unit_bytes: int = UNIT_BYTES) -> list[ReadUnit]:
    """Cut one FHIR file into read units (only plain NDJSON is cut; the rest is one unit)."""
    kind = fhir_kind(path)
    if kind is None:
        raise ValueError(f"{path} is not a FHIR file")
    size = path.stat().st_size
    if kind != "ndjson" or size <= unit_bytes:
        return [ReadUnit(str(path), source_file, kind)]
    units: list[ReadUnit] = []
    start, line = 0, 1
    with path.open("rb") as handle:
        while start < size:
            handle.seek(start)
            block = handle.read(unit_bytes)
            cut = block.rfind(b"\n")
            if cut < 0 or start + len(block) >= size:
                # Last piece, or one line longer than a unit: read on to the next newline.
                rest = b"" if start + len(block) >= size else handle.readline()
                end = start + len(block) + len(rest)
                units.append(ReadUnit(str(path), source_file, kind, start, end, line))
                break
            end = start + cut + 1
            units.append(ReadUnit(str(path), source_file, kind, start, end, line))
            line += block.count(b"\n", 0, cut + 1)
            start = end
    return units


def _split_lines(data: bytes, first_line: int) -> Iterator[RawRecord]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for offset, line in enumerate(lines):
        yield RawRecord(first_line + offset, line[:-1] if line.endswith(b"\r") else line)


def read_ndjson_range(unit: ReadUnit) -> bytes:
    """The bytes of a plain NDJSON unit (its line range of the file). Raises OSError."""
    with open(unit.path, "rb") as handle:
        handle.seek(unit.start)
        return handle.read() if unit.end < 0 else handle.read(unit.end - unit.start)


def iter_unit(unit: ReadUnit) -> Iterator[RawRecord | RawReject]:
    """Yield every record of a read unit, and rejects for what is not a record."""
    if unit.kind == "ndjson":
        try:
            data = read_ndjson_range(unit)
        except OSError as exc:
            yield RawReject(0, "", "unreadable_file", f"file cannot be read: {exc.strerror or exc}")
            return
        if unit.start == 0 and not data:
            yield RawReject(0, "", "empty_file", "file is empty")
            return
        yield from _split_lines(data, unit.first_line)
    elif unit.kind == "ndjson.gz":
        yield from _iter_gzip(unit)
    else:
        yield from _iter_json(unit)


GZIP_READ_BYTES = 8192
"""Decompressed bytes asked of the gzip stream per read: the buffer a line-by-line reader uses, so
a damaged stream gives up at the same point, with the same lines read before it."""


def iter_gzip_blocks(unit: ReadUnit, block_bytes: int = UNIT_BYTES) -> Iterator[tuple[int, bytes] | RawReject]:
    """Yield a ``.ndjson.gz`` file as (number of its first line, block of whole lines), each block
    about ``block_bytes`` of text; then, for a damaged or empty stream, one reject.

    A block's lines end with a newline, except the file's last line when the file has none. What a
    truncated or corrupt stream yields is every whole line decompressed before the damage.
    """
    number = 0
    pending: list[bytes] = []
    pending_bytes = 0

    def whole_lines(final: bool) -> Iterator[tuple[int, bytes]]:
        nonlocal number, pending, pending_bytes
        data = b"".join(pending)
        cut = len(data) if final else data.rfind(b"\n") + 1
        pending, pending_bytes = ([data[cut:]], len(data) - cut) if cut < len(data) else ([], 0)
        if cut:
            block = data[:cut]
            yield number + 1, block
            number += block.count(b"\n") + (not block.endswith(b"\n"))

    try:
        with gzip.open(unit.path, "rb") as handle:
            while chunk := handle.read1(GZIP_READ_BYTES):
                pending.append(chunk)
                pending_bytes += len(chunk)
                # Cut only at a newline just read: a line longer than a block is not re-joined
                # for every piece of it.
                if pending_bytes >= block_bytes and b"\n" in chunk:
                    yield from whole_lines(final=False)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        yield from whole_lines(final=False)
        detail = "the gzip stream ends early (truncated file)" if isinstance(exc, EOFError) else f"gzip error: {exc}"
        yield RawReject(
            number + 1,
            "",
            "truncated_gzip" if isinstance(exc, EOFError) else "bad_gzip",
            f"{detail}; {number} lines before it were read",
        )
        return
    yield from whole_lines(final=True)
    if number == 0:
        yield RawReject(0, "", "empty_file", "file is empty (no lines after decompression)")


def _iter_gzip(unit: ReadUnit) -> Iterator[RawRecord | RawReject]:
    for block in iter_gzip_blocks(unit):
        if isinstance(block, RawReject):
            yield block
        else:
            yield from _split_lines(block[1], block[0])


class _DoubledObject(dict[str, Any]):
    """A JSON object that gave the key ``doubled`` twice (holding the last value, as orjson does)."""

    doubled: str


def _marking_doubled_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) == len(pairs):
        return document
    marked = _DoubledObject(document)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.doubled = key
            break
        seen.add(key)
    return marked


def _first_doubled(value: Any, where: str) -> tuple[str, str] | None:
    """The first key given twice in ``value`` (parsed with :func:`_marking_doubled_keys`) and the
    path of the object that gives it (``subject``, ``component[1].valueQuantity``), or None."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _DoubledObject):
            return item.doubled, path
        if isinstance(item, dict):
            stack.extend(reversed([(v, f"{path}.{k}" if path else k) for k, v in item.items()]))
        elif isinstance(item, list):
            stack.extend(reversed([(v, f"{path}[{i}]") for i, v in enumerate(item)]))
    return None


def _doubled_reason(key: str, where: str) -> str:
    return (f"key {key!r:.40} appears twice in {where}: which of its values the source meant is unknown "
            "(a JSON reader silently keeps one)")


def _first_doubled_reason(value: Any, whole: str) -> str | None:
    """The reason naming the first key given twice in ``value`` (marked), its object named by its
    path, or by ``whole`` when it is ``value`` itself; None when no key is."""
    doubled = _first_doubled(value, "")
    return None if doubled is None else _doubled_reason(doubled[0], doubled[1] or whole)


def parse_marking_doubled_keys(data: bytes) -> tuple[Any, bool]:
    """JSON text parsed with every object that gives a key twice marked, and whether there was one.

    orjson, like most JSON readers, keeps the last of two values of a key without a word: a
    diagnosis filed under the second of two ``subject`` references, an Observation read as a
    Patient. Python's own reader shows the pairs, at about twice orjson's time, so this runs only on
    text that :func:`may_give_a_key_twice` picks out. Text nested deeper than Python recurses
    (orjson reads 1,024 levels) is not searched: ``(None, False)``.
    """
    found = False

    def mark(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        document = _marking_doubled_keys(pairs)
        found = found or isinstance(document, _DoubledObject)
        return document

    try:
        return json.loads(data, object_pairs_hook=mark), found
    except RecursionError:
        return None, False


_SPACED_KEY_END = re.compile(rb'"[ \t\r\n]+:')
_ESCAPED_QUOTE_OR_COLON = re.compile(rb"\\u00(?:22|3[aA])")


def _key_ends(text: bytes) -> int:
    """How many times a quote is followed by a colon in JSON text: once per object key, and for
    the rare string that holds an escaped quote before a colon."""
    return text.count(b'":') + len(_SPACED_KEY_END.findall(text))


def may_give_a_key_twice(data: bytes, document: Any) -> bool:
    """A cheap screen for :func:`parse_marking_doubled_keys`: whether the JSON text ``data`` may
    give a key twice in an object. ``document`` is what orjson read from it, one value per key, so
    its rewrite holds fewer key ends than the text when a key was given twice (or, rarely, when a
    string holds a quote and then spaces before a colon; the search then finds nothing). Text that
    writes a quote or a colon as ``\\u0022`` or ``\\u003a`` (.NET's encoder does, in a string
    holding JSON) is always searched: orjson's rewrite of it adds a key end, which could hide a
    key given twice. About a tenth of the search's time."""
    if _ESCAPED_QUOTE_OR_COLON.search(data):
        return True
    try:
        rewritten = orjson.dumps(document)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels): searched
        return True
    return _key_ends(data) > rewritten.count(b'":')  # orjson writes no space before a colon


def doubled_key_reason(data: bytes) -> str | None:
    """A one-line reason naming a key that an object of the JSON text ``data`` gives twice (and the
    object's path in the resource), or None when there is none."""
    document, found = parse_marking_doubled_keys(data)
    return _first_doubled_reason(document, "the resource") if found else None


def _doubled_entry_reasons(bundle: dict[str, Any]) -> dict[int, str]:
    """The reason per entry number for the entries of a marked Bundle that give a key twice."""
    entries = bundle.get("entry")
    reasons: dict[int, str] = {}
    for index, entry in enumerate(entries if isinstance(entries, list) else [], start=1):
        if (reason := _first_doubled_reason(entry, "the entry")) is not None:
            reasons[index] = f"Bundle entry {index}: {reason}"
    return reasons


def _iter_json(unit: ReadUnit) -> Iterator[RawRecord | RawReject]:
    try:
        data = Path(unit.path).read_bytes()
    except OSError as exc:
        yield RawReject(0, "", "unreadable_file", f"file cannot be read: {exc.strerror or exc}")
        return
    if not data.strip():
        yield RawReject(0, "", "empty_file", "file is empty")
        return
    preview = data[:300].decode("utf-8", "replace")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = "truncated" if "unexpected end" in str(exc).lower() or "eof" in str(exc).lower() else "not valid"
        yield RawReject(0, preview, "invalid_json", f"whole file is not valid JSON ({reason}: {str(exc)[:120]})")
        return
    if not isinstance(document, dict):
        yield RawReject(
            0, preview, "not_object", f"file holds a JSON {type(document).__name__}, not a Bundle or resource"
        )
        return
    marked, has_doubled = parse_marking_doubled_keys(data) if may_give_a_key_twice(data, document) else (None, False)
    if document.get("resourceType") != "Bundle":
        doubled = _first_doubled_reason(marked, "the resource") if has_doubled else None
        yield RawRecord(1, data, document) if doubled is None else RawReject(1, preview, "duplicate_key", doubled)
        return
    entry_doubled: dict[int, str] = {}
    if has_doubled and isinstance(marked, dict):
        # A second ``entry`` list would hide every resource of the first, a second meta.lastUpdated
        # would date its deletions: a key given twice outside the entries makes the file one row.
        envelope = ((marked.doubled, "") if isinstance(marked, _DoubledObject)
                    else _first_doubled({k: v for k, v in marked.items() if k != "entry"}, ""))
        if envelope is not None:
            key, where = envelope
            yield RawReject(0, preview, "duplicate_key",
                            _doubled_reason(key, f"Bundle.{where}" if where else "the Bundle"))
            return
        entry_doubled = _doubled_entry_reasons(marked)
    bundle_type = document.get("type")
    entries = document.get("entry", [])
    if not isinstance(bundle_type, str) or bundle_type not in BUNDLE_TYPES or not isinstance(entries, list):
        yield RawReject(
            0,
            preview,
            "bad_bundle",
            f"Bundle.type {bundle_type!r:.40} is not a known Bundle type or Bundle.entry is not a list",
        )
        return
    entries = [_with_entry_id(entry) for entry in entries]
    meta = document.get("meta")
    stamp = meta.get("lastUpdated") if isinstance(meta, dict) else None
    stamp = stamp if isinstance(stamp, str) else document.get("timestamp")
    bundle_time = stamp if isinstance(stamp, str) else None
    full_urls: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("resource"), dict)
            and isinstance(entry.get("fullUrl"), str)
        ):
            resource = entry["resource"]
            if isinstance(resource.get("resourceType"), str) and isinstance(resource.get("id"), str):
                full_urls[entry["fullUrl"]] = (resource["resourceType"], resource["id"])
    for index, entry in enumerate(entries, start=1):
        if index in entry_doubled:  # a DELETE's url given twice names two resources
            yield RawReject(index, json_text(entry).decode("utf-8", "replace"), "duplicate_key", entry_doubled[index])
            continue
        if isinstance(entry, dict) and "resource" not in entry and _request_method(entry) == "DELETE":
            yield _deletion(index, entry, bundle_time)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raw = json_text(entry).decode("utf-8", "replace")
            what = (
                "has no resource"
                if isinstance(entry, dict) and "resource" not in entry
                else "is not an object with a resource object"
            )
            yield RawReject(index, raw, "no_resource", f"Bundle entry {index} {what}")
            continue
        yield RawRecord(index, b"", entry["resource"], full_urls)


def _request_method(entry: dict[str, Any]) -> object:
    request = entry.get("request")
    return request.get("method") if isinstance(request, dict) else None


def _deletion(index: int, entry: dict[str, Any], bundle_time: str | None) -> RawRecord | RawReject:
    """A ``DELETE`` entry as the deletion it asks for, or a reject when its URL names no one resource.

    The URL is ``Type/id``, possibly after a server base (``https://ehr.example/fhir/Patient/123``).
    A conditional delete (``Patient?identifier=...``) names the resources a search would find on the
    sender's server: this export cannot run that search, so it is quarantined, not guessed at.
    """
    url = entry["request"].get("url")
    raw = json_text(entry).decode("utf-8", "replace")
    if isinstance(url, str) and "?" in url:
        return RawReject(index, raw, "conditional_delete",
                         f"Bundle entry {index} deletes by search ({url[:80]}); conditional deletes are not applied")
    if not isinstance(url, str):
        return RawReject(index, raw, "bad_delete",
                         f"Bundle entry {index} is a DELETE without a request.url (expected like 'Patient/123')")
    parts = url.rstrip("/").split("/")
    if len(parts) < 2 or not is_r4_resource_type(parts[-2]) or FHIR_ID.fullmatch(parts[-1]) is None:
        return RawReject(index, raw, "bad_delete",
                         f"Bundle entry {index} is a DELETE whose request.url {url!r:.80} names no resource "
                         "(expected like 'Patient/123')")
    return RawRecord(index, b"", BundleDelete(parts[-2], parts[-1], entry, bundle_time))


def _with_entry_id(entry: Any) -> Any:
    """A Bundle entry whose resource has no ``id``, given the one the entry names for it.

    A client's transaction creates resources (``POST``) without ids and names each one by a
    temporary ``urn:uuid:`` fullUrl, by which the other entries refer to it; an update (``PUT``)
    names it by its ``request.url`` (``Patient/123``). Either is the resource's identity in this
    export, so it becomes the id (still checked as a FHIR id) instead of the whole resource being
    lost as ``missing_id``. Entries with an id, or naming none, are returned as they are.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict) or "id" in entry["resource"]:
        return entry
    full_url, request = entry.get("fullUrl"), entry.get("request")
    if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        rid = full_url.removeprefix("urn:uuid:")
    elif (
        isinstance(request, dict) and request.get("method") == "PUT" and isinstance(request.get("url"), str)
        and request["url"].count("/") == 1 and request["url"].split("/")[0] == entry["resource"].get("resourceType")
    ):
        rid = request["url"].split("/")[1].split("?")[0]
    else:
        return entry
    return {**entry, "resource": {**entry["resource"], "id": rid}}


def fetch_raw(path: Path, kind: str, numbers: set[int], limit: int = 500) -> dict[int, str]:
    """Return the raw text of the given record numbers of a file (for quarantine rows)."""
    found: dict[int, str] = {}
    for record in iter_unit(ReadUnit(str(path), "", kind)):
        if isinstance(record, RawRecord) and record.number in numbers:
            parsed = record.parsed.entry if isinstance(record.parsed, BundleDelete) else record.parsed
            raw = record.raw if parsed is None or kind != "json" else json_text(parsed)
            if kind == "json" and record.number == 1 and record.raw:
                raw = record.raw
            found[record.number] = raw[: limit * 4].decode("utf-8", "replace")[:limit]
            if len(found) == len(numbers):
                break
    return found
