"""Censoring weights of the risk label: hand-computed values, the Kaplan-Meier risk they recover
where complete cases are biased, and the errors for labels they cannot weigh."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.nonparametric import kaplan_meier_estimator

from models.censoring import censoring_survival, censoring_weights


def test_weights_by_hand() -> None:
    # Reference: censored at 100, 100 and 300; events at 100 and 200; followed to 500.
    ref_event = np.array([0, 0, 0, 1, 1, 0])
    ref_duration = np.array([100, 100, 300, 100, 200, 500])
    times, survival = censoring_survival(ref_event, ref_duration)
    # At 100 the event comes first, so five are at risk of censoring and two are censored; at 300,
    # two at risk, one censored. scikit-survival's own censoring estimate agrees.
    np.testing.assert_allclose(times, [100, 200, 300, 500])
    np.testing.assert_allclose(survival, [3 / 5, 3 / 5, 3 / 5 * 1 / 2, 0.0])
    reverse = kaplan_meier_estimator(ref_event.astype(bool), ref_duration, reverse=True)
    np.testing.assert_allclose(survival, reverse[1])
    weights = censoring_weights(
        risk_label=[1, 1, 0, np.nan],
        event=[1, 1, 0, 0],
        duration_days=[100, 250, 400, 150],
        horizon_days=365,
        reference_risk_label=[np.nan, np.nan, np.nan, 1, 1, 0],
        reference_event=ref_event,
        reference_duration_days=ref_duration,
    )
    # Raw weights: a case at 100 is uncensored just before it (G(100-) = 1), a case at 250 with
    # G(250-) = 3/5, a control at the horizon with G(365-) = 3/10; the unlabelled patient weighs 0.
    raw = np.array([1.0, 5 / 3, 10 / 3])
    np.testing.assert_allclose(weights, [*(raw / raw.mean()), 0.0])


def test_a_control_censored_at_the_horizon_weighs_as_followed_to_it() -> None:
    # Reference: censored at 100 and at exactly 365; followed to 500. A control censored at 365 is
    # labelled 0 (followed for the whole horizon): its chance of being labelled is G(365-) = 2/3, not
    # G(365) = 1/3, which would already count its own censoring.
    weights = censoring_weights([0, 0], [0, 0], [365, 500], 365, [np.nan, 0, 0], [0, 0, 0], [100, 365, 500])
    np.testing.assert_allclose(weights, [1.0, 1.0])
    weights = censoring_weights([1, 0], [1, 0], [50, 365], 365, [np.nan, 0, 0], [0, 0, 0], [100, 365, 500])
    np.testing.assert_allclose(weights, np.array([1.0, 1.5]) / 1.25)


def test_weighted_labels_recover_the_kaplan_meier_risk_that_complete_cases_overstate() -> None:
    rng = np.random.default_rng(0)
    event_time, censoring_time = rng.exponential(900.0, 4000), rng.uniform(0.0, 1500.0, 4000)
    duration = np.minimum(event_time, censoring_time)
    event = event_time <= censoring_time
    horizon = 365.0
    label = np.where(event & (duration <= horizon), 1.0, np.where(duration >= horizon, 0.0, np.nan))
    known = ~np.isnan(label)
    weights = censoring_weights(label, event, duration, horizon, label, event, duration)
    times, survival = kaplan_meier_estimator(event, duration)
    km_risk = 1.0 - survival[times <= horizon][-1]
    complete_cases = label[known].mean()
    weighted = np.average(label[known], weights=weights[known])
    assert complete_cases - km_risk > 0.03  # early events kept, early non-events dropped
    assert weighted == pytest.approx(km_risk, abs=0.002)
    assert weighted == pytest.approx(1.0 - np.exp(-horizon / 900.0), abs=0.02)  # the true risk
    assert weights[known].mean() == pytest.approx(1.0)
    assert (weights[~known] == 0).all()


def test_competing_deaths_are_weighted_at_death_and_recover_the_cumulative_incidence() -> None:
    # The outcome and a competing death (three times as frequent) race against uniform censoring. A
    # death within the horizon without the outcome is a control (features.labels). The weighted
    # labels must give the outcome's cumulative incidence at the horizon, l1 / (l1 + l2) (1 -
    # exp(-(l1 + l2) h)); counting deaths as censorings and weighting the dead at the horizon gives
    # about 0.087 here.
    rng = np.random.default_rng(0)
    n, horizon, outcome_rate, death_rate = 40_000, 365.0, 1 / 2000, 1 / 600
    outcome_time, death_time = rng.exponential(1 / outcome_rate, n), rng.exponential(1 / death_rate, n)
    censoring_time = rng.uniform(0.0, 1500.0, n)
    duration = np.minimum.reduce([outcome_time, death_time, censoring_time])
    event = outcome_time == duration
    died = death_time == duration
    label = np.where(event & (duration <= horizon), 1.0,
                     np.where((duration >= horizon) | died, 0.0, np.nan))
    known = ~np.isnan(label)
    weights = censoring_weights(label, event, duration, horizon, label, event, duration)
    total = outcome_rate + death_rate
    incidence = outcome_rate / total * (1 - np.exp(-total * horizon))
    assert round(incidence, 4) == 0.1261
    assert np.average(label[known], weights=weights[known]) == pytest.approx(incidence, abs=0.004)
    # By hand: no censoring before 10 days in a reference of one censoring at 20; the death at 10
    # weighs 1 / G(10-) = 1, the control followed past the horizon 1 / G(365-) = 2.
    weights = censoring_weights([0, 0], [0, 0], [10, 400], 365, [0, np.nan, 0], [0, 0, 0], [10, 20, 400])
    np.testing.assert_allclose(weights, np.array([1.0, 2.0]) / 1.5)


def test_weights_refuse_what_they_cannot_weigh() -> None:
    with pytest.raises(ValueError, match="none of 2 patients has a known risk label"):
        censoring_weights([np.nan, np.nan], [0, 0], [10, 20], 365, [0, 1], [0, 1], [400, 50])
    with pytest.raises(ValueError, match="no patient of the reference split is still followed at 365 days"):
        censoring_weights([0.0], [0], [400], 365, [np.nan, np.nan], [0, 0], [100, 200])
    with pytest.raises(ValueError, match=r"risk_label \(2,\), event \(1,\) and duration_days \(2,\)"):
        censoring_weights([0.0, 1.0], [0], [400, 30], 365, [0], [0], [400])
    with pytest.raises(ValueError, match="duration_days must be finite and non-negative"):
        censoring_weights([0.0], [0], [400], 365, [0], [0], [-1.0])
