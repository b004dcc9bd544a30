"""Full R4 validation (strict mode): one-line reasons that name the value, and no crash on input
fhir.resources cannot read."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from features.fhir.validate import (
    RecordError,
    is_valid_r4,
    json_text,
    r4_model,
    r4b_unreadable_shape,
    validate_r4,
)


def _observation(**change: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "effectiveDateTime": "2020-01-02T10:00:00Z",
    }
    return {k: v for k, v in (record | change).items() if v is not None}


def _reason(resource: dict[str, Any]) -> str:
    with pytest.raises(RecordError) as caught:
        validate_r4(resource)
    assert caught.value.code == "fhir_invalid"
    assert not is_valid_r4(r4_model(resource["resourceType"]), json_text(resource))
    return caught.value.reason


def test_a_valid_resource_passes() -> None:
    validate_r4(_observation())
    assert is_valid_r4(r4_model("Observation"), orjson.dumps(_observation()))


def test_an_empty_string_is_named_on_one_line() -> None:
    # pydantic's message quotes FHIR's string pattern with a literal CR, LF and TAB.
    reason = _reason(_observation(code={"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": ""}]}))
    assert reason == (
        "FHIR R4 validation failed at Observation.code.coding.0.display: "
        "empty string (FHIR allows no empty values; leave the element out)"
    )


def test_the_value_found_and_the_other_failures_are_named() -> None:
    reason = _reason(_observation(identifier=["LAB-123"], issued="soon", effectiveDateTime="2020-13-45"))
    assert reason == (
        "FHIR R4 validation failed at Observation.effectiveDateTime: Value error, DateTime value string does not "
        "match spec regex. (found '2020-13-45') (also at Observation.identifier.0, Observation.issued)"
    )


def test_a_long_message_keeps_its_end() -> None:
    # Two value[x] in one component: pydantic lists the allowed fields, then says what is wrong.
    component = {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                 "valueString": "a", "valueInteger": 1}
    assert _reason(_observation(component=[component])) == (
        "FHIR R4 validation failed at Observation.component.0: Value error, Any of one field value is expected "
        "from this list ['valueBoolean', 'valueCode ... valueSampledData', 'valueString', 'valueTime'], "
        "but got multiple!"
    )


@pytest.mark.parametrize(
    ("change", "where"),
    [
        # fhir.resources raises KeyError on these two ...
        ({"contained": [{"resourceType": "MedicinalProduct", "id": "m"}]},
         "Observation.contained[0].resourceType: 'MedicinalProduct' is an R4 type that R4B replaced, with no model "
         "to read it"),
        ({"contained": [{"resourceType": "Bundle", "type": "collection",
                         "entry": [{"resource": {"resourceType": "Practioner", "id": "m"}}]}]},
         "Observation.contained[0].entry[0].resource.resourceType: 'Practioner' is not a FHIR R4B resource type"),
        # ... TypeError on this one ...
        ({"contained": [{"resourceType": 1, "id": "m"}]},
         "Observation.contained[0].resourceType: should be a string, found int 1"),
        # ... and AttributeError on a primitive's extension given as text that reads as JSON.
        ({"_status": "1"}, "Observation._status: a primitive's extension should be an object, found str '1'"),
        ({"component": [{"code": {"text": "a"}, "valueString": "x", "_valueString": "[1]"}]},
         "Observation.component[0]._valueString: a primitive's extension should be an object, found str '[1]'"),
    ],
)
def test_input_fhir_resources_cannot_read_is_invalid_and_named(change: dict[str, Any], where: str) -> None:
    assert _reason(_observation(**change)) == f"FHIR R4 validation failed at {where}"


def test_nesting_deeper_than_python_recurses_is_invalid_not_a_crash() -> None:
    extension: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(300):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    assert _reason(_observation(extension=[extension])) == (
        "FHIR R4 validation failed: this Observation is nested deeper than fhir.resources.R4B can read"
    )


def test_the_library_raising_on_a_record_without_a_known_bad_shape_is_its_own_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A library (or version) that breaks on good input must not read as bad data: every record
    # would be quarantined as invalid, and the export blamed for it.
    class Broken:
        @staticmethod
        def model_validate(resource: dict[str, Any]) -> None:
            raise AttributeError("'NoneType' object has no attribute 'fields'")

    monkeypatch.setattr("features.fhir.validate.r4_model", lambda resource_type: Broken)
    with pytest.raises(RecordError) as caught:
        validate_r4(_observation())
    assert caught.value.code == "fhir_library_error"
    assert re.fullmatch(
        r"fhir\.resources [0-9.]+ raised AttributeError: 'NoneType' object has no attribute 'fields' on this "
        r"Observation, which holds no shape known to be invalid: the library, not necessarily the record, may be "
        r"at fault", caught.value.reason)


def test_a_primitive_extension_as_an_object_or_a_list_with_nulls_is_no_unreadable_shape() -> None:
    patient = {"resourceType": "Patient", "id": "p", "_birthDate": {"extension": []},
               "name": [{"given": ["A", "B"], "_given": [None, {"id": "g2"}]}],
               "contained": [{"resourceType": "Practitioner", "id": "d"}]}
    assert r4b_unreadable_shape(patient) is None
    validate_r4(patient)


def test_r4_types_that_r4b_replaced_are_named() -> None:
    with pytest.raises(RecordError, match=r"^MedicinalProduct is an R4 type that R4B replaced: fhir.resources.R4B "):
        validate_r4({"resourceType": "MedicinalProduct", "id": "m1"})


def test_json_text_writes_what_orjson_cannot() -> None:
    value: Any = "leaf"
    for _ in range(200):
        value = {"e": [value]}
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(value)
    assert json.loads(json_text(value)) == value
    assert json_text({"a": [1, "é"]}) == b'{"a":[1,"\xc3\xa9"]}'
    for _ in range(400):
        value = {"e": [value]}
    assert json_text(value) == b'"(JSON nested too deep to be written back)"'
