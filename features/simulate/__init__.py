"""The simulated hospital: a landing zone in cohortcast's contracts, with its ground truth.

Stage: source data. In: a patient count, a seed and an output folder. Out: ``fhir/`` (Bulk-FHIR R4
NDJSON per resource type, plus a share of patients as transaction Bundles), ``notes/`` (a notes
table from a second documentation system), ``genomics/`` (variant calls in long form and an
expression panel as a wide matrix), ``imaging/`` (per-study embedding vectors) and
``truth.parquet`` (each patient's true risk, survival, treatment effect and realised outcome).

The clinical story is a cardiology cohort: adults seen at an index cardiology visit, where a
clinician may start clopidogrel. The outcome is a major adverse cardiovascular event (myocardial
infarction, ischaemic stroke or cardiovascular death). A hidden per-patient state drives it, and each
part of that state is visible through one modality only, so that no single modality can reach the
best possible discrimination (see :mod:`features.simulate.state`).
"""

from __future__ import annotations

from features.simulate.hospital import (
    SimulationConfig,
    SimulationSummary,
    check_replaceable_simulation,
    simulate_hospital,
)
from features.simulate.state import true_survival

__all__ = ["SimulationConfig", "SimulationSummary", "check_replaceable_simulation", "simulate_hospital",
           "true_survival"]
