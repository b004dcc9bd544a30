"""Flatten one FHIR resource into rows of its normalized table.

Stage: ingest. In: one parsed resource (a ``dict``) and where it came from. Out: the name of its
table (:data:`features.fhir.specs.TABLE_OF_TYPE`, or ``raw_unknown``) and its rows as tuples in the
column order of that table's schema in :mod:`features.schemas`. A field the pipeline uses that is
missing or malformed raises :class:`features.fhir.validate.RecordError`; nothing is guessed. Beside
them, :func:`record_version` gives the resource's version (a ``record_versions`` row), by which the
ingest keeps the newest of several copies; a malformed version is read as absent (see there).

This is the per-record path of the ingest: it works on plain dicts and tuples, and it alone words
quarantine reasons. :mod:`features.fhir.columnar` mirrors its rules column-wise for the common
forms (the fast path); a change to what is read or checked here needs the same change there
(``tests/features/fhir/test_columnar.py`` compares the two paths' outputs).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any

from features.fhir.specs import (
    CODE_PADDING,
    ENCOUNTER_REFERENCE_FIELD,
    ENTERED_IN_ERROR,
    MEDICATION_TYPES,
    PATIENT_REFERENCE_FIELD,
    QUANTITY_COMPARATORS,
    RECORDED_TYPES,
    STATUS_ELEMENTS,
    TABLE_OF_TYPE,
    UCUM_SYSTEMS,
    listed_prefix,
    vocabulary_prefix,
)
from features.fhir.validate import (
    DATE_LENGTH,
    FHIR_ID,
    SITE_ZONE,
    RecordError,
    check_id,
    check_number,
    check_object,
    check_storable,
    check_string,
    is_before,
    json_text,
    parse_date,
    parse_datetime,
    parse_first_instant,
)
from features.identifiers import subject_id_for

Row = tuple[Any, ...]
RAW_LIMIT = 100_000
"""raw_unknown keeps each resource's JSON up to this many characters."""


@dataclass
class Origin:
    """Where a resource was read: its file (relative to the landing zone) and record number."""

    source_file: str
    record_number: int
    # The export time: no date may be later.
    latest: datetime
    # Inside a Bundle: entry fullUrl -> (resource type, id), to resolve urn:uuid references.
    full_urls: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # The site's time zone (IANA): dates and times without an offset are its wall-clock time.
    zone: str = SITE_ZONE


def _reference(value: Any, where: str, target: str, origin: Origin) -> str:
    """Resolve a reference to a ``target`` resource (``Patient/<id>``, ``urn:uuid:<id>``, URL)."""
    if not isinstance(value, dict):
        raise RecordError("bad_reference", f"{where} should be a Reference object, found {type(value).__name__}")
    ref = value.get("reference")
    if not isinstance(ref, str) or not ref:
        raise RecordError("bad_reference", f"{where}.reference is missing or not a string")
    resolved = origin.full_urls.get(ref) if origin.full_urls else None
    ident = _resolve(ref, target) if resolved is None else _check_resolved(resolved, target)
    if type(ident) is tuple:
        raise RecordError("bad_reference", f"{where}.reference {ref!r:.80} {ident[0]}")
    return ident  # type: ignore[return-value]


def _check_resolved(resolved: tuple[str, str], target: str) -> str | tuple[str]:
    kind, ident = resolved
    if kind != target:
        return (f"does not point to a {target}",)
    if FHIR_ID.fullmatch(ident) is None:
        return ("has an invalid id",)
    return ident


@lru_cache(maxsize=1 << 16)
def _resolve(ref: str, target: str) -> str | tuple[str]:
    """The id a reference string names (outside a Bundle), or (the reason it is bad,). Cached:
    every resource of a patient repeats the same ``Patient/<id>``."""
    if ref.startswith("urn:uuid:"):
        return _check_resolved((target, ref[9:]), target)
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2:
        return ("is not Type/id or urn:uuid:id",)
    return _check_resolved((parts[-2], parts[-1]), target)


def _optional_reference(value: Any, target: str, origin: Origin) -> str | None:
    if value is None:
        return None
    try:
        return _reference(value, "", target, origin)
    except RecordError:
        return None


def _coded(concept: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """Every coding of a CodeableConcept that has a code, in the concept's order, as
    (``PREFIX//code``, the coding); the code is stripped of :data:`CODE_PADDING` (a code of
    whitespace alone is none). Raise if there is none."""
    if not isinstance(concept, dict):
        raise RecordError(
            "missing_code", f"{where} is missing" if concept is None else f"{where} should be a CodeableConcept"
        )
    codings = concept.get("coding")
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(codings, list):
        for coding in codings:
            if isinstance(coding, dict):
                code = coding.get("code")
                if isinstance(code, str) and (code := code.strip(CODE_PADDING)):
                    system = coding.get("system")
                    out.append((_code_text(system if isinstance(system, str) else None, code), coding))
    if not out:
        raise RecordError("missing_code", f"{where} has no coding with a code")
    return out


def _chosen(coded: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The coding a concept's one code is taken from: the first whose system is a listed
    vocabulary (:func:`~features.fhir.specs.listed_prefix`), else the first.

    FHIR gives the codings of a concept no order, and EHR exports often put their local code first
    (``[DX//DM2, SNOMED//44054006]``): taken as the code, it would hide the patient from a cohort
    rule naming the SNOMED code. The concept's order decides between listed codings, so the choice
    is the same on every run.
    """
    for item in coded:
        system = item[1].get("system")
        if isinstance(system, str) and listed_prefix(system) is not None:
            return item
    return coded[0]


def _code(concept: Any, where: str) -> tuple[str, dict[str, Any]]:
    """The :func:`_chosen` ``PREFIX//code`` of a CodeableConcept, and its coding; raise if it has none."""
    return _chosen(_coded(concept, where))


@lru_cache(maxsize=1 << 14)
def _code_text(system: str | None, code: str) -> str:
    return f"{vocabulary_prefix(system)}//{code}"


def _display(concept: Any, coding: dict[str, Any] | None = None) -> str | None:
    """A concept's text, else the display of ``coding``, the coding its code was taken from (so
    that the display names that code); without one, the display of its first coding."""
    if not isinstance(concept, dict):
        return None
    text = concept.get("text")
    if isinstance(text, str):
        return text
    if coding is None:
        codings = concept.get("coding")
        coding = codings[0] if isinstance(codings, list) and codings and isinstance(codings[0], dict) else None
    display = coding.get("display") if coding is not None else None
    return display if isinstance(display, str) else None


def _optional_code(concept: Any) -> tuple[str | None, dict[str, Any] | None]:
    """:func:`_code` of an optional CodeableConcept; (None, None) when it has no code."""
    try:
        return _code(concept, "")
    except RecordError:
        return None, None


def _first_in_list(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def _time(
    resource: dict[str, Any], keys: tuple[str, ...], where: str, origin: Origin
) -> tuple[datetime, datetime | None]:
    """The first of ``keys`` present (a dateTime, or a Period) as (time, end time).

    A Period's time is its start, else its end: a procedure or a visit known only by when it ended
    had happened by then, and dating it so never places it earlier than the source says. A start
    given without a time of day is the end of its day (known by then), but never after the
    Period's end: a visit that began on 1 January and ended there at 09:00 had begun by 09:00. A
    Period with neither counts as absent, and the next key is read.
    """
    empty: list[str] = []
    for key in keys:
        value = resource.get(key)
        if value is None:
            continue
        if key.endswith(("Period", "period")):
            period = check_object(value, f"{where}.{key}")
            start, end = period.get("start"), period.get("end")
            if start is None and end is None:
                empty.append(key)
                continue
            if start is None:
                end_time = parse_datetime(end, f"{where}.{key}.end", origin.latest, origin.zone)
                return end_time, end_time
            start_time = parse_datetime(start, f"{where}.{key}.start", origin.latest, origin.zone)
            if end is None:
                return start_time, None
            end_time = parse_datetime(end, f"{where}.{key}.end", origin.latest, origin.zone)
            return (end_time if len(start) <= DATE_LENGTH and start_time > end_time else start_time), end_time
        return parse_datetime(value, f"{where}.{key}", origin.latest, origin.zone), None
    if empty:
        others = [key for key in keys if key not in empty]
        also = f" and {where} has none of {', '.join(others)}" if others else ""
        raise RecordError("missing_date", f"{where}.{empty[0]} has neither start nor end{also}")
    raise RecordError("missing_date", f"{where} has none of {', '.join(keys)}")


def _patient(resource: dict[str, Any], rt: str, origin: Origin) -> str:
    key = PATIENT_REFERENCE_FIELD.get(rt, "subject")
    value = resource.get(key)
    if value is None:
        raise RecordError("missing_reference", f"{rt}.{key} (the patient) is missing")
    return _reference(value, f"{rt}.{key}", "Patient", origin)


_GENDERS = {"male", "female", "other", "unknown"}


def flatten_patient(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    gender = res.get("gender")
    if gender is not None and check_string(gender, "Patient.gender") not in _GENDERS:
        raise RecordError("bad_value", f"Patient.gender {gender!r:.40} is not male, female, other or unknown")
    birth = res.get("birthDate")
    birth_date = parse_date(birth, "Patient.birthDate", origin.latest, origin.zone) if birth is not None else None
    death = res.get("deceasedDateTime")
    death_time = (parse_datetime(death, "Patient.deceasedDateTime", origin.latest, origin.zone)
                  if death is not None else None)
    # At the coarser precision, on the local calendar (is_before): a neonatal death at 03:00+05:30
    # on the day of birth is 21:30 UTC the day before, and a death known only by its month may be
    # on any day of it; neither is a death before birth.
    if death is not None and birth is not None and is_before(death, birth, origin.zone):
        raise RecordError("bad_date", f"Patient.deceasedDateTime {death!r} is before birthDate {birth!r}")
    flag = res.get("deceasedBoolean")
    if flag is not None and not isinstance(flag, bool):
        raise RecordError("bad_type", f"Patient.deceasedBoolean should be true or false, found {flag!r:.40}")
    deceased = True if death_time is not None else flag
    replaced_by = _replaced_by(res, rid, origin)
    return [
        (rid, subject_id_for(rid), birth_date, gender, death_time, deceased, replaced_by, origin.source_file,
         origin.record_number)
    ]


def _replaced_by(res: dict[str, Any], rid: str, origin: Origin) -> str | None:
    """The patient a merged Patient record was replaced by: its first ``link`` of type
    ``replaced-by`` that names another Patient. A link that names none is not applied (the record
    stays its own patient) rather than losing the patient."""
    links = res.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("type") == "replaced-by":
            other = _optional_reference(link.get("other"), "Patient", origin)
            if other is not None and other != rid:
                return other
    return None


def flatten_encounter(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    patient = _patient(res, "Encounter", origin)
    if res.get("period") is None:
        raise RecordError("missing_date", "Encounter.period is missing")
    start, end = _time(res, ("period",), "Encounter", origin)
    period = res["period"]  # an object: _time checked it
    # At the coarser precision (is_before): a visit from 10:00 that ended on that day, given as a
    # date, did not end before it began.
    if end is not None and period.get("start") is not None and is_before(period["end"], period["start"], origin.zone):
        raise RecordError("bad_date", "Encounter.period.end is before period.start")
    klass = res.get("class")
    klass_code = klass.get("code") if isinstance(klass, dict) else None
    kind = _first_in_list(res.get("type"))
    type_code, type_coding = _optional_code(kind)
    return [
        (
            rid,
            patient,
            start,
            end,
            klass_code if isinstance(klass_code, str) else None,
            type_code,
            _display(kind, type_coding),
            _optional_code(_first_in_list(res.get("reasonCode")))[0],
            _text_or_none(res.get("status")),
            origin.source_file,
            origin.record_number,
        )
    ]


def _text_or_none(value: Any) -> str | None:
    """An optional code element read as is (a status, say): anything but a string is None."""
    return value if isinstance(value, str) else None


_CODED: dict[str, tuple[str, tuple[str, ...], str]] = {
    # type: (code field, time fields in order of preference, status field)
    "Condition": ("code", ("onsetDateTime", "onsetPeriod", "recordedDate"), "clinicalStatus"),
    "Procedure": ("code", ("performedDateTime", "performedPeriod"), "status"),
    "MedicationRequest": ("medicationCodeableConcept", ("authoredOn",), "status"),
    "MedicationStatement": (
        "medicationCodeableConcept",
        ("effectiveDateTime", "effectivePeriod", "dateAsserted"),
        "status",
    ),
    "MedicationAdministration": ("medicationCodeableConcept", ("effectiveDateTime", "effectivePeriod"), "status"),
    # A vaccine given "in childhood" (occurrenceString) is dated when it was recorded: given by then.
    "Immunization": ("vaccineCode", ("occurrenceDateTime", "recorded"), "status"),
    "AllergyIntolerance": ("code", ("onsetDateTime", "recordedDate"), "clinicalStatus"),
    "DiagnosticReport": ("code", ("effectiveDateTime", "effectivePeriod", "issued"), "status"),
}


def _flatten_coded(rt: str) -> Callable[[dict[str, Any], str, Origin], list[Row]]:
    code_field = _CODED[rt][0]

    def flatten(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
        patient = _patient(res, rt, origin)
        concept = res.get(code_field)
        where = f"{rt}.{code_field}"
        if rt in MEDICATION_TYPES and concept is None and "medicationReference" in res:
            concept, where = _contained_medication(res, rt)
        coded = _coded(concept, where)
        code, coding = _chosen(coded)
        time, end, status, verification = _time_and_status(res, rt, origin)
        row: Row = (
            rid,
            rt,
            patient,
            _optional_reference(res.get(ENCOUNTER_REFERENCE_FIELD.get(rt, "encounter")), "Encounter", origin),
            time,
            end,
            code,
            [text for text, _ in coded],
            _display(concept, coding),
            status,
            verification,
        )
        if rt in MEDICATION_TYPES:
            row = (*row, _do_not_perform(res, rt), _intent(res, rt), _recorded_time(res, rt, origin))
        elif rt in RECORDED_TYPES:
            row = (*row, _recorded_time(res, rt, origin))
        return [(*row, origin.source_file, origin.record_number)]

    return flatten


def _recorded_time(res: dict[str, Any], rt: str, origin: Origin) -> datetime | None:
    """When the record became known (:data:`RECORDED_TYPES`), or None for a type without the element."""
    return _optional_time(res, RECORDED_TYPES[rt], rt, origin) if rt in RECORDED_TYPES else None


def _do_not_perform(res: dict[str, Any], rt: str) -> bool | None:
    """A MedicationRequest's ``doNotPerform``: true for an order *not* to give the drug. A modifier
    element, so a value that is not a boolean is refused rather than read as absent (the order
    would then say the opposite). None when absent, and for the types that have no such element."""
    flag = res.get("doNotPerform") if rt == "MedicationRequest" else None
    if flag is not None and not isinstance(flag, bool):
        raise RecordError("bad_type", f"{rt}.doNotPerform should be true or false, found {flag!r:.40}")
    return flag


def _intent(res: dict[str, Any], rt: str) -> str | None:
    """A MedicationRequest's ``intent`` (order, plan, proposal, ...). Also a modifier element, so a
    value that is not a code is refused rather than read as absent. None when absent, and for the
    types that have no such element."""
    intent = res.get("intent") if rt == "MedicationRequest" else None
    if intent is not None and not isinstance(intent, str):
        raise RecordError(
            "bad_type", f"{rt}.intent should be a code (order, plan, proposal, ...), found {intent!r:.40}"
        )
    return intent


def _optional_time(res: dict[str, Any], element: str, rt: str, origin: Origin) -> datetime | None:
    """The time element ``element`` of a resource, or None when it has none. A Condition's or
    AllergyIntolerance's ``recordedDate``, a DiagnosticReport's or Observation's ``issued`` are
    read even when another element gives the time: the event is known from the later of the two (a
    diagnosis entered in 2018 with onset 2015 was not known in 2016), so a malformed one is refused,
    not skipped."""
    value = res.get(element)
    return parse_datetime(value, f"{rt}.{element}", origin.latest, origin.zone) if value is not None else None


def _time_and_status(
    res: dict[str, Any], rt: str, origin: Origin
) -> tuple[datetime, datetime | None, str | None, str | None]:
    """A coded record's time, end time, status code and verification status code."""
    _, time_fields, status_field = _CODED[rt]
    time, end = _time(res, time_fields, rt, origin)
    abatement = _optional_time(res, "abatementDateTime", rt, origin) if rt == "Condition" else None
    if abatement is not None:
        end = abatement
    verification = res.get("verificationStatus") if "verificationStatus" in STATUS_ELEMENTS[rt] else None
    return time, end, _status_code(res.get(status_field)), _status_code(verification)


def _status_code(status: Any) -> str | None:
    """A status given as a code, or as a CodeableConcept: its first coding with a code, read as
    written (a status is compared with HL7's own codes, ``refuted`` say, as entered-in-error is)."""
    if isinstance(status, dict):
        codings = status.get("coding")
        for coding in codings if isinstance(codings, list) else []:
            code = coding.get("code") if isinstance(coding, dict) else None
            if isinstance(code, str) and code:
                return code
        return None
    return _text_or_none(status)


def names_drug_by_reference(res: dict[str, Any]) -> bool:
    """Whether a medication record names its drug by a reference to a Medication outside itself
    (``Medication/<id>``, ``urn:uuid:<id>``): resolved once the whole export is read."""
    if res.get("medicationCodeableConcept") is not None or "medicationReference" not in res:
        return False
    value = res["medicationReference"]
    ref = value.get("reference") if isinstance(value, dict) else None
    return not (isinstance(ref, str) and ref.startswith("#"))


def _contained_medication(res: dict[str, Any], rt: str) -> tuple[Any, str]:
    """The code of the Medication a ``#id`` medicationReference names among the record's
    ``contained`` resources, and where it was found."""
    ref = res["medicationReference"].get("reference")
    contained = res.get("contained")
    for index, inner in enumerate(contained if isinstance(contained, list) else []):
        if isinstance(inner, dict) and inner.get("resourceType") == "Medication" and f"#{inner.get('id')}" == ref:
            return inner.get("code"), f"{rt}.contained[{index}] (Medication {ref}).code"
    raise RecordError("bad_reference", f"{rt}.medicationReference {ref!r:.60} names no contained Medication")


def flatten_medication_reference(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    """A medication record whose drug is another resource: a row of ``medication_references``
    (:data:`features.schemas.MEDICATION_REFERENCES`), made a ``medications`` row by the ingest
    once the Medication it names is read."""
    rt = res["resourceType"]
    patient = _patient(res, rt, origin)
    medication = _reference(res.get("medicationReference"), f"{rt}.medicationReference", "Medication", origin)
    time, end, status, verification = _time_and_status(res, rt, origin)
    encounter = _optional_reference(res.get(ENCOUNTER_REFERENCE_FIELD.get(rt, "encounter")), "Encounter", origin)
    return [
        (rid, rt, patient, encounter, time, end, status, verification, _do_not_perform(res, rt), _intent(res, rt),
         _recorded_time(res, rt, origin), medication, origin.source_file, origin.record_number)
    ]


def flatten_medication(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    """A ``Medication`` resource: its drug codes, for the records that name it by reference."""
    coded = _coded(res.get("code"), "Medication.code")
    code, coding = _chosen(coded)
    codes = [text for text, _ in coded]
    return [(rid, code, codes, _display(res.get("code"), coding), origin.source_file, origin.record_number)]


Value = tuple[float | None, str | None, str | None, str | None]
"""(numeric_value, value_comparator, unit, text_value)."""


def _value(holder: dict[str, Any], where: str, latest: datetime, zone: str) -> Value:
    """(numeric_value, value_comparator, unit, text_value) of an Observation or component ``value[x]``."""
    if "valueQuantity" in holder:
        quantity = check_object(holder["valueQuantity"], f"{where}.valueQuantity")
        if "value" not in quantity:
            raise RecordError("missing_value", f"{where}.valueQuantity.value is missing")
        number = check_number(quantity["value"], f"{where}.valueQuantity.value")
        comparator = _comparator(quantity.get("comparator"), f"{where}.valueQuantity.comparator")
        return number, comparator, _unit(quantity), None
    if "valueCodeableConcept" in holder:
        return None, None, None, _code(holder["valueCodeableConcept"], f"{where}.valueCodeableConcept")[0]
    for key in ("valueInteger", "valueDecimal"):
        if key in holder:
            return check_number(holder[key], f"{where}.{key}"), None, None, None
    if "valueBoolean" in holder:
        if not isinstance(holder["valueBoolean"], bool):
            raise RecordError("bad_type", f"{where}.valueBoolean should be true or false")
        return float(holder["valueBoolean"]), None, None, None
    for key in ("valueString", "valueDateTime", "valueTime"):
        if key in holder:
            value = holder[key]
            if not isinstance(value, str):
                raise RecordError("bad_type", f"{where}.{key} should be a string, found {type(value).__name__}")
            return None, None, None, value
    if "valueRatio" in holder:
        return _ratio(check_object(holder["valueRatio"], f"{where}.valueRatio"), f"{where}.valueRatio")
    if "valueRange" in holder:
        return _range(check_object(holder["valueRange"], f"{where}.valueRange"), f"{where}.valueRange")
    if "valuePeriod" in holder:
        return _period_days(check_object(holder["valuePeriod"], f"{where}.valuePeriod"), f"{where}.valuePeriod",
                            latest, zone)
    return None, None, None, None


def _unit(quantity: dict[str, Any]) -> str | None:
    """A Quantity's unit: its UCUM ``code`` where it has one, else its ``unit`` text, else its ``code``.

    The UCUM code is one spelling per unit across senders, where ``unit`` is display text; a code of
    another system (a local unit list) is less readable than the text, so the text comes first there.
    """
    system, code, unit = quantity.get("system"), quantity.get("code"), quantity.get("unit")
    if isinstance(system, str) and system.rstrip("/") in UCUM_SYSTEMS and isinstance(code, str):
        return code
    return next((text for text in (unit, code) if isinstance(text, str)), None)


_INVERTED_COMPARATOR = {"<": ">", "<=": ">=", ">=": "<=", ">": "<"}


def _quantity_parts(holder: dict[str, Any], key: str, where: str) -> tuple[float, str | None, str | None]:
    """(value, comparator, unit) of the Quantity ``holder[key]``, whose value is required."""
    if key not in holder:
        raise RecordError("missing_value", f"{where}.{key} is missing")
    quantity = check_object(holder[key], f"{where}.{key}")
    if "value" not in quantity:
        raise RecordError("missing_value", f"{where}.{key}.value is missing")
    # A part of a ratio or a bound of a band is not stored as it is: only finite here.
    number = check_number(quantity["value"], f"{where}.{key}.value", stored=False)
    return number, _comparator(quantity.get("comparator"), f"{where}.{key}.comparator"), _unit(quantity)


def _ratio(ratio: dict[str, Any], where: str) -> Value:
    """A Ratio as one number, numerator over denominator (a titer of 1:64 reads 0.015625, so a higher
    titer is a smaller value), with the bound of either side as the ratio's comparator."""
    numerator, above, numerator_unit = _quantity_parts(ratio, "numerator", where)
    denominator, below, denominator_unit = _quantity_parts(ratio, "denominator", where)
    if denominator == 0:
        raise RecordError("bad_value", f"{where}.denominator.value is 0 (expected a non-zero denominator)")
    value = check_storable(numerator / denominator, f"{where} {numerator:g}/{denominator:g} =")
    if above is not None and below is not None:
        raise RecordError("bad_value", f"{where} has a comparator on both the numerator ({above!r}) and the "
                                       f"denominator ({below!r}) (expected one bound at most)")
    bound = above or below
    if bound == "ad":
        raise RecordError("bad_value", f"{where} has the comparator 'ad' (expected <, <=, >= or > in a ratio)")
    if bound is not None and (numerator <= 0 or denominator <= 0):
        raise RecordError("bad_value", f"{where} has a comparator and the parts {numerator:g} and {denominator:g} "
                                       "(expected positive parts: only then does a bound on one bound the ratio)")
    # A bound on the denominator bounds the ratio the other way: 1:>64 is a ratio below 1/64.
    comparator = above if below is None else _INVERTED_COMPARATOR[below]
    if denominator_unit is None:
        unit = numerator_unit
    else:
        # A compound denominator in parentheses: mg/(kg.d), not (mg/kg).d.
        per = f"({denominator_unit})" if any(sign in denominator_unit for sign in "/.") else denominator_unit
        unit = f"{numerator_unit or 1}/{per}"
    return value, comparator, unit, None


def _range(value_range: dict[str, Any], where: str) -> Value:
    """A Range: a one-sided range as a bound (``>=`` low, ``<=`` high), a two-sided one as the text
    ``low-high`` (a reported band, such as 0-2 cells per field, read as a category)."""
    low, high = (_quantity_parts(value_range, key, where) if key in value_range else None for key in ("low", "high"))
    for key, bound in (("low", low), ("high", high)):
        if bound is not None and bound[1] is not None:
            raise RecordError("bad_value", f"{where}.{key}.comparator {bound[1]!r} is not allowed (a Range's "
                                           "bounds are SimpleQuantities, without a comparator)")
    if low is None or high is None:
        bound = low or high
        if bound is None:
            return None, None, None, None
        number = check_storable(bound[0], f"{where}.{'low' if low is not None else 'high'}.value")
        return number, ">=" if low is not None else "<=", bound[2], None
    if low[2] is not None and high[2] is not None and low[2] != high[2]:
        raise RecordError("bad_value", f"{where}.low.unit {low[2]!r:.40} differs from high.unit {high[2]!r:.40} "
                                       "(expected one unit for both bounds)")
    if low[0] > high[0]:
        raise RecordError("bad_value", f"{where}.low.value {low[0]:g} is above high.value {high[0]:g} "
                                       "(expected low <= high)")
    return None, None, low[2] or high[2], f"{_number_text(low[0])}-{_number_text(high[0])}"


def _period_days(period: dict[str, Any], where: str,
                 latest: datetime, zone: str) -> Value:
    """A Period as its length in days (unit ``d``), each end read at its first instant (so
    ``2020-01-01`` to ``2020-01-02`` is one day, and an end of coarser precision within the start's
    period is 0 days); an open period has no length, so no value. A null end is an absent one."""
    start, end = (parse_first_instant(period[key], f"{where}.{key}", latest, zone) if period.get(key) is not None
                  else None for key in ("start", "end"))
    if start is None or end is None:
        return None, None, None, None
    if is_before(period["end"], period["start"], zone):
        raise RecordError("bad_value", f"{where}.start {period['start']!r:.40} is after its end "
                                       f"{period['end']!r:.40} (expected start <= end)")
    return max(0.0, (end - start).total_seconds() / 86_400), None, "d", None


def _number_text(number: float) -> str:
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


def _comparator(value: Any, where: str) -> str | None:
    """A Quantity's comparator code, or None when it has none. Any other code is refused rather
    than dropped: without it a result below the detection limit would read as a measurement."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError("bad_type", f"{where} should be a string, found {type(value).__name__} {value!r:.40}")
    if value not in QUANTITY_COMPARATORS:
        raise RecordError(
            "bad_value",
            f"{where} {value!r:.40} is not a FHIR comparator (expected one of {', '.join(QUANTITY_COMPARATORS)})",
        )
    return value


def flatten_observation(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    patient = _patient(res, "Observation", origin)
    code, coding = _code(res.get("code"), "Observation.code")
    time, end = _time(res, ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"), "Observation",
                      origin)
    issued_time = _optional_time(res, "issued", "Observation", origin)
    encounter = _optional_reference(res.get("encounter"), "Encounter", origin)
    category, _ = _optional_code(_first_in_list(res.get("category")))
    category = category.split("//", 1)[1] if category else None
    tail = (category, _text_or_none(res.get("status")), origin.source_file, origin.record_number)
    components = res.get("component")
    rows: list[Row] = []
    numeric, comparator, unit, text = _value(res, "Observation", origin.latest, origin.zone)
    absent = _absent_reason(res, numeric, text, "Observation")
    if numeric is not None or text is not None or not components:
        display = _display(res.get("code"), coding)
        rows.append((rid, patient, encounter, time, end, issued_time, code, display, None, numeric, comparator, unit,
                     text, absent, *tail))
    if components is not None:
        if not isinstance(components, list):
            raise RecordError("bad_type", "Observation.component should be a list")
        for index, component in enumerate(components):
            where = f"Observation.component[{index}]"
            check_object(component, where)
            c_numeric, c_comparator, c_unit, c_text = _value(component, where, origin.latest, origin.zone)
            c_absent = _absent_reason(component, c_numeric, c_text, where)
            c_code, c_coding = _code(component.get("code"), f"{where}.code")
            rows.append(
                (
                    rid,
                    patient,
                    encounter,
                    time,
                    end,
                    issued_time,
                    c_code,
                    _display(component.get("code"), c_coding),
                    code,
                    c_numeric,
                    c_comparator,
                    c_unit,
                    c_text,
                    c_absent,
                    *tail,
                )
            )
    return rows


def _absent_reason(holder: dict[str, Any], numeric: float | None, text: str | None, where: str) -> str | None:
    """The code of ``holder``'s ``dataAbsentReason`` (any system), which FHIR allows only without a value
    (invariant obs-6); None without one."""
    if "dataAbsentReason" not in holder:
        return None
    reason, _ = _code(holder["dataAbsentReason"], f"{where}.dataAbsentReason")
    if numeric is not None or text is not None:
        raise RecordError("bad_value", f"{where} has both a value and a dataAbsentReason ({reason}) (expected one: "
                                       "a reason only for a missing value, FHIR invariant obs-6)")
    return reason.split("//", 1)[1]




def _note_text(res: dict[str, Any]) -> str:
    content = res.get("content")
    if not isinstance(content, list) or not content:
        raise RecordError("no_note_text", "DocumentReference.content is missing or empty")
    urls, blank, rendered = [], None, None
    for index, item in enumerate(content):
        attachment = item.get("attachment") if isinstance(item, dict) else None
        if not isinstance(attachment, dict):
            raise RecordError("bad_type", f"DocumentReference.content[{index}].attachment should be an object")
        content_type = attachment.get("contentType") or "text/plain"
        if not isinstance(content_type, str):
            raise RecordError(
                "bad_type", f"DocumentReference.content[{index}].attachment.contentType should be a string"
            )
        data = attachment.get("data")
        if data is None:
            if isinstance(attachment.get("url"), str):
                urls.append(attachment["url"])
            continue
        text = decode_text(data, content_type, f"DocumentReference.content[{index}].attachment")
        if text is not None and text.strip():
            # The plain text over another rendering of the same note (HTML, RTF): the first
            # text/plain attachment, else the first text attachment.
            if is_plain_text(content_type):
                return text
            rendered = text if rendered is None else rendered
        elif text is not None and blank is None:
            # A blank text says nothing (a notes table refuses one too); a later attachment may.
            blank = index
    if rendered is not None:
        return rendered
    if blank is not None:
        raise RecordError("no_note_text", f"DocumentReference.content[{blank}].attachment's text is blank, and no "
                          "later text/* attachment has text")
    if urls:
        raise RecordError(
            "no_note_text",
            f"DocumentReference has no text/* attachment with inline data or a Binary URL (first URL attachment: "
            f"{urls[0]!r:.60}); only those are read",
        )
    raise RecordError("no_note_text", "DocumentReference has no text/* attachment with inline data")


def _media_type(content_type: str | None) -> str:
    """``text/html`` for ``Text/HTML; charset=utf-8``; no type is ``text/plain``."""
    return (content_type or "text/plain").partition(";")[0].strip().lower()


def is_plain_text(content_type: str | None) -> bool:
    """Whether a content type is ``text/plain`` (as no type is)."""
    return _media_type(content_type) == "text/plain"


class _HtmlText(HTMLParser):
    """The text of an HTML note as a reader sees it: no markup, scripts or styles; entities read; a
    line break at each block (paragraph, list item, row, heading)."""

    BLOCKS = frozenset({"address", "article", "blockquote", "br", "dd", "div", "dl", "dt", "footer", "h1", "h2",
                        "h3", "h4", "h5", "h6", "header", "hr", "li", "ol", "p", "pre", "section", "table", "tr",
                        "ul"})
    HIDDEN = frozenset({"head", "script", "style", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        self.parts.append("\n" if tag in self.BLOCKS else " " if tag in ("td", "th") else "")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        self.parts.append("\n" if tag in self.BLOCKS else "")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """An HTML note's text, one line per block, spaces collapsed (:class:`_HtmlText`): the markup
    of an EHR's HTML rendering is no part of what the clinician wrote, and would fill the text
    encoder's window."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


@lru_cache(maxsize=256)
def text_charset(content_type: str | None) -> str | None:
    """The charset of a ``text/*`` content type (UTF-8 when none is given; no type is
    ``text/plain``); None for any other type."""
    if not _media_type(content_type).startswith("text/"):
        return None
    params = (content_type or "").partition(";")[2]
    charset = "utf-8"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    return charset


_BASE64_SPACE = str.maketrans("", "", " \t\r\n")


def base64_bytes(data: str) -> bytes:
    """FHIR ``base64Binary`` as bytes. The type allows whitespace around its four-character groups,
    so text wrapped in 76-character lines (MIME style) is read; any other character than base64's
    raises ``binascii.Error`` or ``ValueError``."""
    return base64.b64decode(data.translate(_BASE64_SPACE), validate=True)


def charset_text(raw: bytes, charset: str) -> str:
    """``raw`` decoded by ``charset``, without a byte-order mark (a mark is no part of the note: kept,
    the same note would have two digests). Raises ``LookupError`` or ``UnicodeError``."""
    return raw.decode(charset).removeprefix("\ufeff")


def decode_text(data: Any, content_type: str, where: str) -> str | None:
    """Base64 ``data`` of a ``text/*`` content type decoded by its charset (:func:`text_charset`);
    None for any other content type."""
    charset = text_charset(content_type)
    if charset is None:
        return None
    if not isinstance(data, str):
        raise RecordError("bad_type", f"{where}.data should be a base64 string")
    try:
        raw = base64_bytes(data)
    except (binascii.Error, ValueError):
        raise RecordError("bad_base64", f"{where}.data is not valid base64") from None
    try:
        text = charset_text(raw, charset)
    except LookupError:
        raise RecordError("bad_charset", f"{where} charset {charset!r:.40} is unknown") from None
    except UnicodeError:  # UnicodeDecodeError, and the bare UnicodeError of codecs such as punycode
        raise RecordError("bad_charset", f"{where} is not valid {charset} text") from None
    return readable_text(text, content_type)


def readable_text(text: str, content_type: str | None) -> str:
    """A decoded note as written: the text of an HTML note (:func:`html_text`), any other as it is."""
    if _media_type(content_type) == "text/html":
        return html_text(text)
    return text


def note_binary(res: dict[str, Any], origin: Origin) -> str | None:
    """The id of the Binary resource a DocumentReference's text is in, when it has no inline text:
    its first URL attachment of a text (or unstated) content type that names a Binary
    (``Binary/<id>``, a URL ending so, or a Bundle entry's ``urn:uuid``). None otherwise, and for
    a malformed ``content`` (:func:`flatten_document_reference` words why)."""
    content = res.get("content")
    found = None
    for item in content if isinstance(content, list) else []:
        attachment = item.get("attachment") if isinstance(item, dict) else None
        if not isinstance(attachment, dict) or not isinstance(attachment.get("contentType", "text/plain"), str):
            return None
        is_text = text_charset(attachment.get("contentType")) is not None
        if attachment.get("data") is not None:
            if is_text:
                return None  # inline text: read as it is
            continue
        if found is None and is_text:
            found = _optional_reference({"reference": attachment.get("url")}, "Binary", origin)
    return found


def note_type_slug(label: str) -> str:
    """``'History and physical note'`` -> ``'history_and_physical_note'``.

    Letters of every script are kept, with their marks (``'Röntgenbefund'`` -> ``'röntgenbefund'``,
    a Japanese or Hindi discharge summary keeps its name), in Unicode's compatibility form, so that
    one kind of note written in two ways is one code; only a label without a letter or digit is a
    ``document``.

    Examples
    --------
    >>> note_type_slug("Progress note")
    'progress_note'
    >>> note_type_slug("退院サマリー"), note_type_slug("Röntgen-Befund")
    ('退院サマリー', 'röntgen_befund')
    """
    # Lower case, with the dot Turkish İ keeps in it dropped (İlerleme is ilerleme); words are runs
    # of letters, digits and the marks that belong to them (a Hindi vowel sign, a Thai tone mark).
    text = unicodedata.normalize("NFKC", label).lower().replace("i\u0307", "i")
    words = "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in text).split()
    return "_".join(words) or "document"


def _note_header(res: dict[str, Any], origin: Origin) -> tuple[str, datetime, str]:
    """A DocumentReference's patient, time and note type."""
    patient = _patient(res, "DocumentReference", origin)
    if res.get("date") is not None:
        time = parse_datetime(res["date"], "DocumentReference.date", origin.latest, origin.zone)
    else:
        # The period of care the note documents: its end, else its start. A note on a stay (a
        # discharge summary) is written at or after its end: dated at the admission, it would be an
        # input to predictions made during the stay, before it was written.
        context = res.get("context")
        period = context.get("period") if isinstance(context, dict) else None
        period = period if isinstance(period, dict) else {}
        where = "DocumentReference.context.period"
        start, end = period.get("start"), period.get("end")
        if end is not None:
            time = parse_datetime(end, f"{where}.end", origin.latest, origin.zone)
            if start is not None:
                # Checked though the end gives the time; compared at the coarser precision, as a
                # visit's period is (flatten_encounter).
                parse_datetime(start, f"{where}.start", origin.latest, origin.zone)
                if is_before(end, start, origin.zone):
                    raise RecordError("bad_date", f"{where}.end is before period.start")
        elif start is not None:
            time = parse_datetime(start, f"{where}.start", origin.latest, origin.zone)
        else:
            raise RecordError("missing_date", "DocumentReference has neither date nor context.period.end or .start")
    return patient, time, note_type_slug(_display(res.get("type")) or "document")


def flatten_document_reference(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    patient, time, note_type = _note_header(res, origin)
    text = _note_text(res)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return [(rid, patient, time, note_type, text, digest, origin.source_file, origin.record_number)]


def flatten_note_reference(res: dict[str, Any], rid: str, origin: Origin, binary_id: str) -> list[Row]:
    """A DocumentReference whose text is in a Binary resource: a row of ``note_references``
    (:data:`features.schemas.NOTE_REFERENCES`), made a ``notes`` row by the ingest once the
    Binary is read."""
    patient, time, note_type = _note_header(res, origin)
    return [(rid, patient, time, note_type, binary_id, origin.source_file, origin.record_number)]


def flatten_binary(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    """A ``Binary`` resource: its content type and, for text, its decoded text and SHA-256 (a row
    of ``binary_texts``, :data:`features.schemas.BINARY_TEXTS`)."""
    content_type = res.get("contentType")
    if not isinstance(content_type, str) or not content_type.strip():
        raise RecordError("bad_type", "Binary.contentType is missing or not a string")
    data = res.get("data")
    text = decode_text(data, content_type, "Binary") if data is not None else None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None
    return [(rid, content_type, digest, text, origin.source_file, origin.record_number)]


def flatten_imaging_study(res: dict[str, Any], rid: str, origin: Origin) -> list[Row]:
    patient = _patient(res, "ImagingStudy", origin)
    time, _ = _time(res, ("started",), "ImagingStudy", origin)
    modality = _first_in_list(res.get("modality"))
    modality_code = modality.get("code") if isinstance(modality, dict) else None
    series = _first_in_list(res.get("series"))
    body_site = series.get("bodySite") if isinstance(series, dict) else None
    site = None
    if isinstance(body_site, dict):
        site = body_site.get("display") or body_site.get("code")
    if modality_code is None and isinstance(series, dict) and isinstance(series.get("modality"), dict):
        modality_code = series["modality"].get("code")
    description = res.get("description")
    return [
        (
            rid,
            patient,
            time,
            modality_code if isinstance(modality_code, str) else None,
            site if isinstance(site, str) else None,
            description if isinstance(description, str) else None,
            _text_or_none(res.get("status")),
            origin.source_file,
            origin.record_number,
        )
    ]


FLATTENERS: dict[str, Callable[[dict[str, Any], str, Origin], list[Row]]] = {
    "Patient": flatten_patient,
    "Encounter": flatten_encounter,
    "Observation": flatten_observation,
    "DocumentReference": flatten_document_reference,
    "ImagingStudy": flatten_imaging_study,
    "Medication": flatten_medication,
    "Binary": flatten_binary,
    **{rt: _flatten_coded(rt) for rt in _CODED},
}
assert set(FLATTENERS) == set(TABLE_OF_TYPE)


def entered_in_error_at(res: dict[str, Any], rt: str) -> str | None:
    """The element by which a record of a used type says it was entered in error
    (:data:`STATUS_ELEMENTS`), or None."""
    for element in STATUS_ELEMENTS.get(rt, ()):
        value = res.get(element)
        if isinstance(value, dict):
            codings = value.get("coding")
            if isinstance(codings, list) and any(
                isinstance(coding, dict) and coding.get("code") == ENTERED_IN_ERROR for coding in codings
            ):
                return element
        elif value == ENTERED_IN_ERROR:
            return element
    return None


_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")
"""The shape of a FHIR ``instant``: a dateTime to the second with its zone (``parse_datetime`` checks the rest)."""


def record_version(res: dict[str, Any], origin: Origin) -> Row | None:
    """The ``record_versions`` row (:data:`features.schemas.RECORD_VERSIONS`) of a resource that
    states its version: ``meta.lastUpdated`` as naive UTC and ``meta.versionId``; None when it
    states neither.

    ``meta`` is no modifier: it says nothing about the patient, only which of several copies of a
    resource is the newest. So a malformed value (a lastUpdated that is not a FHIR instant, or is
    dated after the export; a versionId that is not a FHIR id) is read as absent rather than
    quarantining a record whose clinical content is sound; that copy then ranks after the copies
    that state a version, as a copy without ``meta`` does.
    """
    meta = res.get("meta")
    if not isinstance(meta, dict):
        return None
    stamp = meta.get("lastUpdated")
    updated: datetime | None = None
    if isinstance(stamp, str) and _INSTANT.fullmatch(stamp) is not None:
        try:
            updated = parse_datetime(stamp, "meta.lastUpdated", origin.latest, origin.zone)
        except RecordError:
            updated = None  # absent, as above
    version = meta.get("versionId")
    if not isinstance(version, str) or FHIR_ID.fullmatch(version) is None:
        version = None
    if updated is None and version is None:
        return None
    return (origin.source_file, origin.record_number, updated, version)


def reports_an_error(outcome: dict[str, Any]) -> bool:
    """Whether an ``OperationOutcome`` reports an error (an issue of severity ``error`` or ``fatal``,
    or issues that cannot be read): what a server could not do, as a Bulk export's error files
    hold. Warnings and information (a search's paging note) are kept as ``raw_unknown`` rows."""
    issues = outcome.get("issue")
    if not isinstance(issues, list) or not issues:
        return True
    return any(not isinstance(issue, dict) or issue.get("severity") not in ("warning", "information")
               for issue in issues)


def describe_outcome(outcome: dict[str, Any]) -> str:
    """One line for an ``OperationOutcome``: a FHIR server's message, not a fact about a patient.

    A Bulk export writes its errors as OperationOutcomes in the files its manifest lists under
    ``error`` (a patient's records it could not export, say); a landing zone may hold them beside
    the data. The line gives the first issue's severity, code and text, so that a data engineer
    sees what the server could not export rather than a record with a missing id.

    >>> describe_outcome({"resourceType": "OperationOutcome", "issue": [
    ...     {"severity": "error", "code": "processing", "diagnostics": "Patient/7: timeout"}]})
    "the FHIR server's own message (OperationOutcome), not patient data: error 'processing': Patient/7: timeout"
    """
    head = "the FHIR server's own message (OperationOutcome), not patient data"
    issues = outcome.get("issue")
    if not isinstance(issues, list) or not issues or not isinstance(issues[0], dict):
        return f"{head}, with no issue"
    first = issues[0]
    details = first.get("details")
    text = first.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None) or "no text"
    more = f" (+{len(issues) - 1} more issues)" if len(issues) > 1 else ""
    return f"{head}: {first.get('severity', '?')} {first.get('code', '?')!r}: {text}{more}"[:300]


def flatten_resource(res: dict[str, Any], origin: Origin, raw: bytes | None = None) -> tuple[str, list[Row]]:
    """Return the table and rows of one resource whose ``resourceType`` is already checked.

    Unused types go to ``raw_unknown`` with their JSON, so nothing is dropped silently.
    """
    rt = res["resourceType"]
    if rt == "OperationOutcome" and reports_an_error(res):
        raise RecordError("server_outcome", describe_outcome(res))
    rid = check_id(res.get("id"), f"{rt}.id")
    flatten = FLATTENERS.get(rt)
    if flatten is None:
        text = (raw if raw is not None else json_text(res)).decode("utf-8", "replace")[:RAW_LIMIT]
        return "raw_unknown", [(rid, rt, text, origin.source_file, origin.record_number)]
    if (element := entered_in_error_at(res, rt)) is not None:
        raise RecordError(
            "entered_in_error", f"{rt}.{element} is entered-in-error: the source system withdrew this record"
        )
    if rt in MEDICATION_TYPES and names_drug_by_reference(res):
        return "medication_references", flatten_medication_reference(res, rid, origin)
    if rt == "DocumentReference" and (binary := note_binary(res, origin)) is not None:
        return "note_references", flatten_note_reference(res, rid, origin, binary)
    return TABLE_OF_TYPE[rt], flatten(res, rid, origin)
