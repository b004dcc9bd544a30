"""Training and prediction on a CUDA device, under bf16 autocast; skipped where there is no GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics import auroc
from models.training import TrainingArguments, predict_logits, train
from tests.models.test_training import dataset, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_training_under_bf16_learns_the_planted_signal_and_is_reproducible() -> None:
    train_data, tuning_data, test_data = dataset(600, 1), dataset(200, 2), dataset(300, 3)
    args = TrainingArguments(max_epochs=8, batch_size=64, learning_rate=3e-3, patience=3, seed=0, device="cuda")
    result = train(tiny_model(), train_data, tuning_data, args)
    assert next(result.model.parameters()).device.type == "cuda"
    logits = predict_logits(result.model, test_data)["risk_logits"]
    labels = test_data.label_arrays()["risk_label"]
    known = ~np.isnan(labels)
    assert auroc(labels[known], logits[known]) > 0.75
    again = train(tiny_model(), train_data, tuning_data, args)
    assert again.history == result.history
    assert np.array_equal(logits, predict_logits(again.model, test_data)["risk_logits"])


def test_a_model_trained_on_cuda_predicts_the_same_on_cpu() -> None:
    train_data, tuning_data, test_data = dataset(300, 1), dataset(100, 2), dataset(100, 3)
    result = train(tiny_model(), train_data, tuning_data,
                   TrainingArguments(max_epochs=2, batch_size=64, seed=0, device="cuda"))
    on_cuda = predict_logits(result.model, test_data)
    on_cpu = predict_logits(result.model.to("cpu"), test_data)
    for key in ("risk_logits", "hazard_logits", "arm_logits"):
        np.testing.assert_allclose(on_cuda[key], on_cpu[key], atol=1e-4)
