"""Shared test settings: nothing downloads, nothing writes outside the repository's ignored folders."""

from __future__ import annotations

import os
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
