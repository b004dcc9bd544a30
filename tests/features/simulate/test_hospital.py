"""Tests of the simulated hospital's landing zone: FHIR validity, determinism, linkage, contracts."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from fhir.resources.R4B import get_fhir_model_class

from features.errors import LandingZoneError, SimulationError
from features.schemas import GENOMICS_VARIANTS_INPUT, IMAGING_INPUT, NOTES_INPUT, TRUTH
from features.simulate import SimulationConfig, simulate_hospital
from features.simulate.vocabulary import EXPRESSION_FEATURES, VARIANTS


def read_resources(landing: Path) -> list[dict[str, Any]]:
    """Every FHIR resource of a landing zone, from NDJSON files and Bundle entries."""
    resources = []
    for path in sorted((landing / "fhir").iterdir()):
        if path.suffix == ".ndjson":
            resources += [orjson.loads(line) for line in path.read_bytes().splitlines()]
        else:
            bundle = orjson.loads(path.read_bytes())
            resources += [entry["resource"] for entry in bundle["entry"]]
    return resources


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 patients, a quarter of them as Bundles, in several shards."""
    out = tmp_path_factory.mktemp("tiny") / "landing"
    simulate_hospital(out, SimulationConfig(n_patients=40, seed=3, bundle_share=0.25, patients_per_shard=15))
    return out


def test_every_resource_and_bundle_validates_as_fhir_r4(tiny_hospital: Path) -> None:
    counts: Counter[str] = Counter()
    for path in sorted((tiny_hospital / "fhir").iterdir()):
        if path.suffix == ".ndjson":
            for line in path.read_bytes().splitlines():
                resource = orjson.loads(line)
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
                counts[resource["resourceType"]] += 1
        else:
            bundle = get_fhir_model_class("Bundle").model_validate(orjson.loads(path.read_bytes()))
            assert bundle.type == "transaction"
            counts["Bundle"] += 1
    assert counts["Patient"] + counts["Bundle"] == 40
    assert counts["Bundle"] > 0
    for resource_type in ("Encounter", "Condition", "Observation", "MedicationRequest", "Procedure",
                          "DocumentReference", "ImagingStudy", "Immunization", "Organization"):
        assert counts[resource_type] > 0, resource_type


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    config = SimulationConfig(n_patients=60, seed=11, patients_per_shard=20)
    simulate_hospital(tmp_path / "a", config, workers=1)
    simulate_hospital(tmp_path / "b", config, workers=2)
    simulate_hospital(tmp_path / "c", SimulationConfig(n_patients=60, seed=12, patients_per_shard=20))
    digest_a = tree_digest(tmp_path / "a")
    assert digest_a == tree_digest(tmp_path / "b")
    assert digest_a["truth.parquet"] != tree_digest(tmp_path / "c")["truth.parquet"]
    assert "fhir/Observation.002.ndjson" in digest_a


def test_every_reference_and_modality_row_links_to_an_existing_patient(small_hospital: Path) -> None:
    resources = read_resources(small_hospital)
    by_type: dict[str, set[str]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], set()).add(r["id"])
    patients = by_type["Patient"]
    assert len(patients) == 300

    def target(reference: str) -> tuple[str, str]:
        if reference.startswith("urn:uuid:"):
            rid = reference.removeprefix("urn:uuid:")
            return next(t for t, ids in by_type.items() if rid in ids), rid
        resource_type, rid = reference.split("/")
        return resource_type, rid

    for r in resources:
        subject = r.get("subject") or r.get("patient")
        if r["resourceType"] in ("Patient", "Organization", "Practitioner"):
            continue
        assert target(subject["reference"]) [1] in patients
        encounter = r.get("encounter")
        if encounter is not None:
            resource_type, rid = target(encounter["reference"])
            assert resource_type == "Encounter" and rid in by_type["Encounter"]

    notes = pq.read_table(small_hospital / "notes" / "notes.parquet")
    variants = pq.read_table(small_hospital / "genomics" / "variants.parquet")
    expression = pa_csv.read_csv(small_hospital / "genomics" / "expression_panel.tsv",
                                 parse_options=pa_csv.ParseOptions(delimiter="\t"))
    imaging = pq.read_table(small_hospital / "imaging" / "embeddings.parquet")
    for table in (notes, variants, expression, imaging):
        assert table.num_rows > 0
        assert set(table.column("patient_id").to_pylist()) <= patients
    assert set(imaging.column("study_id").to_pylist()) == by_type["ImagingStudy"]


def test_tables_follow_the_landing_zone_contracts(small_hospital: Path) -> None:
    notes = pq.read_table(small_hospital / "notes" / "notes.parquet")
    assert notes.schema.equals(NOTES_INPUT)
    variants = pq.read_table(small_hospital / "genomics" / "variants.parquet")
    assert variants.schema.equals(GENOMICS_VARIANTS_INPUT)
    n_genotyped = len(set(variants.column("patient_id").to_pylist()))
    assert variants.num_rows == n_genotyped * len(VARIANTS)
    assert set(variants.column("genotype").to_pylist()) == {0, 1, 2}
    expression = pa_csv.read_csv(small_hospital / "genomics" / "expression_panel.tsv",
                                 parse_options=pa_csv.ParseOptions(delimiter="\t"))
    assert expression.column_names == ["patient_id", *EXPRESSION_FEATURES]
    imaging = pq.read_table(small_hospital / "imaging" / "embeddings.parquet")
    assert imaging.schema.equals(IMAGING_INPUT)
    lengths = pa.compute.list_value_length(imaging.column("embedding"))
    assert pa.compute.min_max(lengths).as_py() == {"min": 64, "max": 64}
    truth = pq.read_table(small_hospital / "truth.parquet")
    assert truth.schema.remove_metadata().equals(TRUTH)
    assert truth.schema.metadata[b"weibull_shape"] == b"1.2"
    manifest = json.loads((small_hospital / "simulation.json").read_text())
    assert manifest["resources_by_type"]["Patient"] == 300
    assert 10 < manifest["n_bundles"] < 55


def test_optional_modalities_are_missing_for_realistic_shares(small_hospital: Path) -> None:
    truth = pq.read_table(small_hospital / "truth.parquet").to_pydict()
    for column, low, high in (("has_notes", 0.8, 0.97), ("has_genomics", 0.3, 0.5),
                              ("has_imaging", 0.33, 0.6)):
        share = np.mean(truth[column])
        assert low < share < high, (column, share)
    imaged = {p for p, has in zip(truth["patient_id"], truth["has_imaging"], strict=True) if has}
    imaging = pq.read_table(small_hospital / "imaging" / "embeddings.parquet")
    assert set(imaging.column("patient_id").to_pylist()) == imaged
    # The truth says whose expression panel is written: part of the genotyped patients.
    panel = pa_csv.read_csv(small_hospital / "genomics" / "expression_panel.tsv",
                            parse_options=pa_csv.ParseOptions(delimiter="\t"))
    with_panel = {p for p, has in zip(truth["patient_id"], truth["has_expression"], strict=True) if has}
    genotyped = {p for p, has in zip(truth["patient_id"], truth["has_genomics"], strict=True) if has}
    assert set(panel.column("patient_id").to_pylist()) == with_panel
    assert with_panel < genotyped and 0.6 < len(with_panel) / len(genotyped) < 0.95


def test_notes_are_base64_prose_that_carries_the_note_severity(small_hospital: Path) -> None:
    truth = pq.read_table(small_hospital / "truth.parquet").to_pydict()
    severity = dict(zip(truth["patient_id"], truth["note_severity"], strict=True))
    affirmed = {"high": [], "low": []}
    for r in read_resources(small_hospital):
        if r["resourceType"] != "DocumentReference":
            continue
        attachment = r["content"][0]["attachment"]
        assert attachment["contentType"] == "text/plain; charset=utf-8"
        text = base64.b64decode(attachment["data"]).decode("utf-8")
        patient = r["subject"]["reference"].split("/")[-1].removeprefix("urn:uuid:")
        group = "high" if severity[patient] > 1 else "low" if severity[patient] < -1 else None
        if group is not None and text.startswith("CARDIOLOGY CONSULT"):
            symptoms = ("SOB on exertion", "DOE", "chest tightness", "CP radiating", "pitting edema",
                        "orthopnea", "fatigue", "lives alone", "missing doses", "walker")
            affirmed[group].append(sum(s in text for s in symptoms))
    assert len(affirmed["high"]) > 10 and len(affirmed["low"]) > 10
    assert np.mean(affirmed["high"]) > np.mean(affirmed["low"]) + 1.0


def test_imaging_embeddings_encode_the_imaging_severity(small_hospital: Path) -> None:
    truth = pq.read_table(small_hospital / "truth.parquet").to_pydict()
    severity = dict(zip(truth["patient_id"], truth["imaging_severity"], strict=True))
    imaging = pq.read_table(small_hospital / "imaging" / "embeddings.parquet").to_pydict()
    echo = [k for k, m in enumerate(imaging["modality"]) if m == "US"]
    x = np.array([imaging["embedding"][k] for k in echo])
    y = np.array([severity[imaging["patient_id"][k]] for k in echo])
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r_squared = 1 - np.var(y - design @ coef) / np.var(y)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert r_squared > 0.6


def test_censored_patients_have_records_that_stop(small_hospital: Path) -> None:
    truth = pq.read_table(small_hospital / "truth.parquet").to_pandas()
    dead = set(truth.loc[truth.event_type == "cardiovascular_death", "patient_id"])
    resources = read_resources(small_hospital)
    deceased = {r["id"] for r in resources if r["resourceType"] == "Patient" and "deceasedDateTime" in r}
    assert deceased == dead and dead
    assert (~truth.event_observed & (truth.observed_time_days < truth.horizon_days)).sum() > 0


def test_rejects_bad_settings_without_writing(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match=r"patients must be at least 1 \(got -5\)"):
        simulate_hospital(tmp_path / "out", SimulationConfig(n_patients=-5))
    with pytest.raises(SimulationError, match=r"genomics_share must be between 0 and 1 \(got 1.5\)"):
        simulate_hospital(tmp_path / "out", SimulationConfig(n_patients=5, genomics_share=1.5))
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "landing"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(LandingZoneError, match="is not empty \\(pass --overwrite to replace it\\)"):
        simulate_hospital(out, SimulationConfig(n_patients=5))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # Not a simulation: even --overwrite leaves it (a hospital's export put where the simulator writes).
    with pytest.raises(LandingZoneError, match=r"holds files but no simulation\.json, so it is not a simulation: "
                                               r"--overwrite replaces only the simulator's own output"):
        simulate_hospital(out, SimulationConfig(n_patients=5), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    simulate_hospital(out, SimulationConfig(n_patients=5))
    (out / "fhir" / "stray.ndjson").write_text("{}\n")
    simulate_hospital(out, SimulationConfig(n_patients=5), overwrite=True)  # a simulation: replaced
    assert not (out / "fhir" / "stray.ndjson").exists()
    assert (out / "truth.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".landing.lock", "landing"]


def test_a_second_simulation_is_refused_and_a_killed_ones_staging_is_cleared(tmp_path: Path) -> None:
    out = tmp_path / "landing"
    # What a simulation killed with SIGKILL leaves: its staging folder, half written; and one of
    # another folder's, which stays.
    (tmp_path / ".landing.k1ll3d.partial" / "fhir").mkdir(parents=True)
    (tmp_path / ".landing.k1ll3d.partial" / "fhir" / "Patient.ndjson").write_text("{}\n")
    (tmp_path / ".landing2.x.partial").mkdir()
    with (tmp_path / ".landing.lock").open("a+b") as held:
        held.write(b"4242\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LandingZoneError, match=rf"output folder {out} is being written by another simulation "
                                                   r"\(process 4242 holds \.landing\.lock\); wait for it"):
            simulate_hospital(out, SimulationConfig(n_patients=5))
        assert (tmp_path / ".landing.k1ll3d.partial").is_dir()  # the running one's staging is left alone
    simulate_hospital(out, SimulationConfig(n_patients=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".landing.lock", ".landing2.x.partial", "landing"]
    assert (out / "truth.parquet").is_file()


def test_no_drug_or_note_is_dated_after_the_patient_died_left_care_or_was_exported(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    config = SimulationConfig(n_patients=1000, seed=3)
    simulate_hospital(landing, config, workers=1)
    truth = pq.read_table(landing / "truth.parquet").to_pylist()
    export_time = datetime(config.export_date.year, config.export_date.month, config.export_date.day)
    ends = {}
    for t in truth:
        died = t["event_observed"] and t["event_type"] == "cardiovascular_death"
        days = t["event_time_days"] if died else t["censoring_time_days"]
        ends[t["patient_id"]] = min(t["prediction_time"] + timedelta(days=days), export_time)
    late = []
    for r in read_resources(landing):
        if r["resourceType"] == "MedicationRequest":
            patient = r["subject"]["reference"].rsplit("/", 1)[-1].removeprefix("urn:uuid:")
            authored = datetime.fromisoformat(r["authoredOn"].replace("Z", "+00:00")).astimezone(UTC).replace(
                tzinfo=None)
            if patient in ends and authored >= ends[patient]:
                late.append(("drug", patient, authored))
    for row in pq.read_table(landing / "notes" / "notes.parquet").to_pylist():
        if row["time"] >= ends[row["patient_id"]]:
            late.append(("note", row["patient_id"], row["time"]))
    assert late == []
