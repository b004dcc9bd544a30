"""Explanations of each patient's risk, by occlusion: what the risk is without a part of the input.

Stage: scoring. In: a trained model, its calibrator, a patient's :class:`~models.data.PatientInputs`
and the token vocabulary. Out: per patient, the share of the risk each modality carries and the items
(an EHR code with all its events, a note, an imaging study) whose removal changes the risk most.

Occlusion asks the model itself, so it is faithful by construction: an item's contribution is exactly
how much the model's calibrated risk falls when the item is removed, as it would for a patient who
never had it. Removing an item is the same as the patient lacking it (its tokens are left out, not
zeroed), which the model learned to handle through modality dropout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from models.calibration import PlattCalibrator
from models.data import PatientInputs
from models.fusion import MODALITIES, FusionForRiskPrediction
from models.training import predict_logits


@dataclass(frozen=True)
class Item:
    modality: str
    name: str
    # Positions to remove: event tokens, notes or studies of the patient.
    event_positions: tuple[int, ...] = ()
    note_positions: tuple[int, ...] = ()
    study_positions: tuple[int, ...] = ()
    # The value bin (1-based; 0: none) of the code's most recent event with a value, and how many
    # of its events have one: what the model read of a lab result or an allele count. A genotype of
    # 0 copies explains the risk as a wild type, which its code alone (GENE//APOE//rs429358) would
    # have a care team read as a carrier.
    value_bin: int = 0
    readings: int = 0


@dataclass(frozen=True)
class ItemContribution:
    modality: str
    item: str
    # Change in risk when the item is removed (positive: the item raised the risk).
    contribution: float
    value_bin: int = 0
    readings: int = 0


@dataclass(frozen=True)
class Explanation:
    risk: float
    # Risk lost when the modality is removed, divided by the sum of those losses' sizes over the
    # present modalities: negative for a modality that lowers the risk (without it the risk would
    # be higher), so a care team never reads a protective finding as a reason for the risk. The
    # sizes sum to 1; all are 0 when no modality moves the risk.
    modality_shares: dict[str, float]
    # Sorted by |contribution|, largest first.
    top_items: list[ItemContribution]


def remove(patient: PatientInputs, item: Item) -> PatientInputs:
    """The patient without the item's tokens, notes and studies."""
    keep_events = np.setdiff1d(np.arange(len(patient.event_codes)), item.event_positions)
    keep_notes = np.setdiff1d(np.arange(len(patient.note_days)), item.note_positions)
    keep_studies = np.setdiff1d(np.arange(len(patient.imaging_days)), item.study_positions)
    return replace(
        patient,
        event_codes=patient.event_codes[keep_events],
        event_value_bins=patient.event_value_bins[keep_events],
        event_days=patient.event_days[keep_events],
        event_modalities=patient.event_modalities[keep_events],
        event_values=None if patient.event_values is None else patient.event_values[keep_events],
        event_static=None if patient.event_static is None else patient.event_static[keep_events],
        note_embeddings=patient.note_embeddings[keep_notes],
        note_days=patient.note_days[keep_notes],
        note_ids=tuple(patient.note_ids[k] for k in keep_notes),
        imaging_embeddings=patient.imaging_embeddings[keep_studies],
        imaging_modalities=patient.imaging_modalities[keep_studies],
        imaging_days=patient.imaging_days[keep_studies],
        study_ids=tuple(patient.study_ids[k] for k in keep_studies),
    )


def modality_items(patient: PatientInputs) -> list[Item]:
    """One item per modality the patient has."""
    items = []
    for m, modality in enumerate(MODALITIES):
        events = tuple(np.flatnonzero(patient.event_modalities == m).tolist())
        notes = tuple(range(len(patient.note_days))) if modality == "notes" else ()
        studies = tuple(range(len(patient.imaging_days))) if modality == "imaging" else ()
        if events or notes or studies:
            items.append(Item(modality, modality, events, notes, studies))
    return items


def detail_items(patient: PatientInputs, vocabulary: list[str], max_codes: int = 24) -> list[Item]:
    """Items inside modalities: each code (all its events), each note, each study.

    Only ``max_codes`` codes are tried, which bounds the cost per patient: dated codes by their most
    recent occurrence and static facts (genotypes, expression values, sex: no time, so at the
    prediction time) taken in turn, so that neither kind can fill the budget alone; a gene panel
    would otherwise crowd out every laboratory result and diagnosis.
    """
    items = []
    codes = patient.event_codes
    order = np.argsort(patient.event_days, kind="stable")  # most recent first
    first_seen = dict.fromkeys(int(codes[position]) for position in order)
    # Static facts have no time (an event at the prediction time, the index visit's, does).
    is_static = patient.event_static if patient.event_static is not None else patient.event_days <= 0
    dated = [code for code in first_seen if not is_static[codes == code].all()]
    static = [code for code in first_seen if is_static[codes == code].all()]
    seen: list[int] = []
    for pair in itertools.zip_longest(dated, static):
        seen += [code for code in pair if code is not None]
    seen = seen[:max_codes]
    for code in seen:
        at = np.flatnonzero(codes == code)
        modality = MODALITIES[int(patient.event_modalities[at[0]])]
        name = vocabulary[code] if code < len(vocabulary) else f"token {code}"
        valued = at[patient.event_value_bins[at] > 0]
        # Days before the prediction time: the smallest is the most recent.
        latest = int(patient.event_value_bins[valued[np.argmin(patient.event_days[valued])]]) if len(valued) else 0
        items.append(Item(modality, name, event_positions=tuple(at.tolist()), value_bin=latest, readings=len(valued)))
    items += [Item("notes", f"note {nid}", note_positions=(k,)) for k, nid in enumerate(patient.note_ids)]
    items += [Item("imaging", f"study {sid}", study_positions=(k,)) for k, sid in enumerate(patient.study_ids)]
    return items


def calibrated_risks(model: FusionForRiskPrediction, calibrator: PlattCalibrator,
                     patients: list[PatientInputs], batch_size: int = 64,
                     bf16: bool = False) -> npt.NDArray[np.float64]:
    """Calibrated risk of each (possibly occluded) patient."""
    if not patients:
        return np.zeros(0)
    logits = predict_logits(model, patients, batch_size=batch_size, bf16=bf16, with_loss=False)["risk_logits"]
    return calibrator.transform(logits)


def explain(model: FusionForRiskPrediction, calibrator: PlattCalibrator, patients: list[PatientInputs],
            vocabulary: list[str], top_k: int = 5, max_codes: int = 24,
            patients_per_chunk: int = 256, bf16: bool = False) -> list[Explanation]:
    """Explain every patient's calibrated risk by occluding modalities and items.

    Patients are explained ``patients_per_chunk`` at a time: each brings about 35 occluded copies of
    its inputs, so building them all at once would hold gigabytes for a large cohort. ``bf16``
    should match the scoring's precision, so the explained risk is the published one.
    """
    explanations: list[Explanation] = []
    for start in range(0, len(patients), patients_per_chunk):
        explanations += _explain_chunk(model, calibrator, patients[start : start + patients_per_chunk],
                                       vocabulary, top_k, max_codes, bf16)
    return explanations


def _explain_chunk(model: FusionForRiskPrediction, calibrator: PlattCalibrator, patients: list[PatientInputs],
                   vocabulary: list[str], top_k: int, max_codes: int, bf16: bool) -> list[Explanation]:
    variants: list[PatientInputs] = []
    plans: list[tuple[list[Item], list[Item]]] = []
    for patient in patients:
        by_modality, details = modality_items(patient), detail_items(patient, vocabulary, max_codes)
        plans.append((by_modality, details))
        variants.append(patient)
        variants += [remove(patient, item) for item in by_modality + details]
    risks = calibrated_risks(model, calibrator, variants, bf16=bf16)
    explanations, cursor = [], 0
    for by_modality, details in plans:
        full = float(risks[cursor])
        drops = full - risks[cursor + 1 : cursor + 1 + len(by_modality)]
        detail_drops = full - risks[cursor + 1 + len(by_modality) : cursor + 1 + len(by_modality) + len(details)]
        cursor += 1 + len(by_modality) + len(details)
        total = float(np.abs(drops).sum())
        shares = {item.modality: (float(d) / total if total > 0 else 0.0)
                  for item, d in zip(by_modality, drops, strict=True)}
        ranked = sorted(zip(details, detail_drops, strict=True), key=lambda pair: -abs(float(pair[1])))
        explanations.append(Explanation(
            risk=full, modality_shares=shares,
            top_items=[ItemContribution(item.modality, item.name, float(d), item.value_bin, item.readings)
                       for item, d in ranked[:top_k]],
        ))
    return explanations
