"""Tests that occlusion explanations are complete and faithful to the model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl

from models.data import FusionDataset
from models.explain import Item, calibrated_risks, detail_items, explain, modality_items, remove
from models.task_model import load_task_model
from tests.models.conftest import TrainedTask


def held_out_patients(trained_task: TrainedTask) -> list:
    folder = trained_task.task_dir
    dataset = FusionDataset(pl.read_parquet(folder / "event_tokens.parquet"),
                            pl.read_parquet(folder / "note_embeddings.parquet"),
                            pl.read_parquet(folder / "imaging_inputs.parquet"), None, 8, 6)
    return dataset.patients[:120]


def test_shares_are_signed_and_their_sizes_sum_to_one_over_present_modalities(trained_task: TrainedTask) -> None:
    model, calibrator, _ = load_task_model(trained_task.model_dir)
    patients = held_out_patients(trained_task)
    vocabulary = [f"CODE//{i}" for i in range(12)]
    explanations = explain(model, calibrator, patients[:20], vocabulary, top_k=3)
    for patient, e in zip(patients[:20], explanations, strict=True):
        assert abs(sum(abs(s) for s in e.modality_shares.values()) - 1.0) < 1e-9
        # Signed: a modality whose removal raises the risk has a negative share.
        without = {m: calibrated_risks(model, calibrator, [remove(patient, item)])[0]
                   for item in modality_items(patient) for m in [item.modality]}
        for modality, share in e.modality_shares.items():
            assert np.sign(share) == np.sign(round(e.risk - without[modality], 12))
        assert ("imaging" in e.modality_shares) == (len(patient.imaging_days) > 0)
        n_items = len(set(patient.event_codes.tolist())) + len(patient.note_ids) + len(patient.study_ids)
        assert len(e.top_items) == min(3, n_items)
        contributions = [abs(item.contribution) for item in e.top_items]
        assert contributions == sorted(contributions, reverse=True)
        assert abs(e.risk - calibrated_risks(model, calibrator, [patient])[0]) < 1e-6
    assert any(share < 0 for e in explanations for share in e.modality_shares.values())


def test_removing_the_top_items_lowers_risk_more_than_removing_random_items(trained_task: TrainedTask) -> None:
    model, calibrator, _ = load_task_model(trained_task.model_dir)
    patients = held_out_patients(trained_task)
    vocabulary = [f"CODE//{i}" for i in range(12)]
    explanations = explain(model, calibrator, patients, vocabulary, top_k=2, max_codes=24)
    rng = np.random.default_rng(0)
    top_drops, random_drops = [], []
    for patient, e in zip(patients, explanations, strict=True):
        raising = [item.item for item in e.top_items if item.contribution > 0]
        codes = sorted({int(c) for c in patient.event_codes})
        if not raising or len(codes) < 4:
            continue
        by_name = {f"CODE//{c}": c for c in codes}
        top_codes = [by_name[n] for n in raising if n in by_name]
        if not top_codes:
            continue
        chosen = rng.choice(codes, size=len(top_codes), replace=False)
        for group, sink in ((top_codes, top_drops), (list(chosen), random_drops)):
            positions = tuple(np.flatnonzero(np.isin(patient.event_codes, group)).tolist())
            without = remove(patient, Item("ehr", "group", event_positions=positions))
            sink.append(e.risk - calibrated_risks(model, calibrator, [without])[0])
    assert len(top_drops) > 30
    assert np.mean(top_drops) > np.mean(random_drops) + 0.01


def test_remove_drops_the_values_of_removed_event_tokens(trained_task: TrainedTask) -> None:
    patient = held_out_patients(trained_task)[0]
    n = len(patient.event_codes)
    values = np.arange(n, dtype=np.float32)
    with_values = replace(patient, event_values=values)
    without = remove(with_values, Item("ehr", "first two", event_positions=(0, 1)))
    np.testing.assert_array_equal(without.event_values, values[2:])
    np.testing.assert_array_equal(without.event_codes, patient.event_codes[2:])
    assert remove(patient, Item("ehr", "first", event_positions=(0,))).event_values is None


def test_a_gene_panel_does_not_crowd_dated_codes_out_of_the_items_tried(trained_task: TrainedTask) -> None:
    patient = held_out_patients(trained_task)[0]
    # Five dated EHR codes (one of the index visit, at the prediction time: day 0, but dated), then
    # a 30-gene panel: static facts, with no time (sitting at day 0 too).
    n_genes = 30
    with_panel = replace(
        patient,
        event_codes=np.concatenate([np.arange(100, 105), np.arange(200, 200 + n_genes)]).astype(np.int64),
        event_value_bins=np.zeros(5 + n_genes, dtype=np.int64),
        event_days=np.concatenate([[400.0, 30.0, 7.0, 90.0, 0.0], np.zeros(n_genes)]).astype(np.float32),
        event_modalities=np.array([0] * 5 + [2] * n_genes, dtype=np.int64),
        event_values=None,
        event_static=np.array([False] * 5 + [True] * n_genes),
    )
    vocabulary = [f"CODE//{i}" for i in range(300)]
    codes = [item.name for item in detail_items(with_panel, vocabulary, max_codes=24) if item.event_positions]
    assert len(codes) == 24
    # Every dated code, most recent first, taken in turn with the genes.
    assert codes[:10:2] == ["CODE//104", "CODE//102", "CODE//101", "CODE//103", "CODE//100"]
    assert codes[1:10:2] == [f"CODE//{200 + i}" for i in range(5)]
    assert codes[10:] == [f"CODE//{205 + i}" for i in range(14)]
    # The dataset marks static facts by their missing time.
    assert held_out_patients(trained_task)[0].event_static is not None


def test_items_carry_the_value_bin_of_their_codes_most_recent_value(trained_task: TrainedTask) -> None:
    # A genotype of 0 copies explains the risk as a wild type: the item says so, where its code
    # alone (GENE//APOE//rs429358) would be read as a carrier. A lab's item gives its latest result.
    patient = replace(
        held_out_patients(trained_task)[0],
        event_codes=np.array([5, 5, 5, 7, 9], dtype=np.int64),
        event_value_bins=np.array([2, 0, 4, 1, 0], dtype=np.int64),
        event_days=np.array([40.0, 3.0, 12.0, 0.0, 20.0], dtype=np.float32),
        event_modalities=np.array([0, 0, 0, 2, 0], dtype=np.int64),
        event_values=None,
        event_static=np.array([False, False, False, True, False]),
    )
    vocabulary = [f"CODE//{i}" for i in range(12)]
    items = {item.name: (item.value_bin, item.readings) for item in detail_items(patient, vocabulary)
             if item.event_positions}
    # CODE//5: the event 3 days before has no value, so the latest value is the one 12 days before.
    assert items == {"CODE//5": (4, 2), "CODE//7": (1, 1), "CODE//9": (0, 0)}
