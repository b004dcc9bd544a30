"""Tests that the simulator's truth is consistent with the outcomes it realises."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from features.simulate import true_survival
from features.simulate.state import (
    SEVERITY_TERMS,
    draw_hidden_state,
    risk_given_estimated_severities,
    risk_given_observed_modalities,
    truth_table,
)


@pytest.fixture(scope="module")
def truth() -> pa.Table:
    state = draw_hidden_state(
        n_patients=20_000,
        seed=5,
        index_start=datetime(2022, 1, 1),
        index_end=datetime(2024, 6, 30),
        export_time=datetime(2025, 12, 31),
        genomics_share=0.4,
        imaging_share=0.45,
        notes_share=0.9,
        notes_table_share=0.35,
        bundle_share=0.1,
    )
    # Four in five genotyped patients have an expression panel, as in the simulated hospital.
    has_expression = state.has_genomics & (np.random.default_rng(1).random(len(state.patient_id)) < 0.8)
    return truth_table(state, horizon_days=365, has_expression=has_expression)


def test_true_risk_ranks_realised_outcomes_well(truth: pa.Table) -> None:
    t = truth.to_pandas()
    labelled = t.dropna(subset=["event_within_horizon"])
    auroc = roc_auc_score(labelled["event_within_horizon"].astype(bool), labelled["true_risk"])
    assert auroc > 0.78


def test_true_risk_matches_the_realised_event_rate(truth: pa.Table) -> None:
    t = truth.to_pandas()
    # Followed beyond the horizon: the label is then exactly "event time <= horizon".
    followed = t[t.censoring_time_days >= 365]
    realised = followed.event_within_horizon.astype(bool).mean()
    expected = followed.true_risk.mean()
    standard_error = np.sqrt(expected * (1 - expected) / len(followed))
    assert abs(realised - expected) < 3 * standard_error
    assert 0.10 < expected < 0.25


def test_censored_before_horizon_without_event_has_unknown_label(truth: pa.Table) -> None:
    t = truth.to_pandas()
    unknown = t.event_within_horizon.isna()
    expected_unknown = ~t.event_observed & (t.observed_time_days < 365)
    assert (unknown == expected_unknown).all()
    assert 0 < unknown.sum() < len(t) // 4
    positives = t.event_within_horizon.fillna(False).astype(bool)
    assert (positives == (t.event_observed & (t.observed_time_days <= 365))).all()


def test_treatment_effect_depends_on_cyp2c19_genotype(truth: pa.Table) -> None:
    t = truth.to_pandas()
    effect_by_alleles = t.groupby("cyp2c19_lof_alleles").true_treatment_effect.mean()
    # Clopidogrel is a pro-drug activated by CYP2C19: poor metabolisers lose the benefit.
    assert effect_by_alleles[0] < -0.03
    assert effect_by_alleles[0] < effect_by_alleles[1] < effect_by_alleles[2]
    assert effect_by_alleles[2] > 0
    assert np.allclose(t.true_treatment_effect, t.true_risk_treated - t.true_risk_untreated)


def test_treatment_is_confounded_but_every_patient_could_get_either_arm(truth: pa.Table) -> None:
    t = truth.to_pandas()
    assert t.propensity.between(0.05, 0.95).all()
    assert t.groupby("treated").ehr_severity.mean()[True] > t.groupby("treated").ehr_severity.mean()[False] + 0.5


def test_true_survival_is_a_falling_curve_in_the_unit_interval(truth: pa.Table) -> None:
    times = np.array([0.0, 30.0, 180.0, 365.0, 730.0])
    curves = true_survival(truth.column("log_hazard_ratio").to_numpy(), times)
    assert curves.shape == (truth.num_rows, 5)
    assert np.all(curves[:, 0] == 1.0)
    assert np.all(np.diff(curves, axis=1) <= 0)
    assert np.all((curves >= 0) & (curves <= 1))
    assert np.allclose(1 - curves[:, 3], truth.column("true_risk").to_numpy())


def _arm_averaged_true_risk(t: pa.Table) -> np.ndarray:
    propensity = t.column("propensity").to_numpy()
    return np.asarray(propensity * t.column("true_risk_treated").to_numpy()
                      + (1 - propensity) * t.column("true_risk_untreated").to_numpy())


def test_risk_given_observed_modalities_equals_the_truth_when_nothing_is_missing(truth: pa.Table) -> None:
    complete = truth.filter(pa.compute.and_(pa.compute.and_(truth.column("has_notes"), truth.column("has_expression")),
                                            truth.column("has_imaging")))
    assert complete.num_rows > 1000
    np.testing.assert_allclose(risk_given_observed_modalities(complete, 365), _arm_averaged_true_risk(complete),
                               rtol=1e-9)


def test_risk_given_observed_modalities_averages_over_what_is_missing(truth: pa.Table) -> None:
    # Law of total expectation: averaging out the missing terms keeps the mean risk of the group.
    no_genomics = truth.filter(pa.compute.invert(truth.column("has_genomics")))
    risk = risk_given_observed_modalities(no_genomics, 365, n_draws=2000)
    assert risk.mean() == pytest.approx(_arm_averaged_true_risk(no_genomics).mean(), abs=0.003)
    # ... and it ranks outcomes less well than the full truth, which knows the missing terms.
    labelled = ~np.isnan(truth.column("event_within_horizon").to_numpy(zero_copy_only=False).astype(float))
    outcome = truth.column("event_within_horizon").to_numpy(zero_copy_only=False)[labelled].astype(bool)
    observed = roc_auc_score(outcome, risk_given_observed_modalities(truth, 365)[labelled])
    full = roc_auc_score(outcome, _arm_averaged_true_risk(truth)[labelled])
    assert 0.6 < observed < full - 0.02


def test_the_genomic_risk_of_a_patient_genotyped_without_an_expression_panel_is_averaged_out(truth: pa.Table) -> None:
    # The genomic risk is written into the expression panel alone: variant calls without a panel
    # say nothing of it, so the reference must not depend on its hidden value for such a patient.
    without_panel = truth.filter(pa.compute.and_(truth.column("has_genomics"),
                                                 pa.compute.invert(truth.column("has_expression"))))
    assert without_panel.num_rows > 500
    shifted = without_panel.set_column(without_panel.schema.get_field_index("genomic_risk"), "genomic_risk",
                                       pa.array(np.full(without_panel.num_rows, 3.0)))
    np.testing.assert_array_equal(risk_given_observed_modalities(shifted, 365),
                                  risk_given_observed_modalities(without_panel, 365))
    with pytest.raises(ValueError, match=r"lacks column\(s\) has_expression \(written by an older simulator"):
        risk_given_observed_modalities(truth.drop_columns(["has_expression"]), 365)


def test_risk_given_estimated_severities_with_exact_estimates_is_the_observed_modalities_risk(truth: pa.Table) -> None:
    exact = {name: (truth.column(name).to_numpy(), np.zeros(truth.num_rows)) for name in SEVERITY_TERMS}
    np.testing.assert_array_equal(risk_given_estimated_severities(truth, exact, 365),
                                  risk_given_observed_modalities(truth, 365))


def test_risk_given_estimated_severities_averages_over_the_estimates_uncertainty(truth: pa.Table) -> None:
    # Each term but the EHR's (which the propensity that averages the arms depends on) read with noise of
    # variance 1 and shrunk as a regression would: E[s | s + n] = (s + n) / 2, residual variance 1/2.
    # The mean risk stays the truth's; the ranking falls below the exact terms'.
    rng = np.random.default_rng(3)
    noisy = {name: ((truth.column(name).to_numpy() + rng.standard_normal(truth.num_rows)) / 2,
                    np.full(truth.num_rows, np.sqrt(0.5))) for name in SEVERITY_TERMS}
    noisy["ehr_severity"] = (truth.column("ehr_severity").to_numpy(), np.zeros(truth.num_rows))
    risk = risk_given_estimated_severities(truth, noisy, 365, n_draws=2000)
    assert risk.mean() == pytest.approx(_arm_averaged_true_risk(truth).mean(), abs=0.003)
    labelled = ~np.isnan(truth.column("event_within_horizon").to_numpy(zero_copy_only=False).astype(float))
    outcome = truth.column("event_within_horizon").to_numpy(zero_copy_only=False)[labelled].astype(bool)
    estimated = roc_auc_score(outcome, risk[labelled])
    observed = roc_auc_score(outcome, risk_given_observed_modalities(truth, 365)[labelled])
    assert 0.55 < estimated < observed - 0.02


def test_risk_given_estimated_severities_names_a_missing_term(truth: pa.Table) -> None:
    partial = {"ehr_severity": (np.zeros(truth.num_rows), np.ones(truth.num_rows))}
    with pytest.raises(ValueError, match=r"no estimate of \['note_severity', 'genomic_risk', 'imaging_severity'\]"):
        risk_given_estimated_severities(truth, partial, 365)
