"""Evaluation metrics for risk, progression and treatment response.

Stage: model evaluation. In: predictions and realised outcomes on the held-out split (numpy
arrays). Out: plain floats. Discrimination and calibration come from scikit-learn, survival metrics
from scikit-survival (Harrell's and Uno's C-index, time-dependent AUC, integrated Brier score), so
that numbers match what a biostatistician computes with the same libraries.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from models.calibration import PlattCalibrator

FloatArray = npt.NDArray[np.float64]


def _check_labels(name: str, y: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """0/1 outcomes of at least one patient, as booleans (NaN, an unknown outcome, is refused)."""
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{name}: expected one outcome per patient, at least one (found shape {labels.shape})")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"{name}: labels must be 0/1 (found {sorted(values, key=str)[:5]}; leave patients "
                         "with an unknown outcome out)")
    return labels.astype(bool)


def _check_risks(name: str, risk: npt.ArrayLike, n: int) -> FloatArray:
    """``n`` predicted probabilities, each finite and in [0, 1]."""
    p = np.asarray(risk, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"{name}: expected {n} predicted risks, one per outcome (found shape {p.shape})")
    if not (np.isfinite(p) & (p >= 0) & (p <= 1)).all():
        bad = p[~(np.isfinite(p) & (p >= 0) & (p <= 1))]
        raise ValueError(f"{name}: predicted risks must be probabilities in [0, 1] (found {bad[:3].tolist()})")
    return p


def _check_binary(name: str, y: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    labels = _check_labels(name, y)
    values = set(np.unique(labels.astype(int)).tolist())
    if len(values) < 2:
        raise ValueError(f"{name}: needs both outcomes, found only {sorted(values)} among {labels.size} patients")
    return labels


def auroc(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Area under the ROC curve (weighted by censoring weights: the IPCW AUROC at the horizon,
    which compares cases with the whole cohort's controls, not only those followed to the horizon)."""
    labels = _check_binary("auroc", y)
    weights = _weights("auroc", sample_weight, labels.size)
    return float(roc_auc_score(labels, np.asarray(risk, dtype=np.float64), sample_weight=weights))


def auprc(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Area under the precision-recall curve (average precision). Precision depends on the event
    rate, which complete cases over-state; censoring weights restore the cohort's."""
    labels = _check_binary("auprc", y)
    weights = _weights("auprc", sample_weight, labels.size)
    return float(average_precision_score(labels, np.asarray(risk, dtype=np.float64), sample_weight=weights))


def _weights(name: str, sample_weight: npt.ArrayLike | None, n: int) -> FloatArray:
    if sample_weight is None:
        return np.ones(n)
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{name}: sample_weight must hold {n} finite non-negative weights, not all 0 "
                         f"(found shape {weights.shape})")
    return weights


def brier(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Mean squared error of the predicted probabilities (weighted: the IPCW Brier score at the horizon)."""
    labels = _check_binary("brier", y)
    weights = _weights("brier", sample_weight, labels.size)
    return float(brier_score_loss(labels, np.asarray(risk, dtype=np.float64), sample_weight=weights))


def expected_calibration_error(y: npt.ArrayLike, risk: npt.ArrayLike, n_bins: int = 10,
                               sample_weight: npt.ArrayLike | None = None) -> float:
    """Expected calibration error over equal-count bins of predicted risk.

    The weighted mean absolute gap between mean predicted risk and observed event rate per bin.
    Equal-count bins keep the estimate stable when most predictions are small, as they are for
    rare outcomes. Patients with the same prediction share a bin (the one their first rank falls
    in), so the error does not depend on the order of the rows. With ``sample_weight`` (censoring
    weights), each bin's rates and its share of the total are weighted.

    Examples
    --------
    >>> round(expected_calibration_error([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], n_bins=2), 3)
    0.0
    """
    labels = _check_labels("expected_calibration_error", y).astype(np.float64)
    p = _check_risks("expected_calibration_error", risk, labels.size)
    weights = _weights("expected_calibration_error", sample_weight, p.size)
    # Each patient's bin from the rank of the first of its tied predictions: ties never straddle
    # two bins, whose split would otherwise follow the row order.
    first_rank = np.searchsorted(np.sort(p), p, side="left")
    # The bins of ``np.array_split`` over the sorted risks: the first ``extra`` hold one more.
    size, extra = divmod(p.size, min(n_bins, p.size))
    bins = np.where(first_rank < extra * (size + 1), first_rank // (size + 1),
                    extra + (first_rank - extra * (size + 1)) // max(size, 1))
    gaps = [
        weights[chunk].sum() * abs(np.average(labels[chunk], weights=weights[chunk])
                                   - np.average(p[chunk], weights=weights[chunk]))
        for chunk in (np.flatnonzero(bins == b) for b in np.unique(bins))
        if weights[chunk].sum() > 0
    ]
    return float(np.sum(gaps) / weights.sum())


def calibration_error_if_calibrated(risk: npt.ArrayLike, n_draws: int = 200, seed: int = 0,
                                    sample_weight: npt.ArrayLike | None = None) -> tuple[float, float]:
    """The expected calibration error a perfectly calibrated model would still show.

    Outcomes are drawn from the predictions themselves (each patient has the event with probability
    ``risk``) ``n_draws`` times; returns the mean and the 95th percentile of
    :func:`expected_calibration_error` (with the same weights) over the draws. With a thousand
    patients it is about 0.02: a measured error below that cannot be told from sampling noise.
    """
    p = np.asarray(risk, dtype=np.float64)
    if p.size == 0:
        raise ValueError("calibration_error_if_calibrated: no patients to evaluate")
    p = _check_risks("calibration_error_if_calibrated", p, p.size)
    rng = np.random.default_rng(seed)
    draws = [expected_calibration_error(rng.random(p.size) < p, p, sample_weight=sample_weight)
             for _ in range(n_draws)]
    return float(np.mean(draws)), float(np.quantile(draws, 0.95))


def calibration_slope(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Slope of the logistic recalibration ``logit P(y) = a + b logit(risk)``: 1 when predicted risks
    spread as much as observed ones, below 1 when they are too extreme (over-fitting)."""
    labels = _check_binary("calibration_slope", y)
    weights = _weights("calibration_slope", sample_weight, labels.size)
    p = np.clip(np.asarray(risk, dtype=np.float64), 1e-6, 1 - 1e-6)
    # The recalibration is a Platt scaling of the risks' logits: its slope is the answer.
    return PlattCalibrator(min_positives=1).fit(np.log(p / (1 - p)), labels, sample_weight=weights).slope_


def observed_expected_ratio(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Observed events over expected events (calibration in the large): 1 is right, above 1 the model
    under-predicts on average. Weighted by censoring weights, the observed rate is the IPCW (Kaplan-
    Meier-like) risk at the horizon rather than the rate among complete cases."""
    labels = _check_binary("observed_expected_ratio", y)
    weights = _weights("observed_expected_ratio", sample_weight, labels.size)
    return float(np.average(labels, weights=weights) / np.average(np.asarray(risk, dtype=np.float64), weights=weights))


def harrell_c_index(event: npt.ArrayLike, duration_days: npt.ArrayLike, risk: npt.ArrayLike) -> float:
    """Harrell's concordance: higher risk should mean an earlier event."""
    result = concordance_index_censored(
        np.asarray(event, dtype=bool), np.asarray(duration_days, dtype=np.float64), np.asarray(risk, dtype=np.float64)
    )
    return float(result[0])


def _survival_targets(train_event: npt.ArrayLike, train_duration_days: npt.ArrayLike, event: npt.ArrayLike,
                      duration_days: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """scikit-survival targets of the train split (for the censoring weights) and the evaluated split."""
    return (
        Surv.from_arrays(np.asarray(train_event, dtype=bool), np.asarray(train_duration_days, dtype=float)),
        Surv.from_arrays(np.asarray(event, dtype=bool), np.asarray(duration_days, dtype=float)),
    )


def uno_c_index(
    train_event: npt.ArrayLike,
    train_duration_days: npt.ArrayLike,
    event: npt.ArrayLike,
    duration_days: npt.ArrayLike,
    risk: npt.ArrayLike,
    tau_days: float,
) -> float:
    """Uno's IPCW concordance up to ``tau_days``, censoring estimated on the training split."""
    y_train, y_test = _survival_targets(train_event, train_duration_days, event, duration_days)
    return float(concordance_index_ipcw(y_train, y_test, np.asarray(risk, dtype=float), tau=tau_days)[0])


def time_dependent_auc(
    train_event: npt.ArrayLike,
    train_duration_days: npt.ArrayLike,
    event: npt.ArrayLike,
    duration_days: npt.ArrayLike,
    risk: npt.ArrayLike,
    times_days: npt.ArrayLike,
) -> float:
    """Mean cumulative/dynamic AUC over ``times_days`` (scikit-survival)."""
    y_train, y_test = _survival_targets(train_event, train_duration_days, event, duration_days)
    _aucs, mean_auc = cumulative_dynamic_auc(y_train, y_test, np.asarray(risk, dtype=float), np.asarray(times_days))
    return float(mean_auc)


def integrated_brier(
    train_event: npt.ArrayLike,
    train_duration_days: npt.ArrayLike,
    event: npt.ArrayLike,
    duration_days: npt.ArrayLike,
    survival: npt.ArrayLike,
    times_days: npt.ArrayLike,
) -> float:
    """Integrated Brier score of survival curves ``survival`` (n_patients, n_times) at ``times_days``."""
    y_train, y_test = _survival_targets(train_event, train_duration_days, event, duration_days)
    return float(integrated_brier_score(y_train, y_test, np.asarray(survival, dtype=float), np.asarray(times_days)))


def pehe(estimated_effect: npt.ArrayLike, true_effect: npt.ArrayLike) -> float:
    """Precision in estimating heterogeneous effects: root mean squared error of the individual effect."""
    estimated = np.asarray(estimated_effect, dtype=np.float64)
    true = np.asarray(true_effect, dtype=np.float64)
    # One effect per patient on both sides: numpy would broadcast an (n,) against an (n, 1) to n x n.
    if estimated.ndim != 1 or estimated.shape != true.shape or estimated.size == 0:
        raise ValueError(f"pehe: expected one estimated and one true effect per patient, at least one "
                         f"(found shapes {estimated.shape} and {true.shape})")
    if not (np.isfinite(estimated).all() and np.isfinite(true).all()):
        raise ValueError(f"pehe: effects must be finite (found {int((~np.isfinite(estimated)).sum())} estimated and "
                         f"{int((~np.isfinite(true)).sum())} true effects that are not)")
    return float(np.sqrt(np.mean((estimated - true) ** 2)))


def follows_policy(estimated_effect: npt.ArrayLike, treated: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Whether each patient got the arm the policy gives them: treated exactly when the estimated
    effect is negative (treatment lowers the risk)."""
    recommended: npt.NDArray[np.bool_] = np.asarray(estimated_effect, dtype=np.float64) < 0
    return np.asarray(recommended == np.asarray(treated, dtype=bool), dtype=bool)


def policy_value(estimated_effect: npt.ArrayLike, treated: npt.ArrayLike, y: npt.ArrayLike,
                 propensity: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None) -> float:
    """Inverse-propensity estimate of the event rate if patients were treated when the model says so.

    The policy treats a patient when the estimated effect is negative (treatment lowers risk).
    Lower is better. Needs only observed data, so it applies where the true effect is unknown.
    With ``sample_weight`` (censoring weights), each patient's inverse-propensity weight is
    multiplied by it, so the labelled patients also stand for those censored before the horizon.
    """
    # Cast to bool, an unknown arm (NaN) or a code 2 would count as treated.
    a = _check_labels("policy_value: treated", treated)
    outcome = _check_labels("policy_value: y", y).astype(np.float64)
    effect = np.asarray(estimated_effect, dtype=np.float64)
    e = np.asarray(propensity, dtype=np.float64)
    if effect.shape != a.shape or e.shape != a.shape or outcome.shape != a.shape:
        raise ValueError(f"policy_value: expected one effect, arm, outcome and propensity per patient (found shapes "
                         f"{effect.shape}, {a.shape}, {outcome.shape} and {e.shape})")
    if not (np.isfinite(effect).all() and np.isfinite(e).all()):
        raise ValueError("policy_value: estimated effects and propensities must be finite")
    follows = follows_policy(effect, a)
    if not follows.any():
        raise ValueError(f"policy_value: none of the {a.size} patients got the treatment the policy gives them "
                         "(treat when the estimated effect is negative), so its event rate cannot be estimated")
    e = np.clip(e, 0.01, 0.99)
    weights = np.where(a, 1.0 / e, 1.0 / (1.0 - e)) * _weights("policy_value", sample_weight, outcome.size)
    return float(np.sum(follows * weights * outcome) / np.sum(follows * weights))


# ------------------------------------------------------------------------------------------------
# Paired comparison of two models on the same patients
# ------------------------------------------------------------------------------------------------

TIED_SCORE_TOLERANCE = 1e-8
"""Scores this close count as tied (half a concordant pair), as in scikit-survival."""


def _tie_ranks(score: FloatArray) -> npt.NDArray[np.int64]:
    """1-based ranks of the scores, equal for scores within :data:`TIED_SCORE_TOLERANCE` of the
    next lower one."""
    order = np.argsort(score, kind="stable")
    step = np.diff(score[order]) > TIED_SCORE_TOLERANCE
    ranks = np.empty(score.size, dtype=np.int64)
    ranks[order] = np.concatenate(([1], 1 + np.cumsum(step)))
    return ranks


def _weighted_concordance(events: npt.NDArray[np.bool_], time: FloatArray, score: FloatArray,
                          weights: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per column of ``weights`` (n, R): the weighted sum of concordance over comparable pairs,
    and of the pairs.

    Patients are taken from the latest time down, and each one's weight is added to a Fenwick
    tree over score ranks (one column per resample): when a patient with the event is reached,
    the tree holds exactly the patients comparable with them (followed longer, or censored at the
    same time: scikit-survival's rule), so two prefix sums give those with a lower and an equal
    score. About ``n log n`` row operations, whatever the number of resamples.
    """
    ranks = _tie_ranks(score)
    size = int(ranks.max())
    tree = np.zeros((size + 1, weights.shape[1]))

    def add(position: int, value: FloatArray) -> None:
        while position <= size:
            tree[position] += value
            position += position & -position

    def below_or_at(position: int) -> FloatArray:
        total = np.zeros(weights.shape[1])
        while position > 0:
            total += tree[position]
            position -= position & -position
        return total

    inserted = np.zeros(weights.shape[1])
    gained = np.zeros(weights.shape[1])
    pairs = np.zeros(weights.shape[1])
    order = np.lexsort((events, -time))  # latest first; at one time, the censored first
    bounds = np.flatnonzero(np.diff(time[order])) + 1
    for group in np.split(order, bounds):
        for k in group[~events[group]]:
            add(int(ranks[k]), weights[k])
            inserted += weights[k]
        for k in group[events[group]]:
            lower, up_to = below_or_at(int(ranks[k]) - 1), below_or_at(int(ranks[k]))
            gained += weights[k] * (lower + 0.5 * (up_to - lower))
            pairs += weights[k] * inserted
        for k in group[events[group]]:
            add(int(ranks[k]), weights[k])
            inserted += weights[k]
    return gained, pairs


def weighted_concordance_difference(
    event: npt.ArrayLike,
    score: npt.ArrayLike,
    reference: npt.ArrayLike,
    weights: npt.ArrayLike,
    duration_days: npt.ArrayLike | None = None,
) -> tuple[FloatArray, FloatArray]:
    """For each row of ``weights`` (patients' multiplicities), the concordance of ``score`` minus
    that of ``reference`` times the number of comparable pairs, and that number.

    Concordance is AUROC when ``duration_days`` is None (``event`` the 0/1 outcome) and Harrell's
    C-index otherwise. A patient of weight k counts as k copies, so weights drawn as bootstrap
    counts give the metrics of bootstrap resamples, from pairs of the original patients.
    """
    events = _check_labels("weighted_concordance_difference", event)
    a, b = np.asarray(score, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n = events.size
    if a.shape != (n,) or b.shape != (n,) or w.shape[1] != n:
        raise ValueError(f"weighted_concordance_difference: scores of shape {a.shape} and {b.shape} and weights "
                         f"of shape {w.shape} for {n} patients")
    for name, values in (("score", a), ("reference", b)):
        if not np.isfinite(values).all():
            # A NaN would rank with the highest score, and the concordance be made up.
            raise ValueError(f"weighted_concordance_difference: {name} must be finite (found "
                             f"{values[~np.isfinite(values)][:3].tolist()})")
    # For AUROC a positive "happens before" every negative.
    time = (~events).astype(np.float64) if duration_days is None else np.asarray(duration_days, dtype=np.float64)
    gained, pairs = np.zeros(len(w)), np.zeros(len(w))
    # Resamples in chunks: the tree holds (distinct scores x resamples) numbers, kept near 64 MB.
    chunk = max(16, 8_000_000 // (n + 1))
    for start in range(0, len(w), chunk):
        rows = slice(start, start + chunk)
        columns = np.ascontiguousarray(w[rows].T)  # (n, resamples in the chunk)
        gained_a, pairs[rows] = _weighted_concordance(events, time, a, columns)
        gained_b, _ = _weighted_concordance(events, time, b, columns)
        gained[rows] = gained_a - gained_b
    return gained, pairs


def paired_concordance_difference(
    event: npt.ArrayLike,
    score: npt.ArrayLike,
    reference: npt.ArrayLike,
    duration_days: npt.ArrayLike | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    sample_weight: npt.ArrayLike | None = None,
) -> tuple[float, float, float]:
    """How much better ``score`` ranks the patients than ``reference``: the difference in AUROC
    (``duration_days`` None, ``event`` the 0/1 outcome) or in Harrell's C-index, with a paired
    percentile bootstrap interval.

    Both scores are judged on the same resampled patients, so the interval reflects the
    uncertainty of the *difference*, which is much narrower than either metric's own interval
    when the two models rank mostly alike. Each resample's concordance is a weighted sum over
    the original patients (:func:`weighted_concordance_difference`), about ``n log n`` operations
    on rows of ``n_resamples`` numbers: a fraction of a second for 3,000 patients. With
    ``sample_weight`` (censoring weights) each patient's resample count is multiplied by their
    weight, giving the difference in the weighted AUROC of :func:`auroc`.

    Returns
    -------
    (difference, low, high)
        The difference on the patients as given, and the ``level`` percentile interval of the
        resampled differences.
    """
    events = (_check_binary("paired_concordance_difference", event) if duration_days is None
              else _check_labels("paired_concordance_difference", event))
    n = events.size
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(n), *(np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_resamples))])
    weights *= _weights("paired_concordance_difference", sample_weight, n)
    gained, pairs = weighted_concordance_difference(events, score, reference, weights, duration_days)
    if pairs[0] == 0:
        raise ValueError("paired_concordance_difference: no comparable pair of patients (no event, or no one "
                         "followed after one)")
    # A resample without a comparable pair (no event drawn) has no concordance: it is left out.
    drawn = pairs[1:] > 0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(gained[1:][drawn] / pairs[1:][drawn], [tail, 1.0 - tail])
    return float(gained[0] / pairs[0]), float(low), float(high)


def auroc_interval(y: npt.ArrayLike, risk: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None,
                   n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """The (weighted) AUROC of :func:`auroc` with a percentile bootstrap interval: a subgroup's
    AUROC from a few dozen cases spans tenths (0.46 to 0.91 with 10 cases and 10 controls), which a
    bare figure hides. Computed as the paired difference against a constant score, whose AUROC is
    0.5 (:func:`paired_concordance_difference`).

    Returns
    -------
    (auroc, low, high)
    """
    n = np.asarray(y).size
    difference, low, high = paired_concordance_difference(y, risk, np.zeros(n), n_resamples=n_resamples, level=level,
                                                          seed=seed, sample_weight=sample_weight)
    return 0.5 + difference, 0.5 + low, 0.5 + high
