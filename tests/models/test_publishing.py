"""Tests of publishing: versions, the live pointer, DuckDB, FHIR RiskAssessments, gates and refusals."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pytest
from fhir.resources.R4B import get_fhir_model_class

from features.ingest import SUMMARY_FILE, FileAccount, IngestSummary
from models.drift import PREVIOUS_PREFIX, REFERENCE_FILE, save_reference
from models.publishing import (
    PublishError,
    _fusion_metrics,
    check_publishable,
    comparable_scores,
    current_scores,
    current_version,
    data_lineage,
    deploy_model,
    describe_items,
    describe_token,
    outcome_recorded_subjects,
    patients_to_list,
    publish,
    published_versions,
    quality_shortfalls,
    rebuild_database,
    risk_assessment_id,
    source_item_descriptions,
)
from models.scoring import SCORED_EVENTS_KEY, RiskTiers, model_version, score_task
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


def test_patients_who_died_are_left_off_the_list_and_tiers_ranked_among_the_living(scores: pa.Table,
                                                                                    tmp_path: Path) -> None:
    frame = pl.from_arrow(scores).head(5).with_columns(risk=pl.Series([0.9, 0.8, 0.7, 0.2, 0.1]))
    patients = pl.DataFrame({
        "subject_id": frame["subject_id"], "patient_id": [f"p-{i}" for i in range(5)],
        # The riskiest died after the prediction time; the third is dead, the date unknown.
        "death_time": [datetime(2025, 3, 1), None, None, None, None],
        "deceased": [True, False, True, None, False],
    })
    living, left_out = patients_to_list(frame.to_arrow(), patients, RiskTiers(high_share=0.3, medium_share=0.3))
    assert left_out == {"deceased": 2, "outcome_recorded": 0}
    assert pl.from_arrow(living).select("risk", "risk_tier").rows() == [(0.8, "high"), (0.2, "medium"), (0.1, "low")]
    publication = publish(living, patients, tmp_path, "synthetic_1y", 365, "death", {}, left_out=left_out)
    manifest = json.loads((publication.folder / "manifest.json").read_text())
    assert (manifest["n_patients"], manifest["left_out"]) == (3, {"deceased": 2, "outcome_recorded": 0})


def test_patients_whose_outcome_is_recorded_since_are_left_off_and_their_assessments_withdrawn(
        scores: pa.Table, tmp_path: Path) -> None:
    frame = pl.from_arrow(scores).head(5).with_columns(risk=pl.Series([0.9, 0.8, 0.7, 0.2, 0.1]))
    ids = frame["subject_id"].to_list()
    patients = pl.DataFrame({"subject_id": ids, "patient_id": [f"p-{i}" for i in range(5)],
                             "death_time": [None, None, None, None, datetime(2025, 3, 1)],
                             "deceased": [False, False, False, False, True]},
                            schema_overrides={"death_time": pl.Datetime("us")})
    everyone, _ = patients_to_list(frame.to_arrow(), patients.with_columns(death_time=None, deceased=False),
                                   RiskTiers(high_share=0.2, medium_share=0.2))
    publish(everyone, patients, tmp_path / "published", "synthetic_1y", 365, "MACE", {})
    # The riskiest had the outcome after the prediction time; the last had it and then died (counted once,
    # as deceased); the third was censored before the horizon without it (event false: stays on the list).
    labels = tmp_path / "warehouse" / "labels.parquet"
    with pytest.raises(PublishError, match=f"task 'synthetic_1y' has no labels at {labels} "
                                           r"\(they say whose outcome is recorded since the prediction time\): "
                                           "materialize labels first"):
        outcome_recorded_subjects(labels, "synthetic_1y")
    labels.parent.mkdir()
    pl.DataFrame({"subject_id": ids, "event": [True, False, False, False, True]}).write_parquet(labels)
    resolved = outcome_recorded_subjects(labels, "synthetic_1y")
    assert resolved.to_list() == [ids[0], ids[4]]
    listed, left_out = patients_to_list(frame.to_arrow(), patients, RiskTiers(high_share=0.3, medium_share=0.3),
                                        resolved)
    assert left_out == {"deceased": 1, "outcome_recorded": 1}
    assert pl.from_arrow(listed).select("risk", "risk_tier").rows() == [(0.8, "high"), (0.7, "medium"),
                                                                        (0.2, "low")]
    second = publish(listed, patients, tmp_path / "published", "synthetic_1y", 365, "MACE", {}, left_out=left_out,
                     outcome_recorded=resolved)
    withdrawn = pl.read_parquet(second.folder / "withdrawn.parquet")
    assert withdrawn.select("subject_id", "reason").rows() == [
        (ids[0], "the outcome this assessment gave the risk of has been recorded since"),
        (ids[4], "the patient has died since this assessment")]
    assert json.loads((second.folder / "manifest.json").read_text())["left_out"] == left_out


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


def test_items_are_described_with_their_answer_variant_and_value() -> None:
    codes = pl.DataFrame({"code": ["GENE//APOE", "LOINC//72166-2", "SNOMED//77176002", "LOINC//8480-6"],
                          "description": ["Variant in APOE", "Tobacco smoking status", "Smoker",
                                          "Systolic Blood Pressure"]})
    described = dict(codes.iter_rows())
    assert describe_token("GENE//APOE//rs429358", described) == "Variant in APOE: rs429358"
    assert describe_token("LOINC//72166-2//SNOMED//77176002", described) == "Tobacco smoking status: Smoker"
    assert describe_token("LOINC//8480-6", described) == "Systolic Blood Pressure"
    assert describe_token("ICD10CM//I21", described) is None

    def item(name: str, shown: str | None = None, readings: int = 0) -> dict[str, object]:
        return {"modality": "ehr", "item": name, "contribution": 0.01, "value_range": shown, "readings": readings}

    scores = pl.DataFrame(
        {"subject_id": [1, 2], "top_items": [
            [item("GENE//APOE//rs429358", "< 0.5", 1), item("LOINC//8480-6", "140 to 160", 7), item("note n1")],
            [item("LOINC//72166-2//SNOMED//77176002"), item("ICD10CM//I21")],
        ]},
        schema={"subject_id": pl.Int64, "top_items": pl.List(pl.Struct(
            {"modality": pl.String, "item": pl.String, "contribution": pl.Float64, "value_range": pl.String,
             "readings": pl.Int32}))},
    )
    published = describe_items(scores, codes)
    assert published["top_items"].list.eval(pl.element().struct.field("description")).to_list() == [
        ["Variant in APOE: rs429358 < 0.5", "Systolic Blood Pressure 140 to 160, latest of 7", "note n1"],
        ["Tobacco smoking status: Smoker", "ICD10CM//I21"],
    ]


def test_a_value_in_a_codes_other_unit_is_described_with_its_unit() -> None:
    codes = pl.DataFrame({"code": ["LOINC//29463-7"], "description": ["Body Weight"]})
    scores = pl.DataFrame(
        {"subject_id": [1], "top_items": [[
            {"modality": "ehr", "item": "LOINC//29463-7//[lb_av]", "contribution": 0.01,
             "value_range": ">= 165 lb", "readings": 1},
            {"modality": "ehr", "item": "LOINC//29463-7", "contribution": 0.01, "value_range": "< 75 kg",
             "readings": 2}]]},
        schema={"subject_id": pl.Int64, "top_items": pl.List(pl.Struct(
            {"modality": pl.String, "item": pl.String, "contribution": pl.Float64, "value_range": pl.String,
             "readings": pl.Int32}))},
    )
    published = describe_items(scores, codes)
    assert published["top_items"].list.eval(pl.element().struct.field("description")).to_list() == [
        ["Body Weight >= 165 lb", "Body Weight < 75 kg, latest of 2"]]


def test_a_note_or_study_item_is_described_by_its_date_and_kind_not_its_id(tmp_path: Path) -> None:
    def items(*names: str) -> list[dict[str, object]]:
        return [{"modality": "notes", "item": name, "contribution": 0.01, "value_range": None, "readings": 0}
                for name in names]

    scores = pl.DataFrame(
        {"subject_id": [1, 2], "top_items": [items("note n1", "study s1", "LOINC//8480-6"),
                                             items("study s2", "note n9")]},
        schema={"subject_id": pl.Int64, "top_items": pl.List(pl.Struct(
            {"modality": pl.String, "item": pl.String, "contribution": pl.Float64, "value_range": pl.String,
             "readings": pl.Int32}))},
    )
    notes, imaging = tmp_path / "notes.parquet", tmp_path / "imaging.parquet"
    pl.DataFrame({"note_id": ["n1", "n2"], "time": [datetime(2023, 4, 30, 9), datetime(2023, 5, 1)],
                  "note_type": ["progress_note", "discharge_summary"],
                  "text": ["Pt well.", "Home."]}).write_parquet(notes)
    pl.DataFrame({"study_id": ["s1", "s2"], "time": [datetime(2022, 3, 20), datetime(2022, 4, 1)],
                  "modality": ["US", "CT"], "body_site": ["Heart structure", None]}).write_parquet(imaging)
    described = source_item_descriptions(scores.to_arrow(), notes, imaging)
    # Only the items the scores name; n9 is in no table (its item keeps its own name).
    assert sorted(described.rows()) == [("note n1", "Note of 2023-04-30: progress_note"),
                                        ("study s1", "Image of 2022-03-20: US, Heart structure"),
                                        ("study s2", "Image of 2022-04-01: CT")]
    published = describe_items(scores, described)
    assert published["top_items"].list.eval(pl.element().struct.field("description")).to_list() == [
        ["Note of 2023-04-30: progress_note", "Image of 2022-03-20: US, Heart structure", "LOINC//8480-6"],
        ["Image of 2022-04-01: CT", "note n9"],
    ]
    assert source_item_descriptions(scores.to_arrow(), tmp_path / "none.parquet", tmp_path / "none.parquet").is_empty()
    # The tables hold UTC; the date is the site's: 2022-03-20 00:00 UTC was the 19th in New York.
    local = source_item_descriptions(scores.to_arrow(), notes, imaging, "America/New_York")
    assert dict(local.rows())["study s1"] == "Image of 2022-03-19: US, Heart structure"


def test_risk_assessments_are_valid_fhir_r4(scores: pa.Table, tmp_path: Path) -> None:
    publication = publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {})
    lines = (publication.folder / "risk_assessments.ndjson").read_bytes().splitlines()
    assert len(lines) == 800
    for line in lines[:100]:
        resource = get_fhir_model_class("RiskAssessment").model_validate(orjson.loads(line))
        assert resource.subject.reference.startswith("Patient/p-")
        assert 0 <= float(resource.prediction[0].probabilityDecimal) <= 1
        assert resource.prediction[0].whenPeriod.end > resource.prediction[0].whenPeriod.start
        # The tier is a rank, not HL7's probability band ("high": more likely than not).
        assert resource.prediction[0].qualitativeRisk.coding[0].system == "urn:cohortcast:risk-tier"
        assert resource.prediction[0].qualitativeRisk.coding[0].code in ("high", "medium", "low")
    # One id per patient and task, the same in the next version: a write-back replaces the last one.
    ids = [orjson.loads(line)["id"] for line in lines]
    assert len(set(ids)) == 800
    again = publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {})
    assert [orjson.loads(line)["id"] for line in (again.folder / "risk_assessments.ndjson").read_bytes().splitlines()] \
        == ids


def test_risk_assessment_ids_are_fhir_ids_unique_to_task_and_patient() -> None:
    # A long task name had cut the subject ids' digits (1, 12 and 123 shared an id); "mace_1y" and
    # "mace-1y" were one task.
    pairs = [("a" * 62, 1), ("a" * 62, 12), ("a" * 62, 123), ("mace_1y", 5), ("mace-1y", 5), ("x" * 100, 2**62)]
    ids = [risk_assessment_id(task, subject) for task, subject in pairs]
    assert len(set(ids)) == len(pairs)
    assert all(re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", i) for i in ids)


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


def write_summary(warehouse: Path, observations_out: int = 5) -> Path:
    """An ingest accounting: 10 patients (9 out, 1 quarantined) and 5 observations in."""
    summary = IngestSummary(
        landing_dir="landing", warehouse_dir=str(warehouse), export_time=datetime(2026, 1, 1), strict=False,
        files=(FileAccount("fhir", "Patient.ndjson", 10, 9, 1), FileAccount("fhir", "Observation.ndjson", 5,
                                                                            observations_out, 0)),
        table_rows={}, quarantined_by_reason={"bad_value": 1}, duplicates=0, fhir_resources_in=15,
        elapsed_seconds=0.1,
    )
    warehouse.mkdir(parents=True, exist_ok=True)
    (warehouse / SUMMARY_FILE).write_bytes(summary.to_json())
    return warehouse / SUMMARY_FILE


def test_quality_shortfalls_name_each_gate_missed() -> None:
    assert quality_shortfalls({"auroc": 0.55, "calibration_error": 0.1}, 0.55, 0.1) == []
    assert quality_shortfalls({"auroc": 0.376, "calibration_error": 0.25}, 0.55, 0.1) == [
        "held-out auroc 0.3760 (expected >= 0.55)", "held-out calibration_error 0.2500 (expected <= 0.1)"]
    assert quality_shortfalls({"auroc": float("nan"), "calibration_error": 0.0}, 0.0, 1.0) == [
        "held-out auroc nan (expected >= 0.0)"]


def test_publishing_is_refused_unless_the_model_and_the_ingest_pass_their_gates(
    scores: pa.Table, trained_task: TrainedTask, tmp_path: Path
) -> None:
    root, warehouse, model = tmp_path / "published", tmp_path / "warehouse", trained_task.model_dir
    publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {})
    auroc = json.loads((model / "metrics.json").read_text())["models"]["fusion"]["auroc"]
    refused = "publish synthetic_1y refused (live version v0001 unchanged): "

    with pytest.raises(PublishError) as no_summary:
        check_publishable(root, "synthetic_1y", scores, model, warehouse, 0.0, 1.0)
    assert str(no_summary.value) == (refused + f"warehouse {warehouse} has no ingest_summary.json (expected the "
                                     "accounting of the ingest that wrote its tables)")
    summary = write_summary(warehouse, observations_out=4)
    with pytest.raises(PublishError) as unbalanced:
        check_publishable(root, "synthetic_1y", scores, model, warehouse, 0.0, 1.0)
    assert str(unbalanced.value) == (refused + f"{summary}: 1 of 2 source files do not balance (expected "
                                     "records_in == records_out + quarantined; first: Observation.ndjson)")
    write_summary(warehouse)
    (warehouse / ".promoting").write_text(f"{warehouse / 'batches' / '2024-06-02'}\n")  # cut short
    with pytest.raises(PublishError) as half_promoted:
        check_publishable(root, "synthetic_1y", scores, model, warehouse, 0.0, 1.0)
    assert str(half_promoted.value) == (refused + f"warehouse {warehouse}: the promotion of batch 2024-06-02 was cut "
                                        "short or is running (its .promoting is there); run the promotion again "
                                        "(ingest job, from_batch 2024-06-02)")
    (warehouse / ".promoting").unlink()
    with pytest.raises(PublishError) as below:
        check_publishable(root, "synthetic_1y", scores, model, warehouse, 1.0, 1.0)
    assert str(below.value) == (refused + f"model {model} misses the task's quality gates: held-out auroc "
                                f"{auroc:.4f} (expected >= 1.0)")
    with pytest.raises(PublishError) as no_model:
        check_publishable(root, "synthetic_1y", scores, tmp_path / "untrained", warehouse, 0.0, 1.0)
    assert str(no_model.value) == (refused + f"model folder {tmp_path / 'untrained'} does not exist (train a model "
                                   "first: `cohortcast train`)")
    # Metrics edited since training (here: to pass a gate the model fails) are not read as the model's.
    edited = shutil.copytree(model, tmp_path / "edited")
    metrics = json.loads((edited / "metrics.json").read_text())
    metrics["models"]["fusion"]["auroc"] = 0.99
    (edited / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(PublishError, match=rf"^{re.escape(refused)}model folder {re.escape(str(edited))}: "
                                           r"metrics.json has SHA-256 [0-9a-f]{12} \(expected [0-9a-f]{12}\), as"):
        check_publishable(root, "synthetic_1y", scores, edited, warehouse, 0.95, 1.0)
    other = scores.set_column(scores.schema.get_field_index("model_version"), "model_version",
                              pa.array(["synthetic_1y-000000000000"] * scores.num_rows))
    with pytest.raises(PublishError) as stale:
        check_publishable(root, "synthetic_1y", other, model, warehouse, 0.0, 1.0)
    assert str(stale.value) == (refused + "the scores were made by model synthetic_1y-000000000000, the model "
                                f"folder {model} holds {model_version(model)} (score the task again)")
    # The task file edited since training: its outcome and horizon, which the publication states,
    # are not what the model predicts.
    target = json.loads((model / "cohortcast_model.json").read_text())["prediction_target"]
    with pytest.raises(PublishError) as edited_task:
        check_publishable(root, "synthetic_1y", scores, model, warehouse, 0.0, 1.0, target | {"horizon_days": 730.0})
    assert str(edited_task.value) == (refused + f"model {model} was trained with horizon_days 365.0, task "
                                      "'synthetic_1y' now has 730.0 (the task file was edited since training; train "
                                      "the model again)")
    # Scores of inputs built before another ingest was put in place.
    earlier = scores.replace_schema_metadata({SCORED_EVENTS_KEY: b"events.parquet:1024:1700000000000000000"})
    with pytest.raises(PublishError) as other_ingest:
        check_publishable(root, "synthetic_1y", earlier, model, warehouse, 0.0, 1.0, target)
    assert str(other_ingest.value) == (
        refused + "the scores are of inputs built from events.parquet:1024:1700000000000000000 (name:bytes:mtime), "
        f"warehouse {warehouse} now holds events.parquet:absent (another ingest or batch was put in place since); "
        "build the task inputs and score the task again")
    assert current_version(root, "synthetic_1y") == "v0001"
    assert sorted(p.name for p in (root / "synthetic_1y").iterdir()) == ["CURRENT", "v0001"]
    check_publishable(root, "synthetic_1y", scores, model, warehouse, 0.0, 1.0, target)


@pytest.mark.parametrize("metrics", [b"{not json", b'{"models": {"fusion": {"calibration_error": 0.05}}}',
                                     b'{"models": []}', b"[]"])
def test_metrics_without_the_gates_values_are_refused_with_one_line(tmp_path: Path, metrics: bytes) -> None:
    # A folder of format 3 has no digests to catch a damaged metrics.json before it is read.
    path = tmp_path / "metrics.json"
    path.write_bytes(metrics)
    expected = (f"refused: {path} is not JSON" if metrics.startswith(b"{not") else
                f"refused: {path} has no models.fusion auroc and calibration_error (expected the held-out metrics "
                "training writes; train the model again)")
    with pytest.raises(PublishError, match=f"^{re.escape(expected)}"):
        _fusion_metrics(path, "refused")


def test_a_candidate_below_the_gates_is_not_deployed_and_a_model_a_crash_left_aside_is_put_back(
        trained_task: TrainedTask, tmp_path: Path) -> None:
    candidate, live = tmp_path / "candidate_models" / "t", tmp_path / "models" / "t"
    shutil.copytree(trained_task.model_dir, candidate)
    # A deployment killed between its two renames left the model before aside, and none in place.
    aside = shutil.copytree(trained_task.model_dir, live.with_name(".t.retired"))
    metrics = json.loads((aside / "metrics.json").read_text())
    (aside / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": -1}))  # another model than the candidate
    auroc = json.loads((candidate / "metrics.json").read_text())["models"]["fusion"]["auroc"]
    with pytest.raises(PublishError, match=rf"model {candidate} not deployed: held-out auroc {auroc:.4f} "
                                           rf"\(expected >= 1\.0\); the model in {live} stays"):
        deploy_model(candidate, live, min_auroc=1.0, max_calibration_error=1.0)
    assert (live / "model.safetensors").read_bytes() == (trained_task.model_dir / "model.safetensors").read_bytes()
    assert json.loads((live / "metrics.json").read_text())["best_epoch"] == -1  # the model put back
    assert deploy_model(candidate, live, min_auroc=0.0, max_calibration_error=1.0) == live
    assert "deployed" in json.loads((live / "cohortcast_model.json").read_text())
    assert (live / "metrics.json").read_bytes() == (candidate / "metrics.json").read_bytes()
    deployed = (live / "cohortcast_model.json").read_text()
    assert deploy_model(candidate, live, min_auroc=0.0, max_calibration_error=1.0) == live  # deployed already
    assert (live / "cohortcast_model.json").read_text() == deployed
    # A deployed folder damaged since (a file edited or lost) is not the candidate's model whole:
    # deploying the same candidate again puts it back, and it stays the model deployed at that
    # time, its drift measured against the same model before it.
    save_reference(live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}", {"train": np.full(10, 0.25)})
    previous = (live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").read_bytes()
    (live / "history.json").write_text("[]")
    assert deploy_model(candidate, live, min_auroc=0.0, max_calibration_error=1.0) == live
    assert (live / "history.json").read_bytes() == (candidate / "history.json").read_bytes()
    assert json.loads((live / "cohortcast_model.json").read_text())["deployed"] == json.loads(deployed)["deployed"]
    assert (live / f"{PREVIOUS_PREFIX}{REFERENCE_FILE}").read_bytes() == previous
    (live / "vocabulary.json").unlink()
    assert deploy_model(candidate, live, min_auroc=0.0, max_calibration_error=1.0) == live
    assert (live / "vocabulary.json").read_bytes() == (candidate / "vocabulary.json").read_bytes()


def test_a_reader_holding_the_database_open_never_blocks_a_publish(scores: pa.Table, tmp_path: Path) -> None:
    root = tmp_path / "published"
    publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r1"})
    # The web page or an analyst's session has the database open while the nightly run publishes
    # two tasks: a writer in place would wait for its lock, and the publish had failed.
    reader = duckdb.connect(str(root / "cohortcast.duckdb"), read_only=True)
    try:
        publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r2"})
        publish(scores.slice(0, 10).set_column(2, "task", pa.array(["other_1y"] * 10)), patients_table(scores),
                root, "other_1y", 365, "death", {"run_id": "r3"})
        # The reader keeps the database it opened until it opens it again.
        assert reader.execute("SELECT count(*) FROM publications").fetchone() == (1,)
    finally:
        reader.close()
    with duckdb.connect(str(root / "cohortcast.duckdb"), read_only=True) as db:
        live = db.execute("SELECT task, version, count(*) FROM published_scores GROUP BY ALL ORDER BY task")
        assert live.fetchall() == [("other_1y", "v0001", 10), ("synthetic_1y", "v0002", 800)]
        assert db.execute("SELECT task, version, n_patients FROM publications ORDER BY task, version").fetchall() == [
            ("other_1y", "v0001", 10), ("synthetic_1y", "v0001", 800), ("synthetic_1y", "v0002", 800)]
    assert sorted(p.name for p in root.iterdir() if not p.is_dir()) == [
        ".publish.lock", "cohortcast.duckdb", "cohortcast_published.json"]


def test_the_database_is_rebuilt_from_the_live_versions(scores: pa.Table, tmp_path: Path) -> None:
    root = tmp_path / "published"
    publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r1"})
    publish(scores.slice(0, 5), patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r2"})
    # A publish killed after moving CURRENT back to v0001 (by hand, here) and before the database:
    # the next rebuild follows CURRENT, and the database is derived from the folders alone.
    (root / "synthetic_1y" / "CURRENT").write_text("v0001\n")
    (root / "cohortcast.duckdb").unlink()
    (root / ".cohortcast.duckdb.999.partial").write_bytes(b"a killed rebuild's file")
    rebuild_database(root)
    assert not list(root.glob("*.partial"))
    with duckdb.connect(str(root / "cohortcast.duckdb"), read_only=True) as db:
        assert db.execute("SELECT version, count(*) FROM published_scores GROUP BY ALL").fetchall() == [("v0001", 800)]
        lineage = db.execute("SELECT lineage FROM publications ORDER BY version").fetchall()
        assert [json.loads(row[0]) for row in lineage] == [{"run_id": "r1"}, {"run_id": "r2"}]


def test_live_scores_that_cannot_be_read_are_one_line(scores: pa.Table, tmp_path: Path) -> None:
    root = tmp_path / "published"
    publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r1"})
    (root / "synthetic_1y" / "CURRENT").write_text("v0009\n")
    with pytest.raises(PublishError, match=r"CURRENT names version 'v0009', which has no scores.parquet"):
        current_scores(root, "synthetic_1y")
    (root / "cohortcast_published.json").write_text(json.dumps({"format_version": 0}))
    with pytest.raises(PublishError, match=r"has format version 0, this cohortcast writes version 1"):
        current_scores(root, "synthetic_1y")


def test_the_change_since_the_last_version_compares_only_risks_of_one_outcome_and_horizon(
        scores: pa.Table, tmp_path: Path) -> None:
    assert comparable_scores(tmp_path, "synthetic_1y", 365, "death") is None  # nothing published yet
    publish(scores, patients_table(scores), tmp_path, "synthetic_1y", 365, "death", {})
    assert comparable_scores(tmp_path, "synthetic_1y", 365, "death").height == 800  # type: ignore[union-attr]
    assert comparable_scores(tmp_path, "synthetic_1y", 730, "death") is None
    assert comparable_scores(tmp_path, "synthetic_1y", 365, "stroke") is None


def test_scores_written_before_the_previous_model_was_carried_still_publish(scores: pa.Table,
                                                                           tmp_path: Path) -> None:
    older = scores.drop_columns(["previous_model_version"])
    living, _ = patients_to_list(older, patients_table(scores).with_columns(
        death_time=pl.lit(None, dtype=pl.Datetime("us")), deceased=pl.lit(False)), RiskTiers())
    assert living.column("previous_model_version").null_count == 800


def test_a_publish_whose_database_cannot_be_built_leaves_the_live_version(scores: pa.Table, tmp_path: Path) -> None:
    root = tmp_path / "published"
    publish(scores, patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r1"})
    manifest = root / "synthetic_1y" / "v0001" / "manifest.json"
    kept = manifest.read_bytes()
    manifest.write_text('{"task": ')  # damaged
    with pytest.raises(PublishError, match=re.escape(
            f"published version {root / 'synthetic_1y' / 'v0001'}: manifest.json cannot be read (JSONDecodeError); "
            "restore it, or move the version folder out of the published folder")):
        publish(scores.slice(0, 5), patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r2"})
    assert current_version(root, "synthetic_1y") == "v0001"
    assert sorted(p.name for p in (root / "synthetic_1y").iterdir()) == ["CURRENT", "v0001"]
    manifest.write_bytes(kept)
    # Another task's live scores damaged: the database cannot be built, and no version is left behind.
    publish(scores.slice(0, 5).set_column(2, "task", pa.array(["broken_1y"] * 5)), patients_table(scores), root,
            "broken_1y", 365, "death", {"run_id": "r0"})
    broken = root / "broken_1y" / "v0001" / "scores.parquet"
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(PublishError, match=r"publish synthetic_1y refused \(live version unchanged\): "
                                           r"cohortcast.duckdb could not be built \("):
        publish(scores.slice(0, 5), patients_table(scores), root, "synthetic_1y", 365, "death", {"run_id": "r2"})
    assert sorted(p.name for p in (root / "synthetic_1y").iterdir()) == ["CURRENT", "v0001"]
    shutil.rmtree(root / "broken_1y")
    # Scores published before explaining items carried a description: their items name themselves.
    old = root / "synthetic_1y" / "v0001" / "scores.parquet"
    fields = [pl.element().struct.field(name) for name in ("modality", "item", "contribution")]
    pl.read_parquet(old).with_columns(pl.col("top_items").list.eval(pl.struct(fields))).write_parquet(old)
    publish(scores.slice(0, 5).set_column(2, "task", pa.array(["other_1y"] * 5)), patients_table(scores), root,
            "other_1y", 365, "death", {"run_id": "r3"})
    with duckdb.connect(str(root / "cohortcast.duckdb"), read_only=True) as db:
        assert db.execute("SELECT task, version, count(*) FROM published_scores GROUP BY ALL ORDER BY task"
                          ).fetchall() == [("other_1y", "v0001", 5), ("synthetic_1y", "v0001", 800)]
        first = db.execute("SELECT top_items FROM published_scores WHERE task = 'synthetic_1y' ORDER BY subject_id "
                           "LIMIT 1").fetchone()
    row = pl.read_parquet(old).sort("subject_id").row(0, named=True)
    assert first == ("; ".join(item["item"] for item in row["top_items"]),)


def test_patients_off_the_list_since_the_last_version_have_their_assessments_withdrawn(scores: pa.Table,
                                                                                    tmp_path: Path) -> None:
    frame = pl.from_arrow(scores).head(4)
    ids = frame["subject_id"].to_list()
    alive = pl.DataFrame({"subject_id": ids, "patient_id": [f"p-{i}" for i in range(4)],
                          "death_time": [None] * 4, "deceased": [False] * 4},
                         schema_overrides={"death_time": pl.Datetime("us")})
    first = publish(frame.to_arrow(), alive, tmp_path, "synthetic_1y", 365, "death", {})
    assert len((first.folder / "risk_assessments.ndjson").read_bytes().splitlines()) == 4
    # The second patient died before the next run; the fourth left the cohort alive (or was merged
    # into another patient id).
    now = alive.with_columns(death_time=pl.Series([None, datetime(2025, 3, 1), None, None], dtype=pl.Datetime("us")))
    living, _ = patients_to_list(frame.head(3).to_arrow(), now, RiskTiers())
    second = publish(living, now, tmp_path, "synthetic_1y", 365, "death", {})

    def statuses(folder: Path) -> list[tuple[str, str, str]]:
        resources = [orjson.loads(line) for line in (folder / "risk_assessments.ndjson").read_bytes().splitlines()]
        return [(r["id"], r["status"], r["note"][0]["text"] if "note" in r else "") for r in resources]

    withdrawn = [(risk_assessment_id("synthetic_1y", ids[1]), "cancelled",
                  "Withdrawn: the patient has died since this assessment; the patient is no longer on this list."),
                 (risk_assessment_id("synthetic_1y", ids[3]), "cancelled",
                  "Withdrawn: the patient has left the task's cohort, or has another patient id now; the patient is "
                  "no longer on this list.")]
    assert statuses(second.folder) == [(risk_assessment_id("synthetic_1y", ids[0]), "final", ""),
                                       (risk_assessment_id("synthetic_1y", ids[2]), "final", ""), *withdrawn]
    lines = (second.folder / "risk_assessments.ndjson").read_bytes().splitlines()
    cancelled = get_fhir_model_class("RiskAssessment").model_validate(orjson.loads(lines[2]))
    assert cancelled.subject.reference == "Patient/p-1" and cancelled.prediction is None
    assert json.loads((second.folder / "manifest.json").read_text())["withdrawn_assessments"] == 2
    # Every version repeats the withdrawals, so a write-back that reads only the live one misses none;
    # a patient back on the list is no longer withdrawn.
    third = publish(living, now, tmp_path, "synthetic_1y", 365, "death", {})
    assert statuses(third.folder)[2:] == withdrawn
    back = pl.from_arrow(living).vstack(pl.from_arrow(frame.tail(1).to_arrow()).select(pl.from_arrow(living).columns))
    living_again, _ = patients_to_list(back.to_arrow(), now, RiskTiers())
    fourth = publish(living_again, now, tmp_path, "synthetic_1y", 365, "death", {})
    assert statuses(fourth.folder)[3:] == withdrawn[:1]


def test_the_lineage_names_the_export_batch_and_model_a_version_came_from(trained_task: TrainedTask,
                                                                         tmp_path: Path) -> None:
    warehouse = tmp_path / "warehouse"
    write_summary(warehouse)
    (warehouse / "promoted_batch.txt").write_text("2026-01-01\n")
    info = json.loads((trained_task.model_dir / "cohortcast_model.json").read_text())
    assert data_lineage(warehouse, trained_task.model_dir) == {
        "warehouse": str(warehouse), "ingested_from": "landing", "batch": "2026-01-01",
        "export_time": "2026-01-01T00:00:00", "fhir_export_time": None, "model": str(trained_task.model_dir),
        "model_version": model_version(trained_task.model_dir),
        "training_fingerprint": info.get("training_fingerprint"),
    }


def test_versions_go_on_past_v9999(scores: pa.Table, tmp_path: Path) -> None:
    # Four digits sort by name only up to v9999: the 10,000th publication had picked v10000 again.
    task_root = tmp_path / "pub" / "synthetic_1y"
    publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {})
    for name in ("v0002", "v9999", "v10000", "v0010"):
        shutil.copytree(task_root / "v0001", task_root / name)
    for name in ("vABCD", "v12"):  # not versions
        (task_root / name).mkdir()
    assert published_versions(task_root) == ["v0001", "v0002", "v0010", "v9999", "v10000"]
    publication = publish(scores, patients_table(scores), tmp_path / "pub", "synthetic_1y", 365, "death", {})
    assert publication.version == "v10001"
    assert current_version(tmp_path / "pub", "synthetic_1y") == "v10001"
