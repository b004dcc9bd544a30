"""Hidden per-patient state of the simulated hospital, and the ground truth it implies.

Stage: source data. In: a :class:`~features.simulate.hospital.SimulationConfig`. Out: a
:class:`HiddenState` of numpy arrays (one entry per patient) and the ``truth`` table
(:data:`features.schemas.TRUTH`).

The outcome is a major adverse cardiovascular event (MACE) after the index visit. Its hazard is a
Weibull proportional-hazards model whose log hazard ratio is

``0.035 (age - 66) + 0.25 male + 0.65 ehr + 0.55 note + 0.45 genomic + 0.35 lpa + 0.55 imaging
+ 0.35 imaging * note + treated * (-0.8 + 0.45 cyp2c19_lof)``

where ``ehr``, ``note``, ``genomic`` and ``imaging`` are independent standard-normal severities,
each written into exactly one modality (labs, vitals and diagnoses; note prose; an expression panel;
image embeddings). ``lpa`` counts LPA risk alleles and ``cyp2c19_lof`` counts CYP2C19 loss-of-function
alleles (both in the variant calls). Two parts of the signal live only across modalities: the
``imaging * note`` term, and clopidogrel's benefit, which CYP2C19 poor metabolisers do not get
(they cannot activate the pro-drug), so the treatment effect needs the medication record and the
genotype together. Treatment is confounded by observed EHR severity, as in real practice, but every
patient has a chance of either arm (propensity clipped to [0.05, 0.95]).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from features.identifiers import subject_ids
from features.schemas import TRUTH

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

WEIBULL_SHAPE = 1.2
"""Hazard rises slowly with time since the index visit (shape > 1)."""
WEIBULL_SCALE_DAYS = 2800.0
"""Baseline scale: about one in six patients has an event within a year without treatment."""
LOSS_TO_FOLLOW_UP_MEAN_DAYS = 2200.0
"""Mean time until a patient leaves the health system (moves away, changes insurer)."""
EVENT_TYPES = ("myocardial_infarction", "stroke", "cardiovascular_death")
EVENT_TYPE_SHARES = (0.45, 0.30, 0.25)
CYP2C19_LOF_ALLELE_FREQUENCY = 0.15
LPA_RISK_ALLELE_FREQUENCY = 0.08


@dataclass(frozen=True)
class HiddenState:
    """What the simulator knows about every patient; arrays of length ``n_patients``."""

    patient_id: list[str]
    is_male: BoolArray
    age_years: FloatArray
    # End of the index visit: the moment a prediction is made.
    prediction_time: list[datetime]
    history_days: FloatArray
    ehr_severity: FloatArray
    note_severity: FloatArray
    genomic_risk: FloatArray
    imaging_severity: FloatArray
    cyp2c19_lof_alleles: IntArray
    lpa_risk_alleles: IntArray
    has_notes: BoolArray
    has_notes_table: BoolArray
    has_genomics: BoolArray
    has_imaging: BoolArray
    as_bundle: BoolArray
    propensity: FloatArray
    treated: BoolArray
    log_hazard_untreated: FloatArray
    log_hazard_treated: FloatArray
    event_time_days: FloatArray
    censoring_time_days: FloatArray
    # Index into EVENT_TYPES; meaningful only where the event is observed.
    event_type: IntArray

    @property
    def observed_time_days(self) -> FloatArray:
        return np.minimum(self.event_time_days, self.censoring_time_days)

    @property
    def event_observed(self) -> BoolArray:
        return self.event_time_days <= self.censoring_time_days

    @property
    def log_hazard(self) -> FloatArray:
        return np.where(self.treated, self.log_hazard_treated, self.log_hazard_untreated)


def _sigmoid(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-x))


def true_survival(log_hazard_ratio: npt.ArrayLike, times_days: npt.ArrayLike) -> FloatArray:
    """Return the true probability of being event-free at each time.

    Parameters
    ----------
    log_hazard_ratio : array of shape (n_patients,)
        The ``log_hazard_ratio`` column of ``truth.parquet``.
    times_days : array of shape (n_times,)
        Days since the prediction time.

    Returns
    -------
    array of shape (n_patients, n_times), falling with time, in [0, 1].
    """
    lhr = np.asarray(log_hazard_ratio, dtype=np.float64)[:, None]
    t = np.asarray(times_days, dtype=np.float64)[None, :]
    return np.asarray(np.exp(-((t / WEIBULL_SCALE_DAYS) ** WEIBULL_SHAPE) * np.exp(lhr)))


def hidden_log_hazard(age_years: npt.ArrayLike, is_male: npt.ArrayLike, ehr: npt.ArrayLike, note: npt.ArrayLike,
                      genomic: npt.ArrayLike, lpa: npt.ArrayLike, imaging: npt.ArrayLike, cyp2c19: npt.ArrayLike,
                      treated: npt.ArrayLike) -> FloatArray:
    """The log hazard ratio of the module docstring, elementwise (numpy broadcasting)."""
    a, n, i = np.asarray(age_years, np.float64), np.asarray(note, np.float64), np.asarray(imaging, np.float64)
    untreated = (0.035 * (a - 66.0) + 0.25 * np.asarray(is_male, np.float64) + 0.65 * np.asarray(ehr, np.float64)
                 + 0.55 * n + 0.45 * np.asarray(genomic, np.float64) + 0.35 * np.asarray(lpa, np.float64)
                 + 0.55 * i + 0.35 * i * n)
    return np.asarray(untreated + np.asarray(treated, np.float64) * (-0.8 + 0.45 * np.asarray(cyp2c19, np.float64)))


SEVERITY_TERMS = ("ehr_severity", "note_severity", "genomic_risk", "imaging_severity")
"""The standard-normal hidden terms of the log hazard, each written into one modality."""
CARRIED_BY: dict[str, str | None] = {"ehr_severity": None, "note_severity": "has_notes",
                                     "genomic_risk": "has_expression", "imaging_severity": "has_imaging"}
"""The truth column saying whether a patient's data carry each term (None: every patient's do). The
genomic risk is in the expression panel, which only part of the genotyped patients have; their
variant calls carry the allele counts (``has_genomics``)."""
TRUTH_COLUMNS = ("age_years", "sex", *SEVERITY_TERMS, "lpa_risk_alleles", "cyp2c19_lof_alleles", "has_notes",
                  "has_genomics", "has_expression", "has_imaging", "propensity")
"""The truth columns the references read (:func:`risk_given_observed_modalities`)."""


def risk_given_observed_modalities(truth: pa.Table, horizon_days: float, n_draws: int = 512,
                                   seed: int = 0) -> FloatArray:
    """Each patient's true risk at the horizon knowing only the hidden terms their data carry.

    ``true_risk`` uses every hidden term, including those of modalities a patient lacks (the
    expression panel and variant calls of a patient without genomics, the image severity of a
    patient never imaged). No model can know those; the best it can do is average over them. This
    risk does so, by Monte Carlo over the missing terms (standard-normal severities, binomial allele
    counts), with the treatment arms averaged by the propensity, as the risk at prediction time is
    (``true_risk`` is under the arm the patient then got, decided after it). It is still an upper
    bound: the present modalities carry their terms with noise.
    """
    columns = _truth_columns(truth)
    exact = {name: (columns[name], np.zeros(truth.num_rows)) for name in SEVERITY_TERMS}
    return _risk_over_draws(columns, exact, horizon_days, n_draws, seed)


def risk_given_estimated_severities(truth: pa.Table, estimates: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
                                    horizon_days: float, n_draws: int = 512, seed: int = 0) -> FloatArray:
    """Each patient's true risk at the horizon when each hidden term their data carry is known only
    as an estimate, ``estimates[term] = (mean, standard deviation)`` per patient for every term of
    :data:`SEVERITY_TERMS`.

    Monte Carlo as in :func:`risk_given_observed_modalities` (which is the case of exact
    estimates): a carried term is drawn from a normal around its estimate, a missing one from its
    standard-normal distribution, allele counts of a genotyped patient are exact (the variant calls
    hold them). With estimates read from the data, it is the risk the true hazard formula gives when
    it is fed what the data tell of each term: a reference for what the data support.
    """
    missing = [name for name in SEVERITY_TERMS if name not in estimates]
    if missing:
        raise ValueError(f"risk_given_estimated_severities: no estimate of {missing} "
                         f"(expected (mean, standard deviation) for each of {list(SEVERITY_TERMS)})")
    return _risk_over_draws(_truth_columns(truth), estimates, horizon_days, n_draws, seed)


def _truth_columns(truth: pa.Table) -> dict[str, npt.NDArray[Any]]:
    missing = [name for name in TRUTH_COLUMNS if name not in truth.column_names]
    if missing:
        raise ValueError(f"truth table lacks column(s) {', '.join(missing)} (written by an older simulator: "
                         "simulate the hospital again)")
    return {name: truth.column(name).to_numpy(zero_copy_only=False) for name in TRUTH_COLUMNS}


def _risk_over_draws(columns: dict[str, npt.NDArray[Any]],
                     severities: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], horizon_days: float,
                     n_draws: int, seed: int) -> FloatArray:
    rng = np.random.default_rng(seed)
    n = len(columns["age_years"])
    shape = (n, n_draws)
    genotyped = columns["has_genomics"].astype(bool)

    def term(name: str) -> FloatArray:
        mean, sd = (np.asarray(a, np.float64) for a in severities[name])
        carrier = CARRIED_BY[name]
        carried = columns[carrier].astype(bool) if carrier is not None else np.ones(n, dtype=bool)
        if carrier is None and not sd.any():
            return mean[:, None]  # exact for everyone: nothing to draw
        # One standard-normal draw serves as the prior of a missing term and as the noise of an estimate.
        z = rng.standard_normal(shape)
        return np.where(carried[:, None], mean[:, None] + sd[:, None] * z, z)

    def alleles(name: str, frequency: float) -> FloatArray:
        return np.where(genotyped[:, None], np.asarray(columns[name], np.float64)[:, None],
                        rng.binomial(2, frequency, shape).astype(np.float64))

    # Draw order fixed (notes, genomics, alleles, imaging, EHR), so results do not depend on the code path.
    note, genomic = term("note_severity"), term("genomic_risk")
    lpa = alleles("lpa_risk_alleles", LPA_RISK_ALLELE_FREQUENCY)
    cyp2c19 = alleles("cyp2c19_lof_alleles", CYP2C19_LOF_ALLELE_FREQUENCY)
    imaging, ehr = term("imaging_severity"), term("ehr_severity")
    common = (columns["age_years"][:, None], (columns["sex"] == "male")[:, None], ehr, note, genomic, lpa, imaging,
              cyp2c19)
    horizon = np.array([float(horizon_days)])
    risk = {}
    for treated in (False, True):
        lhr = hidden_log_hazard(*common, treated)  # (n, n_draws): the note term is always drawn
        risk[treated] = 1.0 - true_survival(lhr.ravel(), horizon)[:, 0].reshape(shape).mean(axis=1)
    propensity = columns["propensity"].astype(np.float64)
    return np.asarray(propensity * risk[True] + (1.0 - propensity) * risk[False])


def draw_hidden_state(
    n_patients: int,
    seed: int,
    index_start: datetime,
    index_end: datetime,
    export_time: datetime,
    genomics_share: float,
    imaging_share: float,
    notes_share: float,
    notes_table_share: float,
    bundle_share: float,
) -> HiddenState:
    """Draw every patient's hidden state, treatment and outcome times from one seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    n = n_patients
    patient_id = [str(uuid.UUID(bytes=raw, version=4)) for raw in _random_chunks(rng, n, 16)]
    is_male = rng.random(n) < 0.5
    age_years = np.clip(rng.normal(66.0, 11.0, n), 40.0, 95.0)
    span_seconds = (index_end - index_start).total_seconds()
    # Index visits happen during clinic hours, 08:00 to 17:00 site time (UTC-5 in winter).
    day_offsets = np.floor(rng.random(n) * span_seconds / 86400.0)
    minute_of_day = 13 * 60 + np.floor(rng.random(n) * 9 * 60)
    prediction_time = [
        index_start + timedelta(days=float(d), minutes=float(m) + 45.0)
        for d, m in zip(day_offsets, minute_of_day, strict=True)
    ]
    history_days = rng.uniform(365.0, 8 * 365.0, n)

    ehr = rng.standard_normal(n)
    note = rng.standard_normal(n)
    genomic = rng.standard_normal(n)
    imaging = rng.standard_normal(n)
    cyp2c19 = rng.binomial(2, CYP2C19_LOF_ALLELE_FREQUENCY, n).astype(np.int64)
    lpa = rng.binomial(2, LPA_RISK_ALLELE_FREQUENCY, n).astype(np.int64)

    # Sicker patients are imaged more often; genomics comes from a research biobank consent,
    # unrelated to health.
    has_genomics = rng.random(n) < genomics_share
    logit_imaging = np.log(imaging_share / (1 - imaging_share)) + 0.4 * ehr
    has_imaging = rng.random(n) < _sigmoid(logit_imaging)
    has_notes = rng.random(n) < notes_share
    has_notes_table = has_notes & (rng.random(n) < notes_table_share)
    as_bundle = rng.random(n) < bundle_share

    age_centred = (age_years - 66.0) / 11.0
    propensity = np.clip(_sigmoid(-0.4 + 0.8 * ehr + 0.3 * age_centred), 0.05, 0.95)
    treated = rng.random(n) < propensity

    log_hazard_untreated = hidden_log_hazard(age_years, is_male, ehr, note, genomic, lpa, imaging, cyp2c19, False)
    log_hazard_treated = hidden_log_hazard(age_years, is_male, ehr, note, genomic, lpa, imaging, cyp2c19, True)

    log_hazard = np.where(treated, log_hazard_treated, log_hazard_untreated)
    unit_exponential = rng.exponential(1.0, n)
    event_time = WEIBULL_SCALE_DAYS * (unit_exponential / np.exp(log_hazard)) ** (1 / WEIBULL_SHAPE)
    loss_to_follow_up = rng.exponential(LOSS_TO_FOLLOW_UP_MEAN_DAYS, n)
    end_of_data = np.array(
        [(export_time - t).total_seconds() / 86400.0 for t in prediction_time], dtype=np.float64
    )
    censoring_time = np.minimum(loss_to_follow_up, end_of_data)
    event_type = rng.choice(len(EVENT_TYPES), size=n, p=EVENT_TYPE_SHARES).astype(np.int64)

    return HiddenState(
        patient_id=patient_id,
        is_male=is_male,
        age_years=age_years,
        prediction_time=prediction_time,
        history_days=history_days,
        ehr_severity=ehr,
        note_severity=note,
        genomic_risk=genomic,
        imaging_severity=imaging,
        cyp2c19_lof_alleles=cyp2c19,
        lpa_risk_alleles=lpa,
        has_notes=has_notes,
        has_notes_table=has_notes_table,
        has_genomics=has_genomics,
        has_imaging=has_imaging,
        as_bundle=as_bundle,
        propensity=propensity,
        treated=treated,
        log_hazard_untreated=log_hazard_untreated,
        log_hazard_treated=log_hazard_treated,
        event_time_days=event_time,
        censoring_time_days=censoring_time,
        event_type=event_type,
    )


def _random_chunks(rng: np.random.Generator, n: int, size: int) -> list[bytes]:
    raw = rng.bytes(size * n)
    return [raw[size * i : size * (i + 1)] for i in range(n)]


def truth_table(state: HiddenState, horizon_days: int, has_expression: npt.ArrayLike) -> pa.Table:
    """Return ``truth.parquet``'s table: the truth the model is measured against; ``has_expression``:
    whether each patient's landing zone holds their expression panel (the carrier of the genomic risk)."""
    horizon = np.array([float(horizon_days)])
    risk_untreated = 1.0 - true_survival(state.log_hazard_untreated, horizon)[:, 0]
    risk_treated = 1.0 - true_survival(state.log_hazard_treated, horizon)[:, 0]
    observed = state.event_observed
    observed_time = state.observed_time_days
    within = observed & (observed_time <= horizon_days)
    # Censored before the horizon without the event: the binary outcome is unknown.
    unknown = ~observed & (observed_time < horizon_days)
    event_type = [EVENT_TYPES[k] if o else None for k, o in zip(state.event_type, observed, strict=True)]
    columns = {
        "patient_id": state.patient_id,
        "subject_id": subject_ids(state.patient_id),
        "sex": np.where(state.is_male, "male", "female"),
        "age_years": state.age_years,
        "prediction_time": state.prediction_time,
        "horizon_days": np.full(len(state.patient_id), horizon_days, dtype=np.int32),
        "ehr_severity": state.ehr_severity,
        "note_severity": state.note_severity,
        "genomic_risk": state.genomic_risk,
        "imaging_severity": state.imaging_severity,
        "cyp2c19_lof_alleles": state.cyp2c19_lof_alleles.astype(np.int8),
        "lpa_risk_alleles": state.lpa_risk_alleles.astype(np.int8),
        "has_notes": state.has_notes,
        "has_genomics": state.has_genomics,
        "has_expression": np.asarray(has_expression, dtype=bool),
        "has_imaging": state.has_imaging,
        "treated": state.treated,
        "propensity": state.propensity,
        "log_hazard_ratio": state.log_hazard,
        "true_risk": np.where(state.treated, risk_treated, risk_untreated),
        "true_risk_untreated": risk_untreated,
        "true_risk_treated": risk_treated,
        "true_treatment_effect": risk_treated - risk_untreated,
        "event_time_days": state.event_time_days,
        "censoring_time_days": state.censoring_time_days,
        "observed_time_days": observed_time,
        "event_observed": observed,
        "event_type": event_type,
        "event_within_horizon": pa.array(
            [None if u else bool(w) for u, w in zip(unknown, within, strict=True)], type=pa.bool_()
        ),
    }
    metadata = {
        b"weibull_shape": str(WEIBULL_SHAPE).encode(),
        b"weibull_scale_days": str(WEIBULL_SCALE_DAYS).encode(),
        b"survival": b"S(t) = exp(-(t / weibull_scale_days) ** weibull_shape * exp(log_hazard_ratio))",
    }
    return pa.table(columns, schema=TRUTH.with_metadata(metadata))
