"""Tests of the landing-zone asset."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from pipelines.assets.landing import simulated_landing_zone
from pipelines.config import SimulationRunConfig
from pipelines.resources import Workspace


def test_simulated_landing_zone_writes_the_configured_hospital(tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    result = simulated_landing_zone(SimulationRunConfig(patients=25, seed=2, workers=1), workspace)
    assert isinstance(result, dg.MaterializeResult)
    assert result.metadata["patients"] == 25
    assert pq.read_table(tmp_path / "landing" / "truth.parquet").num_rows == 25
