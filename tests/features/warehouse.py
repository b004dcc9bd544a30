"""Write a small warehouse (events, notes, imaging Parquet) from a simulated landing zone, for the
tasks-stage tests and benchmark, until the ingest stage writes the real one."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tests.features.minimal_events import minimal_events


def write_warehouse(landing_dir: Path, warehouse_dir: Path) -> Path:
    warehouse_dir.mkdir(parents=True, exist_ok=True)
    minimal_events(landing_dir).write_parquet(warehouse_dir / "events.parquet")
    pl.read_parquet(landing_dir / "notes" / "notes.parquet").write_parquet(warehouse_dir / "notes.parquet")
    pl.read_parquet(landing_dir / "imaging" / "embeddings.parquet").write_parquet(
        warehouse_dir / "imaging.parquet")
    return warehouse_dir
