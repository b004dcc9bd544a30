"""Tests of the Platt calibration of the risk head and of the treatment-arm heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.calibration import PlattCalibrator


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_each_arm_is_calibrated_on_its_own_patients() -> None:
    rng = np.random.default_rng(0)
    n = 40_000
    true_logit = rng.normal(-1.5, 1.0, n)
    treated = (rng.random(n) < 0.4).astype(np.float64)
    y = (rng.random(n) < _sigmoid(true_logit)).astype(np.float64)
    # Arm 0's head over-states the risk by one logit, arm 1's by half a logit at twice the spread.
    arm_logits = np.stack([true_logit + 1.0, 2.0 * true_logit + 0.5], axis=1)
    calibrator = PlattCalibrator().fit(true_logit, y).fit_arms(arm_logits, y, treated)
    (slope0, intercept0), (slope1, intercept1) = calibrator.arms_
    assert (slope0, intercept0) == pytest.approx((1.0, -1.0), abs=0.06)
    assert (slope1, intercept1) == pytest.approx((0.5, -0.25), abs=0.06)
    risks = calibrator.transform_arms(arm_logits)
    assert risks.shape == (n, 2)
    assert np.abs(risks - _sigmoid(true_logit)[:, None]).max() < 0.03


def test_with_too_few_outcomes_in_an_arm_both_arms_keep_the_heads_probabilities() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 2))
    y = np.r_[np.tile([0.0, 1.0], 95), [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.nan]]
    # Arm 1: the last ten patients, three of them with the outcome and one with none known.
    treated = np.r_[np.zeros(190), np.ones(10)]
    treated[5] = np.nan
    calibrator = PlattCalibrator(min_arm_outcomes=4).fit(logits[:, 0], np.nan_to_num(y)).fit_arms(logits, y, treated)
    assert calibrator.arms_ == [(1.0, 0.0), (1.0, 0.0)]
    np.testing.assert_allclose(calibrator.transform_arms(logits), _sigmoid(logits))
    # The model card says which, with the counts.
    assert calibrator.arm_calibration_ == (
        "treatment-arm risks not calibrated (as the heads gave them): the tuning arms hold untreated 94 events and "
        "95 non-events, treated 3 and 6, and calibration needs 4 of each in each arm")
    # With three outcomes enough, each arm gets its own fit.
    calibrator = PlattCalibrator(min_arm_outcomes=3).fit(logits[:, 0], np.nan_to_num(y)).fit_arms(logits, y, treated)
    assert calibrator.arms_[0] != (1.0, 0.0) and calibrator.arms_[1] != (1.0, 0.0)
    assert calibrator.arm_calibration_ == ("treatment-arm risks calibrated on each arm's tuning patients (untreated "
                                           "94 events and 95 non-events, treated 3 and 6)")


def test_arm_calibration_is_saved_and_an_older_file_leaves_the_arms_as_the_heads_gave_them(tmp_path: Path) -> None:
    logits = np.array([[-2.0, 0.5], [0.0, 1.0]])
    calibrator = PlattCalibrator()
    calibrator.slope_, calibrator.intercept_, calibrator.arms_ = 1.0, 0.0, [(2.0, -1.0), (0.5, 0.25)]
    loaded = PlattCalibrator.load(calibrator.save(tmp_path / "calibration.json"))
    assert loaded.arms_ == [(2.0, -1.0), (0.5, 0.25)]
    np.testing.assert_allclose(loaded.transform_arms(logits), _sigmoid(np.array([[-5.0, 0.5], [-1.0, 0.75]])))
    (tmp_path / "old.json").write_text(json.dumps({"method": "platt", "slope": 1.0, "intercept": 0.0}))
    np.testing.assert_allclose(PlattCalibrator.load(tmp_path / "old.json").transform_arms(logits), _sigmoid(logits))


def test_arm_logits_of_the_wrong_shape_are_refused() -> None:
    calibrator = PlattCalibrator().fit([-1.0, 1.0] * 5, [0, 1] * 5)
    with pytest.raises(ValueError, match=r"arm logits of shape \(n, 2\) .* found \(10,\), 10 and 10"):
        calibrator.fit_arms(np.zeros(10), np.zeros(10), np.zeros(10))


def test_survival_curves_are_calibrated_to_the_kaplan_meier_risk_by_the_horizon(tmp_path: Path) -> None:
    from sksurv.nonparametric import kaplan_meier_estimator

    rng = np.random.default_rng(0)
    n = 4000
    hazard = 0.0008 * np.exp(rng.normal(size=n))  # per day, exponential times
    event_time = rng.exponential(1 / hazard)
    censor_time = rng.uniform(100, 800, n)
    duration, event = np.minimum(event_time, censor_time), event_time <= censor_time
    true_s = np.exp(-hazard * 365)
    predicted = true_s ** 2  # a head that doubles every cumulative hazard
    calibrator = PlattCalibrator().fit_survival(predicted, event, duration, 365.0)
    times, km = kaplan_meier_estimator(event, duration)
    km_risk = 1 - km[times <= 365][-1]
    assert np.mean(1 - calibrator.transform_survival(predicted)) == pytest.approx(km_risk, abs=1e-9)
    assert calibrator.survival_power_ == pytest.approx(0.5, abs=0.03)
    # One power for every curve: the order of the patients' risks is kept.
    curves = np.stack([predicted, predicted ** 1.5], axis=1)
    assert (np.argsort(calibrator.transform_survival(curves)[:, 0]) == np.argsort(predicted)).all()
    # Saved beside the rest; a calibration saved before it leaves the curves as the head gave them.
    calibrator.slope_, calibrator.intercept_ = 1.0, 0.0
    loaded = PlattCalibrator.load(calibrator.save(tmp_path / "calibration.json"))
    assert loaded.survival_power_ == calibrator.survival_power_
    assert loaded.survival_calibration_ == calibrator.survival_calibration_ == (
        f"survival curves calibrated in the large: power {calibrator.survival_power_:.3f} makes the mean risk by the "
        f"horizon the tuning split's Kaplan-Meier estimate {km_risk:.3f} (the curves' mean "
        f"{np.mean(1 - predicted):.3f})")
    (tmp_path / "old.json").write_text(json.dumps({"method": "platt", "slope": 1.0, "intercept": 0.0}))
    np.testing.assert_array_equal(PlattCalibrator.load(tmp_path / "old.json").transform_survival(curves), curves)
    # Nobody followed to the horizon: nothing to calibrate against.
    short = PlattCalibrator().fit_survival(predicted, event, np.minimum(duration, 300.0), 365.0)
    assert short.survival_power_ == 1.0
    assert short.survival_calibration_ == ("survival curves not calibrated (as the head gave them): no tuning patient "
                                           "was followed to the horizon")


@pytest.mark.parametrize("arms", [None, 3, [{"slope": 1.0, "intercept": 0.0}]])
def test_a_calibration_with_arms_that_are_not_two_is_refused(tmp_path: Path, arms: object) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"method": "platt", "slope": 1.0, "intercept": 0.0, "arms": arms}))
    with pytest.raises(ValueError, match="'arms' should list the two treatment arms' calibrations, found"):
        PlattCalibrator.load(path)


def test_a_survival_target_out_of_reach_leaves_the_curves_and_a_power_must_be_positive(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    duration = rng.uniform(100, 800, 1000)
    event = rng.random(1000) < 0.3  # about 0.1 by a year
    # A head that gives nearly everyone no risk: no power within the limit reaches the target.
    flat = np.where(np.arange(1000) < 900, 1.0, 0.999)
    far_off = PlattCalibrator().fit_survival(flat, event, np.minimum(duration, 700), 365.0)
    assert far_off.survival_power_ == 1.0
    assert far_off.survival_calibration_.startswith(
        "survival curves not calibrated (as the head gave them): matching the tuning split's Kaplan-Meier risk by the "
        "horizon (0.1")
    assert far_off.survival_calibration_.endswith("needs a power outside 1/20 to 20: the survival head is far off, "
                                                  "train again")
    path = tmp_path / "calibration.json"
    for power, shown in ((0, "0"), (-1.0, "-1.0"), ("x", "'x'"), (True, "True"), (None, "None")):
        path.write_text(json.dumps({"method": "platt", "slope": 1.0, "intercept": 0.0, "survival_power": power}))
        # The message names the power, not the slope and intercept, which are fine.
        with pytest.raises(ValueError, match=f"survival_power should be a finite positive number, found {shown}$"):
            PlattCalibrator.load(path)
    path.write_text('{"method": "platt", "slope": 1.0, "intercept": 0.0, "survival_power": NaN}')
    with pytest.raises(ValueError, match="survival_power should be a finite positive number, found nan"):
        PlattCalibrator.load(path)
