"""Tests of the landing-zone asset."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from features.errors import LandingZoneError
from pipelines.assets.landing import simulated_landing_zone
from pipelines.config import SimulationRunConfig
from pipelines.resources import Workspace


def test_simulated_landing_zone_writes_the_configured_hospital(tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    result = simulated_landing_zone(SimulationRunConfig(patients=25, seed=2, workers=1), workspace)
    assert isinstance(result, dg.MaterializeResult)
    assert result.metadata["patients"] == 25
    assert pq.read_table(tmp_path / "landing" / "truth.parquet").num_rows == 25


def test_a_new_simulation_replaces_an_earlier_one_but_never_a_hospital_export(tmp_path: Path) -> None:
    workspace = Workspace(root=str(tmp_path))
    simulated_landing_zone(SimulationRunConfig(patients=25, seed=2, workers=1), workspace)
    simulated_landing_zone(SimulationRunConfig(patients=30, seed=3, workers=1), workspace)
    assert pq.read_table(tmp_path / "landing" / "truth.parquet").num_rows == 30
    # An export copied into landing/, as a deployment does: it stays, byte for byte.
    shutil.rmtree(tmp_path / "landing")
    export = tmp_path / "landing" / "fhir" / "Patient.000.ndjson"
    export.parent.mkdir(parents=True)
    export.write_text('{"resourceType": "Patient", "id": "real-patient-1"}\n')
    with pytest.raises(LandingZoneError, match=rf"^landing folder {re.escape(str(tmp_path / 'landing'))} holds "
                                               r"files but no simulation.json, so it is not a simulation"):
        simulated_landing_zone(SimulationRunConfig(patients=25, seed=2, workers=1), workspace)
    assert [p.name for p in (tmp_path / "landing").rglob("*")] == ["fhir", "Patient.000.ndjson"]
    assert export.read_text() == '{"resourceType": "Patient", "id": "real-patient-1"}\n'
