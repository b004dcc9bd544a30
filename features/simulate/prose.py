"""Clinical prose for the simulated hospital's notes.

Stage: source data. In: a patient's visit context (age, sex, known diagnoses, vitals, medications)
and their hidden note severity. Out: note text as a clinician would type it, with the
abbreviations, negations, copy-forward phrasing and typos real notes have.

The note severity is written only here: symptom burden (dyspnoea, chest pain, oedema), frailty and
adherence. A reader (or a text encoder) must weigh affirmed against negated findings to recover it;
the diagnoses and vitals the notes repeat are also in the structured record, so they add no new
signal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

# (intercept, weight on note severity, affirmed phrasings, negated phrasings)
_SYMPTOMS: tuple[tuple[float, float, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        -1.0,
        1.3,
        (
            "c/o SOB on exertion",
            "reports DOE after one flight of stairs",
            "increasing dyspnea w/ minimal activity",
            "gets winded walking to the mailbox",
        ),
        ("denies SOB", "no DOE", "no dyspnea at rest or w/ exertion"),
    ),
    (
        -1.4,
        1.1,
        (
            "intermittent chest tightness, worse w/ exertion, relieved by rest",
            "c/o substernal CP radiating to L arm",
            "episodes of chest pressure x2 wks",
        ),
        ("denies CP", "no chest pain or pressure", "CP free since last visit"),
    ),
    (
        -1.2,
        1.2,
        ("2+ pitting edema bilat LE", "ankle swelling, worse at end of day", "LE edema noted"),
        ("no LE edema", "no peripheral edema", "extremities w/o edema"),
    ),
    (
        -1.6,
        1.2,
        ("orthopnea, now sleeping on 3 pillows", "wakes up at night short of breath (PND)"),
        ("denies orthopnea/PND", "sleeps flat w/o difficulty"),
    ),
    (
        -0.8,
        0.9,
        ("fatigue, limits ADLs", "feels tired all the time", "reports low energy"),
        ("energy level good", "denies fatigue"),
    ),
    (
        -1.8,
        1.0,
        ("lightheaded on standing, near-syncope x1", "palpitations at night"),
        ("no syncope or presyncope", "denies palpitations"),
    ),
)

# (intercept, weight, affirmed, opposite) for social and functional history.
_SOCIAL: tuple[tuple[float, float, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        -1.3,
        1.0,
        ("lives alone, dtr checks in weekly", "lives alone, limited support"),
        ("lives w/ spouse, good support", "lives with family"),
    ),
    (
        -1.5,
        1.1,
        ("admits to missing doses of meds, cost concerns", "poor med adherence per pharmacy fill hx"),
        ("adherent to meds", "takes meds as prescribed, uses pillbox"),
    ),
    (
        -1.7,
        1.1,
        ("frail, ambulates w/ walker", "2 falls in past 6 mo"),
        ("independent in ADLs", "walks 30 min most days"),
    ),
)

_CONDITION_ABBREVIATIONS = {
    "hypertension": "HTN",
    "type_2_diabetes": "DM2",
    "hyperlipidemia": "HLD",
    "coronary_artery_disease": "CAD",
    "atrial_fibrillation": "afib",
    "chronic_kidney_disease": "CKD 3",
    "heart_failure": "HFrEF",
    "obesity": "obesity",
    "copd": "COPD",
}

_PLANS = (
    "cont current meds",
    "f/u 3 mo",
    "RTC 6 wks",
    "labs prior to next visit",
    "low Na diet reviewed",
    "daily weights, call if gain >3 lb",
    "encouraged walking program",
    "med rec done",
)


@dataclass(frozen=True)
class VisitContext:
    """What a note writer sees at one visit."""

    age_years: int
    is_male: bool
    conditions: Sequence[str]
    medications: Sequence[str]
    systolic_mm_hg: int
    diastolic_mm_hg: int
    heart_rate_per_min: int
    note_severity: float


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _typo(rnd: random.Random, text: str) -> str:
    """Drop or swap one letter of a longer word, as fast typing does."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) > 5 and w.isalpha()]
    if not long_words:
        return text
    i = rnd.choice(long_words)
    w = words[i]
    j = rnd.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :] if rnd.random() < 0.5 else w[:j] + w[j + 1 :]
    return " ".join(words)


def _findings(
    rnd: random.Random,
    table: tuple[tuple[float, float, tuple[str, ...], tuple[str, ...]], ...],
    severity: float,
    mention_absent: float,
) -> list[str]:
    phrases = []
    for intercept, weight, affirmed, negated in table:
        if rnd.random() < _sigmoid(intercept + weight * severity):
            phrases.append(rnd.choice(affirmed))
        elif rnd.random() < mention_absent:
            phrases.append(rnd.choice(negated))
    rnd.shuffle(phrases)
    return phrases


def write_visit_note(rnd: random.Random, visit: VisitContext, heading: str) -> str:
    """Return an outpatient note (SOAP form) for one visit."""
    sex = "M" if visit.is_male else "F"
    history = ", ".join(_CONDITION_ABBREVIATIONS[c] for c in visit.conditions) or "no significant PMH"
    symptoms = _findings(rnd, _SYMPTOMS, visit.note_severity, mention_absent=0.6)
    social = _findings(rnd, _SOCIAL, visit.note_severity, mention_absent=0.3)
    reason = rnd.choice(("f/u", "routine f/u", "follow up of chronic conditions", "cardiology eval"))
    subjective = "; ".join(symptoms) if symptoms else "no new complaints"
    lines = [
        heading,
        f"S: {visit.age_years} yo {sex} w/ hx of {history} here for {reason}. {subjective}.",
    ]
    if social:
        lines.append("SH: " + "; ".join(social) + ".")
    if visit.medications:
        lines.append("Meds: " + ", ".join(visit.medications) + ".")
    lines.append(
        f"O: BP {visit.systolic_mm_hg}/{visit.diastolic_mm_hg}, HR {visit.heart_rate_per_min}, "
        + rnd.choice(("NAD", "A&Ox3, NAD", "well appearing", "appears comfortable"))
        + "."
    )
    plans = rnd.sample(_PLANS, k=rnd.randint(1, 3))
    lines.append("A/P: " + "\n- ".join(["", *plans]).lstrip("\n"))
    text = "\n".join(lines)
    if rnd.random() < 0.3:
        text = _typo(rnd, text)
    return text


def write_discharge_summary(rnd: random.Random, visit: VisitContext, diagnosis: str) -> str:
    """Return a short discharge summary after a hospital stay for ``diagnosis``."""
    sex = "male" if visit.is_male else "female"
    history = ", ".join(_CONDITION_ABBREVIATIONS[c] for c in visit.conditions) or "no significant PMH"
    course = rnd.choice(
        (
            "Treated per protocol, course uncomplicated.",
            "Hospital course notable for transient AKI, resolved w/ IVF.",
            "Monitored on tele, no arrhythmias.",
        )
    )
    return (
        "DISCHARGE SUMMARY\n"
        f"{visit.age_years} yo {sex} w/ {history} admitted w/ {diagnosis}. {course}\n"
        "Discharged home in stable condition. F/u w/ cardiology in 1-2 wks."
    )


def write_nursing_note(rnd: random.Random, visit: VisitContext) -> str:
    """Return a nursing or care-management note from the second documentation system."""
    findings = _findings(rnd, _SYMPTOMS + _SOCIAL, visit.note_severity, mention_absent=0.4)
    body = "; ".join(findings) if findings else "pt without complaints"
    return (
        rnd.choice(("RN phone call:", "Care mgmt note:", "Nursing assessment:"))
        + f" {body}. VS: BP {visit.systolic_mm_hg}/{visit.diastolic_mm_hg}. "
        + rnd.choice(("Education provided.", "Will relay to MD.", "Pt verbalized understanding."))
    )
