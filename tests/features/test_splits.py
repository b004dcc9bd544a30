from __future__ import annotations

from features.splits import assign_splits
from features.tasks import SplitFractions


def test_splits_are_per_patient_deterministic_and_stable() -> None:
    fractions = SplitFractions(0.7, 0.15, 0.15, seed=3)
    ids = list(range(1000, 6000))
    first = assign_splits(ids, fractions)
    again = assign_splits(list(reversed(ids)) + ids[:10], fractions)
    assert first.equals(again)
    assert first["subject_id"].n_unique() == first.height == 5000
    shares = first["split"].value_counts(normalize=True).sort("split")
    assert dict(zip(shares["split"], shares["proportion"], strict=True)) == pytest_approx(
        {"held_out": 0.15, "train": 0.7, "tuning": 0.15})
    # Adding patients never moves an existing one.
    subset = assign_splits(ids[:100], fractions)
    assert subset.equals(first.head(100))
    assert not assign_splits(ids, SplitFractions(0.7, 0.15, 0.15, seed=4)).equals(first)


def pytest_approx(expected: dict[str, float]) -> object:
    import pytest

    return pytest.approx(expected, abs=0.02)
