"""Tests of a task's model: train, evaluate against baselines, save, load, and refuse broken folders."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.errors import TrainingDataError
from features.tasks import load_task
from models.drift import INPUT_REFERENCE_FILE, PREVIOUS_PREFIX, REFERENCE_FILE, save_reference
from models.task_model import (
    MIN_SUBGROUP_CASES,
    ModelFolderError,
    _InputMatrices,
    _severities_read_from_data,
    _subgroups,
    _survival_metrics,
    _training_text,
    check_model_folder,
    load_task_data,
    load_task_model,
    model_file_digests,
    promote_model,
    save_task_model,
    train_task_model,
    trained_with,
    training_fingerprint,
    truth_mismatch,
)
from models.training import TrainingArguments
from tests.models.synthetic import write_task_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    warehouse = tmp_path_factory.mktemp("warehouse")
    task = load_task(write_task_folder(warehouse, 900, seed=4))
    model_dir = warehouse / "models" / "synthetic_1y"
    metrics = train_task_model(
        warehouse / "tasks" / "synthetic_1y", model_dir, task,
        TrainingArguments(max_epochs=10, batch_size=64, learning_rate=3e-3, device="cpu"),
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    )
    return model_dir, metrics


def test_model_folder_holds_weights_vocabulary_calibration_metrics_and_card(trained: tuple[Path, dict]) -> None:
    model_dir, metrics = trained
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "MODEL_CARD.md", "calibration.json", "cohortcast_model.json", "config.json", "drift_reference.parquet",
        "history.json", "input_reference.parquet", "metrics.json", "model.safetensors", "vocabulary.json",
    ]
    assert json.loads((model_dir / "metrics.json").read_text())["models"]["fusion"] == metrics["models"]["fusion"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: synthetic_1y")
    assert "| lightgbm |" in card and "| fusion |" in card
    assert "modality summary path on;" in card
    assert metrics["trained_on"] == {"device": "cpu", "precision": "float32", "processes": 1}
    assert ("AdamW, peak learning rate 0.003 (one-cycle), weight decay 0.01, batch 64, at most 10 epochs with early "
            "stopping on the tuning loss (patience 4), weights averaged over about 1 epoch; seed 0; on cpu in "
            "float32. A rerun with the same data and seed gives the same model on the same kind of device.") in card
    fusion = metrics["models"]["fusion"]
    assert f"Calibration slope {fusion['calibration_slope']:.2f}" in card
    # Whether the survival curves were calibrated, and how, is in the card and the metrics.
    power = json.loads((model_dir / "calibration.json").read_text())["survival_power"]
    assert metrics["survival_calibration"].startswith(f"survival curves calibrated in the large: power {power:.3f} ")
    assert f"\n\nS{metrics['survival_calibration'][1:]}.\n" in card
    # So is whether the treatment-arm heads were (this small task's arms hold too few outcomes).
    assert metrics["arm_calibration"].startswith("treatment-arm risks not calibrated (as the heads gave them): the "
                                                 "tuning arms hold untreated ")
    assert f"\n\nT{metrics['arm_calibration'][1:]}.\n" in card
    assert 0 < fusion["calibration_error_if_calibrated"] < fusion["calibration_error_if_calibrated_95"]
    # Early non-events have no label, so the censoring-weighted event rate is below the complete cases'.
    assert metrics["held_out_event_rate_weighted"] < metrics["held_out_event_rate"]
    assert (f"(event rate {metrics['held_out_event_rate']:.3f}; {metrics['held_out_event_rate_weighted']:.3f} "
            "weighted for censoring)") in card
    assert ("Outcome: death after the prediction time, within 365 days. Follow-up of a patient without the event "
            "ends their own usual interval between days with records (the year before the prediction time) after "
            "their last record, and never later than the latest record in the data; death is the event.") in card
    task_dir = model_dir.parent.parent / "tasks" / "synthetic_1y"
    labels = pl.read_parquet(task_dir / "labels.parquet").join(pl.read_parquet(task_dir / "splits.parquet"),
                                                               on="subject_id")
    held_out = labels.filter(pl.col("split") == "held_out")["boolean_value"]
    assert (f"held_out {(held_out == True).sum():,} with the event, {(held_out == False).sum():,} without, "  # noqa: E712
            f"{held_out.null_count():,} followed less than the horizon.") in card


def test_model_card_warns_that_bf16_gpu_training_may_not_rerun_exactly() -> None:
    metrics = {"training_arguments": asdict(TrainingArguments(average_epochs=0.0)),
               "trained_on": {"device": "cuda", "precision": "bf16 autocast", "processes": 2}}
    text = _training_text(metrics)
    assert "batch 128 per process, 2 processes (DistributedDataParallel)," in text
    assert "the last weights of the best epoch kept; seed 0; on cuda in bf16 autocast." in text
    assert text.endswith("bf16 training on a GPU can differ slightly from one process to the next; train with "
                         "`--float32` for an exact rerun.")


def test_evaluation_reports_every_metric_for_the_model_and_baselines(trained: tuple[Path, dict]) -> None:
    _, metrics = trained
    fusion = metrics["models"]["fusion"]
    for key in ("auroc", "auprc", "brier", "calibration_error", "harrell_c", "uno_c", "time_dependent_auc",
                "integrated_brier", "policy_event_rate", "subgroup_sex_female_cases", "subgroup_sex_male_cases"):
        assert key in fusion, key
    assert fusion["auroc"] > 0.65
    assert set(metrics["models"]) == {"fusion", "logistic_regression", "logistic_regression_all_modalities",
                                      "lightgbm", "lightgbm_all_modalities", "cox_ph", "cox_ph_all_modalities",
                                      "random_survival_forest", "t_learner_lightgbm"}
    assert "policy_event_rate" in metrics["models"]["t_learner_lightgbm"]


def test_subgroup_aurocs_are_reported_only_with_enough_cases_and_controls(trained: tuple[Path, dict]) -> None:
    model_dir, metrics = trained
    fusion = metrics["models"]["fusion"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    groups = ("sex_female", "sex_male", "sex_other_or_unknown",
              "age_under_65", "age_65_to_79", "age_80_plus", "age_unknown")
    assert sum(fusion[f"subgroup_{g}_labelled"] for g in groups[:3]) == metrics["n_held_out_labelled"]
    assert sum(fusion[f"subgroup_{g}_labelled"] for g in groups[3:]) == metrics["n_held_out_labelled"]
    reported = 0
    for group in groups:
        labelled, cases = fusion[f"subgroup_{group}_labelled"], fusion[f"subgroup_{group}_cases"]
        enough = min(cases, labelled - cases) >= MIN_SUBGROUP_CASES
        assert (f"auroc_{group}" in fusion) == (f"auroc_{group}_low" in fusion) == enough, group
        if enough:
            # A bootstrap interval around the subgroup's AUROC: with tens of cases it spans tenths.
            low, value, high = (fusion[f"auroc_{group}{end}"] for end in ("_low", "", "_high"))
            assert low < value < high and high - low > 0.05
            shown = f"{value:.3f} | {low:.3f} to {high:.3f}"
        else:
            shown = "too few to tell | "
        assert f"| {group} | {labelled} | {cases} | {shown} |" in card
        reported += enough
    assert 0 < reported < len(groups)  # the tiny held-out split has both kinds


def test_subgroups_give_unrecorded_sex_and_age_groups_of_their_own() -> None:
    cohort = pl.DataFrame({"sex": ["female", "male", "other", None, "unknown", "female"],
                           "age_years": [30.0, 64.99, 65.0, 79.5, 80.0, None]})
    groups = {name: mask.tolist() for name, mask in _subgroups(cohort).items()}
    assert groups == {
        "sex_female": [True, False, False, False, False, True],
        "sex_male": [False, True, False, False, False, False],
        "sex_other_or_unknown": [False, False, True, True, True, False],
        "age_under_65": [True, True, False, False, False, False],
        "age_65_to_79": [False, False, True, True, False, False],
        "age_80_plus": [False, False, False, False, True, False],
        "age_unknown": [False, False, False, False, False, True],
    }


def test_fusion_is_compared_with_each_baseline_on_the_same_patients(trained: tuple[Path, dict]) -> None:
    model_dir, metrics = trained
    comparisons = metrics["comparisons"]
    models = metrics["models"]
    for name in ("logistic_regression", "logistic_regression_all_modalities", "lightgbm", "lightgbm_all_modalities"):
        row = comparisons[name]
        assert row["auroc_difference"] == pytest.approx(models["fusion"]["auroc"] - models[name]["auroc"])
        assert row["auroc_difference_low"] < row["auroc_difference"] < row["auroc_difference_high"]
    for name in ("lightgbm", "lightgbm_all_modalities", "cox_ph", "cox_ph_all_modalities", "random_survival_forest"):
        row = comparisons[name]
        assert row["harrell_c_difference"] == pytest.approx(models["fusion"]["harrell_c"] - models[name]["harrell_c"])
        assert row["harrell_c_difference_low"] < row["harrell_c_difference"] < row["harrell_c_difference_high"]
    assert "auroc_difference" not in comparisons["cox_ph"] and "harrell_c_difference" not in comparisons[
        "logistic_regression"]
    # The T-learner estimates treatment effects only: it has no ranking of risk to compare.
    assert set(comparisons) == {"logistic_regression", "logistic_regression_all_modalities", "lightgbm",
                                "lightgbm_all_modalities", "cox_ph", "cox_ph_all_modalities", "random_survival_forest"}
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert metrics["comparison_resamples"] == 1000 and "(1,000 resamples of the patients)" in card
    lightgbm = comparisons["lightgbm"]
    assert (f"| lightgbm | {lightgbm['auroc_difference']:+.3f} ({lightgbm['auroc_difference_low']:+.3f} to "
            f"{lightgbm['auroc_difference_high']:+.3f}) |") in card


def test_loaded_model_matches_the_saved_one(trained: tuple[Path, dict]) -> None:
    model_dir, _ = trained
    model, calibrator, info = load_task_model(model_dir)
    assert info["task"] == "synthetic_1y" and info["format_version"] == 4
    assert model.config.hidden_size == 32
    assert 0 < calibrator.transform([0.0])[0] < 1


def test_incomplete_or_foreign_model_folders_are_refused(trained: tuple[Path, dict], tmp_path: Path) -> None:
    model_dir, _ = trained
    with pytest.raises(ModelFolderError, match=r"does not exist \(train a model first"):
        load_task_model(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocabulary.json", "cohortcast_model.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(ModelFolderError,
                       match=r"is missing model\.safetensors, calibration\.json, metrics\.json \(it is incomplete"):
        load_task_model(broken)
    for name in ("model.safetensors", "calibration.json", "metrics.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "cohortcast_model.json").write_text(json.dumps({"format_version": 0, "task": "x"}))
    with pytest.raises(ModelFolderError, match=r"has format version 0, this cohortcast reads version 4 \(or 3, "
                                               "written before file digests; train the model again"):
        load_task_model(broken)
    for damaged, found in ((b'{"format_version": 4, "task"', r"is not JSON \(.*; it is damaged"),
                           (b'{"task": "\xff"}', r"is not JSON \(.*; it is damaged"),
                           (b"[4]", "should hold a JSON object, found list"),
                           (b'{"format_version": 4, "task": "x", "targets": [], "files": ["a"]}',
                            r"'files' should map file names to SHA-256 digests, found list \['a'\]")):
        (broken / "cohortcast_model.json").write_bytes(damaged)
        with pytest.raises(ModelFolderError, match=rf"model folder {broken}: cohortcast_model\.json {found}"):
            load_task_model(broken)
        assert not trained_with(broken, "any fingerprint")


def test_a_format_3_folder_mixing_two_models_or_with_a_damaged_calibration_is_refused(
        trained: tuple[Path, dict], tmp_path: Path) -> None:
    # Format 3 folders carry no digests: what they hold is checked as it is read.
    model_dir, _ = trained
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    info = json.loads((old / "cohortcast_model.json").read_text())
    info["format_version"] = 3
    info.pop("files")
    (old / "cohortcast_model.json").write_text(json.dumps(info))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"],
                                                 "intermediate_size": 4 * config["hidden_size"]}))
    with pytest.raises(ModelFolderError, match=rf"model folder {old}: config.json and model.safetensors are not of "
                                               r"one model \(mismatched keys: .*\); train the model again"):
        load_task_model(old)
    (old / "config.json").write_text(json.dumps(config))
    load_task_model(old)
    for damaged, found in (("{", r"calibration.json is not valid JSON \(JSONDecodeError\)"),
                           ('{"method": "platt", "slope": "1"}', "expected a finite numeric slope and intercept")):
        (old / "calibration.json").write_text(damaged)
        with pytest.raises(ModelFolderError, match=rf"model folder {old}: .*{found}.*; train or deploy the model"):
            load_task_model(old)


def test_a_model_folder_whose_files_differ_from_what_training_wrote_is_refused(trained: tuple[Path, dict],
                                                                                tmp_path: Path) -> None:
    model_dir, _ = trained
    info = json.loads((model_dir / "cohortcast_model.json").read_text())
    assert sorted(info["files"]) == ["MODEL_CARD.md", "calibration.json", "config.json", "drift_reference.parquet",
                                     "history.json", "input_reference.parquet", "metrics.json", "model.safetensors",
                                     "vocabulary.json"]
    assert check_model_folder(model_dir) == info
    edited = shutil.copytree(model_dir, tmp_path / "edited")
    (edited / "metrics.json").write_text((edited / "metrics.json").read_text().replace('"auroc": 0.', '"auroc": 1.'))
    recorded = info["files"]["metrics.json"][:12]
    with pytest.raises(ModelFolderError, match=rf"model folder {edited}: metrics\.json has SHA-256 [0-9a-f]{{12}} "
                                               rf"\(expected {recorded}\), as cohortcast_model\.json 'files' records "
                                               r"\(the file was edited, damaged or taken from another model"):
        load_task_model(edited)
    (edited / "metrics.json").write_bytes((model_dir / "metrics.json").read_bytes())
    (edited / "drift_reference.parquet").unlink()
    with pytest.raises(ModelFolderError, match=r"is missing drift_reference\.parquet \(it is incomplete"):
        check_model_folder(edited)
    # What deployment writes beside the model is not the training's: editing it is no damage.
    (edited / "drift_reference.parquet").write_bytes((model_dir / "drift_reference.parquet").read_bytes())
    save_reference(edited / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}", {"train": np.full(10, 0.9)})
    assert check_model_folder(edited) == info
    # A folder of version 3, written before the digests, still loads (without the check).
    older = {key: value for key, value in info.items() if key != "files"} | {"format_version": 3}
    (edited / "cohortcast_model.json").write_text(json.dumps(older))
    (edited / "history.json").write_text("[]")
    assert load_task_model(edited)[2] == older
    # Without digests, a config of another model beside these weights is caught by the weights
    # it asks for and the file lacks (transformers would start them random, and only log it).
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(config | {"numeric_value_embedding": True}))
    with pytest.raises(ModelFolderError, match=rf"^model folder {edited}: config.json and model.safetensors are not "
                                               r"of one model \(missing keys: encoder.event_code_slope.weight\); "
                                               "train the model again$"):
        load_task_model(edited)


def _make_another_model(folder: Path, reference_risk: float) -> bytes:
    """Make the model in ``folder`` another one, trained on a cohort of constant ``reference_risk``
    (its digests recorded as training records them); return its reference file's bytes."""
    save_reference(folder / REFERENCE_FILE, {"train": np.full(10, reference_risk)})
    info = json.loads((folder / "cohortcast_model.json").read_text())
    info["files"] = model_file_digests(folder)
    (folder / "cohortcast_model.json").write_text(json.dumps(info))
    return (folder / REFERENCE_FILE).read_bytes()


def test_promoting_a_candidate_replaces_the_live_model_and_keeps_the_replaced_ones_references(
        trained: tuple[Path, dict], tmp_path: Path) -> None:
    model_dir, _ = trained
    candidate, live = tmp_path / "candidate_models" / "synthetic_1y", tmp_path / "models" / "synthetic_1y"
    shutil.copytree(model_dir, candidate)
    # Written over an older candidate: its previous_* are not the live model's.
    save_reference(candidate / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}", {"train": np.full(10, 0.9)})

    assert promote_model(candidate, live) == live
    assert sorted(p.name for p in live.iterdir()) == sorted(
        p.name for p in model_dir.iterdir())  # the first model: nothing before it, so no previous_*
    assert (live / "model.safetensors").read_bytes() == (candidate / "model.safetensors").read_bytes()
    assert candidate.is_dir()

    replaced = _make_another_model(live, 0.5)
    replaced_inputs = (live / INPUT_REFERENCE_FILE).read_bytes()
    promote_model(candidate, live)
    assert (live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").read_bytes() == replaced
    assert (live / f"{PREVIOUS_PREFIX}{INPUT_REFERENCE_FILE}").read_bytes() == replaced_inputs
    for name in (REFERENCE_FILE, INPUT_REFERENCE_FILE):
        assert (live / name).read_bytes() == (candidate / name).read_bytes()
    assert not list(live.parent.glob(".*"))  # no staging or retired folder left beside it

    # A promotion killed between its two renames left the deployed model aside and none in place:
    # the next one still keeps that model's references.
    aside = _make_another_model(live, 0.25)
    live.rename(live.with_name(f".{live.name}.retired"))
    promote_model(candidate, live)
    assert (live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").read_bytes() == aside
    assert json.loads((live / "cohortcast_model.json").read_text())["deployed"] >= json.loads(
        (candidate / "cohortcast_model.json").read_text())["created"]

    # A reference damaged since its model was trained is no reference: the drift check would fail on it.
    _make_another_model(live, 0.75)
    (live / REFERENCE_FILE).write_bytes(b"PAR1 damaged")
    promote_model(candidate, live)
    assert not (live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").exists()
    assert (live / f"{PREVIOUS_PREFIX}{INPUT_REFERENCE_FILE}").read_bytes() == replaced_inputs


def test_promotion_checks_the_copy_it_deploys_and_a_refusal_leaves_everything_as_it_was(
        trained: tuple[Path, dict], tmp_path: Path) -> None:
    model_dir, _ = trained
    live = tmp_path / "models" / "t"
    shutil.copytree(model_dir, live)
    before = sorted((p.name, p.read_bytes()) for p in live.iterdir())
    checked: list[Path] = []

    def refuse(staged: Path) -> None:
        checked.append(staged)
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        promote_model(model_dir, live, accept=refuse)
    # The copy was checked, not the candidate a new training could rewrite meanwhile.
    assert checked == [live.with_name(".t.partial")]
    assert sorted((p.name, p.read_bytes()) for p in live.iterdir()) == before
    assert [p.name for p in live.parent.iterdir()] == ["t"]


def test_promotion_refuses_a_copy_that_mixes_two_models_and_leaves_no_staging_behind(
        trained: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, _ = trained
    live = tmp_path / "models" / "t"
    shutil.copytree(model_dir, live)
    before = sorted((p.name, p.read_bytes()) for p in live.iterdir())
    copytree = shutil.copytree

    def copy_while_the_candidate_is_retrained(source: Path, target: Path) -> Path:
        copied = copytree(source, target)
        # The weights came from the retrained candidate, the rest from the model before it.
        (copied / "calibration.json").write_text(json.dumps({"slope": 2.0, "intercept": 0.0}))
        return Path(copied)

    monkeypatch.setattr("models.task_model.shutil.copytree", copy_while_the_candidate_is_retrained)
    with pytest.raises(ModelFolderError, match=r"\.t\.partial: calibration\.json has SHA-256"):
        promote_model(model_dir, live)
    assert sorted((p.name, p.read_bytes()) for p in live.iterdir()) == before
    assert [p.name for p in live.parent.iterdir()] == ["t"]

    def copy_until_the_disk_is_full(source: Path, target: Path) -> Path:
        Path(target).mkdir()
        shutil.copy(Path(source) / "config.json", Path(target) / "config.json")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("models.task_model.shutil.copytree", copy_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left on device"):
        promote_model(model_dir, live)
    assert sorted((p.name, p.read_bytes()) for p in live.iterdir()) == before
    assert [p.name for p in live.parent.iterdir()] == ["t"]


def test_the_training_fingerprint_follows_the_inputs_and_the_settings(trained: tuple[Path, dict],
                                                                    tmp_path: Path) -> None:
    model_dir, _ = trained
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    args = TrainingArguments(max_epochs=10, batch_size=64)
    assert training_fingerprint(task_dir, args, None, None, True) is None  # nothing recorded: always train
    assert not trained_with(model_dir, None)
    step = task_dir / "labels.fingerprint.json"
    step.write_text(json.dumps({"key": "k1", "output": "labels.parquet:10:1", "side_outputs": []}))
    first = training_fingerprint(task_dir, args, None, None, True)
    assert first == training_fingerprint(task_dir, TrainingArguments(max_epochs=10, batch_size=64), None, None, True)
    assert first != training_fingerprint(task_dir, args, {"hidden_size": 64}, None, True)
    assert first != training_fingerprint(task_dir, TrainingArguments(max_epochs=11, batch_size=64), None, None, True)
    assert first != training_fingerprint(task_dir, args, None, None, False)
    step.write_text(json.dumps({"key": "k1", "output": "labels.parquet:10:2", "side_outputs": []}))  # rewritten
    second = training_fingerprint(task_dir, args, None, None, True)
    assert second != first
    # A step's output replaced after its record was written (by hand, or by a step killed between the
    # two writes): the record is unchanged, the file is not.
    (task_dir / "labels.parquet").write_bytes(b"new labels")
    third = training_fingerprint(task_dir, args, None, None, True)
    assert third != second
    os.utime(task_dir / "labels.parquet", ns=(1, 1))
    fourth = training_fingerprint(task_dir, args, None, None, True)
    assert fourth != third
    # A write that never completed, or a file no step record names (the summary, rewritten by every
    # build), is no input.
    (task_dir / ".labels.parquet.x1.partial").write_bytes(b"half")
    (task_dir / "summary.json").write_text("{}")
    assert training_fingerprint(task_dir, args, None, None, True) == fourth
    # The trained fixture's folder has no step fingerprints, so its model records none.
    assert "training_fingerprint" not in json.loads((model_dir / "cohortcast_model.json").read_text())
    assert not trained_with(model_dir, first)


def test_a_broken_candidate_is_refused_and_the_live_model_stays(trained: tuple[Path, dict], tmp_path: Path) -> None:
    model_dir, _ = trained
    live, candidate = tmp_path / "live", tmp_path / "candidate"
    shutil.copytree(model_dir, live)
    shutil.copytree(model_dir, candidate)
    (candidate / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"candidate is missing model\.safetensors"):
        promote_model(candidate, live)
    assert (live / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_severities_read_from_data_recover_a_term_the_inputs_carry_and_leave_an_uncarried_one_unknown(
        tmp_path: Path) -> None:
    task = load_task(write_task_folder(tmp_path, 400, seed=2))
    data = load_task_data(tmp_path / "tasks" / task.name, task.horizon_days)
    tabular = pl.concat(data.tabular.values())
    n = tabular.height
    truth = tabular.select("subject_id", ehr_severity=pl.col("noise"), note_severity=pl.lit(0.0),
                           genomic_risk=pl.lit(0.0), imaging_severity=pl.lit(0.0), has_notes=pl.lit(True),
                           has_genomics=pl.lit(True), has_expression=pl.lit(True),
                           has_imaging=pl.Series([False] * n))
    estimates = _severities_read_from_data(data, _InputMatrices(data).late_fusion, truth)
    held_out_noise = data.tabular["held_out"]["noise"].to_numpy()
    mean, sd = estimates["ehr_severity"]
    np.testing.assert_allclose(mean, held_out_noise, atol=0.05)
    assert sd.shape == held_out_noise.shape and np.all(sd < 0.05)
    # Nobody is imaged: the image term keeps its standard-normal distribution.
    np.testing.assert_array_equal(estimates["imaging_severity"][0], np.zeros(len(held_out_noise)))
    np.testing.assert_array_equal(estimates["imaging_severity"][1], np.ones(len(held_out_noise)))


def test_survival_metrics_use_one_grid_whatever_the_model_s_survival_intervals() -> None:
    # The same score through the fusion model's path (a curve at its interval edges up to two years)
    # and a baseline's (no curve) gives the same Uno's C and time-dependent AUC: both end at the
    # 365-day horizon. The curve only adds the integrated Brier score on that grid.
    rng = np.random.default_rng(0)
    n = 400
    score = rng.normal(size=n)
    duration = rng.exponential(400.0 / np.exp(0.5 * score))
    event = (rng.random(n) < 0.7).astype(float)
    train = {"event": np.roll(event, 7), "duration_days": np.roll(duration, 7) * 1.5}
    labels = {"event": event, "duration_days": duration}
    edges = [30.0, 90.0, 180.0, 365.0, 730.0]
    curve = np.exp(-np.outer(np.exp(0.5 * score), edges) / 400.0)
    fusion = _survival_metrics(train, labels, score, 365.0, curve, edges)
    baseline = _survival_metrics(train, labels, score, 365.0)
    assert fusion["uno_c"] == baseline["uno_c"]
    assert fusion["time_dependent_auc"] == baseline["time_dependent_auc"]
    assert set(fusion) - set(baseline) == {"integrated_brier"}
    # A 30-day horizon evaluates at one time: no integral over it, and no failure.
    short = _survival_metrics(train, labels, score, 30.0, curve, edges)
    assert sorted(short) == ["harrell_c", "time_dependent_auc", "uno_c"]


def test_survival_metrics_take_held_out_follow_up_past_the_train_splits_longest() -> None:
    # The train split's longest follow-up is a censoring at 900 days: its censoring weights end
    # there. Held-out patients followed to it or past it (an event on day 900, a censoring on day
    # 950) are evaluated as followed beyond every evaluation time, as they were; scikit-survival
    # alone refuses them.
    rng = np.random.default_rng(0)
    n = 400
    score = rng.normal(size=n)
    duration = np.minimum(rng.exponential(600.0 / np.exp(0.5 * score)), rng.uniform(50, 899, n))
    event = (rng.random(n) < 0.7).astype(float)
    train = {"event": np.roll(event, 7), "duration_days": np.roll(duration, 7)}
    train["event"][0], train["duration_days"][0] = 0.0, 900.0
    edges = [30.0, 90.0, 180.0, 365.0, 730.0]
    curve = np.exp(-np.outer(np.exp(0.5 * score), edges) / 400.0)
    within = {"event": event.copy(), "duration_days": duration.copy()}
    within["event"][:2], within["duration_days"][:2] = [1.0, 0.0], [800.0, 800.0]
    beyond = {"event": event.copy(), "duration_days": duration.copy()}
    beyond["event"][:2], beyond["duration_days"][:2] = [1.0, 0.0], [900.0, 950.0]
    expected = _survival_metrics(train, within, score, 365.0, curve, edges)
    found = _survival_metrics(train, beyond, score, 365.0, curve, edges)
    # Harrell's C has no censoring weights and reads every follow-up as it is.
    assert sorted(found) == ["harrell_c", "integrated_brier", "time_dependent_auc", "uno_c"]
    assert {k: v for k, v in found.items() if k != "harrell_c"} == {
        k: v for k, v in expected.items() if k != "harrell_c"}


def test_a_truth_file_for_another_question_is_refused_before_training(tmp_path: Path) -> None:
    task = load_task(write_task_folder(tmp_path, 60, seed=2))
    folder = tmp_path / "tasks" / "synthetic_1y"
    cohort = pl.read_parquet(folder / "cohort.parquet")
    truth = cohort.select("subject_id", "prediction_time").with_columns(
        horizon_days=pl.lit(365, dtype=pl.Int32), true_risk_untreated=0.1, true_risk_treated=0.08,
        true_treatment_effect=-0.02, propensity=0.5, age_years=60.0, sex=pl.lit("female"), ehr_severity=0.0,
        note_severity=0.0, genomic_risk=0.0, imaging_severity=0.0, lpa_risk_alleles=0, cyp2c19_lof_alleles=0,
        has_notes=True, has_genomics=True, has_expression=True, has_imaging=False)
    assert truth_mismatch(truth, cohort, 365.0) is None
    # A truth written before the simulator said whose expression panel it wrote.
    assert truth_mismatch(truth.drop("has_expression"), cohort, 365.0) == (
        "it has no column has_expression (written by an older simulator: simulate the hospital again)")
    assert truth_mismatch(truth, cohort, 90.0) == "its true risks are at a horizon of [365] days, the task's is 90"
    assert truth_mismatch(truth.tail(58), cohort, 365.0) == "2 of the task's 60 patients are not in it"
    later = truth.with_columns(pl.col("prediction_time") + pl.duration(days=pl.col("subject_id") % 2))
    assert truth_mismatch(later, cohort, 365.0) == (
        f"{(cohort['subject_id'] % 2).sum()} of the task's 60 patients are predicted at another time than the "
        "simulator's (another cohort rule)")
    assert truth_mismatch(truth.drop("propensity"), cohort, 365.0) == (
        "it has no column propensity (not a cohortcast simulator's truth.parquet)")
    truth.with_columns(horizon_days=pl.lit(90, dtype=pl.Int32)).write_parquet(tmp_path / "truth.parquet")
    with pytest.raises(TrainingDataError, match=(
            rf"truth {tmp_path / 'truth.parquet'} does not describe task 'synthetic_1y': its true risks are at a "
            r"horizon of \[90\] days, the task's is 365; train without it")):
        train_task_model(folder, tmp_path / "model", task, TrainingArguments(max_epochs=1, device="cpu"),
                         truth_path=tmp_path / "truth.parquet")
    assert not (tmp_path / "model").exists()


def test_a_model_whose_task_inputs_were_built_again_while_it_trained_is_not_saved(tmp_path: Path) -> None:
    task = load_task(write_task_folder(tmp_path, 120, seed=3))
    folder = tmp_path / "tasks" / "synthetic_1y"
    # A step record naming the vocabulary, as `cohortcast features` writes.
    (folder / "event_tokens.fingerprint.json").write_text(json.dumps(
        {"key": "k", "output": "event_tokens.parquet", "side_outputs": ["vocabulary.json"]}))
    vocabulary = json.loads((folder / "vocabulary.json").read_text())

    def build_again(record: dict[str, float]) -> None:  # another run rebuilds the inputs mid-training
        codes = list(vocabulary["vocabulary"])
        renumbered = {code: (len(codes) - 1 - i if i > 1 else i) for i, code in enumerate(codes)}
        (folder / "vocabulary.json").write_text(json.dumps({**vocabulary, "vocabulary": renumbered}))

    with pytest.raises(TrainingDataError, match=rf"task folder {folder} changed while the model trained \(its "
                                                r"inputs were built again\); the model is not saved: train again"):
        train_task_model(folder, tmp_path / "model", task, TrainingArguments(max_epochs=1, device="cpu"),
                         {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 32}, baselines=False, on_epoch=build_again)
    assert not (tmp_path / "model").exists()


def test_every_table_of_a_split_lists_the_datasets_patients_in_its_order(tmp_path: Path) -> None:
    task = load_task(write_task_folder(tmp_path, 300, seed=3))
    data = load_task_data(tmp_path / "tasks" / task.name, task.horizon_days)
    for split, dataset in data.datasets.items():
        assert len(dataset) > 0
        np.testing.assert_array_equal(data.tabular[split]["subject_id"].to_numpy(), dataset.subject_ids)
        np.testing.assert_array_equal(data.cohort[split]["subject_id"].to_numpy(), dataset.subject_ids)


def test_the_card_of_an_outcome_death_competes_with_says_the_curve_is_cause_specific(
        trained: tuple[Path, dict]) -> None:
    from dataclasses import replace

    from models.fusion import FusionConfig
    from models.task_model import model_card

    model_dir, metrics = trained
    task = load_task(model_dir.parent.parent / "synthetic_1y.yaml")
    data = load_task_data(model_dir.parent.parent / "tasks" / "synthetic_1y", task.horizon_days)
    config = FusionConfig.from_pretrained(model_dir)
    note = "Death is not part of this outcome and ends follow-up: the survival curve is cause-specific"
    assert task.outcome.death and note not in model_card(task, data, config, metrics)
    competing = replace(task, outcome=replace(task.outcome, death=False, codes=("ICD10CM//I21",)))
    assert f"\n\n{note} (the chance of staying free of the outcome were no one to die first)" in model_card(
        competing, data, config, metrics)


def test_the_card_of_a_task_without_a_treatment_says_nothing_of_arms(trained: tuple[Path, dict]) -> None:
    from dataclasses import replace

    from models.fusion import FusionConfig
    from models.task_model import model_card

    model_dir, metrics = trained
    task = load_task(model_dir.parent.parent / "synthetic_1y.yaml")
    data = load_task_data(model_dir.parent.parent / "tasks" / "synthetic_1y", task.horizon_days)
    config = FusionConfig.from_pretrained(model_dir)
    assert data.has_treatment and "Treatment-arm risks not calibrated" in model_card(task, data, config, metrics)
    assert "Treatment-arm risks" not in model_card(task, replace(data, has_treatment=False), config, metrics)


def test_a_model_loads_and_saves_without_transformers_progress_bars(trained: tuple[Path, dict], tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as transformers_logging

    model_dir, metrics = trained
    model, calibrator, _info = load_task_model(model_dir)
    save_task_model(tmp_path / "copy", model, calibrator, (model_dir / "vocabulary.json").read_bytes(), metrics, [],
                    "card", has_treatment=True, reference_risk={"train": np.array([0.1, 0.2])})
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert transformers_logging.is_progress_bar_enabled()  # put back for the rest of the process
