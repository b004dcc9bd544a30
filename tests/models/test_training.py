"""Tests of training: it learns a planted signal, stops early, calibrates, and refuses hopeless splits."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.errors import ModelSettingsError, TrainingDataError
from models.data import FusionDataset, collate
from models.fusion import FusionConfig, FusionForRiskPrediction
from models.metrics import auroc
from models.training import (
    TrainingArguments,
    _moving_average,
    _one_cycle,
    _trains_in_bf16,
    check_treatment_arms,
    label_censoring_weights,
    predict_logits,
    train,
)
from tests.models.synthetic import synthetic_task


def dataset(n: int, seed: int) -> FusionDataset:
    tokens, notes, studies, labels = synthetic_task(n, seed)
    return FusionDataset(tokens, notes, studies, labels, text_embedding_dim=8, imaging_embedding_dim=6)


def tiny_model() -> FusionForRiskPrediction:
    torch.manual_seed(0)
    return FusionForRiskPrediction(FusionConfig(
        event_vocab_size=12, n_value_bins=6, text_embedding_dim=8, imaging_embedding_dim=6,
        n_imaging_modalities=10, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, dropout=0.0,
    ))


def test_collate_pads_and_masks_missing_modalities() -> None:
    data = dataset(6, seed=1)
    batch = collate([data[i] for i in range(6)])
    assert batch["event_codes"].shape[0] == 6
    assert batch["note_embeddings"].shape[2] == 8
    assert batch["event_mask"].sum().item() == sum(len(data[i].event_codes) for i in range(6))
    no_image = [i for i in range(6) if len(data[i].imaging_days) == 0]
    assert no_image and not batch["imaging_mask"][no_image].any()


def test_collate_pads_to_a_multiple_without_changing_predictions() -> None:
    data = dataset(6, seed=1)
    patients = [data[i] for i in range(6)]
    plain, padded = collate(patients), collate(patients, pad_to_multiple_of=16)
    longest = max(len(p.event_codes) for p in patients)
    assert padded["event_codes"].shape[1] == -(-longest // 16) * 16 and plain["event_codes"].shape[1] == longest
    assert padded["note_embeddings"].shape[1] == 16 and padded["imaging_mask"].shape[1] == 16
    assert padded["event_mask"].sum().item() == plain["event_mask"].sum().item()
    model = tiny_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).risk_logits, model(**plain).risk_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"collate: pad_to_multiple_of must be >= 1, got 0"):
        collate(patients, pad_to_multiple_of=0)


def test_training_learns_the_planted_signal_and_is_reproducible() -> None:
    train_data, tuning_data, test_data = dataset(600, 1), dataset(200, 2), dataset(300, 3)
    args = TrainingArguments(max_epochs=8, batch_size=64, learning_rate=3e-3, patience=3, seed=0)
    result = train(tiny_model(), train_data, tuning_data, args)
    logits = predict_logits(result.model, test_data)["risk_logits"]
    labels = test_data.label_arrays()["risk_label"]
    known = ~np.isnan(labels)
    assert auroc(labels[known], logits[known]) > 0.75
    assert 0 <= result.best_epoch < 8
    assert len(result.history) >= result.best_epoch + 1
    again = train(tiny_model(), train_data, tuning_data, args)
    assert np.array_equal(logits, predict_logits(again.model, test_data)["risk_logits"])


def test_moving_average_weighs_each_step_by_the_decay_of_its_time_constant() -> None:
    model = tiny_model()
    averaged = _moving_average(model, average_epochs=2.0, steps_per_epoch=5)
    assert averaged is not None and _moving_average(model, 0.0, 5) is None
    decay = np.exp(-1 / 10)  # a time constant of 2 epochs of 5 steps
    weight = model.risk_head.weight
    values = []
    for step in range(3):
        with torch.no_grad():
            weight.fill_(float(step + 1))
        averaged.update_parameters(model)
        values.append(step + 1.0)
    # The first update copies; each later one moves the average (1 - decay) of the way to the weights.
    expected = (values[0] * decay + values[1] * (1 - decay)) * decay + values[2] * (1 - decay)
    np.testing.assert_allclose(averaged.module.risk_head.weight.detach().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(("total_steps", "peak_step"), [(30, 2), (10, 1), (3, 1)])
def test_learning_rate_warms_up_to_its_peak_then_falls(total_steps: int, peak_step: int) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = _one_cycle(optimizer, 1e-3, total_steps)
    rates = [scheduler.get_last_lr()[0]]  # the rate of each of the run's steps
    for _ in range(total_steps - 1):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] < 1e-4
    assert rates[peak_step] == pytest.approx(1e-3)
    assert max(rates) == pytest.approx(1e-3) and rates[-1] < 1e-6


def test_training_runs_however_few_steps_an_epoch_has() -> None:
    data = dataset(600, 1)
    # 600 patients in batches of 600, 300, 200 and 60: 1, 2, 3 and 10 steps (a one-step warm-up broke OneCycleLR).
    for batch_size in (600, 300, 200, 60):
        result = train(tiny_model(), data, data, TrainingArguments(max_epochs=1, batch_size=batch_size))
        assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])


def test_collating_in_loader_processes_trains_the_same_model() -> None:
    train_data, tuning_data = dataset(300, 1), dataset(100, 2)
    args = TrainingArguments(max_epochs=2, batch_size=64, seed=0)
    in_process = train(tiny_model(), train_data, tuning_data, args)
    in_workers = train(tiny_model(), train_data, tuning_data,
                       TrainingArguments(max_epochs=2, batch_size=64, seed=0, dataloader_num_workers=2))
    assert in_process.history == in_workers.history
    with pytest.raises(ValueError, match=r"dataloader_num_workers: expected >= 0, got -1"):
        train(tiny_model(), train_data, tuning_data, TrainingArguments(max_epochs=1, dataloader_num_workers=-1))


def test_training_uses_bf16_only_on_a_gpu_that_computes_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert _trains_in_bf16(TrainingArguments(), gpu)
    assert not _trains_in_bf16(TrainingArguments(bf16=False), gpu)
    assert not _trains_in_bf16(TrainingArguments(), cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a GPU older than Ampere
    assert not _trains_in_bf16(TrainingArguments(), gpu)


def test_training_refuses_a_negative_averaging_time() -> None:
    data = dataset(200, 1)
    with pytest.raises(ValueError, match=r"TrainingArguments.average_epochs: expected >= 0, got -1.0"):
        train(tiny_model(), data, data, TrainingArguments(max_epochs=1, average_epochs=-1.0))


def test_training_refuses_a_split_without_enough_events() -> None:
    data = dataset(40, 1)
    for p in data.patients:
        object.__setattr__(p, "risk_label", 0.0)
    with pytest.raises(ValueError, match=r"train split: 0 patients with the outcome among 40 with a known label"):
        train(tiny_model(), data, data, TrainingArguments(max_epochs=1))


def test_training_refuses_a_tuning_split_too_small_to_calibrate() -> None:
    # Platt scaling from one case or one control is a near-step function: every risk 0 or 1.
    train_data, tuning = dataset(200, 1), dataset(60, 2)
    for i, p in enumerate(tuning.patients):
        object.__setattr__(p, "risk_label", 1.0 if i < 4 else 0.0)
    with pytest.raises(ValueError, match=r"^tuning split: 4 patients with the outcome among 60 with a known label "
                                         r"\(need at least 5 with and 5 without\)"):
        train(tiny_model(), train_data, tuning, TrainingArguments(max_epochs=1))
    for i, p in enumerate(tuning.patients):
        object.__setattr__(p, "risk_label", 0.0 if i < 4 else 1.0)
    with pytest.raises(ValueError, match=r"^tuning split: 56 patients with the outcome among 60"):
        train(tiny_model(), train_data, tuning, TrainingArguments(max_epochs=1))


def test_dataset_can_hide_modalities_to_measure_each_alone() -> None:
    tokens, notes, studies, labels = synthetic_task(30, 5)
    mixed = tokens.with_columns(tokens["modality_ids"].list.eval(pl.element() * 0 + 2).alias("modality_ids"))
    only_notes = FusionDataset(mixed, notes, studies, labels, 8, 6, modalities=("notes",))
    batch = collate(list(only_notes))
    assert not batch["event_mask"].any() and not batch["imaging_mask"].any()
    assert batch["note_mask"].sum().item() == notes.height
    genomics = FusionDataset(mixed, notes, studies, labels, 8, 6, modalities=("genomics",))
    assert collate(list(genomics))["event_mask"].sum().item() == mixed["token_ids"].list.len().sum()
    with pytest.raises(ValueError, match=r"modalities: \['text'\] are not among"):
        FusionDataset(mixed, notes, studies, labels, 8, 6, modalities=("text",))


def test_dataset_keeps_every_note_given_unless_capped() -> None:
    tokens, notes, studies, labels = synthetic_task(5, 5)
    first = int(notes["subject_id"][0])
    # 20 notes for one patient, one per day before the prediction time: more than any fixed cap.
    many = pl.concat([notes.filter(pl.col("subject_id") != first)] + [
        notes.filter(pl.col("subject_id") == first).with_columns(pl.col("time") - timedelta(days=k))
        for k in range(20)
    ])
    every = next(p for p in FusionDataset(tokens, many, studies, labels, 8, 6).patients if p.subject_id == first)
    assert len(every.note_days) == 20
    capped = FusionDataset(tokens, many, studies, labels, 8, 6, max_notes=4)
    recent = next(p for p in capped.patients if p.subject_id == first)
    np.testing.assert_array_equal(recent.note_days, np.sort(every.note_days)[:4])  # the 4 most recent
    # Studies likewise: the task's imaging_inputs hold its inputs.max_studies most recent already.
    first_study = int(studies["subject_id"][0])
    scans = pl.concat([studies.filter(pl.col("subject_id") != first_study)] + [
        studies.filter(pl.col("subject_id") == first_study).head(1).with_columns(pl.col("time") - timedelta(days=k))
        for k in range(12)
    ])
    all_scans = FusionDataset(tokens, many, scans, labels, 8, 6).patients
    assert len(next(p for p in all_scans if p.subject_id == first_study).imaging_days) == 12


def test_dataset_refuses_notes_and_studies_dated_after_the_prediction_time() -> None:
    tokens, notes, studies, labels = synthetic_task(5, 5)
    first = int(notes["subject_id"][0])
    late = notes.with_columns(
        pl.when(pl.col("subject_id") == first).then(pl.col("time") + timedelta(days=400)).otherwise(pl.col("time"))
    )
    with pytest.raises(ValueError, match=rf"note inputs: \d+ rows dated after their patient's prediction time "
                                         rf"\(subject {first}, "):
        FusionDataset(tokens, late, studies, labels, 8, 6)


def test_predictions_do_not_depend_on_batching_or_threads() -> None:
    data = dataset(150, seed=3)
    model = tiny_model().eval()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_batch = predict_logits(model, data, batch_size=150)
        sequential = predict_logits(model, data, batch_size=16)
        torch.set_num_threads(2)
        threaded = predict_logits(model, data, batch_size=16)  # 10 batches, one core each
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    for key in ("risk_logits", "hazard_logits", "arm_logits"):
        np.testing.assert_allclose(threaded[key], one_batch[key], atol=1e-5)
        np.testing.assert_allclose(threaded[key], sequential[key], atol=1e-6)
    # The loss is a mean of batch means, so only the same batches give the same loss.
    assert float(threaded["loss"]) == pytest.approx(float(sequential["loss"]), abs=1e-6)
    assert np.isnan(predict_logits(model, data, with_loss=False)["loss"])


def test_calibrated_risk_matches_the_censoring_weighted_event_rate_not_the_complete_cases() -> None:
    # In the synthetic task, a fifth of the patients without the event leave before the horizon.
    train_data, tuning_data = dataset(600, 1), dataset(300, 2)
    args = TrainingArguments(max_epochs=3, batch_size=64, learning_rate=3e-3, patience=3, seed=0)
    result = train(tiny_model(), train_data, tuning_data, args)
    weights = label_censoring_weights(tuning_data, train_data, result.model.config.horizon_days)
    labels = tuning_data.label_arrays()["risk_label"]
    known = ~np.isnan(labels)
    risk = result.calibrator.transform(predict_logits(result.model, tuning_data)["risk_logits"])
    weighted_rate = np.average(labels[known], weights=weights[known])
    # Platt scaling with an intercept matches the weighted mean risk to the weighted event rate.
    assert np.average(risk[known], weights=weights[known]) == pytest.approx(weighted_rate, abs=1e-3)
    assert labels[known].mean() - weighted_rate > 0.02
    assert (weights[~known] == 0).all() and weights[known].mean() == pytest.approx(1.0)


def test_dataset_refuses_embeddings_of_another_width_than_the_model_reads() -> None:
    # Studies from an image encoder of 6 values, read by a model trained on 4: a new encoder, not a
    # shape error deep inside the projection.
    tokens, notes, studies, labels = synthetic_task(5, 5)
    first = int(studies.sort("subject_id")["subject_id"][0])
    with pytest.raises(ValueError, match=rf"study inputs: {studies.height} embeddings have 6 values where the model "
                                         rf"reads 4 \(subject {first}; .*train the model again"):
        FusionDataset(tokens, notes, studies, labels, 8, 4)


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_epochs": 0}, r"^training settings: max_epochs 0 \(expected at least 1\)$"),
    ({"batch_size": 0}, r"^training settings: batch_size 0 \(expected at least 1\)$"),
    ({"learning_rate": float("nan")}, r"^training settings: learning_rate nan \(expected a positive number"),
    ({"learning_rate": -1e-3}, r"^training settings: learning_rate -0.001 \(expected a positive number"),
])
def test_training_settings_that_cannot_train_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ModelSettingsError, match=message):
        TrainingArguments(**settings)  # type: ignore[arg-type]


def test_a_run_that_diverges_in_its_first_epoch_says_so() -> None:
    with pytest.raises(ModelSettingsError, match=r"^training diverged at epoch 0: tuning loss nan \(learning rate "
                                                 r"10000.0; train again with a lower one\)$"):
        train(tiny_model(), dataset(300, 1), dataset(150, 2),
              TrainingArguments(max_epochs=2, batch_size=64, learning_rate=1e4, average_epochs=0))


def _train_one_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo processes training on its half of 200 patients, in batches of 128."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        data = dataset(200, 1)
        result = train(model, data, data, TrainingArguments(max_epochs=1, batch_size=128, average_epochs=0))
        changed = any(not torch.equal(a, b) for a, b in zip(before, result.model.parameters(), strict=True))
        (Path(out_dir) / f"rank{rank}.txt").write_text(f"{result.history[0]['train_loss']} {changed}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_each_process_trains_on_its_shard_even_when_the_shard_is_smaller_than_a_batch(tmp_path: Path) -> None:
    # 100 patients per process in batches of 128: the whole split (200) is more than a batch, and
    # dropping a "last short batch" by it left each process with no batch at all.
    torch.multiprocessing.spawn(_train_one_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        loss, changed = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert float(loss) > 0 and changed == "True"


def test_a_treatment_task_whose_arms_cannot_be_evaluated_is_refused_before_training() -> None:
    tokens, notes, studies, labels = synthetic_task(120, seed=5)

    def split(changed: pl.DataFrame) -> FusionDataset:
        return FusionDataset(tokens, notes, studies, changed, text_embedding_dim=8, imaging_embedding_dim=6)

    check_treatment_arms(split(labels), split(labels), baselines=True)
    fix = "check the task's treatment codes and grace period, or use more patients"
    nobody = split(labels.with_columns(treated=pl.lit(False)))
    with pytest.raises(TrainingDataError, match=f"the train split has no treated patients .the propensity model "
                                                f"needs both arms.; {fix}$"):
        check_treatment_arms(nobody, split(labels), baselines=False)
    never_ill = split(labels.with_columns(
        boolean_value=pl.when(pl.col("treated") & pl.col("boolean_value").is_not_null()).then(pl.lit(False))
        .otherwise(pl.col("boolean_value"))))
    treated = int(labels.filter(pl.col("treated") & pl.col("boolean_value").is_not_null()).height)
    with pytest.raises(TrainingDataError, match=rf"the train split's treated arm has 0 patients with the outcome "
                                                rf"among {treated} with a known label .the T-learner baseline needs "
                                                rf"both outcomes in each arm.; {fix}, or train without baselines$"):
        check_treatment_arms(never_ill, split(labels), baselines=True)
    check_treatment_arms(never_ill, split(labels), baselines=False)
    with pytest.raises(TrainingDataError, match="the tuning split has no treated patients with a known label"):
        check_treatment_arms(split(labels), nobody, baselines=True)


def test_inputs_beyond_what_the_config_embeds_are_refused_before_training() -> None:
    data = dataset(40, seed=2)
    model = FusionForRiskPrediction(FusionConfig(
        event_vocab_size=12, n_value_bins=3, text_embedding_dim=8, imaging_embedding_dim=6,
        n_imaging_modalities=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    largest_bin = max(int(p.event_value_bins.max()) for p in data.patients if p.event_value_bins.size)
    assert largest_bin >= 3
    with pytest.raises(ModelSettingsError, match=rf"train split: value bin {largest_bin} is beyond the model's 3 "
                                                 r"\(FusionConfig.n_value_bins\); build the config from the same"):
        train(model, data, dataset(40, seed=3), TrainingArguments(max_epochs=1, device="cpu", min_events=1))


def test_training_without_calibration_needs_no_calibratable_tuning_split() -> None:
    # A survival use that reads the raw curves: a tuning split with 2 cases trains, and the heads
    # keep their own probabilities.
    tokens, notes, studies, labels = synthetic_task(60, 4)
    cases = labels.with_row_index().filter(pl.col("boolean_value").fill_null(False))["index"].to_list()
    assert len(cases) > 2
    labels = labels.with_row_index().with_columns(
        boolean_value=pl.when(pl.col("index").is_in(cases[2:])).then(None).otherwise(pl.col("boolean_value")),
    ).drop("index")
    few = FusionDataset(tokens, notes, studies, labels, text_embedding_dim=8, imaging_embedding_dim=6)
    args = TrainingArguments(max_epochs=1, batch_size=16, device="cpu", min_events=1)
    with pytest.raises(TrainingDataError, match="tuning split: 2 patients with the outcome"):
        train(tiny_model(), dataset(120, seed=3), few, args)
    result = train(tiny_model(), dataset(120, seed=3), few, replace(args, calibrate=False))
    assert (result.calibrator.slope_, result.calibrator.intercept_, result.calibrator.survival_power_) == (1.0, 0.0,
                                                                                                         1.0)
