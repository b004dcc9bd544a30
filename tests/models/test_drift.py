"""Tests of the population stability index."""

from __future__ import annotations

import numpy as np
import pytest

from models.drift import PSI_ALARM, PSI_WARN, population_stability_index


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20_000)
    assert population_stability_index(reference, rng.normal(size=20_000)) < 0.01
    assert PSI_WARN < population_stability_index(reference, rng.normal(0.4, 1, 20_000)) < PSI_ALARM
    assert population_stability_index(reference, rng.normal(1.5, 1, 20_000)) > PSI_ALARM


def test_psi_refuses_empty_samples() -> None:
    with pytest.raises(ValueError, match=r"needs two non-empty samples \(got 3 and 0\)"):
        population_stability_index([1, 2, 3], [])
