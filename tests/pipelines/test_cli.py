"""Tests of the ``cohortcast`` command line: one-line errors, nothing written on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from models.task_model import format_difference
from pipelines import cli, distributed
from pipelines.cli import main
from tests.models.synthetic import write_task_folder

DEATH_TASK = Path(__file__).resolve().parents[2] / "tasks" / "synthea_death_1y.yaml"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--patients", "-5"], "error: patients must be at least 1 (got -5)\n"),
        (["--patients", "many"], "error: Invalid value for '--patients': 'many' is not a valid integer.\n"),
        (["--seed", "-1"], "error: seed must be a non-negative integer (got -1)\n"),
        (["--workers", "0"], "error: Invalid value for '--workers': 0 is not in the range x>=1.\n"),
    ],
)
def test_simulate_bad_arguments_print_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _out, err = run_cli(["simulate", "--out", str(tmp_path / "landing"), *args], capsys)
    assert code == 2
    assert err == message
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "export.ndjson").write_text("{}\n")
    code, _out, err = run_cli(["simulate", "--out", str(tmp_path), "--patients", "3"], capsys)
    assert code == 2
    assert err == f"error: output folder {tmp_path} is not empty (pass --overwrite to replace it)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export.ndjson"]


def test_simulate_refuses_an_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _out, err = run_cli(["simulate", "--out", str(blocker / "landing"), "--patients", "3"], capsys)
    assert code == 2
    assert err.startswith(f"error: output folder {blocker / 'landing'} is not writable")
    assert err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_simulate_writes_a_landing_zone_and_prints_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = run_cli(
        ["simulate", "--out", str(tmp_path / "landing"), "--patients", "12", "--seed", "4"], capsys
    )
    assert code == 0
    assert "FHIR Patient" in out
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == [
        "fhir", "genomics", "imaging", "notes", "simulation.json", "truth.parquet",
    ]


def test_train_prints_the_metrics_and_fusion_against_each_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.console, "width", 160)  # a wide terminal: no cell wrapped
    task_yaml = write_task_folder(tmp_path, 400, seed=2)
    # Gates every model meets: the model is deployed where scoring reads it.
    task_yaml.write_text(task_yaml.read_text() + "publishing:\n  min_auroc: 0.0\n  max_calibration_error: 1.0\n")
    code, out, err = run_cli(
        ["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--epochs", "2", "--hidden-size", "16",
         "--layers", "1", "--batch-size", "64", "--average-epochs", "0.5", "--float32"], capsys
    )
    assert code == 0, err
    candidate, live = tmp_path / "candidate_models" / "synthetic_1y", tmp_path / "models" / "synthetic_1y"
    metrics = json.loads((candidate / "metrics.json").read_text())
    assert json.loads((live / "metrics.json").read_text()) == metrics
    assert f"deployed: {live} (scoring reads it)" in out.replace("\n", "")
    assert metrics["training_arguments"]["average_epochs"] == 0.5
    assert metrics["training_arguments"]["bf16"] is False
    assert "synthetic_1y: held-out metrics" in out and "fusion minus each model" in out
    lightgbm = metrics["comparisons"]["lightgbm"]
    assert format_difference(lightgbm, "auroc") in out
    assert format_difference(metrics["comparisons"]["cox_ph"], "harrell_c") in out


def test_train_keeps_a_model_below_the_task_s_quality_gate_a_candidate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.console, "width", 400)
    task_yaml = write_task_folder(tmp_path, 300, seed=3)
    task_yaml.write_text(task_yaml.read_text() + "publishing:\n  min_auroc: 1.0\n  max_calibration_error: 1.0\n")
    code, out, err = run_cli(
        ["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--epochs", "1", "--hidden-size", "16",
         "--layers", "1", "--batch-size", "64", "--no-baselines", "--float32"], capsys
    )
    assert code == 0, err
    candidate, live = tmp_path / "candidate_models" / "synthetic_1y", tmp_path / "models" / "synthetic_1y"
    auroc = json.loads((candidate / "metrics.json").read_text())["models"]["fusion"]["auroc"]
    assert (f"model {candidate} not deployed: held-out auroc {auroc:.4f} (expected >= 1.0); "
            f"no model is deployed at {live}") in out
    assert not live.exists()


def test_train_refuses_to_write_over_the_deployed_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = tmp_path / "models" / "synthea_death_1y"
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK), "--out",
                               str(live)], capsys)
    assert code == 2
    assert f"--out {live} is the deployed model's folder" in err
    assert not live.exists()


def test_train_without_task_inputs_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "no_such"
    code, _out, err = run_cli(["train", "--warehouse", str(warehouse), "--task", str(DEATH_TASK)], capsys)
    assert code == 2
    assert err == (
        f"error: task folder {warehouse / 'tasks' / 'synthea_death_1y'}: missing labels.parquet, splits.parquet, "
        "cohort.parquet, event_tokens.parquet, vocabulary.json, tabular_features.parquet "
        "(run `cohortcast features` first)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_model_folder_it_cannot_create_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_yaml = write_task_folder(tmp_path, 40, seed=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _out, err = run_cli(
        ["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--out", str(blocker / "model")], capsys
    )
    assert code == 2
    assert err == f"error: model folder {blocker / 'model'} cannot be created ({blocker} is not a folder)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "synthetic_1y.yaml", "tasks"]


@pytest.mark.parametrize("out", [".", "models"])
def test_train_refuses_to_write_over_a_folder_that_is_not_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    # Writing the model replaces its whole folder: the warehouse, or the folder of every task's
    # deployed model, was deleted.
    task_yaml = write_task_folder(tmp_path, 40, seed=2)
    (tmp_path / "models" / "other_task").mkdir(parents=True)
    (tmp_path / "models" / "other_task" / "model.safetensors").write_text("weights")
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--out",
                               str(tmp_path / out)], capsys)
    assert code == 2
    target = tmp_path / out
    if out == ".":
        assert err == (f"error: model folder {target} holds the task's inputs ({tmp_path / 'tasks' / 'synthetic_1y'}): "
                       "writing the model there would delete them; name a folder of its own\n")
    else:
        assert err == (f"error: model folder {target} exists and is not a model folder (no cohortcast_model.json): "
                       "writing the model there would delete what it holds; name a new or empty folder\n")
    assert (tmp_path / "models" / "other_task" / "model.safetensors").read_text() == "weights"
    assert (tmp_path / "tasks" / "synthetic_1y" / "labels.parquet").is_file()


@pytest.mark.parametrize(("damaged", "why"), [
    ("labels.parquet", "labels.parquet cannot be read"),
    ("vocabulary.json", "vocabulary.json is not JSON"),
    ("truth", "cannot be read as Parquet"),
])
def test_train_on_damaged_inputs_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damaged: str, why: str
) -> None:
    task_yaml = write_task_folder(tmp_path, 40, seed=2)
    folder = tmp_path / "tasks" / "synthetic_1y"
    extra: list[str] = []
    if damaged == "truth":
        (tmp_path / "truth.parquet").write_text("not parquet")
        extra = ["--truth", str(tmp_path / "truth.parquet")]
    else:
        (folder / damaged).write_bytes((folder / damaged).read_bytes()[:20])
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "candidate_models").exists()


def test_train_refuses_a_task_folder_of_two_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A features run killed after it wrote a new cohort left the note embeddings of the cohort before.
    task_yaml = write_task_folder(tmp_path, 40, seed=2)
    folder = tmp_path / "tasks" / "synthetic_1y"
    cohort = pl.read_parquet(folder / "cohort.parquet")
    cohort.head(30).write_parquet(folder / "cohort.parquet")
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(task_yaml)], capsys)
    assert code == 2
    assert err.startswith(f"error: task folder {folder}: labels.parquet holds 10 patient(s) not in cohort.parquet, so "
                          "its files come from two builds (a `cohortcast features` run cut short?): run `cohortcast "
                          "features` again"), err


def test_train_refuses_a_seed_numpy_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK), "--seed", "-1"],
                              capsys)
    assert code == 2 and "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295." in err
    assert list(tmp_path.iterdir()) == []


def test_features_refuses_a_task_folder_it_cannot_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tasks").write_text("not a folder")
    code, _out, err = run_cli(["features", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK)], capsys)
    assert code == 2
    assert err == (
        f"error: task folder {tmp_path / 'tasks' / 'synthea_death_1y'} cannot be created "
        f"({tmp_path / 'tasks'} is not a folder)\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["tasks"]


@pytest.mark.parametrize("home", ["missing", "relative/home"])
def test_demo_with_a_dagster_home_dagster_cannot_use_prints_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, home: str
) -> None:
    value = str(tmp_path / home) if home == "missing" else home
    monkeypatch.setenv("DAGSTER_HOME", value)
    code, _out, err = run_cli(["demo", "--workspace", str(tmp_path / "workspace"), "--patients", "20"], capsys)
    assert code == 2
    assert err == (f"error: DAGSTER_HOME {value!r} is not an existing folder given by an absolute path (unset it "
                   f"to use {cli.REPO_DAGSTER_HOME})\n")
    assert list(tmp_path.iterdir()) == []


def test_distributed_training_with_a_bad_task_file_prints_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        distributed.main(["--warehouse", str(tmp_path), "--task", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"python -m pipelines.distributed: error: task file {tmp_path / 'nope.yaml'} does not exist")


def test_train_on_too_few_outcomes_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task_yaml = write_task_folder(tmp_path, 40, seed=3)
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--epochs", "1",
                               "--no-baselines"], capsys)
    assert code == 2
    assert re.fullmatch(r"error: train split: \d+ patients with the outcome among \d+ with a known label \(need at "
                        r"least 10 with and 10 without\); use more patients, a longer horizon or broader outcome "
                        r"codes\n", err)


def test_train_with_heads_that_do_not_divide_the_hidden_size_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before the task file or its inputs are read (neither exists here).
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path / "none"), "--task", str(tmp_path / "none.yaml"),
                               "--hidden-size", "130", "--heads", "4"], capsys)
    assert code == 2
    assert err == ("error: Invalid value for --heads: --heads 4 does not divide --hidden-size 130 (use one of 1, 2, "
                   "5, 10, 13, 26, ...)\n")


def test_train_refuses_a_held_out_split_with_one_outcome_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_yaml = write_task_folder(tmp_path, 300, seed=3)
    folder = tmp_path / "tasks" / "synthetic_1y"
    held_out = pl.read_parquet(folder / "splits.parquet").filter(pl.col("split") == "held_out")["subject_id"]
    labels = pl.read_parquet(folder / "labels.parquet")
    labels.with_columns(pl.when(pl.col("subject_id").is_in(held_out.to_list())).then(False)
                        .otherwise(pl.col("boolean_value")).alias("boolean_value")).write_parquet(
        folder / "labels.parquet")
    code, out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(task_yaml), "--epochs", "1",
                              "--no-baselines"], capsys)
    assert code == 2
    assert re.fullmatch(r"error: held_out split: 0 patients with the outcome among \d+ with a known label \(need at "
                        r"least 1 with and 1 without\).*\n", err)
    assert "epoch" not in out


def test_features_with_an_encoder_folder_that_is_not_a_model_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    code, _out, err = run_cli(["features", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK),
                               "--encoder", str(missing)], capsys)
    assert (code, err) == (2, f"error: Invalid value for '--encoder': Directory '{missing}' does not exist.\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _out, err = run_cli(["features", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK),
                               "--encoder", str(empty)], capsys)
    assert (code, err) == (2, f"error: note encoder: {empty} is not a Hugging Face model folder (expected a "
                              "config.json in it)\n")


def test_train_with_a_truth_file_that_does_not_exist_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run_cli(["train", "--warehouse", str(tmp_path), "--task", str(DEATH_TASK),
                               "--truth", str(tmp_path / "truth.parquet")], capsys)
    assert (code, err) == (2, f"error: Invalid value for '--truth': File '{tmp_path / 'truth.parquet'}' does not "
                              "exist.\n")


def test_demo_reads_its_workspace_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workspace named by COHORTCAST_WORKSPACE, as dagster dev reads it (the run itself replaced here).
    monkeypatch.setenv("COHORTCAST_WORKSPACE", str(tmp_path / "ws"))
    code, out, _err = run_cli(["demo", "--help"], capsys)
    assert code == 0 and "COHORTCAST_WORKSPACE" in out
    seen: list[Path] = []
    monkeypatch.setattr("pipelines.demo.run_demo", lambda workspace, *args: seen.append(workspace))
    run_cli(["demo", "--patients", "5"], capsys)
    assert seen == [tmp_path / "ws"]


def test_demo_refuses_a_negative_seed_before_it_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(["demo", "--workspace", str(tmp_path / "ws"), "--seed", "-1"], capsys)
    assert code == 2 and "Invalid value for '--seed': -1 is not in the range x>=0." in err
    assert not (tmp_path / "ws").exists()
