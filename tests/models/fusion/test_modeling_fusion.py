"""Tests of the fusion transformer with a tiny configuration (hidden size 32, 2 layers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.fusion import FusionConfig, FusionForRiskPrediction, survival_curve
from models.fusion.modeling_fusion import FusionEncoder


def tiny_config(**overrides: object) -> FusionConfig:
    settings: dict[str, object] = {
        "event_vocab_size": 20, "n_value_bins": 6, "text_embedding_dim": 8, "imaging_embedding_dim": 6,
        "n_imaging_modalities": 3, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "dropout": 0.0,
    }
    settings.update(overrides)
    return FusionConfig(**settings)


def tiny_batch(batch_size: int = 3, n_events: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "event_codes": torch.randint(1, 20, (batch_size, n_events), generator=g),
        "event_value_bins": torch.randint(0, 6, (batch_size, n_events), generator=g),
        "event_days": torch.rand(batch_size, n_events, generator=g) * 300,
        "event_modalities": torch.randint(0, 4, (batch_size, n_events), generator=g),
        "event_mask": torch.ones(batch_size, n_events, dtype=torch.bool),
        "note_embeddings": torch.randn(batch_size, 2, 8, generator=g),
        "note_days": torch.rand(batch_size, 2, generator=g),
        "note_mask": torch.tensor([[True, True], [False, False], [True, False]])[:batch_size],
        "imaging_embeddings": torch.randn(batch_size, 1, 6, generator=g),
        "imaging_modalities": torch.ones(batch_size, 1, dtype=torch.long),
        "imaging_days": torch.full((batch_size, 1), 10.0),
        "imaging_mask": torch.tensor([[True], [False], [False]])[:batch_size],
    }


def test_forward_gives_every_head_and_a_finite_loss() -> None:
    torch.manual_seed(0)
    model = FusionForRiskPrediction(tiny_config())
    out = model(
        **tiny_batch(),
        risk_labels=torch.tensor([1.0, math.nan, 0.0]),
        event=torch.tensor([1.0, 0.0, 0.0]),
        duration_days=torch.tensor([20.0, 100.0, 800.0]),
        treated=torch.tensor([1.0, 0.0, 1.0]),
    )
    assert out.risk_logits.shape == (3,)
    assert out.hazard_logits.shape == (3, 7)
    assert out.arm_logits.shape == (3, 2)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.event_code.weight.grad is not None


def test_padding_does_not_change_predictions() -> None:
    torch.manual_seed(0)
    model = FusionForRiskPrediction(tiny_config()).eval()
    batch = tiny_batch()
    padded = dict(batch)
    padded["event_codes"] = torch.cat([batch["event_codes"], torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded["event_value_bins"] = torch.cat([batch["event_value_bins"], torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded["event_days"] = torch.cat([batch["event_days"], torch.zeros(3, 4)], dim=1)
    padded["event_modalities"] = torch.cat([batch["event_modalities"], torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded["event_mask"] = torch.cat([batch["event_mask"], torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(**batch).risk_logits, model(**padded).risk_logits, atol=1e-5)


def test_save_and_load_give_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FusionForRiskPrediction(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = FusionForRiskPrediction.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**tiny_batch()).risk_logits, loaded(**tiny_batch()).risk_logits)


def test_config_rejects_heads_that_do_not_divide_the_hidden_size() -> None:
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(12\): "
                                         r"each head attends over hidden_size / heads dimensions; use a number of "
                                         r"heads that divides 100 \(1, 2, 4, 5, 10, 20, \.\.\.\)"):
        tiny_config(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match=r"horizon_days \(400\) must be one of survival_bin_edges_days"):
        tiny_config(horizon_days=400)


def test_modality_dropout_never_hides_all_of_a_patients_tokens() -> None:
    torch.manual_seed(0)
    encoder = FusionForRiskPrediction(tiny_config(modality_dropout=0.9)).encoder.train()
    modalities = torch.tensor([[0, 0, 1, 3]] * 500)
    mask = torch.tensor([[True, True, True, False]] * 500)
    dropped = encoder.drop_modalities(modalities, mask)
    assert dropped.any(dim=1).all()
    assert not (dropped & ~mask).any()
    # Whole modalities go together: the two ehr tokens are kept or dropped as one.
    assert torch.equal(dropped[:, 0], dropped[:, 1])
    assert 0 < dropped[:, 2].float().mean() < 1


def test_modality_means_average_each_modalitys_real_tokens_only() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [10.0, 10.0], [5.0, 7.0]]])  # (1, 4, 2)
    modalities = torch.tensor([[0, 0, 0, 3]])  # three ehr tokens (one of them padding), one imaging
    mask = torch.tensor([[True, True, False, True]])
    means = FusionEncoder.modality_means(tokens, modalities, mask)
    # ehr: mean of the two real tokens; notes and genomics absent: zeros; imaging: its one token.
    assert torch.equal(means, torch.tensor([[2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0, 7.0]]))


def test_modality_summary_is_optional_and_changes_the_pooled_vector() -> None:
    torch.manual_seed(0)
    with_summary = FusionForRiskPrediction(tiny_config()).eval()
    torch.manual_seed(0)
    without = FusionForRiskPrediction(tiny_config(modality_summary=False)).eval()
    assert with_summary.encoder.summary is not None and without.encoder.summary is None
    assert set(with_summary.state_dict()) - set(without.state_dict()) == {"encoder.summary.weight",
                                                                          "encoder.summary.bias"}
    with torch.no_grad():
        assert not torch.allclose(with_summary(**tiny_batch()).pooled, without(**tiny_batch()).pooled)


def test_survival_loss_matches_the_discrete_time_likelihood() -> None:
    model = FusionForRiskPrediction(tiny_config(survival_bin_edges_days=[10, 20, 30], horizon_days=30))
    logits = torch.zeros(4, 3)  # every hazard is 0.5: each interval survived or failed costs log 2
    # Event in (10, 20]: survived one interval, the event in the next -> 2 terms.
    # Censored at 25, the midpoint of (20, 30]: survived all three -> 3 terms.
    # Censored at 24, before it: survived two -> 2 terms. Censored at exactly 20: survived (10, 20] -> 2.
    loss = model.survival_loss(logits, torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([15.0, 25.0, 24.0, 20.0]))
    assert loss.item() == pytest.approx((2 + 3 + 2 + 2) / 4 * math.log(2), rel=1e-6)


def test_survival_loss_fitted_without_covariates_recovers_the_kaplan_meier_curve() -> None:
    # Exponential event times (1-year risk 0.13) and uniform censoring over two years: the hazards
    # that minimise the loss must give the Kaplan-Meier survival at each edge, up to the
    # life-table rule's approximation inside an interval. A censored patient dropped from the
    # interval they were censored in drives the last, year-wide interval's survival far too low.
    from sksurv.nonparametric import kaplan_meier_estimator

    generator = torch.Generator().manual_seed(0)
    n = 20_000
    event_days = torch.empty(n).exponential_(generator=generator) * (365 / -math.log(0.87))
    censor_days = torch.rand(n, generator=generator) * 730
    duration, event = torch.minimum(event_days, censor_days), (event_days <= censor_days).float()
    edges = [30.0, 90.0, 180.0, 365.0, 730.0]
    model = FusionForRiskPrediction(tiny_config(survival_bin_edges_days=edges, horizon_days=365))
    logits = torch.zeros(1, len(edges), requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model.survival_loss(logits.expand(n, -1), event, duration)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = survival_curve(logits.detach())[0].numpy()
    times, km = kaplan_meier_estimator(event.numpy() > 0.5, duration.numpy())
    at_edges = [km[np.searchsorted(times, edge, side="right") - 1] for edge in edges[:-1]]
    np.testing.assert_allclose(fitted[:-1], at_edges, atol=0.003)
    # Nobody is followed past 730 days, so the last edge is checked against the truth, 0.87 ** 2
    # (dropping the patients censored in the last interval gave 0 there).
    assert fitted[-1] == pytest.approx(0.87**2, abs=0.01)


def test_survival_curve_falls_and_stays_in_the_unit_interval() -> None:
    curve = survival_curve(torch.randn(50, 7))
    assert ((curve >= 0) & (curve <= 1)).all()
    assert (curve[:, 1:] <= curve[:, :-1]).all()
