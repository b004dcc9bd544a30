"""Clinical codes the simulated hospital uses, with their displays.

Stage: source data. In: nothing. Out: constant tables of SNOMED CT, ICD-10-CM, LOINC, RxNorm, CVX
and DICOM codes, chosen to match what a US hospital's EHR (and Synthea) writes. Each chronic
condition carries the weights of its prevalence model ``sigmoid(intercept + ehr_weight * ehr
severity + age_weight * standardised age)``: the structured record is how EHR severity shows.
"""

from __future__ import annotations

from dataclasses import dataclass

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
DOCUMENT_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"


@dataclass(frozen=True)
class Condition:
    key: str
    snomed: str
    snomed_display: str
    icd10cm: str
    icd10cm_display: str
    intercept: float
    ehr_weight: float
    age_weight: float
    # RxNorm (code, display, short name used in notes) started when the condition is diagnosed.
    medications: tuple[tuple[str, str, str], ...]


CHRONIC_CONDITIONS: tuple[Condition, ...] = (
    Condition(
        "hypertension", "59621000", "Essential hypertension (disorder)", "I10",
        "Essential (primary) hypertension", 0.3, 0.9, 0.4,
        (("314076", "lisinopril 10 MG Oral Tablet", "lisinopril 10mg daily"),),
    ),
    Condition(
        "type_2_diabetes", "44054006", "Diabetes mellitus type 2 (disorder)", "E11.9",
        "Type 2 diabetes mellitus without complications", -0.8, 0.8, 0.1,
        (("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
          "metformin ER 500mg"),),
    ),
    Condition(
        "hyperlipidemia", "55822004", "Hyperlipidemia (disorder)", "E78.5",
        "Hyperlipidemia, unspecified", 0.0, 0.6, 0.2,
        (("259255", "atorvastatin 80 MG Oral Tablet", "atorvastatin 80mg qhs"),),
    ),
    Condition(
        "coronary_artery_disease", "53741008", "Coronary arteriosclerosis (disorder)", "I25.10",
        "Atherosclerotic heart disease of native coronary artery without angina pectoris",
        -0.7, 0.9, 0.4,
        (("243670", "aspirin 81 MG Oral Tablet", "ASA 81"),),
    ),
    Condition(
        "atrial_fibrillation", "49436004", "Atrial fibrillation (disorder)", "I48.91",
        "Unspecified atrial fibrillation", -1.8, 0.6, 0.6,
        (("1364445", "apixaban 5 MG Oral Tablet", "apixaban 5 bid"),),
    ),
    Condition(
        "chronic_kidney_disease", "433144002", "Chronic kidney disease stage 3 (disorder)",
        "N18.30", "Chronic kidney disease, stage 3 unspecified", -1.6, 0.9, 0.5, (),
    ),
    Condition(
        "heart_failure", "84114007", "Heart failure (disorder)", "I50.9",
        "Heart failure, unspecified", -2.2, 0.9, 0.5,
        (
            ("313988", "furosemide 40 MG Oral Tablet", "lasix 40"),
            ("866412", "24 HR metoprolol succinate 100 MG Extended Release Oral Tablet",
             "metoprolol succ 100"),
        ),
    ),
    Condition(
        "obesity", "414916001", "Obesity (disorder)", "E66.9", "Obesity, unspecified",
        -0.9, 0.4, -0.1, (),
    ),
    # COPD is common in this population but unrelated to the outcome model: a realistic distractor.
    Condition(
        "copd", "13645005", "Chronic obstructive lung disease (disorder)", "J44.9",
        "Chronic obstructive pulmonary disease, unspecified", -2.0, 0.0, 0.3,
        (("895994", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
          "flovent inh"),),
    ),
)

CLOPIDOGREL = ("309362", "clopidogrel 75 MG Oral Tablet")

# Outcome conditions (SNOMED, SNOMED display, ICD-10-CM, ICD-10-CM display), by event type.
OUTCOME_CONDITIONS = {
    "myocardial_infarction": (
        "22298006", "Myocardial infarction (disorder)", "I21.9",
        "Acute myocardial infarction, unspecified",
    ),
    "stroke": ("422504002", "Ischemic stroke (disorder)", "I63.9", "Cerebral infarction, unspecified"),
    "cardiovascular_death": (
        "410429000", "Cardiac arrest (disorder)", "I46.9", "Cardiac arrest, cause unspecified",
    ),
}

PCI = ("415070008", "Percutaneous coronary intervention (procedure)")
ECG = ("29303009", "Electrocardiographic procedure (procedure)")

ENCOUNTER_TYPES = {
    # The index visit: the only encounters of this type, so a task can find the prediction time.
    "index": ("11429006", "Consultation (procedure)"),
    "follow_up": ("185349003", "Encounter for check up (procedure)"),
    "problem": ("185347001", "Encounter for problem (procedure)"),
    "admission": ("32485007", "Hospital admission (procedure)"),
    "emergency": ("50849002", "Emergency room admission (procedure)"),
}

# LOINC code, display, UCUM unit, category
LABS = {
    "creatinine": ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL"),
    "egfr": ("62238-1", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in "
             "Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI)", "mL/min/{1.73_m2}"),
    "hba1c": ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%"),
    "ldl": ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL"),
    "nt_probnp": ("33762-6", "Natriuretic peptide.B prohormone N-Terminal [Mass/volume] in Serum or "
                  "Plasma", "pg/mL"),
    "sodium": ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L"),
    "potassium": ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L"),
    "hemoglobin": ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL"),
}
VITALS = {
    "heart_rate": ("8867-4", "Heart rate", "/min"),
    "body_weight": ("29463-7", "Body weight", "kg"),
    "bmi": ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2"),
}
BODY_WEIGHT_IN_POUNDS = ("29463-7", "Body weight", "[lb_av]")
"""How the system that sends transaction Bundles charts a weight: in pounds, as many US clinics do."""
KILOGRAMS_PER_POUND = 0.45359237
BLOOD_PRESSURE = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
SMOKING_STATUS = ("72166-2", "Tobacco smoking status")
SMOKING_VALUES = {
    "current": ("449868002", "Smokes tobacco daily (finding)"),
    "former": ("8517006", "Ex-smoker (finding)"),
    "never": ("266919005", "Never smoked tobacco (finding)"),
}

NOTE_TYPES = {
    "progress": ("11506-3", "Progress note"),
    "consult": ("11488-4", "Consult note"),
    "discharge": ("18842-5", "Discharge summary"),
}

INFLUENZA_VACCINE = ("140", "Influenza, seasonal, injectable, preservative free")
ALLERGIES = (
    ("91936005", "Allergy to penicillin (finding)", 0.10),
    ("91935009", "Allergy to peanut (finding)", 0.02),
    ("300916003", "Latex allergy (finding)", 0.03),
)

# DICOM modality, description, body site SNOMED (code, display), share among studies.
IMAGING_PROTOCOLS = (
    ("US", "Transthoracic echocardiogram", ("80891009", "Heart structure (body structure)"), 0.55),
    ("CT", "CT coronary angiography", ("80891009", "Heart structure (body structure)"), 0.15),
    ("CT", "CT chest without contrast", ("51185008", "Thoracic structure (body structure)"), 0.15),
    ("MR", "Cardiac MRI with contrast", ("80891009", "Heart structure (body structure)"), 0.15),
)

# Variant calls: gene, rsID, alternate-allele frequency. CYP2C19 rs4244285 (*2) and LPA
# rs10455872 carry the simulated effects; the others are real pharmacogenes and risk loci that
# carry none here (a model must learn to ignore them).
VARIANTS = (
    ("CYP2C19", "rs4244285"),
    ("LPA", "rs10455872"),
    ("APOE", "rs429358"),
    ("PCSK9", "rs11591147"),
    ("SLCO1B1", "rs4149056"),
    ("CYP2C9", "rs1799853"),
    ("VKORC1", "rs9923231"),
    ("F5", "rs6025"),
    ("MTHFR", "rs1801133"),
    ("ABCB1", "rs1045642"),
)
NULL_VARIANT_FREQUENCIES = (0.14, 0.02, 0.15, 0.08, 0.39, 0.03, 0.12, 0.33)

# Expression panel (log2 normalised counts). The first six load on the genomic risk.
EXPRESSION_FEATURES = (
    "IL6", "CRP", "GDF15", "LGALS3", "MMP9", "IL1RL1",
    "TNF", "NPPB", "ACE2", "APOB", "LDLR", "HMGCR", "SOD2", "NOS3", "VEGFA", "CCL2",
    "TGFB1", "COL1A1", "MYH7", "ACTB", "GAPDH", "PPARG", "SIRT1", "KLF2",
)
EXPRESSION_RISK_LOADINGS = (0.8, 0.7, 0.7, 0.6, 0.5, 0.5)
