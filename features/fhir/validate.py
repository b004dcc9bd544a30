"""Validation of the FHIR fields cohortcast uses: the fast path, and full R4 validation (strict).

Stage: ingest. In: one parsed FHIR resource (a ``dict``). Out: typed field values, or a
:class:`RecordError` whose ``reason`` is the one line a data engineer reads in the quarantine table.

The fast path checks only what the pipeline uses (ids, dates, references, codes, value types), with
plain Python and no model objects; ``strict`` mode additionally validates each resource with the
``fhir.resources.R4B`` pydantic models (FHIR 4.3.0, the same as R4 4.0.1 for the clinical resources
the pipeline reads; the R4 types R4B replaced, :data:`~features.fhir.specs.R4_ONLY_TYPES`, have no
model there and are quarantined in strict mode).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from importlib.metadata import version
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import polars as pl

from features.errors import CohortcastError
from features.fhir.specs import R4_ONLY_TYPES, is_r4_resource_type
from features.schemas import FLOAT32_MAX

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""FHIR R4 ``id``: 1 to 64 letters, digits, '-' and '.'."""

_DATETIME = re.compile(
    r"([0-9]{4})(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?)?)?"
)
EARLIEST = datetime(1800, 1, 1)
"""Dates before this are taken as data-entry errors, not history."""


class RecordError(ValueError):
    """One record cannot be used. ``code`` is a stable slug (``bad_date``), ``reason`` one line."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_id(value: Any, where: str) -> str:
    """Return ``value`` if it is a valid FHIR id, else raise :class:`RecordError`.

    Examples
    --------
    >>> check_id("abc-1.2", "Patient.id")
    'abc-1.2'
    >>> check_id("a b", "Patient.id")
    Traceback (most recent call last):
    ...
    features.fhir.validate.RecordError: Patient.id 'a b' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)
    """
    if value is None:
        raise RecordError("missing_id", f"{where} is missing")
    if not isinstance(value, str) or FHIR_ID.fullmatch(value) is None:
        raise RecordError("bad_id", f"{where} {value!r:.80} is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")
    return value


SITE_ZONE = "UTC"
"""The default site time zone (IANA name): what a date, or a time without an offset, is read in."""


def parse_datetime(value: Any, where: str, latest: datetime, zone: str = SITE_ZONE) -> datetime:
    """Parse a FHIR ``date``, ``dateTime`` or ``instant`` to the naive UTC time it is known by.

    A date without a time of day, or a partial date (``2019``, ``2019-04``), stands for its whole
    day, month or year on the site's calendar (``zone``, an IANA time zone), and is read as the
    **last** microsecond of that period, but never later than ``latest``: a fact recorded only as
    "2019-04-12" may have happened at any hour of that day, so it is surely known only once the day
    is over where it was recorded. A model with a prediction time of 2019-04-12T00:00 then never
    reads it as an input, and a death recorded as "2020" does not make a patient dead on 1
    January. A day read in UTC would end 4 to 8 hours early for a site in the Americas, so a fact of
    that evening would pass for known before it happened. A dateTime without an offset (which FHIR
    requires with a time of day, and some senders omit) is also the site's local time. A leap
    second (``23:59:60``, which FHIR allows) is the last microsecond of its minute. A value whose
    first instant is before 1800 or after ``latest`` (the export time) is rejected.

    Examples
    --------
    >>> parse_datetime("2016-03-14T11:40:00-04:00", "x", datetime(2030, 1, 1))
    datetime.datetime(2016, 3, 14, 15, 40)
    >>> parse_datetime("2019-04", "x", datetime(2030, 1, 1))
    datetime.datetime(2019, 4, 30, 23, 59, 59, 999999)
    >>> parse_datetime("2019-04-12", "x", datetime(2030, 1, 1), zone="America/New_York")
    datetime.datetime(2019, 4, 13, 3, 59, 59, 999999)
    >>> parse_datetime("2019-04-12", "x", datetime(2019, 4, 12, 9, 30))
    datetime.datetime(2019, 4, 12, 9, 30)
    >>> parse_datetime("2016-12-31T23:59:60Z", "x", datetime(2030, 1, 1))
    datetime.datetime(2016, 12, 31, 23, 59, 59, 999999)
    """
    return _checked_time(value, where, latest, period_end=True, zone=zone)


def _checked_time(value: Any, where: str, latest: datetime, period_end: bool, zone: str = SITE_ZONE) -> datetime:
    """:func:`_parse_datetime_text` of ``value``, or the :class:`RecordError` its reason words."""
    if not isinstance(value, str):
        raise RecordError("bad_type", f"{where} should be a date string, found {type(value).__name__} {value!r:.40}")
    parsed = _parse_datetime_text(value, latest, period_end, zone)
    if type(parsed) is tuple:
        code, tail = parsed
        raise RecordError(code, f"{where} {value!r:.60} {tail}")
    return parsed  # type: ignore[return-value]


def site_zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``America/Chicago``), or a :class:`CohortcastError` that says
    what is expected."""
    try:
        zone = _zone(name)
        # The fast path converts with polars, whose zone names are the IANA database's alone
        # (zoneinfo also takes file names such as 'posix/America/New_York' or 'localtime').
        pl.select(pl.lit(datetime(2000, 1, 1)).dt.replace_time_zone(name))
    except (ZoneInfoNotFoundError, ValueError, pl.exceptions.ComputeError):
        raise CohortcastError(f"site time zone {name!r} is not an IANA time zone name (expected like 'America/Chicago' "
                              "or 'UTC')") from None
    return zone


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def as_utc(value: datetime, zone: str, last_occurrence: bool = False) -> datetime:
    """The naive UTC instant of ``value``: an aware time converted, a naive one read as wall-clock
    time in ``zone``. A wall-clock time that occurs twice (the hour a clock goes back) is its first
    occurrence, or with ``last_occurrence`` its second (the end of a day whose clocks go back at
    midnight is the end of its repeated hour); one that does not occur (the hour a clock skips) is
    read with the offset before the change.

    Raises
    ------
    OverflowError
        When the instant is outside years 1 to 9999 in UTC.
    """
    if value.tzinfo is None:
        if zone == "UTC":
            return value
        value = value.replace(tzinfo=_zone(zone), fold=int(last_occurrence))
    return value.astimezone(UTC).replace(tzinfo=None)


@lru_cache(maxsize=1 << 16)
def _parse_datetime_text(value: str, latest: datetime, period_end: bool,
                         zone: str = SITE_ZONE) -> datetime | tuple[str, str]:
    """:func:`parse_datetime` of one string: the datetime, or (reason code, reason after the value).
    ``period_end``: a value without a time of day is the end of its period (capped at ``latest``),
    else its first instant. The range checks are on the first instant either way. A value without
    an offset is wall-clock time in ``zone``.

    Cached: an export repeats the same instants many times (every observation of a visit), and the
    regex and ``fromisoformat`` are the ingest's largest per-resource cost after JSON parsing.
    """
    match = _DATETIME.fullmatch(value)
    if match is None:
        return "bad_date", "is not a FHIR date/dateTime"
    period = None
    try:
        if match.group(4) is None:
            year, month = int(match.group(1)), match.group(3)
            local = datetime(year, int(month or 1), 1)
            period = "month" if month else "year"
        elif match.group(6) is None:
            local = datetime.fromisoformat(value)
            period = "day"
        else:
            text = value
            if match.group(8) == "60":
                # A leap second (23:59:60 UTC; another minute in a local zone), which ``datetime``
                # cannot hold: the last microsecond of its minute keeps it in order, not before any
                # other instant of that minute and before the next, whatever its fraction.
                rest = match.end(9) if match.group(9) is not None else match.end(8)
                text = value[: match.start(8)] + "59.999999" + value[rest:]
            elif match.group(9) is not None and len(match.group(9)) > 7:
                text = value[:26] + value[match.end(9) :]
            local = datetime.fromisoformat(text)
        parsed = as_utc(local, zone)
    except ValueError as exc:
        return "bad_date", f"is not a real date ({exc})"
    except OverflowError:
        # A placeholder such as 0001-01-01T00:00:00+01:00 names an instant before year 1 in UTC.
        return "bad_date", "is outside the dates a calendar can hold (years 1 to 9999 in UTC)"
    # A value without an offset names a day or a wall-clock time on the site's calendar: its year
    # is the one written.
    if (parsed if local.tzinfo is not None else local) < EARLIEST:
        return "bad_date", "is before 1800"
    if parsed > latest:
        return "future_date", f"is after the export time {latest:%Y-%m-%dT%H:%M:%S}"
    if period is None or not period_end:
        return parsed
    last = _last_instant(local, period)
    # The period ends with year 9999 (already after any export time).
    return latest if last == datetime.max else min(as_utc(last, zone, last_occurrence=True), latest)


def _last_instant(first: datetime, period: str) -> datetime:
    """The last microsecond of the day, month or year that starts at ``first``."""
    try:
        if period == "day":
            following = first + timedelta(days=1)
        elif period == "month" and first.month < 12:
            following = first.replace(month=first.month + 1)
        else:
            following = first.replace(year=first.year + 1, month=1)
    except (OverflowError, ValueError):  # the period ends with year 9999
        return datetime.max
    return following - timedelta(microseconds=1)


def parse_first_instant(value: Any, where: str, latest: datetime, zone: str = SITE_ZONE) -> datetime:
    """Parse a FHIR ``date`` or ``dateTime`` to its **first** instant (naive UTC): a partial date
    is the start of its day, month or year (on the site's calendar, ``zone``). For the start of a
    span, where :func:`parse_datetime` reads the end of the period a value names."""
    return _checked_time(value, where, latest, period_end=False, zone=zone)


def parse_date(value: Any, where: str, latest: datetime, zone: str = SITE_ZONE) -> date:
    """Parse a FHIR ``date`` (e.g. ``birthDate``) to a ``date``; a partial date is its first day.
    A date stays the calendar date written (checked against ``latest`` on the site's calendar); a
    dateTime is its UTC date."""
    first = _checked_time(value, where, latest, period_end=False, zone=zone)
    if len(value) > DATE_LENGTH:
        return first.date()
    return date(int(value[:4]), int(value[5:7] or 1), int(value[8:10] or 1))


DATE_LENGTH = len("2019-04-01")
"""The longest FHIR date without a time: any longer text is a dateTime."""


def is_before(value: str, other: str, zone: str = SITE_ZONE) -> bool:
    """Whether the FHIR date/dateTime ``value`` lies wholly before ``other``, compared at the
    coarser precision of the two. Both must be valid (read by :func:`parse_datetime` already).

    A date or partial date stands for its whole day, month or year: a death recorded as
    ``2020-01`` of a baby born on ``2020-01-15`` is not before the birth, nor is the end of a visit
    given as ``2021-03-15`` before its start at 10:00 that day. Against a date, a dateTime is read
    as its date on its own local calendar, as written (before any conversion to UTC): a birthDate
    is the local calendar date of birth, so a death at 03:00+05:30 on that day (21:30 UTC the day
    before) is a neonatal death on the day of birth, not a death before birth. Two dateTimes are
    compared as instants (to the microsecond, in UTC; one without an offset is wall-clock time in
    ``zone``, the site's).

    Examples
    --------
    >>> is_before("2020-01-01T03:00:00+05:30", "2020-01-01")
    False
    >>> is_before("2020-01", "2020-01-15")
    False
    >>> is_before("2021-03-15T22:00:00-05:00", "2021-03-16")
    True
    >>> is_before("2021-03-15T10:00:00+01:00", "2021-03-15T09:30:00Z")
    True
    """
    shorter = min(len(value), len(other))
    if shorter <= DATE_LENGTH:
        # YYYY, YYYY-MM and YYYY-MM-DD are fixed width and a dateTime starts with its local date:
        # the texts cut to the coarser precision compare as the dates they name.
        return value[:shorter] < other[:shorter]
    return parse_datetime(value, "value", datetime.max, zone) < parse_datetime(other, "other", datetime.max, zone)


def check_number(value: Any, where: str, stored: bool = True) -> float:
    """Return a finite JSON number as ``float``; booleans, strings, non-finite values and, for a
    number that is ``stored`` as it is, numbers beyond what the events table holds
    (:data:`features.schemas.FLOAT32_MAX`) fail."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError("bad_type", f"{where} should be a number, found {type(value).__name__} {value!r:.40}")
    number = float(value)
    if not math.isfinite(number):
        raise RecordError("bad_value", f"{where} is not a finite number ({value!r:.40})")
    return check_storable(number, where) if stored else number


def check_storable(number: float, where: str) -> float:
    """Return ``number`` if float32 holds it (:data:`features.schemas.FLOAT32_MAX`)."""
    if abs(number) > FLOAT32_MAX:
        raise RecordError("bad_value", f"{where} {number:.9g} is beyond the range stored (expected a magnitude of at "
                                       f"most {FLOAT32_MAX:.9g}, float32)")
    return number


def json_text(value: Any) -> bytes:
    """A parsed JSON value written back as JSON (a Bundle entry's resource, for the fast path and
    for quarantine rows). orjson writes 255 levels of nesting but reads 1,024; a value nested
    deeper than it writes (a chain of extensions) is written by the standard library instead, and
    one deeper than Python recurses is named, not written."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "replace")
    except RecursionError:
        return b'"(JSON nested too deep to be written back)"'


def check_object(value: Any, where: str) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object."""
    if not isinstance(value, dict):
        raise RecordError("bad_type", f"{where} should be an object, found {type(value).__name__}")
    return value


def check_string(value: Any, where: str) -> str:
    """Return ``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise RecordError(
            "bad_type", f"{where} should be a non-empty string, found {type(value).__name__} {value!r:.40}"
        )
    return value


@lru_cache(maxsize=256)
def r4_model(resource_type: str) -> Any:
    """The ``fhir.resources.R4B`` model class of a resource type."""
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


R4B_CANNOT_READ = (KeyError, TypeError, AttributeError, ValueError, RecursionError)
"""What ``fhir.resources`` raises, besides pydantic's ValidationError, on input it cannot read: a
nested resource of a type it has no model for (``KeyError``), a ``resourceType`` that is not a
string (``TypeError``), a primitive's ``_element`` given as text (``AttributeError``), nesting
deeper than Python recurses. :func:`r4b_unreadable_shape` finds the shapes known to do this; a
record that raises without one of them is ``fhir_library_error``, not ``fhir_invalid``: the
library (or its version) may be at fault rather than the record, and a data engineer must be
able to tell the two apart."""

LIBRARY_ERROR = "fhir_library_error"
"""Reason code of a record on which ``fhir.resources.R4B`` raised for no known reason."""


def r4b_unreadable_shape(resource: dict[str, Any]) -> str | None:
    """Where ``resource`` holds a shape that makes ``fhir.resources.R4B`` raise instead of reporting
    a validation error, said as ``path: what is wrong``; ``None`` when it holds none.

    The shapes: a resource nested inside it (``contained``, a Bundle entry, a Parameters value)
    whose ``resourceType`` is not a string or names no R4B resource type, and a primitive's
    ``_element`` (its id and extensions, always an object, or a list of objects and nulls beside a
    list of values) given as text. The walk is iterative, so nesting of any depth is searched.

    Examples
    --------
    >>> r4b_unreadable_shape({"resourceType": "Observation", "contained": [{"resourceType": "Practioner"}]})
    "Observation.contained[0].resourceType: 'Practioner' is not a FHIR R4B resource type"
    >>> r4b_unreadable_shape({"resourceType": "Patient", "name": [{"given": ["A"], "_given": ["1"]}]})
    "Patient.name[0]._given[0]: a primitive's extension should be an object, found str '1'"
    >>> r4b_unreadable_shape({"resourceType": "Patient", "_gender": {"extension": []}}) is None
    True
    """
    stack: list[tuple[Any, str, bool]] = [(resource, str(resource.get("resourceType")), True)]
    while stack:
        node, where, top = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{where}[{i}]", False) for i, item in reversed(list(enumerate(node))))
            continue
        if not isinstance(node, dict):
            continue
        if not top and "resourceType" in node:
            nested = node["resourceType"]
            if not isinstance(nested, str):
                return f"{where}.resourceType: should be a string, found {type(nested).__name__} {nested!r:.40}"
            if nested in R4_ONLY_TYPES:
                return f"{where}.resourceType: {nested!r} is an R4 type that R4B replaced, with no model to read it"
            if not is_r4_resource_type(nested):
                return f"{where}.resourceType: {nested!r:.60} is not a FHIR R4B resource type"
        children: list[tuple[Any, str, bool]] = []
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("_"):
                items = value if isinstance(value, list) else [value]
                for i, item in enumerate(items):
                    if isinstance(item, str):
                        place = f"{where}.{key}[{i}]" if isinstance(value, list) else f"{where}.{key}"
                        return f"{place}: a primitive's extension should be an object, found str {item!r:.40}"
            children.append((value, f"{where}.{key}", False))
        stack.extend(reversed(children))
    return None


def is_valid_r4(model: Any, text: bytes) -> bool:
    """Whether one resource's JSON text parses with orjson and validates against ``model``.

    Exactly what :func:`validate_r4` accepts, without the reason. (``model_validate_json`` on the
    text was measured as no faster: the time is in fhir.resources' Python validators, not in
    parsing; and JSON-mode validation could differ from the dict validation the reasons come from.)
    """
    from pydantic import ValidationError

    try:
        model.model_validate(orjson.loads(text))
    except (ValidationError, orjson.JSONDecodeError, *R4B_CANNOT_READ):
        return False
    return True


_CONTROL = str.maketrans({"\r": "\\r", "\n": "\\n", "\t": "\\t"})
_SCALARS = (str, int, float, bool, type(None))


def _r4_error(resource_type: str, error: Any) -> str:
    """One pydantic error as ``Type.path: message (found value)``, on one line."""
    location = ".".join(str(part) for part in (resource_type, *error.get("loc", ())))
    found = error.get("input")
    if error.get("type") == "string_pattern_mismatch" and found == "":
        return f"{location}: empty string (FHIR allows no empty values; leave the element out)"
    message = str(error.get("msg", "")).translate(_CONTROL)
    if len(message) > 160:
        # The key words of a long message (a list of allowed fields, say) are at its end.
        message = f"{message[:90]} ... {message[-65:]}"
    shown = f" (found {found!r:.40})" if isinstance(found, _SCALARS) and repr(found)[:40] not in message else ""
    return f"{location}: {message}{shown}"


def validate_r4(resource: dict[str, Any]) -> None:
    """Validate one resource fully against its FHIR R4 model (``--strict``).

    Raises
    ------
    RecordError
        ``fhir_invalid`` with the first failing field, pydantic's message and the value found,
        then where the other failures are.
    """
    from pydantic import ValidationError

    rt = resource["resourceType"]
    if rt in R4_ONLY_TYPES:
        raise RecordError(
            "fhir_invalid", f"{rt} is an R4 type that R4B replaced: fhir.resources.R4B has no model to validate it"
        )
    try:
        r4_model(rt).model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors()
        if not errors:
            summary = " ".join(str(exc).split())
            raise RecordError("fhir_invalid", f"FHIR R4 validation failed for {rt}: {summary:.200}") from None
        others = [".".join(str(part) for part in (rt, *error.get("loc", ()))) for error in errors[1:]]
        also = f" (also at {', '.join(others[:3])}{f' and {len(others) - 3} more' if len(others) > 3 else ''})"
        reason = f"FHIR R4 validation failed at {_r4_error(rt, errors[0])}{also if others else ''}"
        raise RecordError("fhir_invalid", reason[:300]) from None
    except RecursionError:
        raise RecordError(
            "fhir_invalid", f"FHIR R4 validation failed: this {rt} is nested deeper than fhir.resources.R4B can read"
        ) from None
    except R4B_CANNOT_READ as exc:
        shape = r4b_unreadable_shape(resource)
        if shape is not None:
            raise RecordError("fhir_invalid", f"FHIR R4 validation failed at {shape}") from None
        detail = f"{type(exc).__name__}: {str(exc).translate(_CONTROL)}"
        raise RecordError(
            LIBRARY_ERROR,
            f"fhir.resources {version('fhir.resources')} raised {detail:.100} on this {rt}, which holds no shape "
            "known to be invalid: the library, not necessarily the record, may be at fault",
        ) from None
