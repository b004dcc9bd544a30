"""Write a whole simulated hospital's landing zone, atomically and reproducibly.

Stage: source data. In: a :class:`SimulationConfig` and an output folder. Out: the landing zone
(``fhir/``, ``notes/``, ``genomics/``, ``imaging/``), ``truth.parquet`` and ``simulation.json``
(the settings and record counts), and a :class:`SimulationSummary`.

Patients are generated in shards of a fixed size, each from its own seeds, so the bytes written
depend only on the settings and never on how many worker processes ran. Everything is written to
a sibling temporary folder first and moved into place at the end: an interrupted run leaves the
output folder as it was, and the next simulation into it deletes the temporary folder. One
simulation at a time writes a folder (a lock beside it, ``.<name>.lock``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from features.errors import LandingZoneError, SimulationError
from features.io import replace_dir, staging_dir, take_pid_lock
from features.schemas import GENOMICS_VARIANTS_INPUT, IMAGING_INPUT, NOTES_INPUT
from features.simulate import vocabulary as v
from features.simulate.records import (
    ImagingStudyRow,
    PatientState,
    reference_resources,
    write_patient,
)
from features.simulate.state import EVENT_TYPES, HiddenState, draw_hidden_state, truth_table

SIMULATOR_VERSION = "1"
# A simulation is written in a hidden sibling ``.<name>.<random>.partial`` and renamed into place.
STAGING_SUFFIX = ".partial"


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of one simulated hospital. The same settings always give the same bytes."""

    n_patients: int = 1000
    seed: int = 0
    # Risk label horizon, days after the prediction time.
    horizon_days: int = 365
    # Index visits fall between these dates; the export is taken at export_date.
    index_start: date = date(2022, 1, 1)
    index_end: date = date(2024, 6, 30)
    export_date: date = date(2025, 12, 31)
    # Shares of patients with each optional modality, and written as transaction Bundles.
    notes_share: float = 0.9
    notes_table_share: float = 0.35
    genomics_share: float = 0.4
    expression_share: float = 0.8
    imaging_share: float = 0.45
    bundle_share: float = 0.1
    # Length of the imaging embedding vectors.
    embedding_dim: int = 64
    # Patients per NDJSON shard (Patient.000.ndjson, Patient.001.ndjson, ...).
    patients_per_shard: int = 2500
    n_practitioners: int = 40

    def validate(self) -> None:
        """Raise :class:`SimulationError` naming the first setting that cannot be honoured."""
        if self.n_patients < 1:
            raise SimulationError(f"patients must be at least 1 (got {self.n_patients})")
        if self.seed < 0:
            raise SimulationError(f"seed must be a non-negative integer (got {self.seed})")
        if self.horizon_days < 1:
            raise SimulationError(f"horizon_days must be at least 1 (got {self.horizon_days})")
        if not self.index_start < self.index_end < self.export_date:
            raise SimulationError(
                f"dates must satisfy index_start < index_end < export_date (got {self.index_start}, "
                f"{self.index_end}, {self.export_date})"
            )
        for name in ("notes_share", "notes_table_share", "genomics_share", "expression_share",
                     "bundle_share"):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise SimulationError(f"{name} must be between 0 and 1 (got {share})")
        if not 0.0 < self.imaging_share < 1.0:
            raise SimulationError(f"imaging_share must be strictly between 0 and 1 (got {self.imaging_share})")
        if self.embedding_dim < 8:
            raise SimulationError(f"embedding_dim must be at least 8 (got {self.embedding_dim})")
        if self.patients_per_shard < 1:
            raise SimulationError(f"patients_per_shard must be at least 1 (got {self.patients_per_shard})")


@dataclass(frozen=True)
class SimulationSummary:
    """What was written."""

    out_dir: Path
    n_patients: int
    resources_by_type: dict[str, int]
    n_bundles: int
    n_table_notes: int
    n_imaging_studies: int
    n_genotyped: int
    event_rate_within_horizon: float
    files: list[str] = field(default_factory=list)


SIMULATION_MANIFEST = "simulation.json"
"""The file every simulated landing zone holds, and no hospital export does."""


def holds_other_files(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds files but is no simulated landing zone (no ``simulation.json``):
    a hospital's export put where the simulator writes, which it must never replace."""
    return out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SIMULATION_MANIFEST).is_file()


def check_replaceable_simulation(out_dir: Path) -> None:
    """Raise :class:`LandingZoneError` unless ``out_dir`` is absent, empty or a simulated landing
    zone (it holds ``simulation.json``): a pipeline that simulates into a workspace must never
    replace a hospital's export that was put in its place."""
    if holds_other_files(out_dir):
        raise LandingZoneError(
            f"landing folder {out_dir} holds files but no {SIMULATION_MANIFEST}, so it is not a simulation: the "
            "simulator replaces only its own output (ingest this export without simulated_landing_zone, or "
            "move it to simulate here)")


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise :class:`LandingZoneError` unless ``out_dir`` can receive a new landing zone."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LandingZoneError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LandingZoneError(f"output folder {out_dir} is not empty (pass --overwrite to replace it)")
    if holds_other_files(out_dir):  # --overwrite replaces a simulation only
        raise LandingZoneError(f"output folder {out_dir} holds files but no {SIMULATION_MANIFEST}, so it is not a "
                               "simulation: --overwrite replaces only the simulator's own output (choose another "
                               "folder, or empty this one)")
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LandingZoneError(f"output folder {out_dir} is not writable (no write permission on {parent})")


def simulate_hospital(
    out_dir: Path, config: SimulationConfig, overwrite: bool = False, workers: int = 1
) -> SimulationSummary:
    """Write a simulated hospital's landing zone and ground truth into ``out_dir``.

    Parameters
    ----------
    out_dir
        Destination folder. It must not exist, be empty, or ``overwrite`` must be true.
    config
        What to simulate.
    overwrite
        Replace a non-empty ``out_dir``.
    workers
        Processes generating shards in parallel; the output does not depend on it.

    Raises
    ------
    SimulationError
        When a setting is out of range.
    LandingZoneError
        When ``out_dir`` cannot be written. Nothing is written then.
    """
    config.validate()
    out_dir = out_dir.absolute()
    check_output_dir(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LandingZoneError(f"output folder {out_dir} is not writable ({exc.strerror})") from exc
    with _writer_lock(out_dir):
        check_output_dir(out_dir, overwrite)  # again: another simulation may have filled it while this one waited
        try:
            staging = staging_dir(out_dir.parent, f".{out_dir.name}.", STAGING_SUFFIX)
        except OSError as exc:
            raise LandingZoneError(f"output folder {out_dir} is not writable ({exc.strerror})") from exc
        try:
            summary = _write_landing_zone(staging, config, workers)
            replace_dir(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return SimulationSummary(**{**asdict(summary), "out_dir": out_dir})


@contextmanager
def _writer_lock(out_dir: Path) -> Iterator[None]:
    """Hold the lock of ``out_dir`` while a simulation writes it, and clear what killed ones left.

    Two simulations into one folder would each replace it with their own, so a second one is
    refused while the first runs. The lock is an advisory ``flock`` on the hidden sibling
    ``.<name>.lock``, which the operating system releases when its holder exits, killed or not; so
    once it is held, a staging folder beside ``out_dir`` was left by a simulation that died (a
    10,000-patient one holds a gigabyte) and is deleted.

    Raises
    ------
    LandingZoneError
        When another process holds the lock.
    """
    lock = out_dir.with_name(f".{out_dir.name}.lock")
    try:
        handle = lock.open("a+b")
    except OSError as exc:
        raise LandingZoneError(f"output folder {out_dir} is not writable ({exc.strerror})") from exc
    with handle:
        if (holder := take_pid_lock(handle)) is not None:
            raise LandingZoneError(f"output folder {out_dir} is being written by another simulation (process "
                                   f"{holder} holds {lock.name}); wait for it to finish, or write elsewhere")
        prefix = f".{out_dir.name}."
        for path in out_dir.parent.iterdir():
            if path.name.startswith(prefix) and path.name.endswith(STAGING_SUFFIX) and path.is_dir():
                shutil.rmtree(path)
        yield


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


def _write_landing_zone(root: Path, config: SimulationConfig, workers: int) -> SimulationSummary:
    state = draw_hidden_state(
        n_patients=config.n_patients,
        seed=config.seed,
        index_start=_utc(config.index_start),
        index_end=_utc(config.index_end),
        export_time=_utc(config.export_date),
        genomics_share=config.genomics_share,
        imaging_share=config.imaging_share,
        notes_share=config.notes_share,
        notes_table_share=config.notes_table_share,
        bundle_share=config.bundle_share,
    )
    fhir_dir = root / "fhir"
    fhir_dir.mkdir()
    hospital_rnd = random.Random(f"{config.seed}/hospital")
    reference, org_id, practitioner_ids = reference_resources(hospital_rnd, config.n_practitioners)
    counts: Counter[str] = Counter()
    for resource_type in ("Organization", "Practitioner"):
        lines = [orjson.dumps(r) for r in reference if r["resourceType"] == resource_type]
        (fhir_dir / f"{resource_type}.000.ndjson").write_bytes(b"\n".join(lines) + b"\n")
        counts[resource_type] += len(lines)

    shards = [
        (start, min(start + config.patients_per_shard, config.n_patients))
        for start in range(0, config.n_patients, config.patients_per_shard)
    ]
    jobs = [
        _ShardJob(k, _patient_states(state, lo, hi, config, org_id, practitioner_ids),
                  config.seed, lo, str(fhir_dir))
        for k, (lo, hi) in enumerate(shards)
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_write_shard, jobs))
    else:
        results = [_write_shard(job) for job in jobs]

    notes_rows: list[dict[str, Any]] = []
    imaging_rows: list[tuple[str, ImagingStudyRow]] = []
    n_bundles = 0
    for result in results:
        counts.update(result.counts)
        notes_rows.extend(result.notes_rows)
        imaging_rows.extend(result.imaging_rows)
        n_bundles += result.n_bundles

    (root / "notes").mkdir()
    notes = pa.Table.from_pylist(notes_rows, schema=NOTES_INPUT)
    pq.write_table(notes, root / "notes" / "notes.parquet")
    (root / "imaging").mkdir()
    pq.write_table(_imaging_table(imaging_rows, config), root / "imaging" / "embeddings.parquet")
    (root / "genomics").mkdir()
    variants, expression = _genomics_tables(state, config)
    pq.write_table(variants, root / "genomics" / "variants.parquet")
    pa_csv.write_csv(expression, root / "genomics" / "expression_panel.tsv",
                     pa_csv.WriteOptions(delimiter="\t", quoting_style="none"))
    # The genomic risk is written into the expression panel alone, which not every genotyped
    # patient has: the truth says who, so that a reference never credits it to the others.
    truth = truth_table(state, config.horizon_days,
                        has_expression=np.isin(state.patient_id, expression.column("patient_id").to_numpy(
                            zero_copy_only=False)))
    pq.write_table(truth, root / "truth.parquet")

    labelled = truth.column("event_within_horizon").drop_null()
    event_rate = float(np.mean(labelled.to_numpy(zero_copy_only=False))) if len(labelled) else 0.0
    summary = SimulationSummary(
        out_dir=root,
        n_patients=config.n_patients,
        resources_by_type=dict(sorted(counts.items())),
        n_bundles=n_bundles,
        n_table_notes=notes.num_rows,
        n_imaging_studies=len(imaging_rows),
        n_genotyped=int(state.has_genomics.sum()),
        event_rate_within_horizon=round(event_rate, 6),
        files=sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
    )
    manifest = {
        "simulator_version": SIMULATOR_VERSION,
        "config": {k: str(val) if isinstance(val, date) else val for k, val in asdict(config).items()},
        "resources_by_type": summary.resources_by_type,
        "n_bundles": n_bundles,
        "n_table_notes": summary.n_table_notes,
        "n_imaging_studies": summary.n_imaging_studies,
        "n_genotyped": summary.n_genotyped,
        "event_rate_within_horizon": summary.event_rate_within_horizon,
    }
    (root / SIMULATION_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def _patient_states(state: HiddenState, lo: int, hi: int, config: SimulationConfig, org_id: str,
                    practitioner_ids: tuple[str, ...]) -> list[PatientState]:
    export_time = _utc(config.export_date)
    return [
        PatientState(
            patient_id=state.patient_id[i],
            is_male=bool(state.is_male[i]),
            age_years=float(state.age_years[i]),
            prediction_time=state.prediction_time[i],
            history_days=float(state.history_days[i]),
            ehr_severity=float(state.ehr_severity[i]),
            note_severity=float(state.note_severity[i]),
            imaging_severity=float(state.imaging_severity[i]),
            has_notes=bool(state.has_notes[i]),
            has_notes_table=bool(state.has_notes_table[i]),
            has_imaging=bool(state.has_imaging[i]),
            as_bundle=bool(state.as_bundle[i]),
            treated=bool(state.treated[i]),
            event_time_days=float(state.event_time_days[i]),
            censoring_time_days=float(state.censoring_time_days[i]),
            event_type=EVENT_TYPES[int(state.event_type[i])],
            export_time=export_time,
            organization_id=org_id,
            practitioner_ids=practitioner_ids,
        )
        for i in range(lo, hi)
    ]


@dataclass(frozen=True)
class _ShardJob:
    shard: int
    patients: list[PatientState]
    seed: int
    first_index: int
    fhir_dir: str


@dataclass
class _ShardResult:
    counts: Counter[str]
    notes_rows: list[dict[str, Any]]
    imaging_rows: list[tuple[str, ImagingStudyRow]]
    n_bundles: int


def _write_shard(job: _ShardJob) -> _ShardResult:
    """Write one shard's NDJSON files and Bundles; return its table rows."""
    fhir_dir = Path(job.fhir_dir)
    lines: dict[str, list[bytes]] = {}
    counts: Counter[str] = Counter()
    notes_rows: list[dict[str, Any]] = []
    imaging_rows: list[tuple[str, ImagingStudyRow]] = []
    n_bundles = 0
    for offset, patient in enumerate(job.patients):
        rnd = random.Random(f"{job.seed}/patient/{job.first_index + offset}")
        records = write_patient(patient, rnd)
        notes_rows.extend(records.notes_rows)
        imaging_rows.extend((patient.patient_id, row) for row in records.imaging_rows)
        for resource in records.resources:
            counts[resource["resourceType"]] += 1
        if patient.as_bundle:
            bundle = {
                "resourceType": "Bundle",
                "id": f"bundle-{patient.patient_id}",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": f"urn:uuid:{r['id']}",
                        "resource": r,
                        "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                    }
                    for r in records.resources
                ],
            }
            (fhir_dir / f"bundle-{patient.patient_id}.json").write_bytes(orjson.dumps(bundle))
            n_bundles += 1
        else:
            for resource in records.resources:
                lines.setdefault(resource["resourceType"], []).append(orjson.dumps(resource))
    for resource_type, type_lines in sorted(lines.items()):
        path = fhir_dir / f"{resource_type}.{job.shard:03d}.ndjson"
        path.write_bytes(b"\n".join(type_lines) + b"\n")
    return _ShardResult(counts, notes_rows, imaging_rows, n_bundles)


def _imaging_table(rows: list[tuple[str, ImagingStudyRow]], config: SimulationConfig) -> pa.Table:
    """Embed each study: the site's image encoder, simulated as a fixed geometry.

    Each modality has its own direction along which severity grows, its own offset, and a
    curved component (severity squared) so that the signal is not purely linear.
    """
    dim = config.embedding_dim
    geometry = np.random.default_rng(20240611)  # the encoder is the same at every hospital
    modalities = sorted({m for m, *_ in v.IMAGING_PROTOCOLS})
    direction = {m: _unit(geometry.standard_normal(dim)) for m in modalities}
    offset = {m: _unit(geometry.standard_normal(dim)) for m in modalities}
    bend = _unit(geometry.standard_normal(dim))
    noise = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    embeddings = np.empty((len(rows), dim), dtype=np.float32)
    for k, (_pid, row) in enumerate(rows):
        sev = row.shown_severity
        raw = 1.5 * offset[row.modality] + 1.0 * sev * direction[row.modality] + 0.25 * sev**2 * bend
        raw = raw + noise.normal(0.0, 0.35, dim)
        embeddings[k] = raw / np.linalg.norm(raw)
    return pa.table(
        {
            "patient_id": [pid for pid, _ in rows],
            "study_id": [row.study_id for _, row in rows],
            "time": [row.time for _, row in rows],
            "modality": [row.modality for _, row in rows],
            "body_site": [row.body_site for _, row in rows],
            "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32())),
        },
        schema=IMAGING_INPUT,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x))


def _genomics_tables(state: HiddenState, config: SimulationConfig) -> tuple[pa.Table, pa.Table]:
    """Variant calls (long) and the expression panel (wide) of the genotyped patients."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    genotyped = np.flatnonzero(state.has_genomics)
    n = len(genotyped)
    columns = [state.cyp2c19_lof_alleles[genotyped], state.lpa_risk_alleles[genotyped]]
    columns += [rng.binomial(2, f, n) for f in v.NULL_VARIANT_FREQUENCIES]
    genotypes = np.stack(columns, axis=1).astype(np.int8)  # (n, n_variants)
    patient_ids = [state.patient_id[i] for i in genotyped]
    variants = pa.table(
        {
            "patient_id": np.repeat(np.array(patient_ids, dtype=object), len(v.VARIANTS)),
            "gene": [gene for gene, _ in v.VARIANTS] * n,
            "variant": [rs for _, rs in v.VARIANTS] * n,
            "genotype": genotypes.reshape(-1),
        },
        schema=GENOMICS_VARIANTS_INPUT,
    )
    with_expression = rng.random(n) < config.expression_share
    n_features = len(v.EXPRESSION_FEATURES)
    loadings = np.zeros(n_features)
    loadings[: len(v.EXPRESSION_RISK_LOADINGS)] = v.EXPRESSION_RISK_LOADINGS
    baseline = rng.uniform(4.0, 12.0, n_features)
    values = (
        baseline[None, :]
        + state.genomic_risk[genotyped][:, None] * loadings[None, :]
        + rng.normal(0.0, 0.6, (n, n_features))
    )[with_expression]
    expression: dict[str, Any] = {
        "patient_id": [p for p, keep in zip(patient_ids, with_expression, strict=True) if keep]
    }
    for j, name in enumerate(v.EXPRESSION_FEATURES):
        expression[name] = np.round(values[:, j], 4)
    return variants, pa.table(expression)
