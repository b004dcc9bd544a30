"""The vocabulary map: each coding system, by URL or HL7 OID, gets its vocabulary's prefix."""

from __future__ import annotations

import pytest

from features.fhir.specs import listed_prefix, vocabulary_prefix


@pytest.mark.parametrize(
    ("system", "prefix"),
    [
        ("urn:oid:2.16.840.1.113883.6.96", "SNOMED"),
        ("urn:oid:2.16.840.1.113883.6.1", "LOINC"),
        ("urn:oid:2.16.840.1.113883.6.88", "RXNORM"),
        ("urn:oid:2.16.840.1.113883.6.90", "ICD10CM"),
        ("urn:oid:2.16.840.1.113883.6.3", "ICD10"),
        ("urn:oid:2.16.840.1.113883.6.103", "ICD9CM"),
        ("urn:oid:2.16.840.1.113883.12.292", "CVX"),
        ("urn:oid:2.16.840.1.113883.6.69", "NDC"),
        ("urn:oid:2.16.840.1.113883.6.12", "CPT"),
        ("urn:oid:2.16.840.1.113883.6.8", "UCUM"),
        ("http://snomed.info/sct", "SNOMED"),
        ("http://snomed.info/sct/", "SNOMED"),
        ("http://loinc.org//", "LOINC"),
        ("http://hl7.org/fhir/sid/icd-10-cm/", "ICD10CM"),
        # ICD-10-PCS procedures by URL or OID: one vocabulary, never WHO ICD-10's diagnoses.
        ("http://www.cms.gov/Medicare/Coding/ICD10", "ICD10PCS"),
        ("urn:oid:2.16.840.1.113883.6.4", "ICD10PCS"),
        ("http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "HCPCS"),
        ("urn:oid:2.16.840.1.113883.6.285", "HCPCS"),
    ],
)
def test_listed_systems_by_url_or_oid_get_their_vocabulary(system: str, prefix: str) -> None:
    assert vocabulary_prefix(system) == prefix
    assert listed_prefix(system) == prefix


@pytest.mark.parametrize(
    ("system", "prefix"),
    [
        # Not listed: the last segment of the URL or OID, upper-cased, trailing slashes ignored.
        ("http://hospital.example/codes/dx/", "DX"),
        ("urn:oid:2.16.840.1.113883.6.104", "2.16.840.1.113883.6.104"),
        ("/", "UNKNOWN"),
        ("", "UNKNOWN"),
        (None, "UNKNOWN"),
    ],
)
def test_unlisted_systems_keep_their_last_segment(system: str | None, prefix: str) -> None:
    assert vocabulary_prefix(system) == prefix
    assert listed_prefix(system) is None
