"""End-to-end: the whole Dagster graph on the simulator's data, as ``cohortcast demo`` runs it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from rich.console import Console

from pipelines.definitions import all_assets
from pipelines.demo import run_demo


def test_demo_materializes_every_asset_on_simulated_data(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    with dg.instance_for_test() as instance:
        result = run_demo(tmp_path / "workspace", patients=80, seed=1, console=console, instance=instance)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    expected = {key.to_user_string() for assets_def in all_assets for key in assets_def.keys}
    assert materialized == expected
    assert (tmp_path / "workspace" / "landing" / "truth.parquet").is_file()
    assert "simulated_landing_zone" in console.export_text()
