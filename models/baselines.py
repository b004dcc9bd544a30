"""Baseline models on the tabular aggregates, trained on the same splits as the fusion model.

Stage: model. In: the task's ``tabular_features`` as a matrix, with labels of the train (and tuning)
split; for the late-fusion baseline also each patient's note and imaging embeddings. Out: fitted
scikit-learn / LightGBM / scikit-survival estimators:

* risk: L2 logistic regression and LightGBM (early-stopped on the tuning split), and a late-fusion
  logistic regression on the aggregates plus each patient's mean note and mean imaging embedding
  (its penalty chosen on the tuning split): the simplest use of every modality, the bar that says
  whether the transformer earns its complexity;
* progression: Cox proportional hazards (ridge-penalised) and a random survival forest;
* treatment effect: a T-learner, one LightGBM per arm, effect = risk if treated - risk if not.

Missing values (a lab never measured) are median-imputed for the linear and Cox models; LightGBM
handles them natively. The baselines are the bar the fusion model has to clear.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import polars as pl
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.ensemble import RandomSurvivalForest
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from models.metrics import harrell_c_index

KEY_COLUMNS = ("subject_id", "prediction_time", "last_input_time")
Matrix = npt.NDArray[np.float64]


def feature_matrix(tabular: pl.DataFrame, columns: list[str] | None = None) -> tuple[Matrix, list[str]]:
    """Return the tabular features as a float matrix (NaN = missing) and its column names.

    Pass the train split's ``columns`` when building the tuning and held-out matrices so that all
    three share one column order.
    """
    names = columns if columns is not None else [c for c in tabular.columns if c not in KEY_COLUMNS]
    missing = [c for c in names if c not in tabular.columns]
    if missing:
        raise ValueError(f"tabular features: columns {missing[:3]} of the train split are missing")
    matrix = tabular.select([pl.col(c).cast(pl.Float64) for c in names]).to_numpy()
    return np.asarray(matrix, dtype=np.float64), names


def _lightgbm(seed: int) -> lgb.LGBMClassifier:
    return lgb.LGBMClassifier(
        n_estimators=2000, learning_rate=0.03, num_leaves=15, min_child_samples=20, subsample=0.8,
        subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0, random_state=seed, n_jobs=2, verbose=-1,
    )


def fit_logistic(x: Matrix, y: npt.ArrayLike, inverse_penalty: float = 0.1,
                 sample_weight: npt.ArrayLike | None = None) -> Pipeline:
    """L2-penalised logistic regression on standardised, median-imputed features.

    ``sample_weight``: the risk labels' censoring weights (``models.censoring``), as the fusion
    model's calibration uses them.
    """
    model = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
        LogisticRegression(C=inverse_penalty, max_iter=5000),
    )
    return model.fit(x, np.asarray(y, dtype=int), logisticregression__sample_weight=sample_weight)


def fit_ridge(x: Matrix, y: npt.ArrayLike, alphas: tuple[float, ...] = tuple(np.logspace(-1, 4, 11))) -> Pipeline:
    """Ridge regression on standardised, median-imputed features, its penalty by leave-one-out error."""
    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                          RidgeCV(alphas=alphas))
    return model.fit(x, np.asarray(y, dtype=np.float64))


def fit_logistic_tuned(x: Matrix, y: npt.ArrayLike, x_tuning: Matrix, y_tuning: npt.ArrayLike,
                       inverse_penalties: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1),
                       sample_weight: npt.ArrayLike | None = None,
                       tuning_weight: npt.ArrayLike | None = None) -> Pipeline:
    """:func:`fit_logistic` with the penalty that gives the lowest (weighted) log loss on the tuning split.

    Hundreds of embedding dimensions beside a few thousand patients need a stronger penalty than
    the aggregates alone; the tuning split picks it, as it early-stops LightGBM.
    """
    labels = np.asarray(y_tuning, dtype=int)
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"logistic regression: the tuning split has {len(labels)} outcomes of one class "
                         "(need both to choose the penalty)")
    fits = [fit_logistic(x, y, c, sample_weight) for c in inverse_penalties]
    losses = [log_loss(labels, fit.predict_proba(x_tuning)[:, 1], labels=[0, 1], sample_weight=tuning_weight)
              for fit in fits]
    return fits[int(np.argmin(losses))]


def mean_embeddings(subject_ids: npt.ArrayLike, embeddings: pl.DataFrame | None, dim: int) -> Matrix:
    """Each patient's mean embedding and number of embeddings, one row per id of ``subject_ids``.

    ``embeddings`` has ``subject_id`` and ``embedding`` (a list of ``dim`` floats) columns; a
    patient without any gets zeros and a count of 0. Shape: (len(subject_ids), dim + 1).
    """
    ids = np.asarray(subject_ids)
    out = np.zeros((len(ids), dim + 1))
    if embeddings is None or not embeddings.height:
        return out
    rows = pl.DataFrame({"subject_id": ids, "__row": np.arange(len(ids), dtype=np.int64)})
    found = embeddings.select("subject_id", "embedding").join(rows, on="subject_id", how="inner")
    lengths = found["embedding"].list.len().to_numpy()
    if found.height and (lengths.min() != dim or lengths.max() != dim):
        raise ValueError(f"mean_embeddings: embeddings of length {lengths.min()}..{lengths.max()} "
                         f"(expected {dim})")
    at = found["__row"].to_numpy()
    vectors = found["embedding"].list.to_array(dim).to_numpy().astype(np.float64)  # (n_embeddings, dim)
    np.add.at(out[:, :dim], at, vectors)
    counts = np.bincount(at, minlength=len(ids)).astype(np.float64)
    out[:, :dim] /= np.maximum(counts, 1.0)[:, None]
    out[:, dim] = counts
    return out


def fit_lightgbm(x: Matrix, y: npt.ArrayLike, x_tuning: Matrix, y_tuning: npt.ArrayLike,
                 seed: int = 0, sample_weight: npt.ArrayLike | None = None,
                 tuning_weight: npt.ArrayLike | None = None) -> lgb.LGBMClassifier:
    """Gradient-boosted trees, stopped when the (weighted) tuning log-loss has not improved for 50 rounds."""
    model = _lightgbm(seed)
    model.fit(
        x, np.asarray(y, dtype=int), sample_weight=sample_weight, eval_X=x_tuning,
        eval_y=np.asarray(y_tuning, dtype=int),
        eval_sample_weight=None if tuning_weight is None else [np.asarray(tuning_weight, dtype=np.float64)],
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    return model


def fit_cox(x: Matrix, event: npt.ArrayLike, duration_days: npt.ArrayLike, alpha: float = 10.0) -> Pipeline:
    """Cox proportional hazards with a ridge penalty ``alpha`` (many correlated aggregates)."""
    model = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
        CoxPHSurvivalAnalysis(alpha=alpha),
    )
    return model.fit(x, Surv.from_arrays(np.asarray(event, dtype=bool), np.asarray(duration_days, dtype=float)))


def fit_cox_tuned(x: Matrix, event: npt.ArrayLike, duration_days: npt.ArrayLike, x_tuning: Matrix,
                  event_tuning: npt.ArrayLike, duration_tuning: npt.ArrayLike,
                  alphas: tuple[float, ...] = (10.0, 100.0, 1000.0)) -> Pipeline:
    """:func:`fit_cox` with the ridge penalty that ranks the tuning split best (Harrell's C).

    Hundreds of embedding dimensions beside the aggregates need a stronger penalty than the
    aggregates alone; the tuning split picks it, as it picks the logistic regression's.
    """
    fits = [fit_cox(x, event, duration_days, alpha) for alpha in alphas]
    tuning_event, tuning_duration = np.asarray(event_tuning, dtype=bool), np.asarray(duration_tuning, dtype=float)
    if not tuning_event.any():
        raise ValueError(f"Cox model: the tuning split has no event among {len(tuning_event)} patients (need one "
                         "at least to choose the penalty)")
    scores = [harrell_c_index(tuning_event, tuning_duration, np.asarray(fit.predict(x_tuning), dtype=np.float64))
              for fit in fits]
    return fits[int(np.argmax(scores))]


def fit_random_survival_forest(x: Matrix, event: npt.ArrayLike, duration_days: npt.ArrayLike,
                               seed: int = 0) -> Pipeline:
    """Random survival forest (scikit-survival), median-imputed.

    Only its risk score (``predict``) is used, so the forest keeps that per leaf
    (``low_memory``): keeping each leaf's whole cumulative hazard over every distinct follow-up
    time took more than 16 GB on 14,000 patients.
    """
    model = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        RandomSurvivalForest(n_estimators=100, min_samples_leaf=15, max_features="sqrt", n_jobs=2,
                             random_state=seed, low_memory=True),
    )
    return model.fit(x, Surv.from_arrays(np.asarray(event, dtype=bool), np.asarray(duration_days, dtype=float)))


@dataclass
class TLearner:
    """One outcome model per treatment arm; the effect is the difference of their risks."""

    untreated: lgb.LGBMClassifier
    treated: lgb.LGBMClassifier

    def effect(self, x: Matrix) -> Matrix:
        treated = np.asarray(self.treated.predict_proba(x))
        untreated = np.asarray(self.untreated.predict_proba(x))
        return np.asarray(treated[:, 1] - untreated[:, 1])


def fit_t_learner(x: Matrix, y: npt.ArrayLike, treated: npt.ArrayLike, x_tuning: Matrix, y_tuning: npt.ArrayLike,
                  treated_tuning: npt.ArrayLike, seed: int = 0, sample_weight: npt.ArrayLike | None = None,
                  tuning_weight: npt.ArrayLike | None = None) -> TLearner:
    """Fit the T-learner; each arm's model early-stops on the same arm of the tuning split (weights:
    the risk labels' censoring weights, or none). A patient whose arm is NaN (a prevalent user, or
    one not observed past the grace period: ``features.labels``) is in neither arm."""
    # As floats, not bool: NaN would become True and put patients without an arm in the treated arm.
    a = np.asarray(treated, dtype=np.float64)
    a_tuning = np.asarray(treated_tuning, dtype=np.float64)
    outcome, outcome_tuning = np.asarray(y, dtype=int), np.asarray(y_tuning, dtype=int)
    w = np.ones(len(a)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w_tuning = np.ones(len(a_tuning)) if tuning_weight is None else np.asarray(tuning_weight, dtype=np.float64)
    arms = []
    for arm in (False, True):
        if len(set(outcome[a == arm].tolist())) < 2:
            raise ValueError(f"T-learner: the {'treated' if arm else 'untreated'} arm of the train split "
                             "has only one outcome value")
        arms.append(fit_lightgbm(x[a == arm], outcome[a == arm], x_tuning[a_tuning == arm],
                                 outcome_tuning[a_tuning == arm], seed, w[a == arm], w_tuning[a_tuning == arm]))
    return TLearner(untreated=arms[0], treated=arms[1])
