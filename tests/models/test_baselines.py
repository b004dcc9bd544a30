"""Tests of the baseline models on scikit-survival's bundled WHAS500 data and a planted signal."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sksurv.datasets import load_whas500

from models.baselines import (
    feature_matrix,
    fit_cox,
    fit_cox_tuned,
    fit_lightgbm,
    fit_logistic,
    fit_logistic_tuned,
    fit_random_survival_forest,
    fit_t_learner,
    mean_embeddings,
)
from models.metrics import auroc, harrell_c_index


@pytest.fixture(scope="module")
def whas500() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_whas500()
    numeric = x.select_dtypes("number").to_numpy(dtype=float)
    return numeric, y["fstat"], y["lenfol"]


def test_survival_baselines_rank_whas500_patients(whas500: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    x, event, duration = whas500
    train, test = slice(0, 350), slice(350, None)
    cox = fit_cox(x[train], event[train], duration[train])
    forest = fit_random_survival_forest(x[train], event[train], duration[train])
    assert harrell_c_index(event[test], duration[test], cox.predict(x[test])) > 0.7
    assert harrell_c_index(event[test], duration[test], forest.predict(x[test])) > 0.7


def test_the_tuned_cox_model_takes_the_penalty_that_ranks_the_tuning_split_best(
    whas500: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    # WHAS500's covariates beside 200 columns of noise: a light penalty fits the noise.
    x, event, duration = whas500
    noisy = np.hstack([x, np.random.default_rng(0).normal(size=(len(x), 200))])
    train, tuning = slice(0, 300), slice(300, 400)
    alphas = (10.0, 1000.0)
    tuned = fit_cox_tuned(noisy[train], event[train], duration[train], noisy[tuning], event[tuning],
                          duration[tuning], alphas)
    c = [harrell_c_index(event[tuning], duration[tuning], fit_cox(noisy[train], event[train], duration[train],
                                                                   alpha).predict(noisy[tuning])) for alpha in alphas]
    assert tuned[-1].alpha == alphas[int(np.argmax(c))]
    with pytest.raises(ValueError, match=r"the tuning split has no event among 100 patients"):
        fit_cox_tuned(noisy[train], event[train], duration[train], noisy[tuning], np.zeros(100, dtype=bool),
                      duration[tuning], alphas)


def test_feature_matrix_keeps_the_train_column_order_and_missing_values() -> None:
    train = pl.DataFrame({"subject_id": [1, 2], "age_years": [50.0, 60.0], "last__LOINC//2160-0": [1.1, None]})
    held_out = pl.DataFrame({"last__LOINC//2160-0": [0.9], "age_years": [70.0], "subject_id": [3]})
    x, names = feature_matrix(train)
    assert names == ["age_years", "last__LOINC//2160-0"]
    assert np.isnan(x[1, 1])
    x_held_out, _ = feature_matrix(held_out, names)
    assert x_held_out.tolist() == [[70.0, 0.9]]
    expected = r"columns \['age_years', 'last__LOINC//2160-0'\] of the train split are missing"
    with pytest.raises(ValueError, match=expected):
        feature_matrix(pl.DataFrame({"subject_id": [4]}), names)


def test_risk_and_treatment_baselines_find_a_planted_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 5))
    treated = rng.random(4000) < 0.5
    # Treatment helps only where feature 1 is negative.
    logit = -1.0 + 1.5 * x[:, 0] + treated * np.where(x[:, 1] < 0, -1.5, 0.0)
    y = rng.random(4000) < 1 / (1 + np.exp(-logit))
    fit, tune, test = slice(0, 2500), slice(2500, 3200), slice(3200, None)
    logistic = fit_logistic(x[fit], y[fit])
    boosted = fit_lightgbm(x[fit], y[fit], x[tune], y[tune])
    assert auroc(y[test], logistic.predict_proba(x[test])[:, 1]) > 0.75
    assert auroc(y[test], boosted.predict_proba(x[test])[:, 1]) > 0.75
    learner = fit_t_learner(x[fit], y[fit], treated[fit], x[tune], y[tune], treated[tune])
    effect = learner.effect(x[test])
    assert effect[x[test, 1] < -0.5].mean() < effect[x[test, 1] > 0.5].mean() - 0.1


def test_mean_embeddings_average_each_patients_vectors_and_count_them() -> None:
    embeddings = pl.DataFrame(
        {"subject_id": [7, 3, 7, 9], "embedding": [[1.0, 2.0], [5.0, 5.0], [3.0, 4.0], [0.5, 0.5]]}
    )
    means = mean_embeddings(np.array([3, 7, 8]), embeddings, dim=2)
    # Patient 9 is not asked for; patient 8 has no embedding.
    assert means.tolist() == [[5.0, 5.0, 1.0], [2.0, 3.0, 2.0], [0.0, 0.0, 0.0]]
    assert mean_embeddings(np.array([3]), None, dim=2).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"embeddings of length 2\.\.2 \(expected 3\)"):
        mean_embeddings(np.array([3]), embeddings, dim=3)


def test_tuned_logistic_regression_penalises_many_noise_features_more() -> None:
    rng = np.random.default_rng(1)
    # One informative feature among 300 of noise, 400 training patients: the weak penalty over-fits.
    x = rng.normal(size=(1400, 301))
    y = rng.random(1400) < 1 / (1 + np.exp(-1.5 * x[:, 0]))
    fit, tune, test = slice(0, 400), slice(400, 900), slice(900, None)
    tuned = fit_logistic_tuned(x[fit], y[fit], x[tune], y[tune])
    chosen = tuned[-1].C
    assert chosen < 0.1
    assert auroc(y[test], tuned.predict_proba(x[test])[:, 1]) > auroc(
        y[test], fit_logistic(x[fit], y[fit], 0.1).predict_proba(x[test])[:, 1]
    )
    with pytest.raises(ValueError, match="tuning split has 500 outcomes of one class"):
        fit_logistic_tuned(x[fit], y[fit], x[tune], np.zeros(500, dtype=bool))
