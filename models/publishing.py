"""Publishing: a versioned, queryable cohort for care teams, EHRs and researchers.

Stage: publishing. In: a task's ``scores`` table, the ``patients`` table (to map subject ids back to
the EHR's patient ids), the task's horizon and the run's lineage. Out, under the published folder:

* ``<task>/v0001/scores.parquet`` — the scores with the patient id, tier and explanation (each
  explaining item with a ``description``: a code's, from the warehouse's ``codes`` table, so a care
  team reads "Systolic Blood Pressure" rather than ``LOINC//8480-6``);
* ``<task>/v0001/risk_assessments.ndjson`` — FHIR R4 ``RiskAssessment`` resources for write-back;
* ``<task>/v0001/manifest.json`` — model version, run id, data lineage, row counts;
* ``<task>/CURRENT`` — the live version, switched atomically only once the version is complete;
* ``cohortcast.duckdb`` — table ``published_scores`` (the live rows of every task) and
  ``publications`` (every version ever published), for the web page and analysts.

A version folder is never changed after it is written, so a consumer reading the previous version
while a new one is published keeps a consistent view; a failed publish leaves ``CURRENT`` as it was.

:func:`check_publishable` applies the gates again at publish time, on what is about to go live: the
model folder's own held-out metrics against the task's quality gates (:func:`quality_shortfalls`,
the rule of the model's quality check), the scores made by that model, and the warehouse's ingest
accounting. A run's blocking checks only stop the run they are in, and a run that only re-scores
and publishes (the nightly one) has neither the model's check nor the ingest's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from features.cohorts import site_clock
from features.errors import CohortcastError
from features.ingest import PROMOTED_BATCH_FILE, SUMMARY_FILE, IngestSummary, unsettled_warehouse
from features.io import staging_dir
from features.schemas import SCORES
from features.task_inputs import warehouse_events_key
from features.units import unit_print_symbol
from models.scoring import SCORED_EVENTS_KEY, RiskTiers
from models.scoring import model_version as model_version_of
from models.task_model import ModelFolderError, check_model_folder, check_prediction_target, promote_model

PUBLISHED_FORMAT_VERSION = 1
RISK_TIER_SYSTEM = "urn:cohortcast:risk-tier"
"""The code system of a RiskAssessment's tier (``high``, ``medium``, ``low``): ranks in the task's cohort."""
FORMAT_FILE = "cohortcast_published.json"
DATABASE = "cohortcast.duckdb"
PUBLISH_LOCK = ".publish.lock"
PUBLISHED_SCORES_SCHEMA = pl.Schema({
    "task": pl.String(), "subject_id": pl.Int64(), "patient_id": pl.String(), "prediction_time": pl.Datetime("us"),
    "risk": pl.Float64(), "risk_tier": pl.String(), "previous_risk": pl.Float64(),
    "previous_model_version": pl.String(), "treatment_effect": pl.Float64(),
    "model_version": pl.String(), "top_items": pl.String(), "version": pl.String(),
})
"""Columns of the database's ``published_scores``: a task's live rows, items as their descriptions."""
PUBLICATIONS_SCHEMA = pl.Schema({
    "task": pl.String(), "version": pl.String(), "created": pl.String(), "n_patients": pl.Int64(),
    "n_high_risk": pl.Int64(), "model_version": pl.String(), "lineage": pl.String(),
})
"""Columns of the database's ``publications``: every version's manifest, lineage as JSON text."""
PUBLICATION_COLUMNS = tuple(PUBLICATIONS_SCHEMA)


class PublishError(CohortcastError):
    """The published folder cannot take a new version, or what would be published fails a gate."""


@dataclass(frozen=True)
class Publication:
    task: str
    version: str
    folder: Path
    n_patients: int
    n_high_risk: int


def deploy_model(candidate: Path, live: Path, min_auroc: float, max_calibration_error: float) -> Path:
    """Make the model in ``candidate`` the one scoring reads (``live``) if its held-out metrics meet
    the quality gates (:func:`quality_shortfalls`); return ``live``. A candidate deployed already
    (``live`` whole, with the same file digests) is left as it is, with its deployment time; over a
    damaged copy of it, it is deployed again (:func:`models.task_model.promote_model` repairs).

    Raises
    ------
    PublishError
        When the candidate misses a gate: ``live`` keeps the model before it.
    ModelFolderError
        When ``candidate`` is not a whole model folder of a version this cohortcast reads
        (:func:`models.task_model.check_model_folder`).
    """
    if not candidate.is_dir():
        raise PublishError(f"model folder {candidate} does not exist (train the model first: `cohortcast train`)")

    def shortfalls_of(folder: Path) -> list[str]:  # a folder check_model_folder passed: metrics.json is there
        fusion = _fusion_metrics(folder / "metrics.json", f"model {candidate} not deployed")
        return quality_shortfalls(fusion, min_auroc, max_calibration_error)

    if _same_model(candidate, live):
        # Deployed already: its deployment time and drift references stay, but the gates still apply.
        shortfalls = shortfalls_of(live)
        if shortfalls:
            raise PublishError(f"model {live} is deployed but misses the gates: {'; '.join(shortfalls)}")
        return live

    def meets_gates(staged: Path) -> None:
        shortfalls = shortfalls_of(staged)
        if shortfalls:
            kept = f"the model in {live} stays" if live.is_dir() else f"no model is deployed at {live}"
            raise PublishError(f"model {candidate} not deployed: {'; '.join(shortfalls)}; {kept}")

    return promote_model(candidate, live, accept=meets_gates)


def _same_model(candidate: Path, live: Path) -> bool:
    """Whether ``live`` holds the candidate's model already, whole: the same files as training wrote
    them (:func:`models.task_model.model_file_digests`). A damaged or edited ``live`` is not the same,
    so deploying the candidate again repairs it."""
    try:
        deployed = check_model_folder(live)
    except ModelFolderError:
        return False
    files = deployed.get("files")  # none in a folder of version 3
    return files is not None and bool(files == check_model_folder(candidate).get("files"))


def check_published_root(root: Path) -> None:
    """Raise :class:`PublishError` unless ``root`` is a writable published folder of this format, or empty."""
    _check_format(root)
    probe = root if root.exists() else root.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PublishError(f"published folder {root} is not writable")


def _check_format(root: Path) -> None:
    """Raise :class:`PublishError` unless ``root`` is a published folder of this format, or empty."""
    marker = root / FORMAT_FILE
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        raise PublishError(f"published folder {root} was not written by cohortcast (no {FORMAT_FILE}); "
                           "choose another folder")
    if marker.is_file():
        version = json.loads(marker.read_text()).get("format_version")
        if version != PUBLISHED_FORMAT_VERSION:
            raise PublishError(f"published folder {root} has format version {version!r}, this cohortcast writes "
                               f"version {PUBLISHED_FORMAT_VERSION}; move it aside or migrate it before publishing")


def quality_shortfalls(fusion: dict[str, float], min_auroc: float, max_calibration_error: float) -> list[str]:
    """The quality gates a model's held-out metrics (``auroc``, ``calibration_error``) miss; empty
    when the model may be published. A missing value (NaN) misses its gate.

    Examples
    --------
    >>> quality_shortfalls({"auroc": 0.52, "calibration_error": 0.04}, 0.55, 0.1)
    ['held-out auroc 0.5200 (expected >= 0.55)']
    >>> quality_shortfalls({"auroc": 0.71, "calibration_error": 0.04}, 0.55, 0.1)
    []
    """
    shortfalls = []
    if not fusion["auroc"] >= min_auroc:
        shortfalls.append(f"held-out auroc {fusion['auroc']:.4f} (expected >= {min_auroc})")
    if not fusion["calibration_error"] <= max_calibration_error:
        shortfalls.append(f"held-out calibration_error {fusion['calibration_error']:.4f} "
                          f"(expected <= {max_calibration_error})")
    return shortfalls


def data_lineage(warehouse_dir: Path, model_dir: Path) -> dict[str, Any]:
    """What a version was scored from, beyond paths that are the same every night: the ingest that
    wrote the warehouse (its landing zone, export time and, for a promoted batch, the batch), the
    model's version (a digest of its weights, architecture and calibration) and its training
    fingerprint (its inputs and settings)."""
    summary = IngestSummary.from_json(warehouse_dir / SUMMARY_FILE)
    batch_file = warehouse_dir / PROMOTED_BATCH_FILE
    info = check_model_folder(model_dir)
    return {
        "warehouse": str(warehouse_dir),
        "ingested_from": summary.landing_dir,
        "batch": batch_file.read_text().strip() if batch_file.is_file() else None,
        "export_time": summary.export_time.isoformat(),
        "fhir_export_time": summary.fhir_export_time.isoformat() if summary.fhir_export_time else None,
        "model": str(model_dir),
        "model_version": model_version_of(model_dir),
        "training_fingerprint": info.get("training_fingerprint"),
    }


def check_publishable(root: Path, task: str, scores: pa.Table, model_dir: Path, warehouse_dir: Path,
                      min_auroc: float, max_calibration_error: float, target: dict[str, Any] | None = None) -> None:
    """Raise :class:`PublishError` unless ``scores`` may go live: the warehouse's ingest accounting
    balances, and the model folder holds the model that made ``scores``, trained for ``target`` (the
    task file's outcome, horizon and treatment, which the publication states), and its held-out
    metrics pass the quality gates. Nothing is written either way.

    Raises
    ------
    PublishError
        With one line naming the gate that failed, what it expected and what it found.
    """
    live = current_version(root, task)
    refused = f"publish {task} refused ({f'live version {live} unchanged' if live else 'no live version yet'})"
    if (unsettled := unsettled_warehouse(warehouse_dir)) is not None:
        # Its patients (who died, who left) may be another batch's than the scores'.
        raise PublishError(f"{refused}: {unsettled}")
    summary_path = warehouse_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise PublishError(f"{refused}: warehouse {warehouse_dir} has no {SUMMARY_FILE} (expected the accounting "
                           "of the ingest that wrote its tables)")
    files = IngestSummary.from_json(summary_path).files
    unbalanced = [account.source_file for account in files if not account.balanced]
    if unbalanced:
        raise PublishError(f"{refused}: {summary_path}: {len(unbalanced)} of {len(files)} source files do not "
                           f"balance (expected records_in == records_out + quarantined; first: {unbalanced[0]})")
    fusion = held_out_metrics(model_dir, refused)
    if target is not None:
        try:
            check_prediction_target(model_dir, check_model_folder(model_dir), task, target)
        except ModelFolderError as exc:
            raise PublishError(f"{refused}: {exc}") from None
    shortfalls = quality_shortfalls(fusion, min_auroc, max_calibration_error)
    if shortfalls:
        raise PublishError(f"{refused}: model {model_dir} misses the task's quality gates: {'; '.join(shortfalls)}")
    made_by = set(scores.column("model_version").to_pylist())
    held = model_version_of(model_dir)
    if made_by - {held}:
        raise PublishError(f"{refused}: the scores were made by model {', '.join(sorted(made_by - {held}))}, "
                           f"the model folder {model_dir} holds {held} (score the task again)")
    # Scores of inputs built before another ingest was put in place would go live under that ingest's
    # lineage, for the patients and records of the one before.
    scored = (scores.schema.metadata or {}).get(SCORED_EVENTS_KEY)
    now = warehouse_events_key(warehouse_dir)
    if scored is not None and scored.decode() != now:
        raise PublishError(f"{refused}: the scores are of inputs built from {scored.decode()} (name:bytes:mtime), "
                           f"warehouse {warehouse_dir} now holds {now} (another ingest or batch was put in place "
                           "since); build the task inputs and score the task again")


def held_out_metrics(model_dir: Path, refused: str) -> dict[str, Any]:
    """The fusion model's held-out metrics in ``model_dir``, as training wrote them.

    Raises
    ------
    PublishError
        Starting with ``refused``, when the folder is not whole (a file edited or mixed in since
        training, whose SHA-256 is not the one it recorded, could pass a gate its model fails) or
        its ``metrics.json`` lacks the numbers the gates read.
    """
    try:
        check_model_folder(model_dir)
    except ModelFolderError as error:
        raise PublishError(f"{refused}: {error}") from error
    return _fusion_metrics(model_dir / "metrics.json", refused)


def _fusion_metrics(path: Path, refused: str) -> dict[str, Any]:
    """The fusion model's held-out metrics in a model folder's ``metrics.json``."""
    try:
        metrics = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishError(f"{refused}: {path} is not JSON ({error}; train the model again)") from error
    models = metrics.get("models") if isinstance(metrics, dict) else None
    fusion = models.get("fusion") if isinstance(models, dict) else None
    gates = ("auroc", "calibration_error")
    if not isinstance(fusion, dict) or not all(isinstance(fusion.get(key), (int, float)) for key in gates):
        raise PublishError(f"{refused}: {path} has no models.fusion {' and '.join(gates)} (expected the held-out "
                           "metrics training writes; train the model again)")
    return fusion


VERSION_NAME = re.compile(r"v[0-9]{4,}")
"""A published version's folder: ``v0001``, ..., ``v9999``, ``v10000``: four digits at least."""


def published_versions(task_root: Path) -> list[str]:
    """A task's published version folders, oldest first (by number: ``v10000`` after ``v9999``)."""
    names = [p.name for p in task_root.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name)] \
        if task_root.is_dir() else []
    return sorted(names, key=lambda name: int(name[1:]))


def current_version(root: Path, task: str) -> str | None:
    pointer = root / task / "CURRENT"
    return pointer.read_text().strip() if pointer.is_file() else None


def current_scores(root: Path, task: str) -> pl.DataFrame | None:
    """The live published scores of a task, or None before the first publication.

    Raises
    ------
    PublishError
        When ``root`` is not a published folder of this format, or
        the live version's scores are missing.
    """
    _check_format(root)
    version = current_version(root, task)
    if not version:
        return None
    path = root / task / version / "scores.parquet"
    if not path.is_file():
        raise PublishError(f"published folder {root / task}: CURRENT names version {version!r}, which has no "
                           "scores.parquet (restore that version, or point CURRENT at a whole one)")
    return pl.read_parquet(path, glob=False)


def comparable_scores(root: Path, task: str, horizon_days: float, outcome: str) -> pl.DataFrame | None:
    """The live published scores of a task when they are risks of the same outcome by the same
    horizon (as their manifest records), else None: a change since a 1-year risk of another
    outcome is no change of the patient's. A version published before the manifest recorded them
    is not compared."""
    version = current_version(root, task)
    if version is None:
        return None
    manifest = _read_manifest(root / task / version)
    if manifest.get("horizon_days") != horizon_days or manifest.get("outcome") != outcome:
        return None
    return current_scores(root, task)


def risk_assessment_id(task: str, subject_id: int) -> str:
    """The id of a task's RiskAssessment of a patient: the same in every version, so that a write-back
    replaces the patient's last assessment of the task, and a different one for every other pair.

    Task and subject id cut to FHIR's 64 characters had collided (a long task name kept only the
    first digits of the subject id; ``mace_1y`` and ``mace-1y`` were one task), so the id ends in a
    digest of both.

    Examples
    --------
    >>> risk_assessment_id("simulated_mace_1y", 42)
    'simulated-mace-1y-42-9f3374404ee5725a'
    """
    digest = hashlib.sha256(f"{task}\x00{subject_id}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9.-]", "-", f"{task}-{subject_id}")[: 64 - len(digest) - 1]
    return f"{readable}-{digest}"


def risk_assessment(row: dict[str, Any], horizon_days: float, outcome: str, model_version: str) -> dict[str, Any]:
    """One FHIR R4 RiskAssessment for one scored patient."""
    when = row["prediction_time"].replace(tzinfo=UTC)
    basis = [{"reference": f"Patient/{row['patient_id']}"}]
    for item in row["top_items"]:
        if item["item"].startswith("note ") and item["contribution"] > 0:
            basis.append({"reference": f"DocumentReference/{item['item'].removeprefix('note ')}"})
        if item["item"].startswith("study ") and item["contribution"] > 0:
            basis.append({"reference": f"ImagingStudy/{item['item'].removeprefix('study ')}"})
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": risk_assessment_id(row["task"], row["subject_id"]),
        "status": "final",
        "method": {"text": f"cohortcast fusion model {model_version}"},
        "subject": {"reference": f"Patient/{row['patient_id']}"},
        "occurrenceDateTime": when.isoformat(timespec="seconds"),
        "basis": basis,
        "prediction": [{
            "outcome": {"text": outcome},
            "probabilityDecimal": round(float(row["risk"]), 6),
            # The tier is a rank among the task's cohort (the top 5 %, say), not a probability band:
            # HL7's risk-probability codes ("high": more likely than not) would contradict the
            # probability beside it, so the tier has a code system of its own.
            "qualitativeRisk": {"coding": [{
                "system": RISK_TIER_SYSTEM, "code": row["risk_tier"],
                "display": f"{row['risk_tier']} tier: ranked among the task's cohort, not a probability band",
            }], "text": f"{row['risk_tier']} risk tier (rank in cohort)"},
            "whenPeriod": {"start": when.isoformat(timespec="seconds"),
                           "end": (when + timedelta(days=horizon_days)).isoformat(timespec="seconds")},
        }],
    }
    if row["treatment_effect"] is not None:
        resource["mitigation"] = (f"Estimated change in risk with the task's treatment: "
                                  f"{row['treatment_effect'] * 100:+.1f} percentage points")
    return resource


WITHDRAWN_FILE = "withdrawn.parquet"
"""A version's withdrawn assessments: every patient published before for the task and not on its list."""
WITHDRAWN_SCHEMA = pl.Schema({"task": pl.String(), "subject_id": pl.Int64(), "patient_id": pl.String(),
                              "prediction_time": pl.Datetime("us"), "reason": pl.String()})


def withdrawn_assessment(row: dict[str, Any], model_version: str) -> dict[str, Any]:
    """A RiskAssessment that withdraws a patient's last published one (same id, status ``cancelled``).

    RiskAssessment ids are stable so that a write-back replaces a patient's last assessment; a
    patient left off the list is otherwise never written again, and the EHR would keep showing
    their last risk.
    """
    return {
        "resourceType": "RiskAssessment",
        "id": risk_assessment_id(row["task"], row["subject_id"]),
        "status": "cancelled",
        "method": {"text": f"cohortcast fusion model {model_version}"},
        "subject": {"reference": f"Patient/{row['patient_id']}"},
        "occurrenceDateTime": row["prediction_time"].replace(tzinfo=UTC).isoformat(timespec="seconds"),
        "note": [{"text": f"Withdrawn: {row['reason']}; the patient is no longer on this list."}],
    }


def withdrawals(root: Path, task: str, published: pl.DataFrame, patients: pl.DataFrame,
                outcome_recorded: pl.Series | None = None) -> pl.DataFrame:
    """Every patient whose assessment of ``task`` a write-back must withdraw with this version.

    The patients of the live version not in ``published`` (died since, had the outcome since
    (``outcome_recorded``), left the cohort, or an EHR merge gave them another patient id), and
    those the live version withdrew already who are still off the list: each version repeats every
    withdrawal, so a write-back that reads only the live version, or skips one, still withdraws
    them all.

    Raises
    ------
    PublishError
        When the live version's files cannot be read.
    """
    version = current_version(root, task)
    empty = pl.DataFrame(schema=WITHDRAWN_SCHEMA)
    if version is None:
        return empty
    try:
        live = current_scores(root, task)
        withdrawn_path = root / task / version / WITHDRAWN_FILE
        before = pl.read_parquet(withdrawn_path, glob=False) if withdrawn_path.is_file() else empty
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise PublishError(f"publish {task} refused (live version {version} unchanged): its files cannot be read "
                           f"({exc.__class__.__name__}); restore it, or point CURRENT at a whole version") from None
    assert live is not None
    dead = deceased_subjects(patients).implode()
    resolved = (outcome_recorded if outcome_recorded is not None else pl.Series([], dtype=pl.Int64)).implode()
    dropped = live.select("task", "subject_id", "patient_id", "prediction_time").with_columns(
        reason=pl.when(pl.col("subject_id").is_in(dead)).then(pl.lit("the patient has died since this assessment"))
        .when(pl.col("subject_id").is_in(resolved))
        .then(pl.lit("the outcome this assessment gave the risk of has been recorded since"))
        .otherwise(pl.lit("the patient has left the task's cohort, or has another patient id now")))
    on_list = published["subject_id"].implode()
    return (pl.concat([before.cast(WITHDRAWN_SCHEMA), dropped.cast(WITHDRAWN_SCHEMA)])
            .filter(~pl.col("subject_id").is_in(on_list))
            .unique("subject_id", keep="first", maintain_order=True).sort("subject_id"))


def describe_token(token: str, descriptions: Mapping[str, str]) -> str | None:
    """A token's description from the warehouse's ``codes`` (code -> description): the token's own,
    else its code's with its answer or variant (``LOINC//72166-2//SNOMED//77176002`` -> ``Tobacco
    smoking status: Smoker``, ``GENE//APOE//rs429358`` -> ``Variant in APOE: rs429358``); None
    when neither is described."""
    if described := descriptions.get(token):
        return described
    parts = token.split("//")
    code, answer = "//".join(parts[:2]), "//".join(parts[2:])
    if not (described := descriptions.get(code)):
        return None
    return f"{described}: {descriptions.get(answer) or answer}" if answer else described


def source_item_descriptions(scores: pa.Table, notes_path: Path, imaging_path: Path,
                             site_timezone: str = "UTC") -> pl.DataFrame:
    """Descriptions of the explaining items that are one note or one study (``note <id>``,
    ``study <id>``: :mod:`models.explain`) among ``scores``' top items, as ``code`` and
    ``description`` rows like the warehouse's ``codes``: ``Note of 2023-04-30: progress_note``,
    ``Image of 2022-03-20: US, Heart structure``. A care team cannot act on an id; the date and
    kind say which document to open. Read from the warehouse's ``notes`` and ``imaging`` tables
    (a missing table describes nothing); a note's text is never copied. The date is the site's
    (``site_timezone``: the tables hold UTC), as the record in the EHR shows it.
    """
    frame = pl.from_arrow(scores.select(["top_items"]))
    assert isinstance(frame, pl.DataFrame)
    names = frame.select(pl.col("top_items").explode().struct.field("item")).drop_nulls().unique()["item"]
    parts = [pl.DataFrame(schema={"code": pl.String, "description": pl.String})]
    sources = ((notes_path, "note", "note_id", "Note", [pl.col("note_type")]),
               (imaging_path, "study", "study_id", "Image", [pl.col("modality"), pl.col("body_site")]))
    local_date = site_clock(pl.col("time"), site_timezone).dt.date()
    for path, prefix, key, kind, what in sources:
        ids = names.filter(names.str.starts_with(f"{prefix} ")).str.strip_prefix(f"{prefix} ")
        if ids.is_empty() or not path.is_file():
            continue
        table = pl.scan_parquet(path, glob=False).select(key, "time", *what).filter(pl.col(key).is_in(ids.implode()))
        dated = pl.format(f"{kind} of {{}}", local_date)
        kind_of = pl.concat_str(what, separator=", ", ignore_nulls=True)
        parts.append(table.select(
            code=pl.lit(f"{prefix} ") + pl.col(key),
            description=pl.when(kind_of != "").then(pl.format("{}: {}", dated, kind_of)).otherwise(dated),
        ).unique("code", keep="first", maintain_order=True).collect())
    return pl.concat(parts)


def describe_items(scores: pl.DataFrame, codes: pl.DataFrame | None) -> pl.DataFrame:
    """``scores`` with a ``description`` in each ``top_items`` entry: the code's description from
    ``codes`` (``code``, ``description``; :func:`describe_token`), else the item's own name (a note,
    a study, a modality); with the range of values the model read where the code has values
    (``Variant in APOE: rs429358 < 0.5``: 0 copies; ``Systolic Blood Pressure 140 to 160, latest
    of 7``), so that a wild-type genotype or a normal result is not read as a finding."""
    known = {} if codes is None else dict(codes.drop_nulls("description").select("code", "description").iter_rows())
    names: dict[str, str] = {}

    def text(item: dict[str, Any]) -> str:
        shown, readings = item.get("value_range"), item.get("readings") or 0
        if item["item"] not in names:
            token = item["item"]
            base, _, unit = token.rpartition("//")
            # A value in a unit kept apart from its code's (LOINC//33914-3//mL/min: features.tokenize), whose
            # range names that unit: the code's description, the unit said once, by the range.
            if base and shown is not None and shown.endswith(f" {unit_print_symbol(unit)}"):
                token = base
            names[item["item"]] = describe_token(token, known) or item["item"]
        if shown is None:
            return names[item["item"]]
        return f"{names[item['item']]} {shown}{f', latest of {readings}' if readings > 1 else ''}"

    inner = cast(pl.List, scores.schema["top_items"]).inner
    described = pl.List(pl.Struct([*cast(pl.Struct, inner).fields, pl.Field("description", pl.String)]))
    items = [[{**item, "description": text(item)} for item in row] for row in scores["top_items"].to_list()]
    return scores.with_columns(pl.Series("top_items", items, dtype=described))


def deceased_subjects(patients: pl.DataFrame) -> pl.Series:
    """The subject ids of the patients known to have died: a ``death_time``, or ``deceased`` with
    the date unknown (a table without either column knows of no death)."""
    died = pl.lit(False)
    if "death_time" in patients.columns:
        died = died | pl.col("death_time").is_not_null()
    if "deceased" in patients.columns:
        died = died | pl.col("deceased").fill_null(False)
    return patients.filter(died)["subject_id"]


def outcome_recorded_subjects(labels_path: Path, task: str) -> pl.Series:
    """The subject ids whose outcome is already recorded: ``event`` true in the task's
    ``labels.parquet`` (the outcome after the prediction time, within the follow-up the data give).

    Raises
    ------
    PublishError
        When the task has no labels file.
    """
    if not labels_path.is_file():
        raise PublishError(f"task '{task}' has no labels at {labels_path} (they say whose outcome is recorded since "
                           "the prediction time): materialize labels first")
    labels = pl.read_parquet(labels_path, columns=["subject_id", "event"], glob=False)
    return labels.filter(pl.col("event"))["subject_id"]


def patients_to_list(scores: pa.Table, patients: pl.DataFrame, tiers: RiskTiers,
                     outcome_recorded: pl.Series | None = None) -> tuple[pa.Table, dict[str, int]]:
    """The scores of the patients a care team's list holds, tiers ranked again among them; and how
    many were left out, by reason (``deceased``, then ``outcome_recorded``).

    A score is as of its patient's prediction time, and since then a cohort patient may have died
    (a ``death_time``, or ``deceased`` with the date unknown) or had the outcome the risk is of
    (``outcome_recorded``: :func:`outcome_recorded_subjects`). A list must never hold a dead
    patient, nor write a risk back to their record; and a risk of an event that has happened is no
    longer a prediction to act on (the patient's care is now that of the event). Since tiers are
    shares of the list people act on, they are ranked among the patients on it.
    """
    dead = deceased_subjects(patients)
    frame = pl.from_arrow(scores)
    assert isinstance(frame, pl.DataFrame)
    if "previous_model_version" not in frame.columns:  # scored before it was carried
        frame = frame.with_columns(previous_model_version=pl.lit(None, dtype=pl.String))
    alive = frame.filter(~pl.col("subject_id").is_in(dead.implode()))
    resolved = outcome_recorded if outcome_recorded is not None else pl.Series("subject_id", [], dtype=pl.Int64)
    listed = alive.filter(~pl.col("subject_id").is_in(resolved.implode()))
    listed = listed.with_columns(pl.Series("risk_tier", tiers.assign(listed["risk"].to_numpy()), dtype=pl.String))
    left_out = {"deceased": frame.height - alive.height, "outcome_recorded": alive.height - listed.height}
    return listed.select(SCORES.names).to_arrow().cast(SCORES), left_out


def publish(scores: pa.Table, patients: pl.DataFrame, root: Path, task: str, horizon_days: float, outcome: str,
            lineage: dict[str, Any], codes: pl.DataFrame | None = None,
            left_out: dict[str, int] | None = None, outcome_recorded: pl.Series | None = None) -> Publication:
    """Write a new version of a task's cohort and make it the live one.

    ``codes`` (``code``, ``description``: the warehouse's ``codes`` table) describes the codes among
    the explaining items; without it an item's description is its name. ``left_out`` counts the
    scored patients not published, by reason (:func:`patients_to_list`), for the manifest;
    ``outcome_recorded`` (:func:`outcome_recorded_subjects`) words the withdrawal of those patients.

    Raises
    ------
    PublishError
        When ``root`` is not writable or holds another format version; nothing changes then.
    """
    check_published_root(root)
    frame = pl.from_arrow(scores)
    assert isinstance(frame, pl.DataFrame)
    with_ids = describe_items(frame, codes).join(
        patients.select("subject_id", "patient_id"), on="subject_id", how="left"
    )
    missing = with_ids["patient_id"].null_count()
    if missing:
        raise PublishError(f"task {task!r}: {missing} scored subjects are not in the patients table")
    task_root = root / task
    task_root.mkdir(parents=True, exist_ok=True)
    with _publish_lock(root):
        retire_partial_versions(root, task)
        (root / FORMAT_FILE).write_text(json.dumps({"format_version": PUBLISHED_FORMAT_VERSION}))
        existing = published_versions(task_root)
        version = f"v{int(existing[-1][1:]) + 1 if existing else 1:04d}"
        withdrawn = withdrawals(root, task, frame, patients, outcome_recorded)
        staging = staging_dir(task_root, f".{version}.")
        model_version = str(frame["model_version"][0]) if frame.height else ""
        with_ids.write_parquet(staging / "scores.parquet")
        withdrawn.write_parquet(staging / WITHDRAWN_FILE)
        lines = [orjson.dumps(risk_assessment(row, horizon_days, outcome, model_version))
                 for row in with_ids.iter_rows(named=True)]
        lines += [orjson.dumps(withdrawn_assessment(row, model_version)) for row in withdrawn.iter_rows(named=True)]
        (staging / "risk_assessments.ndjson").write_bytes(b"\n".join(lines) + (b"\n" if lines else b""))
        n_high = int((frame["risk_tier"] == "high").sum())
        created = datetime.now(UTC).isoformat(timespec="seconds")
        manifest = {"task": task, "version": version, "created": created, "n_patients": frame.height,
                    "n_high_risk": n_high, "model_version": model_version, "lineage": lineage,
                    "left_out": left_out or {}, "withdrawn_assessments": withdrawn.height,
                    # What the risks are of: the next version's change since this one compares like with like.
                    "horizon_days": horizon_days, "outcome": outcome}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        staging.rename(task_root / version)
        # The database is built with the new version live before CURRENT moves: a database that
        # cannot be built (a damaged manifest, a full disk) leaves the live version as it was, and
        # Parquet readers and DuckDB readers never see two different live versions.
        try:
            database = _build_database(root, {task: version})
        except (PublishError, OSError, duckdb.Error, pl.exceptions.PolarsError) as exc:
            shutil.rmtree(task_root / version)
            if isinstance(exc, PublishError):
                raise
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise PublishError(f"publish {task} refused (live version unchanged): {DATABASE} could not be built "
                               f"({first_line})") from None
        pointer = task_root / ".CURRENT.partial"
        pointer.write_text(version + "\n")
        os.replace(pointer, task_root / "CURRENT")
        os.replace(database, root / DATABASE)
    return Publication(task, version, task_root / version, frame.height, n_high)


@contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    """Hold ``root``'s publishing lock: one publish at a time picks a version number, moves a
    ``CURRENT`` and rebuilds the database (two nightly tasks publish side by side). The operating
    system releases the ``flock`` when its holder exits, killed or not."""
    with (root / PUBLISH_LOCK).open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def rebuild_database(root: Path) -> Path:
    """Write ``cohortcast.duckdb`` again from the published folders (:func:`_rebuild_database`),
    under the publish lock."""
    with _publish_lock(root):
        return _rebuild_database(root)


def _rebuild_database(root: Path) -> Path:
    """Write ``cohortcast.duckdb`` again from the published folders (:func:`_build_database`).

    Written as a new file and renamed over the old one: a reader with the database open (the web
    page, an analyst's session) keeps the file it opened and never blocks a publish, and a killed
    publish leaves the last whole database, which the next publish brings up to date.
    """
    os.replace(_build_database(root), root / DATABASE)
    return root / DATABASE


def _read_manifest(folder: Path) -> dict[str, Any]:
    """A version's ``manifest.json``, with the keys the database reads."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"published version {folder}: {path.name} cannot be read ({exc.__class__.__name__}); "
                           "restore it, or move the version folder out of the published folder") from None
    missing = [key for key in PUBLICATION_COLUMNS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise PublishError(f"published version {folder}: {path.name} lacks {', '.join(missing)}; restore it, or "
                           "move the version folder out of the published folder")
    return dict(manifest)


def _build_database(root: Path, live_override: dict[str, str] | None = None) -> Path:
    """A new ``cohortcast.duckdb`` beside the old one (not yet in place): ``published_scores`` from
    each task's live version (its ``CURRENT``, or ``live_override[task]`` for a version about to go
    live), ``publications`` from every version's manifest. Returns the new file's path.

    Raises
    ------
    PublishError
        When a version's manifest cannot be read.
    """
    live: list[pl.DataFrame] = []
    publications: list[dict[str, Any]] = []
    for task_root in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in (task_root / name for name in published_versions(task_root)):
            manifest = _read_manifest(folder)
            publications.append({key: manifest[key] for key in PUBLICATION_COLUMNS if key != "lineage"}
                                | {"lineage": json.dumps(manifest["lineage"], default=str)})
        version = (live_override or {}).get(task_root.name) or current_version(root, task_root.name)
        if version is not None:
            rows = pl.read_parquet(task_root / version / "scores.parquet", glob=False)
            # Items published before they carried a description are named by themselves.
            fields = {f.name for f in rows.schema["top_items"].inner.fields}  # type: ignore[attr-defined]
            label = pl.element().struct.field("description" if "description" in fields else "item")
            if "previous_model_version" not in rows.columns:  # published before it was carried
                rows = rows.with_columns(previous_model_version=pl.lit(None, dtype=pl.String))
            live.append(rows.select(
                "task", "subject_id", "patient_id", "prediction_time", "risk", "risk_tier", "previous_risk",
                "previous_model_version", "treatment_effect", "model_version",
                pl.col("top_items").list.eval(label).list.join("; ").alias("top_items"),
                pl.lit(version).alias("version"),
            ))
    scores = pl.concat(live) if live else pl.DataFrame(schema=PUBLISHED_SCORES_SCHEMA)
    history = pl.DataFrame(publications, schema=PUBLICATIONS_SCHEMA)
    for leftover in root.glob(f".{DATABASE}.*.partial*"):  # a killed rebuild's file (and its WAL)
        leftover.unlink()
    partial = root / f".{DATABASE}.{os.getpid()}.partial"
    connection = duckdb.connect(str(partial))
    try:
        connection.register("scores", scores.cast(PUBLISHED_SCORES_SCHEMA).to_arrow())
        connection.register("history", history.to_arrow())
        connection.execute("CREATE TABLE published_scores AS SELECT * FROM scores")
        connection.execute("CREATE TABLE publications AS SELECT * FROM history")
    finally:
        connection.close()
    return partial


def retire_partial_versions(root: Path, task: str) -> None:
    """Remove version folders a killed publish left half-written (never the live one)."""
    for partial in (root / task).glob(".v*"):
        shutil.rmtree(partial, ignore_errors=True)
