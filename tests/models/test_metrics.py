"""Calibration metrics: the slope and observed/expected ratio of a recalibration, and the error a
perfectly calibrated model shows from sampling alone."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import (
    calibration_error_if_calibrated,
    calibration_slope,
    expected_calibration_error,
    observed_expected_ratio,
)


def _outcomes(risk: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(risk.size) < risk


def test_calibration_slope_is_one_for_true_risks_and_half_for_doubled_logits() -> None:
    logit = np.random.default_rng(1).normal(-1.5, 1.0, size=20_000)
    risk = 1 / (1 + np.exp(-logit))
    y = _outcomes(risk)
    assert calibration_slope(y, risk) == pytest.approx(1.0, abs=0.05)
    too_extreme = 1 / (1 + np.exp(-2 * logit))
    assert calibration_slope(y, too_extreme) == pytest.approx(0.5, abs=0.03)


def test_observed_expected_ratio_counts_events_against_predictions() -> None:
    assert observed_expected_ratio([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match=r"observed_expected_ratio: needs both outcomes, found only \[0\]"):
        observed_expected_ratio([0, 0], [0.1, 0.2])


def test_calibration_error_of_a_calibrated_model_shrinks_with_patients() -> None:
    risk = np.random.default_rng(2).uniform(0.02, 0.5, size=1_000)
    mean_1k, p95_1k = calibration_error_if_calibrated(risk)
    mean_10k, _ = calibration_error_if_calibrated(np.tile(risk, 10))
    # Ten bins of 100 patients with a risk near 0.2: about 0.03 of noise per bin.
    assert 0.015 < mean_1k < 0.035 and p95_1k > mean_1k
    assert mean_10k < mean_1k / 2.5
    assert calibration_error_if_calibrated(risk) == (mean_1k, p95_1k)  # seeded
    # The true risks themselves measure about as much on one draw of outcomes.
    assert expected_calibration_error(_outcomes(risk), risk) < p95_1k
    with pytest.raises(ValueError, match="no patients to evaluate"):
        calibration_error_if_calibrated(np.array([]))
