"""One simulated patient's records: FHIR R4 resources, notes-table rows and imaging studies.

Stage: source data. In: a :class:`PatientState` (one patient's slice of the hidden state) and a
per-patient random generator. Out: a :class:`PatientRecords` with the patient's FHIR resources as
plain dicts (ready for ``orjson``), rows for the notes table and the imaging studies whose
embeddings :mod:`features.simulate.hospital` computes.

The record covers the years before the index visit (the history a model may use), the index visit
itself, and follow-up until the outcome, loss to follow-up or the export date. Nothing is written
after a patient leaves the health system: censoring shows in the data as records that stop.
"""

from __future__ import annotations

import base64
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from features.simulate import vocabulary as v
from features.simulate.prose import (
    VisitContext,
    write_discharge_summary,
    write_nursing_note,
    write_visit_note,
)

Resource = dict[str, Any]
SITE_TIMEZONE = ZoneInfo("America/New_York")
"""The simulated hospital's clock; FHIR times carry its UTC offset, as real exports do."""


@dataclass(frozen=True)
class PatientState:
    """One patient's hidden state, as scalars."""

    patient_id: str
    is_male: bool
    age_years: float
    prediction_time: datetime
    history_days: float
    ehr_severity: float
    note_severity: float
    imaging_severity: float
    has_notes: bool
    has_notes_table: bool
    has_imaging: bool
    as_bundle: bool
    treated: bool
    event_time_days: float
    censoring_time_days: float
    event_type: str
    export_time: datetime
    organization_id: str
    practitioner_ids: tuple[str, ...]


@dataclass
class ImagingStudyRow:
    study_id: str
    time: datetime
    modality: str
    body_site: str
    # Severity the image shows: the patient's imaging severity, blurred by study-to-study noise.
    shown_severity: float


@dataclass
class PatientRecords:
    resources: list[Resource] = field(default_factory=list)
    notes_rows: list[dict[str, Any]] = field(default_factory=list)
    imaging_rows: list[ImagingStudyRow] = field(default_factory=list)


def fhir_time(time: datetime) -> str:
    """Format a naive UTC time as a FHIR dateTime in site time, e.g. ``2023-05-02T09:15:00-04:00``."""
    return time.replace(tzinfo=UTC).astimezone(SITE_TIMEZONE).isoformat(timespec="seconds")


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)], "text": display}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class _PatientWriter:
    """Builds one patient's records; holds the id generator and the reference style."""

    def __init__(self, state: PatientState, rnd: random.Random) -> None:
        self.state = state
        self.rnd = rnd
        self.records = PatientRecords()
        # No record after this: the patient's death, their leaving care, or the export.
        self.records_end = state.export_time
        self.conditions: list[str] = []
        self.medications: list[str] = []
        # Transaction Bundles reference their own entries by full URL, Bulk exports by type/id.
        self.reference: Callable[[str, str], dict[str, str]] = (
            (lambda _type, rid: {"reference": f"urn:uuid:{rid}"})
            if state.as_bundle
            else (lambda rtype, rid: {"reference": f"{rtype}/{rid}"})
        )
        self.subject = self.reference("Patient", state.patient_id)

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rnd.getrandbits(128), version=4))

    def add(self, resource: Resource) -> Resource:
        self.records.resources.append(resource)
        return resource

    # ---- resources ---------------------------------------------------------------------------

    def patient(self, death_time: datetime | None) -> None:
        s, rnd = self.state, self.rnd
        birth = s.prediction_time - timedelta(days=s.age_years * 365.25)
        given = rnd.choice(_MALE_NAMES if s.is_male else _FEMALE_NAMES)
        family = rnd.choice(_FAMILY_NAMES)
        resource: Resource = {
            "resourceType": "Patient",
            "id": s.patient_id,
            "identifier": [
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                         "code": "MR", "display": "Medical Record Number"}]},
                    "system": "http://hospital.cohortcast.example/mrn",
                    "value": f"MRN{rnd.randrange(10**7, 10**8)}",
                }
            ],
            "name": [{"use": "official", "family": family, "given": [given]}],
            "telecom": [{"system": "phone", "value": f"555-{rnd.randrange(100, 999)}-"
                         f"{rnd.randrange(1000, 9999)}", "use": "home"}],
            "gender": "male" if s.is_male else "female",
            "birthDate": birth.date().isoformat(),
            "address": [
                {
                    "line": [f"{rnd.randrange(1, 999)} {rnd.choice(_STREETS)}"],
                    "city": rnd.choice(_CITIES),
                    "state": "MA",
                    "postalCode": f"0{rnd.randrange(1000, 2799)}",
                    "country": "US",
                }
            ],
        }
        if death_time is not None:
            resource["deceasedDateTime"] = fhir_time(death_time)
        self.add(resource)

    def encounter(self, kind: str, start: datetime, end: datetime, encounter_class: str) -> str:
        rid = self.new_id()
        code, display = v.ENCOUNTER_TYPES[kind]
        class_display = {"AMB": "ambulatory", "IMP": "inpatient encounter", "EMER": "emergency"}
        self.add(
            {
                "resourceType": "Encounter",
                "id": rid,
                "status": "finished",
                "class": {"system": v.ACT_CODE, "code": encounter_class,
                          "display": class_display[encounter_class]},
                "type": [_concept(v.SNOMED, code, display)],
                "subject": self.subject,
                "participant": [{"individual": {
                    "reference": f"Practitioner/{self.rnd.choice(self.state.practitioner_ids)}"}}],
                "period": {"start": fhir_time(start), "end": fhir_time(end)},
                "serviceProvider": {"reference": f"Organization/{self.state.organization_id}"},
            }
        )
        return rid

    def condition(self, condition: tuple[str, str, str, str], onset: datetime, encounter: str,
                  active: bool = True) -> None:
        snomed, snomed_display, icd, icd_display = condition
        self.add(
            {
                "resourceType": "Condition",
                "id": self.new_id(),
                "clinicalStatus": {"coding": [{"system": v.CONDITION_CLINICAL,
                                               "code": "active" if active else "resolved"}]},
                "verificationStatus": {"coding": [{"system": v.CONDITION_VERIFICATION,
                                                   "code": "confirmed"}]},
                "category": [{"coding": [{"system": v.CONDITION_CATEGORY,
                                          "code": "encounter-diagnosis",
                                          "display": "Encounter Diagnosis"}]}],
                "code": {
                    "coding": [_coding(v.SNOMED, snomed, snomed_display),
                               _coding(v.ICD10CM, icd, icd_display)],
                    "text": snomed_display,
                },
                "subject": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "onsetDateTime": fhir_time(onset),
                "recordedDate": fhir_time(onset),
            }
        )

    def medication(self, code: str, display: str, time: datetime, encounter: str | None,
                   status: str = "active") -> None:
        resource: Resource = {
            "resourceType": "MedicationRequest",
            "id": self.new_id(),
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": _concept(v.RXNORM, code, display),
            "subject": self.subject,
            "authoredOn": fhir_time(time),
            "dosageInstruction": [{"text": "as directed"}],
        }
        if encounter is not None:
            resource["encounter"] = self.reference("Encounter", encounter)
        self.add(resource)

    def observation(self, loinc: tuple[str, str, str], value: float, decimals: int, time: datetime,
                    encounter: str, category: str) -> None:
        code, display, unit = loinc
        self.add(
            {
                "resourceType": "Observation",
                "id": self.new_id(),
                "status": "final",
                "category": [{"coding": [{"system": v.OBSERVATION_CATEGORY, "code": category}]}],
                "code": _concept(v.LOINC, code, display),
                "subject": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "effectiveDateTime": fhir_time(time),
                # Vital signs are charted as they are taken; a laboratory result is issued two
                # hours after the draw, so the labs of a visit are not yet known at its end.
                "issued": fhir_time(time if category == "vital-signs" else time + timedelta(hours=2)),
                "valueQuantity": {"value": round(value, decimals) if decimals else round(value),
                                  "unit": unit, "system": v.UCUM, "code": unit},
            }
        )

    def blood_pressure(self, systolic: int, diastolic: int, time: datetime, encounter: str) -> None:
        def component(loinc: tuple[str, str], value: int) -> dict[str, Any]:
            return {"code": _concept(v.LOINC, *loinc),
                    "valueQuantity": {"value": value, "unit": "mm[Hg]", "system": v.UCUM,
                                      "code": "mm[Hg]"}}

        self.add(
            {
                "resourceType": "Observation",
                "id": self.new_id(),
                "status": "final",
                "category": [{"coding": [{"system": v.OBSERVATION_CATEGORY, "code": "vital-signs"}]}],
                "code": _concept(v.LOINC, *v.BLOOD_PRESSURE),
                "subject": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "effectiveDateTime": fhir_time(time),
                "component": [component(v.SYSTOLIC, systolic), component(v.DIASTOLIC, diastolic)],
            }
        )

    def smoking_status(self, status: str, time: datetime, encounter: str) -> None:
        self.add(
            {
                "resourceType": "Observation",
                "id": self.new_id(),
                "status": "final",
                "category": [{"coding": [{"system": v.OBSERVATION_CATEGORY, "code": "social-history"}]}],
                "code": _concept(v.LOINC, *v.SMOKING_STATUS),
                "subject": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "effectiveDateTime": fhir_time(time),
                "valueCodeableConcept": _concept(v.SNOMED, *v.SMOKING_VALUES[status]),
            }
        )

    def procedure(self, procedure: tuple[str, str], start: datetime, minutes: int,
                  encounter: str) -> None:
        self.add(
            {
                "resourceType": "Procedure",
                "id": self.new_id(),
                "status": "completed",
                "code": _concept(v.SNOMED, *procedure),
                "subject": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "performedPeriod": {"start": fhir_time(start),
                                    "end": fhir_time(start + timedelta(minutes=minutes))},
            }
        )

    def note(self, kind: str, text: str, time: datetime, encounter: str) -> None:
        code, display = v.NOTE_TYPES[kind]
        self.add(
            {
                "resourceType": "DocumentReference",
                "id": self.new_id(),
                "status": "current",
                "docStatus": "final",
                "type": _concept(v.LOINC, code, display),
                "category": [{"coding": [{"system": v.DOCUMENT_CATEGORY, "code": "clinical-note",
                                          "display": "Clinical Note"}]}],
                "subject": self.subject,
                "date": fhir_time(time),
                "author": [{"reference": f"Practitioner/{self.rnd.choice(self.state.practitioner_ids)}"}],
                "content": [{"attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                }}],
                "context": {"encounter": [self.reference("Encounter", encounter)],
                            "period": {"start": fhir_time(time), "end": fhir_time(time)}},
            }
        )

    def immunization(self, time: datetime, encounter: str) -> None:
        self.add(
            {
                "resourceType": "Immunization",
                "id": self.new_id(),
                "status": "completed",
                "vaccineCode": _concept(v.CVX, *v.INFLUENZA_VACCINE),
                "patient": self.subject,
                "encounter": self.reference("Encounter", encounter),
                "occurrenceDateTime": fhir_time(time),
                "primarySource": True,
            }
        )

    def allergy(self, code: str, display: str, time: datetime) -> None:
        self.add(
            {
                "resourceType": "AllergyIntolerance",
                "id": self.new_id(),
                "clinicalStatus": {"coding": [{"system": v.ALLERGY_CLINICAL, "code": "active"}]},
                "verificationStatus": {"coding": [{"system": v.ALLERGY_VERIFICATION,
                                                   "code": "confirmed"}]},
                "type": "allergy",
                "category": ["medication" if "penicillin" in display else "environment"],
                "criticality": "low",
                "code": _concept(v.SNOMED, code, display),
                "patient": self.subject,
                "recordedDate": fhir_time(time),
            }
        )

    def imaging_study(self, time: datetime, protocol: tuple[str, str, tuple[str, str], float]) -> str:
        modality, description, (site_code, site_display), _share = protocol
        rid = self.new_id()
        study_uid = f"2.25.{uuid.UUID(rid).int}"
        instances = self.rnd.randint(20, 120)
        self.add(
            {
                "resourceType": "ImagingStudy",
                "id": rid,
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                "status": "available",
                "subject": self.subject,
                "started": fhir_time(time),
                "modality": [_coding(v.DICOM, modality, modality)],
                "description": description,
                "numberOfSeries": 1,
                "numberOfInstances": instances,
                "series": [{
                    "uid": f"{study_uid}.1",
                    "number": 1,
                    "modality": _coding(v.DICOM, modality, modality),
                    "bodySite": _coding(v.SNOMED, site_code, site_display),
                    "numberOfInstances": instances,
                }],
            }
        )
        return rid

    # ---- clinical course ---------------------------------------------------------------------

    def visit_context(self, systolic: int, diastolic: int, heart_rate: int, when: datetime) -> VisitContext:
        s = self.state
        age = s.age_years + (when - s.prediction_time).days / 365.25
        return VisitContext(
            age_years=int(age),
            is_male=s.is_male,
            conditions=tuple(self.conditions),
            medications=tuple(self.medications),
            systolic_mm_hg=systolic,
            diastolic_mm_hg=diastolic,
            heart_rate_per_min=heart_rate,
            note_severity=s.note_severity,
        )

    def outpatient_visit(self, start: datetime, kind: str, smoking: str | None,
                         new_conditions: list[v.Condition]) -> None:
        s, rnd = self.state, self.rnd
        end = start + timedelta(minutes=45)
        encounter = self.encounter(kind, start, end, "AMB")
        measured = start + timedelta(minutes=10)
        for condition in new_conditions:
            self.condition((condition.snomed, condition.snomed_display, condition.icd10cm,
                            condition.icd10cm_display), start + timedelta(minutes=30), encounter)
            self.conditions.append(condition.key)
            for code, display, short in condition.medications:
                self.medication(code, display, start + timedelta(minutes=35), encounter)
                self.medications.append(short)
        age_centred = (s.age_years - 66.0) / 11.0
        ehr = s.ehr_severity
        systolic = round(128 + 9 * ehr + 3 * age_centred + rnd.gauss(0, 10))
        diastolic = round(78 + 4 * ehr + rnd.gauss(0, 7))
        heart_rate = round(72 + 2 * ehr + rnd.gauss(0, 9))
        self.blood_pressure(systolic, diastolic, measured, encounter)
        self.observation(v.VITALS["heart_rate"], heart_rate, 0, measured, encounter, "vital-signs")
        if rnd.random() < 0.5:
            bmi = 29 + 2.5 * ehr + 3 * ("obesity" in self.conditions) + rnd.gauss(0, 2)
            height_m = 1.77 if s.is_male else 1.63
            weight_kg = bmi * height_m**2
            # The Bundle feed is another source system, whose scale is set to pounds: the same
            # code in a second unit, which the model's inputs convert (features.units).
            if self.state.as_bundle:
                self.observation(v.BODY_WEIGHT_IN_POUNDS, weight_kg / v.KILOGRAMS_PER_POUND, 1, measured, encounter,
                                 "vital-signs")
            else:
                self.observation(v.VITALS["body_weight"], weight_kg, 1, measured, encounter, "vital-signs")
            self.observation(v.VITALS["bmi"], bmi, 1, measured, encounter, "vital-signs")
        if smoking is not None:
            self.smoking_status(smoking, measured, encounter)
        if kind == "index" or rnd.random() < 0.6:
            self.labs(start + timedelta(minutes=20), encounter)
        if rnd.random() < 0.15:
            self.procedure(v.ECG, start + timedelta(minutes=15), 10, encounter)
        if start.month >= 9 and rnd.random() < 0.5:
            self.immunization(start + timedelta(minutes=40), encounter)
        if s.has_notes and (kind == "index" or rnd.random() < 0.7):
            visit = self.visit_context(systolic, diastolic, heart_rate, start)
            heading = "CARDIOLOGY CONSULT" if kind == "index" else rnd.choice(
                ("PROGRESS NOTE", "Office Visit", "FOLLOW-UP VISIT"))
            self.note("consult" if kind == "index" else "progress",
                      write_visit_note(rnd, visit, heading), start + timedelta(minutes=40), encounter)
        if s.has_notes_table and rnd.random() < 0.5:
            visit = self.visit_context(systolic, diastolic, heart_rate, start)
            note_id = self.new_id()
            written = start + timedelta(days=rnd.randint(1, 4), hours=rnd.randint(0, 6))
            note_type = rnd.choice(("nursing_note", "care_management_note"))
            text = write_nursing_note(rnd, visit)
            # Written days after the visit: not once the patient died, left care or was exported.
            if written < self.records_end:
                self.records.notes_rows.append({"patient_id": s.patient_id, "note_id": note_id, "time": written,
                                                "note_type": note_type, "text": text})

    def labs(self, time: datetime, encounter: str) -> None:
        s, rnd = self.state, self.rnd
        ehr = s.ehr_severity
        ckd = "chronic_kidney_disease" in self.conditions
        creatinine = math.exp(0.18 * ehr + 0.35 * ckd + rnd.gauss(0, 0.12)) * (1.05 if s.is_male else 0.85)
        age = s.age_years + (time - s.prediction_time).days / 365.25
        # CKD-EPI 2021, so eGFR is consistent with the creatinine it is computed from.
        kappa, alpha = (0.9, -0.302) if s.is_male else (0.7, -0.241)
        ratio = creatinine / kappa
        egfr = 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.2 * 0.9938**age * (1 if s.is_male else 1.012)
        self.observation(v.LABS["creatinine"], creatinine, 2, time, encounter, "laboratory")
        self.observation(v.LABS["egfr"], egfr, 0, time, encounter, "laboratory")
        self.observation(v.LABS["sodium"], 139 + rnd.gauss(0, 2.5), 0, time, encounter, "laboratory")
        self.observation(v.LABS["potassium"], 4.2 + 0.1 * ckd + rnd.gauss(0, 0.35), 1, time, encounter,
                         "laboratory")
        self.observation(v.LABS["hemoglobin"], (14.5 if s.is_male else 13.0) - 0.3 * ckd + rnd.gauss(0, 1.0),
                         1, time, encounter, "laboratory")
        if "type_2_diabetes" in self.conditions or rnd.random() < 0.3:
            hba1c = 5.6 + 0.4 * ehr + 1.3 * ("type_2_diabetes" in self.conditions) + rnd.gauss(0, 0.5)
            self.observation(v.LABS["hba1c"], hba1c, 1, time, encounter, "laboratory")
        if rnd.random() < 0.5:
            statin = "hyperlipidemia" in self.conditions
            ldl = 115 + 18 * ehr - 35 * statin + rnd.gauss(0, 22)
            self.observation(v.LABS["ldl"], max(ldl, 25.0), 0, time, encounter, "laboratory")
        if "heart_failure" in self.conditions or rnd.random() < 0.3:
            nt_probnp = math.exp(5.0 + 0.6 * ehr + 1.2 * ("heart_failure" in self.conditions)
                                 + rnd.gauss(0, 0.5))
            self.observation(v.LABS["nt_probnp"], nt_probnp, 0, time, encounter, "laboratory")

    def hospital_stay(self, start: datetime, event_type: str) -> None:
        rnd = self.rnd
        days = rnd.randint(2, 7)
        end = start + timedelta(days=days)
        encounter = self.encounter("admission", start, end, "IMP")
        self.condition(v.OUTCOME_CONDITIONS[event_type], start + timedelta(hours=1), encounter)
        if event_type == "myocardial_infarction" and rnd.random() < 0.7:
            self.procedure(v.PCI, start + timedelta(hours=3), 90, encounter)
        self.labs(start + timedelta(hours=1), encounter)
        if self.state.has_notes:
            visit = self.visit_context(140, 85, 88, start)
            diagnosis = {"myocardial_infarction": "NSTEMI", "stroke": "acute ischemic stroke"}[event_type]
            self.note("discharge", write_discharge_summary(rnd, visit, diagnosis), end, encounter)

    def fatal_event(self, time: datetime) -> None:
        encounter = self.encounter("emergency", time - timedelta(minutes=50), time, "EMER")
        self.condition(v.OUTCOME_CONDITIONS["cardiovascular_death"], time - timedelta(minutes=45),
                       encounter)


def _clinic_time(rnd: random.Random, day: datetime) -> datetime:
    """A weekday clinic slot, 08:00-16:00 site time (13:00-21:00 UTC)."""
    slot = day.replace(hour=13, minute=0, second=0, microsecond=0)
    while slot.weekday() >= 5:
        slot += timedelta(days=1)
    return slot + timedelta(minutes=15 * rnd.randrange(0, 32))


def write_patient(state: PatientState, rnd: random.Random) -> PatientRecords:
    """Return every record of one patient, in the order a source system would have written them."""
    w = _PatientWriter(state, rnd)
    s = state
    index_start = s.prediction_time - timedelta(minutes=45)
    first_visit = index_start - timedelta(days=s.history_days)
    event_observed = s.event_time_days <= s.censoring_time_days
    follow_up_end = s.prediction_time + timedelta(days=min(s.event_time_days, s.censoring_time_days))
    death_time = (follow_up_end if event_observed and s.event_type == "cardiovascular_death" else None)
    w.patient(death_time)
    # After a non-fatal event the patient stays in care until censored; a death ends the record.
    records_end = follow_up_end if death_time is not None else (
        s.prediction_time + timedelta(days=s.censoring_time_days))
    w.records_end = min(records_end, s.export_time)

    # Visits: more frequent for sicker patients; the index visit is always the first consultation.
    rate_per_year = 1.5 + 1.5 * _sigmoid(s.ehr_severity)
    n_before = max(1, _poisson(rnd, rate_per_year * s.history_days / 365.25))
    before = sorted(
        _clinic_time(rnd, first_visit + timedelta(days=rnd.uniform(0, s.history_days - 10)))
        for _ in range(n_before)
    )
    age_centred = (s.age_years - 66.0) / 11.0
    diagnosed_at: dict[int, list[v.Condition]] = {}
    for condition in v.CHRONIC_CONDITIONS:
        logit = condition.intercept + condition.ehr_weight * s.ehr_severity + condition.age_weight * age_centred
        if rnd.random() < _sigmoid(logit):
            diagnosed_at.setdefault(rnd.randrange(0, n_before), []).append(condition)
    smoking = rnd.choices(("current", "former", "never"),
                          weights=(_sigmoid(-1.7 + 0.5 * s.ehr_severity), 0.3, 0.5))[0]

    for allergy_code, allergy_display, share in v.ALLERGIES:
        if rnd.random() < share:
            w.allergy(allergy_code, allergy_display, before[0])
    for k, start in enumerate(before):
        w.outpatient_visit(start, "follow_up" if k % 3 else "problem", smoking if k == 0 else None,
                           diagnosed_at.get(k, []))
    w.outpatient_visit(index_start, "index", smoking, [])
    if s.treated:
        # Started after the index visit (the prescription follows the visit's results), so the
        # treatment decision is never a model input at the prediction time; never prescribed to a
        # patient who died or left care before it.
        started = s.prediction_time + timedelta(days=rnd.uniform(1, 14))
        if started < w.records_end:
            w.medication(*v.CLOPIDOGREL, started, None)
        else:
            w.new_id()  # the order's id is drawn all the same: the patient's later records stay as they were

    follow_up_days = (records_end - s.prediction_time).days
    n_after = _poisson(rnd, 2.0 * follow_up_days / 365.25)
    after = sorted(
        _clinic_time(rnd, s.prediction_time + timedelta(days=rnd.uniform(14, max(follow_up_days, 15))))
        for _ in range(n_after)
    )
    for start in after:
        if start < records_end:
            w.outpatient_visit(start, "follow_up", None, [])
    if death_time is not None:
        w.fatal_event(death_time)
    elif event_observed:
        w.hospital_stay(follow_up_end, s.event_type)

    if s.has_imaging:
        for when in _imaging_times(rnd, first_visit, index_start, s.prediction_time, records_end):
            protocol = rnd.choices(v.IMAGING_PROTOCOLS, weights=[p[3] for p in v.IMAGING_PROTOCOLS])[0]
            study_id = w.imaging_study(when, protocol)
            w.records.imaging_rows.append(
                ImagingStudyRow(study_id, when, protocol[0], protocol[2][1],
                                s.imaging_severity + rnd.gauss(0, 0.3))
            )
    return w.records


def _imaging_times(rnd: random.Random, first: datetime, index_start: datetime,
                   prediction_time: datetime, records_end: datetime) -> list[datetime]:
    span = (index_start - first).total_seconds()
    times = [first + timedelta(seconds=rnd.uniform(0, span)) for _ in range(1 + _poisson(rnd, 0.7))]
    if records_end > prediction_time + timedelta(days=30) and rnd.random() < 0.3:
        after = (records_end - prediction_time).total_seconds()
        times.append(prediction_time + timedelta(seconds=rnd.uniform(86400 * 7, after)))
    return sorted(t.replace(microsecond=0) for t in times)


def _poisson(rnd: random.Random, mean: float) -> int:
    """Knuth's Poisson draw; means here are small (under 30)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rnd.random()
        if p <= limit:
            return k
        k += 1


def reference_resources(rnd: random.Random, n_practitioners: int) -> tuple[list[Resource], str, tuple[str, ...]]:
    """Return the hospital's Organization and Practitioner resources, and their ids."""
    org_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    resources: list[Resource] = [{
        "resourceType": "Organization",
        "id": org_id,
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                              "code": "prov", "display": "Healthcare Provider"}]}],
        "name": "Cohortcast General Hospital",
        "address": [{"line": ["1 Hospital Way"], "city": "Boston", "state": "MA", "postalCode": "02114",
                     "country": "US"}],
    }]
    practitioner_ids = []
    for _ in range(n_practitioners):
        pid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        practitioner_ids.append(pid)
        resources.append({
            "resourceType": "Practitioner",
            "id": pid,
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi",
                            "value": str(rnd.randrange(10**9, 2 * 10**9))}],
            "active": True,
            "name": [{"family": rnd.choice(_FAMILY_NAMES), "given": [rnd.choice(_FEMALE_NAMES + _MALE_NAMES)],
                      "prefix": ["Dr."]}],
        })
    return resources, org_id, tuple(practitioner_ids)


_MALE_NAMES = ("James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas",
               "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Luis", "Wei", "Mohammed", "Kwame")
_FEMALE_NAMES = ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
                 "Sarah", "Karen", "Lisa", "Nancy", "Maria", "Mei", "Fatima", "Ama", "Rosa", "Ruth")
_FAMILY_NAMES = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
                 "Rodriguez", "Martinez", "Hernandez", "Lopez", "Nguyen", "Chen", "Okafor", "Murphy",
                 "O'Brien", "Kowalski", "Haddad", "Silva")
_STREETS = ("Maple St", "Oak Ave", "Washington St", "Elm St", "Beacon St", "Harbor Rd", "Main St",
            "Chestnut Hill Ave", "Summer St", "Pleasant St")
_CITIES = ("Boston", "Cambridge", "Somerville", "Quincy", "Newton", "Brookline", "Medford", "Malden",
           "Waltham", "Revere")
