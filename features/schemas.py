"""Every Arrow schema of cohortcast, in one place.

Stage: shared by all stages. In: nothing. Out: ``pyarrow.Schema`` objects for the landing-zone
contracts a hospital points cohortcast at (notes, genomics and imaging tables; FHIR itself is
described by the FHIR R4 specification), for the simulator's ground truth, and for every internal
table: the normalized FHIR tables, ``quarantine``, the MEDS-form ``events``, ``labels``,
``splits`` and ``scores``.

Conventions, which every later stage relies on:

* Times are ``timestamp[us]`` without a zone and always in UTC; dates of birth are ``date32``.
* ``patient_id`` is the source system's identifier (the FHIR ``Patient.id``); ``subject_id`` is
  the MEDS ``int64`` derived from it by :func:`features.identifiers.subject_ids`.
* Codes carry their vocabulary as a prefix, MEDS style: ``LOINC//2160-0``, ``SNOMED//44054006``,
  ``ICD10CM//I50.9``, ``RXNORM//309362``, ``GENE//CYP2C19``.
* Units are in column names where a column has one unit (``duration_days``).
"""

from __future__ import annotations

import pyarrow as pa

TIME = pa.timestamp("us")
"""UTC instant without a zone (MEDS convention)."""

# --------------------------------------------------------------------------------------------
# Landing-zone contracts (what a hospital drops next to its FHIR export)
# --------------------------------------------------------------------------------------------

NOTES_INPUT = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("note_type", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)
"""A notes table (``notes/*.parquet`` or ``*.csv``): one clinical note per row."""

GENOMICS_VARIANTS_INPUT = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("gene", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        # Number of alternate alleles: 0 homozygous reference, 1 heterozygous, 2 homozygous alt.
        pa.field("genotype", pa.int8(), nullable=False),
    ]
)
"""Variant calls in long form (``genomics/*.parquet|tsv|csv``)."""

GENOMICS_FEATURES_INPUT = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("feature", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)
"""Numeric genomic features (expression, scores) in long form. The wide form has ``patient_id``
and one float column per feature."""

IMAGING_INPUT = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        # DICOM modality code: US, CT, MR, CR, ...
        pa.field("modality", pa.string(), nullable=False),
        pa.field("body_site", pa.string(), nullable=False),
        # Produced by the site's image encoder; every row of one table has the same length.
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Imaging study embeddings (``imaging/*.parquet``)."""

# --------------------------------------------------------------------------------------------
# Simulator ground truth (known only for simulated hospitals)
# --------------------------------------------------------------------------------------------

TRUTH = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("sex", pa.string(), nullable=False),
        pa.field("age_years", pa.float64(), nullable=False),
        # The index visit: the moment a prediction is made for this patient.
        pa.field("prediction_time", TIME, nullable=False),
        pa.field("horizon_days", pa.int32(), nullable=False),
        # Hidden state. Each component is seen through one modality only.
        pa.field("ehr_severity", pa.float64(), nullable=False),
        pa.field("note_severity", pa.float64(), nullable=False),
        pa.field("genomic_risk", pa.float64(), nullable=False),
        pa.field("imaging_severity", pa.float64(), nullable=False),
        pa.field("cyp2c19_lof_alleles", pa.int8(), nullable=False),
        pa.field("lpa_risk_alleles", pa.int8(), nullable=False),
        # Which modalities the landing zone holds for this patient.
        pa.field("has_notes", pa.bool_(), nullable=False),
        pa.field("has_genomics", pa.bool_(), nullable=False),
        # The expression panel, of part of the genotyped patients: it alone carries genomic_risk.
        pa.field("has_expression", pa.bool_(), nullable=False),
        pa.field("has_imaging", pa.bool_(), nullable=False),
        # Treatment decided at the index visit (clopidogrel started within the treatment window).
        pa.field("treated", pa.bool_(), nullable=False),
        pa.field("propensity", pa.float64(), nullable=False),
        # log hazard ratio of the outcome under the treatment actually given (decided after the
        # prediction time, as true_risk is; the arms averaged by the propensity are the risk at
        # that time); with the Weibull baseline stored in the schema metadata it gives the whole
        # true survival curve.
        pa.field("log_hazard_ratio", pa.float64(), nullable=False),
        pa.field("true_risk", pa.float64(), nullable=False),
        pa.field("true_risk_untreated", pa.float64(), nullable=False),
        pa.field("true_risk_treated", pa.float64(), nullable=False),
        # risk if treated minus risk if untreated at the horizon (negative = the drug helps).
        pa.field("true_treatment_effect", pa.float64(), nullable=False),
        pa.field("event_time_days", pa.float64(), nullable=False),
        pa.field("censoring_time_days", pa.float64(), nullable=False),
        pa.field("observed_time_days", pa.float64(), nullable=False),
        pa.field("event_observed", pa.bool_(), nullable=False),
        # myocardial_infarction, stroke, cardiovascular_death, or null when censored.
        pa.field("event_type", pa.string(), nullable=True),
        # Realised binary label: event within the horizon; null when censored before it.
        pa.field("event_within_horizon", pa.bool_(), nullable=True),
    ]
)
"""``truth.parquet``: what the simulator knows and a model can only estimate."""

# --------------------------------------------------------------------------------------------
# Internal tables
# --------------------------------------------------------------------------------------------

QUARANTINE = pa.schema(
    [
        # fhir, notes, genomics or imaging.
        pa.field("source_kind", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file, entry of a Bundle, row of a Parquet file, record of a
        # CSV/TSV file after its header (a quoted field over several lines is one record, a blank
        # line one too); 0 when the whole file could not be read.
        pa.field("record_number", pa.int64(), nullable=False),
        pa.field("resource_type", pa.string(), nullable=True),
        pa.field("resource_id", pa.string(), nullable=True),
        # The record as found, cut to a few hundred characters.
        pa.field("raw_text", pa.string(), nullable=False),
        # A stable slug to count by (invalid_json, bad_date, orphan_reference, duplicate, ...).
        pa.field("reason_code", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
"""Records that could not be used, one row each, with a one-line reason."""

PATIENTS = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("birth_date", pa.date32(), nullable=True),
        pa.field("sex", pa.string(), nullable=True),
        pa.field("death_time", TIME, nullable=True),
        # deceasedDateTime or deceasedBoolean; true with a null death_time: dead, date unknown.
        pa.field("deceased", pa.bool_(), nullable=True),
        # Patient.link "replaced-by": this record was merged into that patient (an MPI merge).
        pa.field("replaced_by", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)

ENCOUNTERS = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("start_time", TIME, nullable=False),
        pa.field("end_time", TIME, nullable=True),
        # FHIR v3 ActCode: AMB, IMP, EMER, ...
        pa.field("encounter_class", pa.string(), nullable=True),
        pa.field("type_code", pa.string(), nullable=True),
        # The type's text, or the display of the coding type_code was taken from ("General
        # examination of patient").
        pa.field("type_display", pa.string(), nullable=True),
        pa.field("reason_code", pa.string(), nullable=True),
        # planned, finished, cancelled, ...: a cancelled or only planned visit is not an event.
        pa.field("status", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)

CODED_EVENTS = pa.schema(
    [
        pa.field("resource_id", pa.string(), nullable=False),
        # The FHIR type: medications mixes MedicationRequest, MedicationStatement, ...
        pa.field("resource_type", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("encounter_id", pa.string(), nullable=True),
        pa.field("time", TIME, nullable=False),
        pa.field("end_time", TIME, nullable=True),
        # The primary code: the concept's first coding of a listed vocabulary (a local code first
        # in the export must not hide the SNOMED one beside it), else its first coding.
        pa.field("code", pa.string(), nullable=False),
        # Every coding of the resource's code, vocabulary-prefixed, in the order of the export.
        pa.field("codes", pa.list_(pa.string()), nullable=False),
        # The code's text, or the display of the coding ``code`` was taken from.
        pa.field("display", pa.string(), nullable=True),
        pa.field("status", pa.string(), nullable=True),
        # A Condition's or allergy's verificationStatus (confirmed, provisional, refuted, ...).
        pa.field("verification_status", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Shared shape of conditions, immunizations, allergies and diagnostic reports (with one column
more, see :data:`RECORDED_EVENTS`), procedures and medications (with columns more, see
:data:`MEDICATIONS`)."""

MEDICATIONS = CODED_EVENTS.insert(
    CODED_EVENTS.get_field_index("source_file"),
    # MedicationRequest.doNotPerform, a FHIR modifier: true for an order *not* to give the drug (an
    # allergy, an interaction), which says the opposite of an exposure. Null when the record does
    # not say (MedicationStatement and MedicationAdministration have no such element).
    pa.field("do_not_perform", pa.bool_(), nullable=True),
).insert(
    CODED_EVENTS.get_field_index("source_file") + 1,
    # MedicationRequest.intent, also a modifier: order, plan (Cerner's documented home medications),
    # proposal (a suggestion no prescriber has acted on), option (one choice of a protocol's
    # alternatives), ...; null for the types without the element.
    pa.field("intent", pa.string(), nullable=True),
).insert(
    CODED_EVENTS.get_field_index("source_file") + 2,
    # MedicationStatement.dateAsserted: when the statement was made ("taking metformin since
    # 2015", said in 2018), so when the drug became known; null for the other types, known at their
    # time (an order when written, an administration when charted).
    pa.field("recorded_time", TIME, nullable=True),
)
"""MedicationRequests, -Statements and -Administrations: the coded-events shape, whether an
order forbids its drug, what kind of request it is, and when a statement was made."""

RECORDED_EVENTS = CODED_EVENTS.insert(
    CODED_EVENTS.get_field_index("source_file"),
    # When the record became known: a diagnosis's or allergy's recordedDate (entered in the record),
    # a report's issued (made available to clinicians), a vaccination's recorded; null when not
    # given. ``time`` stays the onset or the specimen's time, which may be earlier: the event is
    # known from the later of the two (``known_time``), since no prediction made before then could
    # have known of it.
    pa.field("recorded_time", TIME, nullable=True),
)
"""Conditions, immunizations, allergies (AllergyIntolerance) and diagnostic reports: the
coded-events shape, and when each became known."""

MEDICATION_CODES = pa.schema(
    [
        pa.field("medication_id", pa.string(), nullable=False),
        pa.field("code", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.string()), nullable=False),
        pa.field("display", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""FHIR ``Medication`` resources: the drug codes that orders naming their drug by
``medicationReference`` (as Epic and Cerner exports do) are resolved against."""

BINARIES = pa.schema(
    [
        pa.field("binary_id", pa.string(), nullable=False),
        pa.field("content_type", pa.string(), nullable=False),
        # Of the decoded text, for text/* content (whose text goes to ``notes`` when a
        # DocumentReference names the Binary); null for any other content.
        pa.field("text_sha256", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""FHIR ``Binary`` resources of the export (a note's text, when a DocumentReference names it by URL)."""

BINARY_TEXTS = BINARIES.insert(BINARIES.get_field_index("source_file"), pa.field("text", pa.string(), nullable=True))
"""Ingest's staging form of ``binaries``: with the decoded text, until notes are resolved."""

NOTE_REFERENCES = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("note_type", pa.string(), nullable=False),
        # The id of the Binary resource the note's text is in.
        pa.field("binary_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Ingest's staging form of a DocumentReference whose text is a Binary resource (an attachment
``url``): it becomes a ``notes`` row once the Binary is read."""

MEDICATION_REFERENCES = pa.schema(
    [
        *[f for f in MEDICATIONS if f.name not in ("code", "codes", "display", "source_file", "record_number")],
        # The id of the Medication resource the record names its drug by.
        pa.field("medication_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Ingest's staging form of a MedicationRequest, -Statement or -Administration whose drug is a
``Medication/<id>`` reference: it becomes a ``medications`` row once the Medication is read."""

RECORD_VERSIONS = pa.schema(
    [
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_number", pa.int64(), nullable=False),
        # meta.lastUpdated, a FHIR instant, in UTC; null when absent or malformed.
        pa.field("last_updated", TIME, nullable=True),
        # meta.versionId as written (a FHIR id); null when absent or malformed.
        pa.field("version_id", pa.string(), nullable=True),
    ]
)
"""Ingest's staging of the version (``meta.lastUpdated``, ``meta.versionId``) of each FHIR record
that states one, by where the record was read: when an export holds several copies of a resource,
the newest is kept. Staged apart rather than as columns of every table: one row per record that
has a version (none in most exports), and no written table changes shape."""

OBSERVATIONS = pa.schema(
    [
        pa.field("resource_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("encounter_id", pa.string(), nullable=True),
        # When the observation was made (effective[DateTime|Period|Instant], else issued).
        pa.field("time", TIME, nullable=False),
        # The end of an effectivePeriod (a 24-hour urine collection); null for a point in time.
        pa.field("end_time", TIME, nullable=True),
        # ``issued``: when the result was made available to clinicians (a lab drawn at 08:00 may be
        # resulted at 10:00); null when not given. The event is known from the latest of ``time``,
        # ``end_time`` and this (``known_time``): a prediction made at 09:00 could not have read that
        # result, nor one made during a collection its result.
        pa.field("issued_time", TIME, nullable=True),
        # Chosen among the codings as CODED_EVENTS' code is. For a component, the component's
        # code; ``parent_code`` then holds the panel's code.
        pa.field("code", pa.string(), nullable=False),
        # The code's text or its coding's display, as the source wrote it ("Systolic blood pressure").
        pa.field("display", pa.string(), nullable=True),
        pa.field("parent_code", pa.string(), nullable=True),
        pa.field("numeric_value", pa.float64(), nullable=True),
        # valueQuantity.comparator (<, <=, >=, >, ad): numeric_value is then a bound, not a
        # measurement ("< 0.01": below the assay's detection limit). Null for a plain value.
        pa.field("value_comparator", pa.string(), nullable=True),
        pa.field("unit", pa.string(), nullable=True),
        # valueCodeableConcept as a prefixed code, or valueString.
        pa.field("text_value", pa.string(), nullable=True),
        # Why there is no value: the code of dataAbsentReason (not-performed, error, masked, ...);
        # null when there is a value. A measurement never made (features.fhir.specs
        # NOT_MEASURED) is not an event.
        pa.field("data_absent_reason", pa.string(), nullable=True),
        pa.field("category", pa.string(), nullable=True),
        # final, preliminary, amended, cancelled, ...: a cancelled observation is not an event.
        pa.field("status", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)

NOTES = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("note_type", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        # sha256 of the text: the key of the note-embedding cache.
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)

IMAGING_STUDIES = pa.schema(
    [
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("modality", pa.string(), nullable=True),
        pa.field("body_site", pa.string(), nullable=True),
        pa.field("description", pa.string(), nullable=True),
        # registered, available, cancelled, ...: a cancelled study is not an event.
        pa.field("status", pa.string(), nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)

GENOMICS = pa.schema(
    [
        pa.field("patient_id", pa.string(), nullable=False),
        # GENE//CYP2C19 with variant rs4244285, or FEATURE//IL6_expression for numeric features.
        pa.field("code", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=True),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        # 1-based line of an NDJSON file or entry of a Bundle (row of a table): lineage.
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Variant calls (value = alternate allele count) and numeric features in one long table."""

IMAGING = IMAGING_INPUT.append(pa.field("source_file", pa.string(), nullable=False)).append(
    pa.field("record_number", pa.int64(), nullable=False)
)
"""Imaging embeddings as ingested: one row per study."""

DELETIONS = pa.schema(
    [
        pa.field("resource_type", pa.string(), nullable=False),
        pa.field("resource_id", pa.string(), nullable=False),
        # When the deleting Bundle was written (its meta.lastUpdated, else timestamp), in UTC; null
        # when it states neither or the value is malformed.
        pa.field("deleted_at", TIME, nullable=True),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Bundle entries that delete a resource (``request.method`` ``DELETE``, ``request.url``
``Type/id``). The copies of that resource the deletion comes after leave the tables (each a
``deleted`` quarantine row naming the entry): features.ingest says which; the deletion itself is
kept here."""

RAW_UNKNOWN = pa.schema(
    [
        pa.field("resource_id", pa.string(), nullable=False),
        pa.field("resource_type", pa.string(), nullable=False),
        # The resource's JSON as found (up to 100,000 characters).
        pa.field("raw_json", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("record_number", pa.int64(), nullable=False),
    ]
)
"""Valid FHIR resources of types cohortcast does not use (Claim, CarePlan, ...): kept, counted."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest magnitude ``events.numeric_value`` and imaging embeddings (float32) hold: ingest
quarantines a larger number, which would be stored as infinity and break every later stage."""

EVENTS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        # When it happened; null for static facts (sex, genotype), as in MEDS.
        pa.field("time", TIME, nullable=True),
        # When it became known, where later than ``time`` (a diagnosis recorded after its onset, a
        # result issued after the draw); null otherwise. Model inputs are placed at it.
        pa.field("known_time", TIME, nullable=True),
        pa.field("code", pa.string(), nullable=False),
        pa.field("numeric_value", pa.float32(), nullable=True),
        # The unit of numeric_value (UCUM where the source coded it: "kg", "[lb_av]"); null for
        # events without a unit. One code can come in several (a weight in kg or in pounds, an
        # eGFR per 1.73 m2 or not): model inputs convert or keep them apart (features.tokenize).
        pa.field("unit", pa.string(), nullable=True),
        pa.field("text_value", pa.string(), nullable=True),
        # ehr, notes, genomics or imaging: the token family the fusion model gives the event.
        pa.field("modality", pa.string(), nullable=False),
        # The normalized table and record the event came from, for lineage.
        pa.field("source", pa.string(), nullable=False),
    ]
)
"""MEDS-compatible long event table; every later stage reads it."""

CODES = pa.schema(
    [
        pa.field("code", pa.string(), nullable=False),
        # The display the export gives the code most often (null when it gives none): what a care
        # team reads instead of "LOINC//8480-6".
        pa.field("description", pa.string(), nullable=True),
        # For an observation component's code, the panels it was reported in ("LOINC//85354-9").
        pa.field("parent_codes", pa.list_(pa.string()), nullable=False),
    ]
)
"""MEDS code metadata (``metadata/codes.parquet`` in a MEDS dataset): one row per code of ``events``."""

LABELS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", TIME, nullable=False),
        pa.field("task", pa.string(), nullable=False),
        # Event within the horizon. Null when follow-up ended before the horizon without the
        # event: such patients are excluded from the risk label, never counted as negatives.
        pa.field("boolean_value", pa.bool_(), nullable=True),
        pa.field("event", pa.bool_(), nullable=False),
        # Days from prediction time to the event, or to the end of follow-up when censored.
        pa.field("duration_days", pa.float64(), nullable=False),
        # Null when the task defines no treatment, or the patient has no arm (features.labels).
        pa.field("treated", pa.bool_(), nullable=True),
        # On the treatment already (a code in the washout before the prediction time, or at it): the
        # effect of starting it does not apply. Null when the task defines no treatment.
        pa.field("prevalent_user", pa.bool_(), nullable=True),
    ]
)

SPLITS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        # train, tuning or held_out; assigned per patient, never per row.
        pa.field("split", pa.string(), nullable=False),
    ]
)

COHORT = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", TIME, nullable=False),
        pa.field("task", pa.string(), nullable=False),
        # Age at the prediction time (features.cohorts.age_years: birthdays passed on the site's calendar
        # plus the share of the year since the last); null when the birth date is unknown.
        pa.field("age_years", pa.float64(), nullable=True),
        pa.field("sex", pa.string(), nullable=True),
    ]
)
"""One row per patient of a task's cohort: who, and when the prediction is made."""

EVENT_TOKENS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", TIME, nullable=False),
        # Index into the task's vocabulary (0 padding, 1 unknown), oldest first, static facts first.
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        # 0 when the event has no numeric value, else its 1-based quantile bin (learned on train).
        pa.field("value_bins", pa.list_(pa.int8()), nullable=False),
        # Days from the event to the prediction time (>= 0); null for static facts.
        pa.field("time_before_days", pa.list_(pa.float32()), nullable=False),
        # 0 ehr, 1 notes, 2 genomics, 3 imaging (see ``features.tokenize.MODALITIES``).
        pa.field("modality_ids", pa.list_(pa.int8()), nullable=False),
        # Latest event time used; null when only static facts were used. The leakage check reads it.
        pa.field("last_input_time", TIME, nullable=True),
        # Events known before the prediction time (in the vocabulary) left out by ``max_events``.
        pa.field("dropped_events", pa.int32(), nullable=False),
    ]
)
"""One row per cohort patient: the event sequence the fusion model reads, cut at prediction time."""

MAX_VALUE_BINS = 127
"""Most value bins per numeric token: ``EVENT_TOKENS.value_bins`` is int8, bin 0 meaning "no
value", so bins 1 to ``value_bins`` must fit in 127."""

NOTE_EMBEDDINGS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("note_type", pa.string(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Embeddings of the notes written before each cohort patient's prediction time."""

IMAGING_INPUTS = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.string(), nullable=False),
        pa.field("time", TIME, nullable=False),
        pa.field("modality", pa.string(), nullable=True),
        pa.field("body_site", pa.string(), nullable=True),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Imaging study embeddings taken before each cohort patient's prediction time."""

EMBEDDING_CACHE = pa.schema(
    [
        # sha256 of the note text; with the model fingerprint (the cache folder) it keys the row.
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""One shard of the on-disk note-embedding cache."""

# TABULAR_FEATURES is wide and its code columns depend on the train split, so only its fixed
# leading columns are declared here; every further column is float64 (counts, last values, days).
TABULAR_FEATURES_KEY = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", TIME, nullable=False),
        pa.field("last_input_time", TIME, nullable=True),
    ]
)
"""Leading columns of the wide tabular-features table of the baseline models."""

EXPLANATION_ITEM = pa.struct(
    [
        pa.field("modality", pa.string()),
        pa.field("item", pa.string()),
        # Change in risk when the item is removed (positive = the item raised the risk).
        pa.field("contribution", pa.float64()),
        # The value bin of a code's most recent event with a value, as the range the model read
        # ("140 to 160", "< 0.5": a genotype's 0 copies), null without one; and how many of its
        # events have a value.
        pa.field("value_range", pa.string()),
        pa.field("readings", pa.int32()),
    ]
)

SCORES = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", TIME, nullable=False),
        pa.field("task", pa.string(), nullable=False),
        # Calibrated probability of the outcome within the task's horizon.
        pa.field("risk", pa.float64(), nullable=False),
        pa.field("risk_tier", pa.string(), nullable=False),
        # The patient's risk in the last publication, and the model that gave it (another model's
        # when the model was trained again since: then part of the change is the models').
        pa.field("previous_risk", pa.float64(), nullable=True),
        pa.field("previous_model_version", pa.string(), nullable=True),
        # Survival probability at each of ``survival_times_days``.
        pa.field("survival_times_days", pa.list_(pa.float32()), nullable=False),
        pa.field("survival_curve", pa.list_(pa.float32()), nullable=False),
        # Risk if treated minus risk if untreated (calibrated arms); null when the task defines no
        # treatment, and for a patient on the treatment already (labels' prevalent_user).
        pa.field("treatment_effect", pa.float64(), nullable=True),
        pa.field("modality_shares", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("top_items", pa.list_(EXPLANATION_ITEM), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

INTERNAL_TABLES: dict[str, pa.Schema] = {
    "quarantine": QUARANTINE,
    "patients": PATIENTS,
    "encounters": ENCOUNTERS,
    "conditions": RECORDED_EVENTS,
    "procedures": CODED_EVENTS,
    "medications": MEDICATIONS,
    "immunizations": RECORDED_EVENTS,
    "allergies": RECORDED_EVENTS,
    "diagnostic_reports": RECORDED_EVENTS,
    "medication_codes": MEDICATION_CODES,
    "binaries": BINARIES,
    "raw_unknown": RAW_UNKNOWN,
    "deletions": DELETIONS,
    "observations": OBSERVATIONS,
    "notes": NOTES,
    "imaging_studies": IMAGING_STUDIES,
    "genomics": GENOMICS,
    "imaging": IMAGING,
    "events": EVENTS,
    "codes": CODES,
    "labels": LABELS,
    "splits": SPLITS,
    "cohort": COHORT,
    "event_tokens": EVENT_TOKENS,
    "note_embeddings": NOTE_EMBEDDINGS,
    "imaging_inputs": IMAGING_INPUTS,
    "scores": SCORES,
}
"""Name of each internal table -> its schema."""

STAGED_TABLES: dict[str, pa.Schema] = {
    **INTERNAL_TABLES,
    "medication_references": MEDICATION_REFERENCES,
    "note_references": NOTE_REFERENCES,
    "binaries": BINARY_TEXTS,
    "record_versions": RECORD_VERSIONS,
    # Records the source system withdrew (entered-in-error): like a deletion, they remove the older
    # copies of their resource; they are quarantined themselves, never written as a table.
    "withdrawals": DELETIONS,
}
"""Every table ingest stages: the internal tables, forms that only exist until they are resolved, and
the FHIR records' versions (read when duplicates are resolved, never written)."""
