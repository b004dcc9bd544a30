"""Tests of scoring: every cohort patient gets a complete score, and mismatched models are refused."""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features.errors import TrainingDataError
from features.schemas import SCORES
from models.explain import ItemContribution
from models.scoring import RiskTiers, model_version, score_task, value_range, vocabulary_fingerprint
from models.task_model import ModelFolderError
from tests.models.conftest import TrainedTask


def test_every_cohort_patient_is_scored_with_tier_curve_effect_and_explanation(trained_task: TrainedTask) -> None:
    scores = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(0.05, 0.15))
    assert scores.schema.equals(SCORES)
    frame = pl.from_arrow(scores)
    assert frame.height == 800
    assert frame["risk"].is_between(0, 1).all()
    assert frame["risk_tier"].value_counts().sort("risk_tier").rows() == [("high", 40), ("low", 640), ("medium", 120)]
    assert frame.filter(pl.col("risk_tier") == "high")["risk"].min() >= frame.filter(
        pl.col("risk_tier") == "medium")["risk"].max()
    curves = np.array(frame["survival_curve"].to_list())
    assert (np.diff(curves, axis=1) <= 0).all() and ((curves >= 0) & (curves <= 1)).all()
    assert frame["treatment_effect"].null_count() == 0
    assert frame["top_items"].list.len().min() >= 1
    assert frame["previous_risk"].null_count() == 800


def test_a_patient_on_the_treatment_already_gets_no_treatment_effect(trained_task: TrainedTask,
                                                                     tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(trained_task.task_dir, inputs)
    labels = pl.read_parquet(inputs / "labels.parquet")
    labels.with_columns(prevalent_user=pl.col("subject_id").is_in([3, 5]), treated=pl.when(
        ~pl.col("subject_id").is_in([3, 5])).then(pl.col("treated"))).write_parquet(inputs / "labels.parquet")
    before = pl.from_arrow(score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                                      with_explanations=False))
    after = pl.from_arrow(score_task(trained_task.model_dir, inputs, "synthetic_1y", RiskTiers(),
                                     with_explanations=False))
    assert after.filter(pl.col("treatment_effect").is_null())["subject_id"].to_list() == [3, 5]
    assert_frame_equal(after.filter(~pl.col("subject_id").is_in([3, 5])),
                       before.filter(~pl.col("subject_id").is_in([3, 5])))


def test_previous_risk_is_carried_with_the_model_that_gave_it(trained_task: TrainedTask) -> None:
    this_model = model_version(trained_task.model_dir)
    # Patient 3's last risk came from the model deployed before: carried, with that model's version.
    # Patient 4's was at another prediction time (an index event moved): another question, not carried.
    when = pl.read_parquet(trained_task.task_dir / "event_tokens.parquet").sort("subject_id")["prediction_time"][0]
    previous = pl.DataFrame({"subject_id": [1, 2, 3, 4], "risk": [0.5, 0.25, 0.9, 0.7],
                             "prediction_time": [when, when, when, when - timedelta(days=400)],
                             "model_version": [this_model, this_model, "synthetic_1y-0123456789ab", this_model]})
    scores = pl.from_arrow(score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                                      previous, with_explanations=False))
    carried = scores.filter(pl.col("previous_risk").is_not_null()).sort("subject_id")
    assert carried.select("subject_id", "previous_risk", "previous_model_version").rows() == [
        (1, 0.5, this_model), (2, 0.25, this_model), (3, 0.9, "synthetic_1y-0123456789ab")]
    assert scores["previous_model_version"].null_count() == 800 - 3


def test_a_model_for_another_task_vocabulary_or_value_bins_is_refused(trained_task: TrainedTask,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="was trained for task 'synthetic_1y', not 'mace_1y'"):
        score_task(trained_task.model_dir, trained_task.task_dir, "mace_1y", RiskTiers())
    # The task file's horizon edited since training: a 1-year risk must not be published as a 2-year one.
    with pytest.raises(ModelFolderError, match=re.escape(
            f"model {trained_task.model_dir} predicts risk within 365 days, task 'synthetic_1y' asks within 730 "
            "(the task file was edited since training; train the model again)")):
        score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(), horizon_days=730)
    other_inputs = tmp_path / "inputs"
    shutil.copytree(trained_task.task_dir, other_inputs)
    trained_state = json.loads((trained_task.task_dir / "vocabulary.json").read_text())
    # Another token, other bin edges (the same value falls in another bin) or other settings: each
    # changes what the inputs mean to the model.
    changes = [("vocabulary", trained_state["vocabulary"] | {"CODE//99": 12}),
               ("bin_edges", trained_state["bin_edges"] | {"CODE//1": [120.0]}),
               ("value_bins", trained_state["value_bins"] + 1),
               ("max_events", trained_state["max_events"] - 1)]
    trained_with = vocabulary_fingerprint(trained_task.model_dir / "vocabulary.json")
    for key, value in changes:
        (other_inputs / "vocabulary.json").write_text(json.dumps(trained_state | {key: value}))
        inputs_with = vocabulary_fingerprint(other_inputs / "vocabulary.json")
        assert inputs_with != trained_with
        refused = (f"model {trained_task.model_dir} was trained with a different vocabulary or value bins than the "
                   f"inputs in {other_inputs} (tokenizer {trained_with}, inputs' tokenizer {inputs_with}: the "
                   "inputs were rebuilt since; train the model again)")
        with pytest.raises(ModelFolderError, match=re.escape(refused)):
            score_task(trained_task.model_dir, other_inputs, "synthetic_1y", RiskTiers())
    # The same state written in another key order and indentation is the same tokenizer.
    (other_inputs / "vocabulary.json").write_text(json.dumps(dict(reversed(trained_state.items()))))
    scores = score_task(trained_task.model_dir, other_inputs, "synthetic_1y", RiskTiers(), with_explanations=False)
    assert scores.num_rows == 800


def test_a_model_trained_for_another_outcome_horizon_or_treatment_is_refused(trained_task: TrainedTask) -> None:
    # The task file edited since training (another outcome, a treatment named): the model's risks
    # would be published under the new outcome's name and horizon.
    target = json.loads((trained_task.model_dir / "cohortcast_model.json").read_text())["prediction_target"]
    assert target == {"outcome_codes": [], "outcome_death": True, "horizon_days": 365.0,
                      "treatment": None}
    scores = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                        with_explanations=False, target=target)
    assert scores.num_rows == 800
    edits = [("outcome_codes", ["SNOMED//230690007"]), ("outcome_death", False),
             ("horizon_days", 730.0),
             ("treatment", {"codes": ["RXNORM//32968"], "window_days": [0.0, 30.0], "washout_days": 365.0})]
    for key, value in edits:
        refused = (f"model {trained_task.model_dir} was trained with {key} {json.dumps(target[key])}, task "
                   f"'synthetic_1y' now has {json.dumps(value)} (the task file was edited since training; train "
                   "the model again)")
        with pytest.raises(ModelFolderError, match=re.escape(refused)):
            score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                       with_explanations=False, target=target | {key: value})


def test_a_task_without_cohort_patients_is_refused_in_one_line(trained_task: TrainedTask, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(trained_task.task_dir, inputs)
    pl.read_parquet(inputs / "event_tokens.parquet").clear().write_parquet(inputs / "event_tokens.parquet")
    with pytest.raises(TrainingDataError, match=re.escape(
            f"task 'synthetic_1y': {inputs / 'event_tokens.parquet'} holds no cohort patient (expected at least one")):
        score_task(trained_task.model_dir, inputs, "synthetic_1y", RiskTiers())


def test_the_model_version_changes_with_the_calibration(trained_task: TrainedTask, tmp_path: Path) -> None:
    # Calibrated again on other tuning labels, the same weights give other risks: a change of risk
    # from one version to the next must not read as the patient's.
    recalibrated = tmp_path / "model"
    shutil.copytree(trained_task.model_dir, recalibrated)
    calibration = json.loads((recalibrated / "calibration.json").read_text())
    (recalibrated / "calibration.json").write_text(json.dumps(calibration | {"slope": calibration["slope"] + 0.5}))
    assert model_version(recalibrated) != model_version(trained_task.model_dir)
    assert model_version(recalibrated).startswith("synthetic_1y-")


def test_tiers_must_be_shares() -> None:
    with pytest.raises(ValueError, match=r"high_share \(0.9\) and medium_share \(0.2\) must be shares"):
        RiskTiers(0.9, 0.2)
    assert RiskTiers(0.1, 0).assign(np.linspace(1, 0, 10)).count("medium") == 0


def test_a_nan_risk_is_refused_not_ranked_into_the_high_tier() -> None:
    # Sorted first, a NaN would take the high tier's one place and leave no one high.
    risks = np.array([0.9, 0.8, 0.7, np.nan] + [0.1] * 16)
    with pytest.raises(ValueError, match=r"risk tiers: 1 of 20 risks are NaN"):
        RiskTiers(0.05, 0.15).assign(risks)


@pytest.mark.parametrize(("high_share", "medium_share", "high", "medium"),
                         [(0.07, 0.14, 7, 14), (0.14, 0.1, 14, 10), (0.28, 0.02, 28, 2), (0.1, 0.2, 10, 20),
                          (0.05, 0.15, 5, 15), (0.001, 0.0, 1, 0)])
def test_tiers_take_their_share_of_the_list_exactly(high_share: float, medium_share: float, high: int,
                                                    medium: int) -> None:
    tiers = RiskTiers(high_share, medium_share).assign(np.linspace(0.9, 0.1, 100))
    assert (tiers.count("high"), tiers.count("medium"), tiers.count("low")) == (high, medium, 100 - high - medium)
    assert tiers[:high] == ["high"] * high and tiers[high:high + medium] == ["medium"] * medium


def test_patients_tied_at_a_tiers_cut_share_its_tier_whatever_their_row_order() -> None:
    # Top 2 of 10 are high and the next 2 medium; the two risks of 0.5 tie across the first cut, the
    # three of 0.3 across the second: each tier takes one patient more than its share.
    risk = np.array([0.3, 0.5, 0.9, 0.1, 0.5, 0.3, 0.2, 0.05, 0.3, 0.1])
    assert RiskTiers(0.2, 0.2).assign(risk) == ["medium", "high", "high", "low", "high", "medium", "low", "low",
                                               "medium", "low"]
    assert RiskTiers(0.2, 0.2).assign(risk[::-1]) == RiskTiers(0.2, 0.2).assign(risk)[::-1]
    assert RiskTiers(0.1, 0.2).assign(np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1])) == \
        ["high"] + ["medium"] * 4 + ["low"] * 5
    # A tie at the high cut that reaches past the medium cut leaves medium empty rather than split it.
    assert RiskTiers(0.4, 0.2).assign(np.array([0.9, 0.5, 0.5, 0.5, 0.1])) == ["high"] * 4 + ["low"]
    assert RiskTiers().assign(np.array([])) == []


def test_bf16_scoring_keeps_risks_apart(trained_task: TrainedTask) -> None:
    # bfloat16 heads had rounded the risks onto a few hundred values, and ties at a tier's cut fell
    # to row order; the encoder runs in bfloat16, the heads in float32.
    scores = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                        with_explanations=False, bf16=True)
    risk = scores.column("risk").to_numpy()
    assert len(np.unique(risk)) == 800
    float32 = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                         with_explanations=False, bf16=False).column("risk").to_numpy()
    assert np.abs(risk - float32).max() < 0.01


def test_value_ranges_name_the_bins_the_tokenizer_gives() -> None:
    # An explanation's "Systolic 140 to 160" must be the bin its readings fell in: a value on an
    # edge belongs to the bin above it, and a token without edges (or an event without a value) has none.
    from features.tokenize import EventTokenizer

    tokenizer = EventTokenizer()
    tokenizer.bin_edges_ = {"LOINC//x": [0.5, 1.5]}
    seen = pl.DataFrame({"token": ["LOINC//x"] * 6 + ["LOINC//y"],
                         "numeric_value": [0.2, 0.5, 1.0, 1.5, 3.0, None, 7.0]})
    bins = tokenizer._bins(seen)
    assert bins.tolist() == [1, 2, 2, 3, 3, 0, 0]
    ranges = [value_range(tokenizer.bin_edges_.get(token, []), int(b))
              for token, b in zip(seen["token"], bins, strict=True)]
    assert ranges == ["< 0.5", "0.5 to 1.5", "0.5 to 1.5", ">= 1.5", ">= 1.5", None, None]
    assert value_range([120.0, 140.0, 160.0], 3) == "140 to 160"
    assert value_range([0.000123456, 2.5e6], 2) == "0.0001235 to 2500000"
    assert value_range([76.10644, 83.24219], 2) == "76.11 to 83.24"
    # Edges halfway between charted integers (an NT-proBNP in pg/mL, platelets per μL) keep their
    # half: "< 1250" would say a bin holding 1250 excludes it, and "1.2e+04" is no way to show a count.
    edges = [1250.5, 12000.5, 250000.5]
    tokenizer.bin_edges_ = {"LOINC//z": edges}
    bins = tokenizer._bins(pl.DataFrame({"token": ["LOINC//z"] * 2, "numeric_value": [1250.0, 250000.0]})).tolist()
    assert [value_range(edges, b) for b in bins] == ["< 1250.5", "12000.5 to 250000.5"]


def test_a_published_value_range_names_its_unit() -> None:
    # "Body weight < 75" cannot be read: in kg or in pounds? The unit is the token's main unit, or
    # the one a value in another unit carries in its token; unitless values show none.
    from models.scoring import _published_item

    # The unit is shown as people read it (UCUM's print symbols), not as UCUM codes it.
    edges = {"LOINC//29463-7": [75.0], "LOINC//29463-7//[lb_av]": [165.0], "GENE//LPA": [0.5],
             "LOINC//8480-6": [140.0], "LOINC//33914-3": [60.0]}
    units = {"LOINC//29463-7": "kg", "GENE//LPA": "{no unit}", "LOINC//8480-6": "mm[Hg]",
             "LOINC//33914-3": "mL/min/{1.73_m2}"}
    items = [ItemContribution("ehr", "LOINC//29463-7", 0.02, value_bin=1, readings=2),
             ItemContribution("ehr", "LOINC//29463-7//[lb_av]", 0.01, value_bin=2, readings=1),
             ItemContribution("genomics", "GENE//LPA", 0.01, value_bin=2, readings=1),
             ItemContribution("ehr", "SNOMED//44054006", 0.01),
             ItemContribution("ehr", "LOINC//8480-6", 0.01, value_bin=2, readings=1),
             ItemContribution("ehr", "LOINC//33914-3", 0.01, value_bin=1, readings=1)]
    assert [_published_item(item, edges, units)["value_range"] for item in items] == [
        "< 75 kg", ">= 165 lb", ">= 0.5", None, ">= 140 mm Hg", "< 60 mL/min/1.73 m2"]
