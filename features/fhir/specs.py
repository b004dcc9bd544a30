"""What cohortcast takes from each FHIR resource type, and the vocabulary map.

Stage: ingest. In: nothing. Out: the registry the flattener and the event builder read:

* :data:`VOCABULARY_PREFIXES`, the one place that maps a FHIR coding ``system`` URL (or HL7 OID)
  to the MEDS vocabulary prefix of its codes (``http://loinc.org`` -> ``LOINC``), and
  :data:`CODE_PADDING`, the whitespace stripped from codes;
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
    # ICD-10-PCS, the US inpatient procedure codes: HL7 names it by CMS's URL, whose last segment
    # ("ICD10") would otherwise file the procedures under WHO ICD-10's diagnoses.
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD10PCS",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": "HCPCS",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://terminology.hl7.org/CodeSystem/v3-ActCode": "ACTCODE",
    "http://terminology.hl7.org/CodeSystem/observation-category": "OBSCAT",
    "urn:oid:2.16.840.1.113883.6.238": "CDCREC",
    # The HL7 OIDs of the same vocabularies: exports converted from CDA documents (and older
    # interfaces) name systems so, and a SNOMED code must be SNOMED whichever name it came by.
    "urn:oid:2.16.840.1.113883.6.96": "SNOMED",
    "urn:oid:2.16.840.1.113883.6.1": "LOINC",
    "urn:oid:2.16.840.1.113883.6.88": "RXNORM",
    "urn:oid:2.16.840.1.113883.6.90": "ICD10CM",
    "urn:oid:2.16.840.1.113883.6.3": "ICD10",
    "urn:oid:2.16.840.1.113883.6.103": "ICD9CM",
    "urn:oid:2.16.840.1.113883.6.4": "ICD10PCS",
    "urn:oid:2.16.840.1.113883.6.285": "HCPCS",
    "urn:oid:2.16.840.1.113883.12.292": "CVX",
    "urn:oid:2.16.840.1.113883.6.69": "NDC",
    "urn:oid:2.16.840.1.113883.6.12": "CPT",
    "urn:oid:2.16.840.1.113883.6.8": "UCUM",
}
"""FHIR coding system URL -> vocabulary prefix: the *listed* vocabularies. A system is listed with
or without trailing slashes (``http://snomed.info/sct/`` is SNOMED). A system not listed keeps its
URL's last path segment, upper-cased (``http://example.org/fhir/CodeSystem/local-labs`` ->
``LOCAL-LABS``), and a coding without a system is ``UNKNOWN//<code>``, so that no code is ever
silently dropped."""

UCUM_SYSTEMS = frozenset(system for system, prefix in VOCABULARY_PREFIXES.items() if prefix == "UCUM")
"""The system URLs of UCUM, the computable unit codes. A Quantity's ``code`` in UCUM is the unit
both ingest paths store, before its ``unit``: ``unit`` is display text (``milligram per deciliter``,
``mg/dl``) that differs between senders for one unit, the UCUM code (``mg/dL``) does not."""

CODE_PADDING = " \t\n\r\f\v\u00a0"
"""Whitespace stripped from both ends of a coding's code (ASCII whitespace and the no-break space
that copies out of HTML and spreadsheets carry). FHIR's ``code`` type allows none there, and a
padded ``" 44054006 "`` would otherwise be a code of its own that no cohort rule names. Both ingest
paths strip exactly these characters."""

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

RECORDED_TYPES: dict[str, str] = {"Condition": "recordedDate", "AllergyIntolerance": "recordedDate",
                                  "DiagnosticReport": "issued", "Immunization": "recorded",
                                  "MedicationStatement": "dateAsserted"}
"""Types whose element saying when the record became known (value: its name) is kept beside their
time, as ``recorded_time``: a diagnosis or an allergy is often entered with an onset years back
("diabetes since 2015", "penicillin allergy since childhood"), a report is issued hours or days
after the specimen was taken, a vaccination given elsewhere is recorded when the patient
reports it, and a medication statement ("taking metformin since 2015") is asserted when the
patient or a relative says so; none was known before then."""

CODED_TABLES = ("conditions", "medications", "procedures", "immunizations", "allergies", "diagnostic_reports")
"""Tables of the shared :data:`features.schemas.CODED_EVENTS` shape (``medications`` with
``do_not_perform``, ``intent`` and ``recorded_time`` beside it: :data:`features.schemas.MEDICATIONS`; ``conditions``,
``immunizations``, ``allergies`` and ``diagnostic_reports`` with ``recorded_time``:
:data:`features.schemas.RECORDED_EVENTS`)."""

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

DID_NOT_HAPPEN = ("not-done", "not-taken", "cancelled", "draft", "intended", "preparation", "registered")
"""Statuses of a coded record whose act did not take place, or not yet: a procedure, immunization
or administration ``not-done``, a medication statement ``not-taken``, an order or report
``cancelled``; an order still a ``draft``, a drug the patient only ``intended`` to take, a
procedure in ``preparation``, a report ``registered`` with no result yet. Such a record is valid
and stays in its table with its status (a refused vaccine is worth counting), but it is not an
event: an event says the act happened. Nor is a MedicationRequest whose ``doNotPerform`` is true:
an order *not* to give the drug."""

NOT_YET_ORDERED = ("proposal", "option")
"""``MedicationRequest.intent`` codes of a request no prescriber has made: a ``proposal`` (a
pharmacist's or a decision-support rule's suggestion) or an ``option`` (one of a protocol's
alternatives, only one of which is given). Kept in ``medications`` with their intent, but not
events: the patient was not given the drug. A ``plan`` is one (Cerner exports documented home
medications so), as is every kind of order."""

NO_RESULT_YET = ("cancelled", "registered")
"""Observation statuses without a result: cancelled, or registered and not yet available."""

NOT_MEASURED = ("not-performed", "not-asked", "asked-declined", "not-permitted")
"""``Observation.dataAbsentReason`` codes that say the measurement was never made (the test was
not done, the question not asked or declined). Such an observation stays in its table with its
reason but is not an event: an event says the act happened. Other reasons (``error``, ``masked``,
``unknown``, ...) leave a measurement without a usable value: an event without a value."""

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

ENCOUNTER_REFERENCE_FIELD: dict[str, str] = {
    "MedicationStatement": "context",
    "MedicationAdministration": "context",
}
"""Where a type names its visit when it is not ``encounter`` (R4 names it ``context``, which may also
be an EpisodeOfCare: then the record has no visit)."""


def listed_prefix(system: str | None) -> str | None:
    """Return the prefix of a system of :data:`VOCABULARY_PREFIXES` (URL or OID, trailing slashes
    ignored), or None for any other system.

    Examples
    --------
    >>> listed_prefix("http://snomed.info/sct/"), listed_prefix("urn:oid:2.16.840.1.113883.6.1")
    ('SNOMED', 'LOINC')
    >>> listed_prefix("http://hospital.example/codes/dx") is None
    True
    """
    return VOCABULARY_PREFIXES.get(system.rstrip("/")) if system else None


def vocabulary_prefix(system: str | None) -> str:
    """Return the MEDS vocabulary prefix of a FHIR coding system URL.

    Examples
    --------
    >>> vocabulary_prefix("http://loinc.org")
    'LOINC'
    >>> vocabulary_prefix("http://snomed.info/sct/")
    'SNOMED'
    >>> vocabulary_prefix("urn:oid:2.16.840.1.113883.6.96")
    'SNOMED'
    >>> vocabulary_prefix("http://example.org/fhir/CodeSystem/local-labs")
    'LOCAL-LABS'
    >>> vocabulary_prefix(None)
    'UNKNOWN'
    """
    if not system:
        return "UNKNOWN"
    prefix = listed_prefix(system)
    if prefix is not None:
        return prefix
    tail = system.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail.upper() or "UNKNOWN"


R4_ONLY_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis", "RiskEvidenceSynthesis", "MedicinalProduct", "MedicinalProductAuthorization",
        "MedicinalProductContraindication", "MedicinalProductIndication", "MedicinalProductIngredient",
        "MedicinalProductInteraction", "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect", "SubstanceNucleicAcid",
        "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation", "SubstanceSourceMaterial",
        "SubstanceSpecification",
    }
)
"""FHIR R4 (4.0.1) resource types that R4B (4.3.0), and so ``fhir.resources.R4B``, replaced (by
``MedicinalProductDefinition``, ``Evidence``, ...): still R4 resources, kept as ``raw_unknown``
records like every type the pipeline does not read."""

ABSTRACT_TYPES = ("Resource", "DomainResource")
"""The base types of FHIR: never the ``resourceType`` of a record."""


@lru_cache(maxsize=512)
def is_r4_resource_type(name: str) -> bool:
    """Whether ``name`` is a resource type of FHIR R4: a concrete one modelled by
    ``fhir.resources.R4B``, or one of :data:`R4_ONLY_TYPES`.

    Examples
    --------
    >>> is_r4_resource_type("Observation"), is_r4_resource_type("MedicinalProduct")
    (True, True)
    >>> is_r4_resource_type("Address"), is_r4_resource_type("DomainResource"), is_r4_resource_type("Foo")
    (False, False, False)
    """
    if name in R4_ONLY_TYPES:
        return True
    if not name.isidentifier() or not name[:1].isupper() or name in ABSTRACT_TYPES:
        return False
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        model = get_fhir_model_class(name)
    except (ValueError, KeyError, ImportError, AttributeError):
        return False
    return issubclass(model, Resource)
