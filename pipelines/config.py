"""Run-time knobs of the Dagster assets, as ``dg.Config`` classes.

Stage: orchestration. In: run configuration (launchpad, CLI, schedules). Out: the library
dataclasses the assets pass to ``features`` and ``models``, one line each.
"""

from __future__ import annotations

import dagster as dg

from features.simulate import SimulationConfig


class SimulationRunConfig(dg.Config):  # type: ignore[misc]
    """How big a hospital to simulate, and from which seed."""

    patients: int = 2000
    seed: int = 0
    # Processes generating patient shards; the output does not depend on it.
    workers: int = 2

    def to_simulation_config(self) -> SimulationConfig:
        return SimulationConfig(n_patients=self.patients, seed=self.seed)
