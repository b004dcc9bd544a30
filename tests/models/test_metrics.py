"""Calibration metrics: the slope and observed/expected ratio of a recalibration, and the error a
perfectly calibrated model shows from sampling alone; paired comparisons of two models' rankings;
the policy value of a treatment rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics import (
    auroc,
    auroc_interval,
    brier,
    calibration_error_if_calibrated,
    calibration_slope,
    expected_calibration_error,
    harrell_c_index,
    observed_expected_ratio,
    paired_concordance_difference,
    pehe,
    policy_value,
    weighted_concordance_difference,
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


def test_weighted_concordance_equals_the_metrics_of_resampled_patients() -> None:
    rng = np.random.default_rng(3)
    n = 60
    event = rng.random(n) < 0.3
    duration = np.round(rng.exponential(200, n))  # rounded: ties in time
    score = rng.random(n) + 0.4 * event
    reference = np.round(rng.random(n) + 0.2 * event, 1)  # rounded: ties in score
    draws = [rng.integers(0, n, n) for _ in range(6)]
    weights = [np.bincount(d, minlength=n) for d in draws]
    gained, pairs = weighted_concordance_difference(event, score, reference, weights, duration)
    expected = [harrell_c_index(event[d], duration[d], score[d]) - harrell_c_index(event[d], duration[d], reference[d])
                for d in draws]
    np.testing.assert_allclose(gained / pairs, expected, rtol=1e-6, atol=1e-12)
    gained, pairs = weighted_concordance_difference(event, score, reference, weights)
    np.testing.assert_allclose(gained / pairs, [auroc(event[d], score[d]) - auroc(event[d], reference[d])
                                                for d in draws], rtol=1e-6, atol=1e-12)


def test_paired_difference_and_its_interval() -> None:
    rng = np.random.default_rng(0)
    n = 800
    event = rng.random(n) < 0.2
    duration = rng.exponential(300, n)
    signal = rng.normal(size=n) + 1.0 * event
    better, worse = signal + 0.3 * rng.normal(size=n), signal + 1.5 * rng.normal(size=n)
    d, low, high = paired_concordance_difference(event, better, worse, seed=1)
    assert d == pytest.approx(auroc(event, better) - auroc(event, worse))
    assert 0 < low < d < high
    assert paired_concordance_difference(event, better, worse, seed=1) == (d, low, high)  # seeded
    d, low, high = paired_concordance_difference(event, better, worse, duration, seed=1)
    assert d == pytest.approx(harrell_c_index(event, duration, better) - harrell_c_index(event, duration, worse))
    assert low < d < high
    assert paired_concordance_difference(event, better, better, duration) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"paired_concordance_difference: needs both outcomes"):
        paired_concordance_difference(np.zeros(5), better[:5], worse[:5])
    with pytest.raises(ValueError, match=r"scores of shape \(800,\) and \(5,\)"):
        weighted_concordance_difference(event, better, worse[:5], np.ones((1, n)))


def test_weighted_calibration_metrics_equal_the_metrics_of_repeated_patients() -> None:
    y = np.array([1, 0, 0, 1, 0, 0])
    risk = np.array([0.9, 0.2, 0.4, 0.6, 0.1, 0.3])
    weights = np.array([1, 2, 1, 3, 1, 2])
    repeated_y, repeated_risk = np.repeat(y, weights), np.repeat(risk, weights)
    assert brier(y, risk, weights) == pytest.approx(brier(repeated_y, repeated_risk))
    expected = observed_expected_ratio(repeated_y, repeated_risk)
    assert observed_expected_ratio(y, risk, weights) == pytest.approx(expected)
    # One bin: calibration in the large, |weighted event rate - weighted mean risk| = |4/10 - 4.2/10|.
    assert expected_calibration_error(y, risk, n_bins=1, sample_weight=weights) == pytest.approx(0.02)
    assert calibration_slope(y, risk, weights) == pytest.approx(calibration_slope(repeated_y, repeated_risk), rel=1e-4)
    with pytest.raises(ValueError, match="brier: sample_weight must hold 6 finite non-negative weights"):
        brier(y, risk, weights[:3])


def test_policy_value_by_hand_and_censoring_weights_count_as_repeated_patients() -> None:
    effect = np.array([-0.1, 0.2, -0.3, 0.1])  # the policy treats patients 1 and 3
    treated = np.array([1, 0, 0, 0])  # patient 3 was not treated: not followed, left out
    y = np.array([1.0, 0.0, 1.0, 1.0])
    propensity = np.array([0.5, 0.5, 0.5, 0.8])  # inverse-propensity weights 2, 2, -, 5
    assert policy_value(effect, treated, y, propensity) == pytest.approx(7 / 9)
    weighted = policy_value(effect, treated, y, propensity, sample_weight=[1.0, 3.0, 1.0, 1.0])
    assert weighted == pytest.approx(7 / 13)
    repeated = [0, 1, 1, 1, 2, 3]
    assert weighted == pytest.approx(policy_value(effect[repeated], treated[repeated], y[repeated],
                                                  propensity[repeated]))
    with pytest.raises(ValueError, match="policy_value: sample_weight must hold 4 finite non-negative weights"):
        policy_value(effect, treated, y, propensity, sample_weight=[1.0, -1.0, 1.0, 1.0])


def test_weighted_auroc_and_its_paired_difference_count_each_patient_by_weight() -> None:
    # A weight of 2 is a patient counted twice: the weighted AUROC is the AUROC of the duplicated data.
    y = np.array([1, 1, 0, 0, 0])
    better, worse = np.array([0.9, 0.4, 0.5, 0.2, 0.1]), np.array([0.3, 0.8, 0.5, 0.6, 0.1])
    weights = np.array([1.0, 2.0, 1.0, 3.0, 1.0])
    repeated = np.repeat(np.arange(5), weights.astype(int))
    assert auroc(y, better, weights) == pytest.approx(auroc(y[repeated], better[repeated]))
    assert auroc(y, better, weights) != pytest.approx(auroc(y, better))
    d, low, high = paired_concordance_difference(y, better, worse, n_resamples=200, seed=0, sample_weight=weights)
    assert d == pytest.approx(auroc(y, better, weights) - auroc(y, worse, weights))
    assert low <= d <= high
    with pytest.raises(ValueError, match=r"auroc: sample_weight must hold 5 finite non-negative weights"):
        auroc(y, better, -weights)


def test_calibration_error_keeps_tied_risks_in_one_bin_whatever_the_row_order() -> None:
    # Three bins of two: the four patients at 0.5 share the second bin, wherever their rows are.
    y = np.array([0, 1, 0, 1, 0, 0])
    risk = np.array([0.5, 0.5, 0.5, 0.5, 0.2, 0.2])
    rng = np.random.default_rng(0)
    for _ in range(10):
        order = rng.permutation(6)
        assert expected_calibration_error(y[order], risk[order], n_bins=3) == pytest.approx(0.4 / 6)


def test_calibration_error_refuses_labels_and_risks_it_cannot_read() -> None:
    risk = np.full(4, 0.5)
    with pytest.raises(ValueError, match=r"labels must be 0/1 \(found \[0.0, 1.0, nan\]; leave patients with an "):
        expected_calibration_error([0, 1, np.nan, 1], risk)
    with pytest.raises(ValueError, match=r"labels must be 0/1 \(found \[0, 2\]"):
        expected_calibration_error([0, 2, 0, 2], risk)
    with pytest.raises(ValueError, match=r"expected 4 predicted risks, one per outcome \(found shape \(5,\)\)"):
        expected_calibration_error([0, 1, 0, 1], np.full(5, 0.5))
    with pytest.raises(ValueError, match=r"predicted risks must be probabilities in \[0, 1\] \(found \[1.7\]\)"):
        expected_calibration_error([0, 1, 0, 1], [0.1, 1.7, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"expected one outcome per patient, at least one \(found shape \(0,\)\)"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match=r"calibration_error_if_calibrated: predicted risks must be probabilities"):
        calibration_error_if_calibrated([0.1, np.nan])


def test_pehe_compares_one_effect_per_patient() -> None:
    estimated, true = np.array([0.1, -0.2, 0.0]), np.array([0.1, -0.1, 0.1])
    assert pehe(estimated, true) == pytest.approx(np.sqrt(0.02 / 3))
    with pytest.raises(ValueError, match=r"one estimated and one true effect per patient, at least one \(found "
                                         r"shapes \(3,\) and \(3, 1\)\)"):
        pehe(estimated, true[:, None])  # numpy alone would broadcast to 3 x 3
    with pytest.raises(ValueError, match=r"found shapes \(1,\) and \(3,\)"):
        pehe(estimated[:1], true)
    with pytest.raises(ValueError, match=r"finite \(found 0 estimated and 1 true effects that are not\)"):
        pehe(estimated, np.array([0.1, np.nan, 0.0]))


def test_policy_value_refuses_what_it_cannot_estimate() -> None:
    effect, y, propensity = np.array([-0.1, 0.2, -0.3]), np.array([1, 0, 1]), np.full(3, 0.5)
    with pytest.raises(ValueError, match="none of the 3 patients got the treatment the policy gives them"):
        policy_value(effect, [0, 1, 0], y, propensity)
    with pytest.raises(ValueError, match=r"policy_value: treated: labels must be 0/1 \(found \[1, 2\]"):
        policy_value(effect, [1, 2, 1], y, propensity)
    with pytest.raises(ValueError, match=r"policy_value: treated: labels must be 0/1 \(found \[0.0, 1.0, nan\]"):
        policy_value(effect, [1, np.nan, 0], y, propensity)
    with pytest.raises(ValueError, match=r"policy_value: y: labels must be 0/1"):
        policy_value(effect, [1, 0, 1], [1.0, np.nan, 0.0], propensity)
    with pytest.raises(ValueError, match="estimated effects and propensities must be finite"):
        policy_value(effect, [1, 0, 1], y, [0.5, np.nan, 0.5])


def test_auroc_interval_is_the_weighted_auroc_with_a_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    n = 300
    y = rng.random(n) < 0.2
    risk = rng.random(n) + 0.3 * y
    weights = rng.uniform(0.5, 2.0, n)
    value, low, high = auroc_interval(y, risk, weights, n_resamples=500)
    assert value == pytest.approx(roc_auc_score(y, risk, sample_weight=weights), abs=1e-12)
    assert low < value < high
    # The spread of AUROCs of resampled patients, computed directly.
    draws = [rng.integers(0, n, n) for _ in range(500)]
    direct = np.quantile([roc_auc_score(y[d], risk[d], sample_weight=weights[d]) for d in draws], [0.025, 0.975])
    assert abs(low - direct[0]) < 0.02 and abs(high - direct[1]) < 0.02


def test_bootstrap_concordance_refuses_labels_and_scores_auroc_refuses() -> None:
    y, risk = np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.1, 0.9, 0.3, 0.4])
    nan_label = r"^paired_concordance_difference: labels must be 0/1 \(found \[0\.0, 1\.0, nan\]"
    with pytest.raises(ValueError, match=nan_label):
        auroc_interval(np.array([0.0, 1.0, np.nan, 1.0]), risk)
    with pytest.raises(ValueError, match=r"labels must be 0/1 \(found \[0\.0, 1\.0, 2\.0\]"):
        auroc_interval(np.array([0.0, 1.0, 2.0, 1.0]), risk)
    with pytest.raises(ValueError, match=r"^weighted_concordance_difference: score must be finite \(found \[nan\]\)"):
        auroc_interval(y, np.array([0.1, np.nan, 0.3, 0.4]))
    with pytest.raises(ValueError, match=r"^weighted_concordance_difference: reference must be finite"):
        paired_concordance_difference(y, risk, np.array([np.inf, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"^paired_concordance_difference: labels must be 0/1"):
        paired_concordance_difference(np.array([0.0, 1.0, np.nan, 1.0]), risk, risk[::-1],
                                      duration_days=np.array([5.0, 1.0, 3.0, 2.0]))
