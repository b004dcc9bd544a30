"""Shared test settings: nothing downloads, nothing writes outside the repository's ignored folders."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / "dagster_home"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(REPO_ROOT / ".cache" / "huggingface"))
os.environ.setdefault("MPLCONFIGDIR", str(REPO_ROOT / ".cache" / "matplotlib"))


@pytest.fixture(scope="session")
def shared_fhir_dir() -> Path:
    """The real Synthea exports that sit beside the repository (``../shared/data/fhir``)."""
    path = SHARED_DATA / "fhir"
    if not path.is_dir():
        pytest.fail(f"real FHIR exports not found at {path}")
    return path


@pytest.fixture(scope="session")
def small_hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-patient simulated landing zone (seed 7), shared by every test that only reads it."""
    from features.simulate import SimulationConfig, simulate_hospital

    out = tmp_path_factory.mktemp("hospital") / "landing"
    simulate_hospital(out, SimulationConfig(n_patients=300, seed=7))
    return out


@pytest.fixture(scope="session")
def small_warehouse(small_hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ingest of ``small_hospital`` (events, notes, imaging, ... Parquet). Read-only:
    a test that writes under a warehouse (``tasks/``, ``cache/``) copies it first."""
    from features.ingest import ingest_landing_zone

    out = tmp_path_factory.mktemp("small_warehouse") / "warehouse"
    # The simulator's export date is 2025-12-31; a fixed export time keeps the warehouse reproducible.
    ingest_landing_zone(small_hospital, out, workers=1, export_time=datetime(2026, 1, 1))
    return out


@pytest.fixture(scope="session")
def synthea_warehouse(shared_fhir_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ingest of both Synthea exports (``synthea-bulk-10`` NDJSON and ``synthea-bundles``
    Bundle JSON) into one warehouse. Read-only, as ``small_warehouse``."""
    from features.ingest import ingest_landing_zone

    out = tmp_path_factory.mktemp("synthea_warehouse") / "warehouse"
    # After the exports' last record (2023-03-22), fixed so the warehouse is reproducible.
    ingest_landing_zone(shared_fhir_dir, out, workers=1, export_time=datetime(2024, 1, 1))
    return out
