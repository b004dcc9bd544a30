"""What cohortcast takes from each FHIR resource type, and the vocabulary map.

Stage: ingest. In: nothing. Out: the registry the flattener and the event builder read:

* :data:`VOCABULARY_PREFIXES`, the one place that maps a FHIR coding ``system`` URL to the MEDS
  vocabulary prefix of its codes (``http://loinc.org`` -> ``LOINC``);
* :data:`TABLE_OF_TYPE`, the normalized table each used resource type goes to; resources of any
  other valid R4 type go to ``raw_unknown``, kept raw and counted;
* :data:`PATIENT_REFERENCE_FIELD`, where each type names its patient.
"""

from __future__ import annotations

from functools import lru_cache

VOCABULARY_PREFIXES: dict[str, str] = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://terminology.hl7.org/CodeSystem/v3-ActCode": "ACTCODE",
    "http://terminology.hl7.org/CodeSystem/observation-category": "OBSCAT",
    "urn:oid:2.16.840.1.113883.6.238": "CDCREC",
}
"""FHIR coding system URL -> vocabulary prefix. A system not listed keeps its URL's last path
segment, upper-cased (``http://example.org/fhir/CodeSystem/local-labs`` -> ``LOCAL-LABS``), and a
coding without a system is ``UNKNOWN//<code>``, so that no code is ever silently dropped."""

TABLE_OF_TYPE: dict[str, str] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Condition": "conditions",
    "Observation": "observations",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "MedicationAdministration": "medications",
    "Medication": "medication_codes",
    "Binary": "binaries",
    "Procedure": "procedures",
    "Immunization": "immunizations",
    "AllergyIntolerance": "allergies",
    "DiagnosticReport": "diagnostic_reports",
    "DocumentReference": "notes",
    "ImagingStudy": "imaging_studies",
}
"""Used resource type -> normalized table. Other valid R4 types go to ``raw_unknown``."""

MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationAdministration")
"""Types that name their drug by ``medicationCodeableConcept`` or by a ``medicationReference`` to a
``Medication`` (contained in the record, or elsewhere in the export)."""

CODED_TABLES = ("conditions", "medications", "procedures", "immunizations", "allergies", "diagnostic_reports")
"""Tables of the shared :data:`features.schemas.CODED_EVENTS` shape."""

ENTERED_IN_ERROR = "entered-in-error"
STATUS_ELEMENTS: dict[str, tuple[str, ...]] = {
    **{rt: ("status",) for rt in TABLE_OF_TYPE if rt not in ("Patient", "Binary", "Condition", "AllergyIntolerance")},
    "Condition": ("verificationStatus",),
    "AllergyIntolerance": ("verificationStatus",),
    # A note's document status as well as its reference's.
    "DocumentReference": ("status", "docStatus"),
}
"""Where each used type (Patient and Binary have none) says it is :data:`ENTERED_IN_ERROR`: a
code, or a CodeableConcept any of whose codings may say so. The source system withdrew such a record: it
describes nothing that happened, so it is quarantined, never used."""

DID_NOT_HAPPEN = ("not-done", "not-taken", "cancelled")
"""Statuses of a coded record whose act did not take place: a procedure, immunization or
administration ``not-done``, a medication statement ``not-taken``, an order or report
``cancelled``. Such a record is valid and stays in its table with its status (a refused vaccine
is worth counting), but it is not an event: an event says the act happened."""

VISIT_DID_NOT_HAPPEN = ("cancelled", "planned")
"""Encounter statuses of a visit that did not (or not yet) take place: kept in ``encounters``,
never an event (a cancelled visit must not become a task's prediction time). A refuted diagnosis
(verificationStatus ``refuted``) and a ``cancelled`` Observation or ImagingStudy are likewise kept
but not events."""

QUANTITY_COMPARATORS = ("<", "<=", ">=", ">", "ad")
"""FHIR R4 ``Quantity.comparator`` codes. With one, a value is a bound, not a measurement: a lab
result ``< 0.01`` is below the assay's detection limit, not exactly 0.01 (``ad``: "sufficient to
achieve this total quantity")."""

PATIENT_REFERENCE_FIELD: dict[str, str] = {
    "Immunization": "patient",
    "AllergyIntolerance": "patient",
}
"""Where a type names its patient when it is not ``subject``."""


def vocabulary_prefix(system: str | None) -> str:
    """Return the MEDS vocabulary prefix of a FHIR coding system URL.

    Examples
    --------
    >>> vocabulary_prefix("http://loinc.org")
    'LOINC'
    >>> vocabulary_prefix("http://example.org/fhir/CodeSystem/local-labs")
    'LOCAL-LABS'
    >>> vocabulary_prefix(None)
    'UNKNOWN'
    """
    if not system:
        return "UNKNOWN"
    prefix = VOCABULARY_PREFIXES.get(system)
    if prefix is not None:
        return prefix
    tail = system.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail.upper() or "UNKNOWN"


@lru_cache(maxsize=512)
def is_r4_resource_type(name: str) -> bool:
    """Whether ``name`` is a resource type of FHIR R4 (as modelled by ``fhir.resources.R4B``).

    Examples
    --------
    >>> is_r4_resource_type("Observation"), is_r4_resource_type("Address"), is_r4_resource_type("Foo")
    (True, False, False)
    """
    if not name.isidentifier() or not name[:1].isupper():
        return False
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        model = get_fhir_model_class(name)
    except (ValueError, KeyError, ImportError, AttributeError):
        return False
    return issubclass(model, Resource)
