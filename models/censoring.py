"""Inverse probability of censoring weights (IPCW) for the risk label at the horizon.

Stage: model training and evaluation. In: each patient's risk label, event flag and follow-up
(``duration_days``), and the same of a reference split (the train split) for the censoring
distribution. Out: one weight per patient, 0 for those without a label.

Why: a patient whose follow-up ended before the horizon without the event has no risk label.
Dropping them (complete cases) keeps every early event but only the non-events followed to the
horizon, so the labelled patients over-represent events: on 10,000 simulated patients the labelled
event rate is 0.143 where the Kaplan-Meier one-year risk of the same cohort is 0.131. A model
trained, calibrated and checked on complete cases inherits that excess. Weighting each labelled
patient by the inverse probability of having stayed uncensored that long (a case with the event at
``t``: ``1 / G(t-)``; a patient followed past the horizon: ``1 / G(horizon)``, with ``G`` the
Kaplan-Meier estimate of the censoring distribution) makes the labelled patients stand in for the
censored ones, under censoring independent of the outcome (Graf et al. 1999; Blanche et al. 2013).

Death, where it is not the outcome, competes with it: a patient who died within the horizon
without the outcome is a control (``features.labels``) whose status at the horizon is known from
their death on. Such a control is weighted at their death, ``1 / G(death-)``, and ``G`` counts
only true censorings: a death is no loss to follow-up. (Counting deaths as censorings estimates
the chance of being neither dead nor censored, and weighting the dead at the horizon then
under-states the cumulative incidence; on simulated data with frequent deaths, by about a third.)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sksurv.nonparametric import kaplan_meier_estimator

from features.errors import TrainingDataError

FloatArray = npt.NDArray[np.float64]


def censoring_survival(event: npt.ArrayLike, duration_days: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Kaplan-Meier estimate of staying uncensored: (times, G(t) just after each time).

    ``event`` is True where follow-up ended by something other than censoring (the outcome, or a
    competing death). Censoring is the "event" here. At tied times outcomes come before censoring, as in
    scikit-survival's own censoring estimate (``reverse=True``, behind its Uno's C and Brier score):
    a patient whose outcome falls on a censoring time is no longer at risk of being censored then.
    """
    observed = np.asarray(event, dtype=bool)
    duration = np.asarray(duration_days, dtype=np.float64)
    if duration.size == 0:
        raise ValueError("censoring weights: the reference split has no patients")
    if not np.isfinite(duration).all() or (duration < 0).any():
        raise ValueError("censoring weights: duration_days must be finite and non-negative")
    times, survival = kaplan_meier_estimator(observed, duration, reverse=True)
    return np.asarray(times, dtype=np.float64), np.asarray(survival, dtype=np.float64)


def _survival_before(times: FloatArray, survival: FloatArray, at: FloatArray) -> FloatArray:
    """G just before ``at``, G(t-), as the step function the estimate is."""
    index = np.searchsorted(times, at, side="left") - 1
    return np.where(index >= 0, survival[np.maximum(index, 0)], 1.0)


def _competing_deaths(label: FloatArray, duration: FloatArray, horizon_days: float) -> npt.NDArray[np.bool_]:
    """Controls whose follow-up ended before the horizon: features.labels makes such a control only
    of a patient who died of a competing cause (an unknown label, NaN, is none)."""
    return np.asarray((label == 0) & (duration < horizon_days))


def censoring_weights(
    risk_label: npt.ArrayLike,
    event: npt.ArrayLike,
    duration_days: npt.ArrayLike,
    horizon_days: float,
    reference_risk_label: npt.ArrayLike,
    reference_event: npt.ArrayLike,
    reference_duration_days: npt.ArrayLike,
) -> FloatArray:
    """IPCW of each patient's risk label at ``horizon_days``, normalised to mean 1 over the labelled.

    ``risk_label`` is 0/1, NaN when unknown (weight 0). A control whose follow-up ended before the
    horizon died of a competing cause (the only such control ``features.labels`` makes). The
    censoring distribution is estimated on the reference split, so held-out patients are weighted
    with what training knew.

    Raises
    ------
    ValueError
        When no patient is labelled, or the reference split has nobody still followed (uncensored)
        at a labelled patient's time.

    Examples
    --------
    Four reference patients: censored at 100 and 200 days, followed to 400, an event at 50. A case
    at 30 days weighs 1/G(30-) = 1, a control past a 365-day horizon 1/G(365-) = 1/(2/3 * 1/2) = 3;
    normalised to mean 1 over the two labelled patients:

    >>> censoring_weights([1, 0, np.nan], [1, 0, 0], [30, 400, 120], 365,
    ...                   [np.nan, np.nan, 0, 1], [0, 0, 0, 1], [100, 200, 400, 50])
    array([0.5, 1.5, 0. ])
    """
    label = np.asarray(risk_label, dtype=np.float64)
    observed = np.asarray(event, dtype=bool)
    duration = np.asarray(duration_days, dtype=np.float64)
    if not (label.shape == observed.shape == duration.shape):
        raise ValueError(
            f"censoring weights: risk_label {label.shape}, event {observed.shape} and duration_days "
            f"{duration.shape} must have one value per patient"
        )
    known = ~np.isnan(label)
    if not known.any():
        raise TrainingDataError(f"censoring weights: none of {label.size} patients has a known risk label")
    reference_label = np.asarray(reference_risk_label, dtype=np.float64)
    reference_duration = np.asarray(reference_duration_days, dtype=np.float64)
    reference_ended = np.asarray(reference_event, dtype=bool)
    if not (reference_label.shape == reference_ended.shape == reference_duration.shape):
        raise ValueError(
            f"censoring weights: reference_risk_label {reference_label.shape}, reference_event "
            f"{reference_ended.shape} and reference_duration_days {reference_duration.shape} must have one "
            "value per patient"
        )
    # Competing deaths end follow-up without censoring it.
    reference_died = _competing_deaths(reference_label, reference_duration, horizon_days)
    times, survival = censoring_survival(reference_ended | reference_died, reference_duration)
    case = known & (label > 0.5)
    died = _competing_deaths(label, duration, horizon_days)
    # A case is weighted at its event time, a competing death at the death, any other control at the
    # horizon, each by the chance of being still followed just before it: such a control is followed
    # at least to the horizon (features.labels), so one censored exactly there counts as followed.
    at = np.where(case, np.minimum(duration, horizon_days), np.where(died, duration, horizon_days))
    uncensored = _survival_before(times, survival, at)
    if (uncensored[known] <= 0).any():
        raise TrainingDataError(
            f"censoring weights: no patient of the reference split is still followed at "
            f"{float(at[known][uncensored[known] <= 0].min()):g} days (horizon {horizon_days:g}); "
            "the horizon is longer than the follow-up"
        )
    weights = np.zeros(label.size)
    weights[known] = 1.0 / uncensored[known]
    return np.asarray(weights / weights[known].mean(), dtype=np.float64)
