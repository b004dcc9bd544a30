"""Multi-process training: two CPU processes under torchrun with the gloo backend."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from models.task_model import load_task_model
from tests.conftest import REPO_ROOT
from tests.models.synthetic import write_task_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_trains_one_model_on_two_gloo_processes(tmp_path: Path) -> None:
    task_path = write_task_folder(tmp_path, 300, seed=2)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "pipelines.distributed", "--warehouse", str(tmp_path),
        "--task", str(task_path), "--epochs", "2", "--batch-size", "32", "--hidden-size", "16", "--no-baselines",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Both processes trained, each knowing the world has two, and each reports the epoch's losses
    # over both shards, with one tuning loss deciding for both when to stop.
    # (Found in the whole output: two processes' prints can share a line.)
    reports = re.findall(r"rank ([01])/2 epoch (\d+) train ([\d.]+) tuning ([\d.]+)", done.stdout)
    by_rank = {rank: [report[1:] for report in reports if report[0] == rank] for rank in ("0", "1")}
    assert [epoch for epoch, _, _ in by_rank["0"]] == ["0", "1"]
    assert by_rank["0"] == by_rank["1"]
    model, _calibrator, info = load_task_model(tmp_path / "candidate_models" / "synthetic_1y")
    assert info["task"] == "synthetic_1y"
    assert model.config.hidden_size == 16
    trained_on = json.loads((tmp_path / "candidate_models" / "synthetic_1y" / "metrics.json").read_text())["trained_on"]
    assert trained_on == {"device": "cpu", "precision": "float32", "processes": 2}


def test_inputs_that_cannot_train_are_one_line_in_each_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.distributed import main

    # One process in a gloo group of one, as torchrun would start it.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    task_path = write_task_folder(tmp_path, 40, seed=2)
    with pytest.raises(SystemExit) as exited:
        main(["--warehouse", str(tmp_path), "--task", str(task_path), "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"error: model folder {tmp_path} holds the task's inputs ({tmp_path / 'tasks' / 'synthetic_1y'}): writing "
        "the model there would delete them; name a folder of its own\n")
    assert (tmp_path / "tasks" / "synthetic_1y" / "labels.parquet").is_file()
