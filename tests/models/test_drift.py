"""Tests of the population stability index and of the references (risks, inputs) saved with a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.tabular import aggregate_before, select_tabular_codes
from models.drift import (
    INPUT_REFERENCE_FILE,
    PSI_ALARM,
    PSI_WARN,
    REFERENCE_FILE,
    input_drift,
    input_reference,
    load_input_reference,
    load_reference,
    population_stability_index,
    reference_codes,
    save_reference,
)
from models.scoring import RiskTiers, score_task
from tests.features.task_fixtures import T0, day, events_frame
from tests.models.conftest import TrainedTask


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20_000)
    assert population_stability_index(reference, rng.normal(size=20_000)) < 0.01
    assert PSI_WARN < population_stability_index(reference, rng.normal(0.4, 1, 20_000)) < PSI_ALARM
    assert population_stability_index(reference, rng.normal(1.5, 1, 20_000)) > PSI_ALARM


def test_psi_refuses_empty_samples() -> None:
    with pytest.raises(ValueError, match=r"needs two non-empty samples \(got 3 and 0\)"):
        population_stability_index([1, 2, 3], [])


def test_a_model_folder_saves_its_training_cohorts_risks_as_the_reference(trained_task: TrainedTask) -> None:
    saved = pl.read_parquet(trained_task.model_dir / REFERENCE_FILE)
    splits = pl.read_parquet(trained_task.task_dir / "splits.parquet")
    assert dict(saved["split"].value_counts().iter_rows()) == dict(splits["split"].value_counts().iter_rows())
    # Re-scoring the cohort the model was trained on, in the same precision, is no drift at all.
    today = score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers(),
                       with_explanations=False, bf16=False).column("risk").to_numpy()
    reference = load_reference(trained_task.model_dir)
    assert reference is not None and reference.size == today.size == 800
    assert population_stability_index(reference, today) == 0.0


def test_a_model_folder_without_a_reference_has_none(tmp_path: Path) -> None:
    assert load_reference(tmp_path) is None
    save_reference(tmp_path / REFERENCE_FILE, {"train": np.array([0.1, 0.2]), "held_out": np.array([0.3])})
    assert load_reference(tmp_path).tolist() == [0.1, 0.2, 0.3]  # type: ignore[union-attr]
    assert pl.read_parquet(tmp_path / REFERENCE_FILE)["split"].to_list() == ["train", "train", "held_out"]


def _inputs(age: list[float], count: list[int | None]) -> pl.DataFrame:
    return pl.DataFrame({"subject_id": list(range(len(age))), "age_years": age, "count__LOINC//1": count})


def test_input_reference_bins_each_input_and_its_missing_share() -> None:
    reference = input_reference(_inputs([float(a) for a in range(10)], [0] * 5 + [2] * 4 + [None]))
    expected = pl.DataFrame({
        "feature": ["age_years", "count__LOINC//1"],
        # Ten distinct ages: a bin each (edges halfway between them), ten bins of a tenth, between
        # an empty bin below the youngest and one above the oldest; none missing.
        # Nine present counts, five of them 0 and four 2: a bin for each value, the empty outer
        # bins, and a tenth missing.
        "edges": [[0.0, *(a + 0.5 for a in range(9)), np.nextafter(9.0, np.inf)],
                  [0.0, 1.0, np.nextafter(2.0, np.inf)]],
        "shares": [[0.0] + [0.1] * 10 + [0.0, 0.0], [0.0, 0.5, 0.4, 0.0, 0.1]],
    })
    assert reference["feature"].to_list() == expected["feature"].to_list()
    for got, want in zip(reference["edges"].to_list(), expected["edges"].to_list(), strict=True):
        assert got == pytest.approx(want)
    for got, want in zip(reference["shares"].to_list(), expected["shares"].to_list(), strict=True):
        assert got == pytest.approx(want)


def test_input_drift_finds_a_feed_that_stopped_and_nothing_in_the_same_cohort() -> None:
    cohort = _inputs([float(a) for a in range(10)], [0] * 5 + [2] * 4 + [None])
    reference = input_reference(cohort)
    same = input_drift(reference, cohort)
    assert same["psi"].to_list() == [0.0, 0.0]
    # The lab's code was renamed upstream: its column is gone today, every patient is missing it.
    stopped = input_drift(reference, cohort.drop("count__LOINC//1"))
    assert stopped.row(0, named=True) == {
        "feature": "count__LOINC//1",
        "psi": pytest.approx((1 - 0.1) * np.log(1 / 0.1) + (1e-4 - 0.5) * np.log(1e-4 / 0.5)
                             + (1e-4 - 0.4) * np.log(1e-4 / 0.4)),
        "missing_reference": pytest.approx(0.1),
        "missing_today": 1.0,
    }
    assert stopped["psi"][0] > PSI_ALARM and stopped["psi"][1] == 0.0
    with pytest.raises(ValueError, match=r"input drift: today's inputs have no rows"):
        input_drift(reference, cohort.head(0))


def test_a_model_folder_saves_its_training_cohorts_inputs_as_the_reference(trained_task: TrainedTask) -> None:
    reference = load_input_reference(trained_task.model_dir)
    assert reference is not None
    today = pl.read_parquet(trained_task.task_dir / "tabular_features.parquet")
    assert reference["feature"].to_list() == [c for c in today.columns
                                              if c not in ("subject_id", "prediction_time", "last_input_time")]
    # The cohort the model was trained on, all splits: no drift in any input.
    assert input_drift(reference, today)["psi"].max() == 0.0
    assert load_input_reference(trained_task.model_dir.parent) is None
    assert not (trained_task.model_dir.parent / INPUT_REFERENCE_FILE).exists()


def test_a_rare_code_that_became_common_or_a_flag_that_flipped_moves_the_index() -> None:
    # 5 % of the training cohort had the code; today everyone has it, 40 times. Quantile edges had
    # put today's counts in the reference's top bin, with the 5 %, and the index read 0.
    reference = np.array([0.0] * 950 + [1.0] * 50)
    assert population_stability_index(reference, np.full(1000, 40.0)) == pytest.approx(
        (1 - 1e-4) * np.log(1 / 1e-4) + (1e-4 - 0.95) * np.log(1e-4 / 0.95) + (1e-4 - 0.05) * np.log(1e-4 / 0.05))
    assert population_stability_index(reference, reference) == 0.0
    # A flag that was 0 for everyone is now 1 for everyone: above anything the reference held.
    assert population_stability_index(np.zeros(100), np.ones(100)) == pytest.approx(2 * (1 - 1e-4) * np.log(1e4))
    # A continuous input drawn again from its own distribution stays stable.
    rng = np.random.default_rng(0)
    assert population_stability_index(rng.normal(size=5000), rng.normal(size=5000)) < 0.01


def test_a_reference_keyed_by_bare_codes_is_compared_with_aggregates_keyed_alike() -> None:
    # A model trained before the aggregates were keyed by coded answer saved count__LOINC//72166-2
    # for smoking status: today's aggregates for its codes must be keyed the same way, or the
    # unchanged data read as a feed that stopped.
    smoking = "LOINC//72166-2"
    events = events_frame([(s, day(-20), smoking, None, "SNOMED//77176002" if s % 2 else "SNOMED//266919005", "ehr")
                           for s in range(1, 41)])
    cohort = pl.DataFrame({"subject_id": list(range(1, 41)), "prediction_time": [T0] * 40,
                           "age_years": [60.0] * 40, "sex": ["female"] * 40})
    by_code = aggregate_before(events, cohort, reference_codes(pl.DataFrame(
        {"feature": [f"count__{smoking}"], "edges": [[0.0]], "shares": [[1.0]]})))
    old_reference = input_reference(by_code).drop("keys")  # as written before the keys were recorded
    codes = reference_codes(old_reference)
    assert not codes.by_token and codes.codes == [smoking]
    today = aggregate_before(events, cohort, codes)
    assert input_drift(old_reference, today).filter(pl.col("feature") == f"count__{smoking}")["psi"].item() == 0.0
    assert reference_codes(input_reference(by_code)).by_token
    # Keyed by token, but written before the keys were recorded: its keys with answers say so.
    by_token = aggregate_before(events, cohort, select_tabular_codes(events, cohort, list(range(1, 41)), 10))
    unrecorded = input_reference(by_token).drop("keys")
    assert reference_codes(unrecorded).by_token
    assert input_drift(unrecorded, aggregate_before(events, cohort, reference_codes(unrecorded)))["psi"].max() == 0.0


def weighed_in_two_units(weight: str, pounds: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """40 patients weighed 20 days before T0, every fourth in pounds (``pounds`` and up), the rest
    in kg (70 and up); and their cohort."""
    units = ["kg" if s % 4 else "[lb_av]" for s in range(1, 41)]
    events = events_frame([(s, day(-20), weight, 70.0 + s % 7 if s % 4 else pounds + s % 7, None, "ehr")
                           for s in range(1, 41)]).with_columns(pl.Series("unit", units, dtype=pl.String))
    cohort = pl.DataFrame({"subject_id": list(range(1, 41)), "prediction_time": [T0] * 40,
                           "age_years": [60.0] * 40, "sex": ["female"] * 40})
    return events, cohort


def test_todays_aggregates_key_units_as_the_models_tokenizer_did() -> None:
    # The reference was keyed with the tokenizer's main units (weights in kg, pounds apart, as a
    # model trained before conversions keyed them); today's aggregates must be keyed the same way,
    # or the pounds would read as a jump in kg.
    weight = "LOINC//29463-7"
    events, cohort = weighed_in_two_units(weight, pounds=170.0)
    selected = select_tabular_codes(events, cohort, list(range(1, 41)), 10, units={weight: "kg", "LOINC//other": "g"})
    reference = input_reference(aggregate_before(events, cohort, selected))
    codes = reference_codes(reference, {weight: "kg", "LOINC//other": "g"})
    assert codes.units == {weight: "kg"}
    assert input_drift(reference, aggregate_before(events, cohort, codes))["psi"].max() == 0.0
    unkeyed = aggregate_before(events, cohort, reference_codes(reference))
    assert input_drift(reference, unkeyed).filter(pl.col("feature") == f"last__{weight}")["psi"].item() > 0.25


def test_todays_aggregates_convert_units_as_the_models_tokenizer_did() -> None:
    weight = "LOINC//29463-7"
    events, cohort = weighed_in_two_units(weight, pounds=160.0)
    main, conversions = {weight: "kg"}, {weight: {"[lb_av]": (0.45359237, 0.0)}}
    selected = select_tabular_codes(events, cohort, list(range(1, 41)), 10, main, conversions)
    reference = input_reference(aggregate_before(events, cohort, selected))
    codes = reference_codes(reference, main, conversions)
    assert codes.unit_conversions == conversions
    assert input_drift(reference, aggregate_before(events, cohort, codes))["psi"].max() == 0.0
    # A model trained while every weight was in kg learned no conversion; when a scale in pounds
    # arrives, its weights are still read in kg, as that model's tokenizer reads them: no drift.
    in_kg = events.with_columns(
        pl.when(pl.col("unit") == "[lb_av]").then(pl.col("numeric_value") * 0.45359237)
        .otherwise(pl.col("numeric_value")).alias("numeric_value"), pl.lit("kg").alias("unit"))
    kg_selected = select_tabular_codes(in_kg, cohort, list(range(1, 41)), 10, main)
    kg_reference = input_reference(aggregate_before(in_kg, cohort, kg_selected))
    assert kg_selected.unit_conversions == {}
    assert input_drift(kg_reference, aggregate_before(events, cohort, reference_codes(kg_reference, main)))[
        "psi"].max() == 0.0
