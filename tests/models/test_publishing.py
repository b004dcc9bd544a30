"""Tests of publishing: versions, the live pointer, DuckDB, FHIR RiskAssessments, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import orjson
import polars as pl
import pyarrow as pa
import pytest
from fhir.resources.R4B import get_fhir_model_class

from models.publishing import PublishError, current_scores, current_version, publish
from models.scoring import RiskTiers, score_task
from tests.models.conftest import TrainedTask


@pytest.fixture(scope="module")
def scores(trained_task: TrainedTask) -> pa.Table:
    return score_task(trained_task.model_dir, trained_task.task_dir, "synthetic_1y", RiskTiers())


def patients_table(scores: pa.Table) -> pl.DataFrame:
    ids = scores.column("subject_id").to_pylist()
    return pl.DataFrame({"subject_id": ids, "patient_id": [f"p-{i}" for i in ids]})


def test_publish_writes_a_version_then_switches_the_live_pointer(scores: pa.Table, tmp_path: Path) -> None:
    root = tmp_path / "published"
    first = publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r1"})
    assert first.version == "v0001" and first.n_patients == 800 and first.n_high_risk == 40
    assert current_version(root, "synthetic_1y") == "v0001"
    second = publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r2"})
    assert second.version == "v0002"
    assert current_version(root, "synthetic_1y") == "v0002"
    assert sorted(p.name for p in (root / "synthetic_1y").iterdir()) == ["CURRENT", "v0001", "v0002"]
    live = current_scores(root, "synthetic_1y")
    assert live is not None and live.height == 800 and live["patient_id"].str.starts_with("p-").all()
    manifest = json.loads((second.folder / "manifest.json").read_text())
    assert manifest["lineage"] == {"run_id": "r2"}
    with duckdb.connect(str(root / "cohortcast.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*), min(version) FROM published_scores").fetchone() == (800, "v0002")
        assert db.execute("SELECT count(*) FROM publications").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM published_scores WHERE risk_tier = 'high'").fetchone() == (40,)


def test_explaining_codes_are_published_with_their_descriptions(scores: pa.Table, tmp_path: Path) -> None:
    frame = pl.from_arrow(scores)
    assert isinstance(frame, pl.DataFrame)
    items = frame.select(pl.col("top_items").explode().struct.unnest()).drop_nulls("item")
    coded = sorted(set(items.filter(pl.col("modality") != "notes")["item"]))
    assert coded
    codes = pl.DataFrame({"code": coded, "description": [f"about {code}" for code in coded]})
    publication = publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {},
                          codes=codes)

    published = (pl.read_parquet(publication.folder / "scores.parquet").select("subject_id", "top_items")
                 .explode("top_items").unnest("top_items").drop_nulls("item"))
    assert published.height == items.height
    assert sorted(published["item"].to_list()) == sorted(items["item"].to_list())
    expected = pl.when(pl.col("item").is_in(coded)).then(pl.lit("about ") + pl.col("item")).otherwise(pl.col("item"))
    assert published.select((pl.col("description") == expected).all()).item()
    first = published.filter(pl.col("subject_id") == published["subject_id"][0])
    with duckdb.connect(str(tmp_path / "pub" / "cohortcast.duckdb"), read_only=True) as db:
        row = db.execute("SELECT top_items FROM published_scores WHERE subject_id = ?",
                         [int(first["subject_id"][0])]).fetchone()
    assert row == ("; ".join(first["description"]),)


def test_risk_assessments_are_valid_fhir_r4(scores: pa.Table, tmp_path: Path) -> None:
    publication = publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {})
    lines = (publication.folder / "risk_assessments.ndjson").read_bytes().splitlines()
    assert len(lines) == 800
    for line in lines[:100]:
        resource = get_fhir_model_class("RiskAssessment").model_validate(orjson.loads(line))
        assert resource.subject.reference.startswith("Patient/p-")
        assert 0 <= float(resource.prediction[0].probabilityDecimal) <= 1
        assert resource.prediction[0].whenPeriod.end > resource.prediction[0].whenPeriod.start


def test_a_folder_from_another_version_or_system_is_refused_and_left_alone(scores: pa.Table, tmp_path: Path) -> None:
    old = tmp_path / "old"
    publish(scores, patients_table(scores), old, "synthetic_1y", 365, "death", {})
    (old / "cohortcast_published.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(PublishError, match="has format version 0, this cohortcast writes version 1"):
        publish(scores, patients_table(scores), old, "synthetic_1y", 365, "death", {})
    assert current_version(old, "synthetic_1y") == "v0001"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.csv").write_text("x\n")
    with pytest.raises(PublishError, match="was not written by cohortcast"):
        publish(scores, patients_table(scores), foreign, "synthetic_1y", 365, "death", {})


def test_unknown_subjects_are_refused(scores: pa.Table, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="800 scored subjects are not in the patients table"):
        publish(scores, pl.DataFrame({"subject_id": [-1], "patient_id": ["x"]}), tmp_path, "synthetic_1y", 365,
                "death", {})
    assert not (tmp_path / "synthetic_1y" / "CURRENT").exists()
