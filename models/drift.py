"""Drift: how far today's inputs and scores have moved from what the model was trained on.

Stage: scoring. In: two samples of one quantity (for example the risks of the training cohort and
today's risks). Out: the population stability index (PSI). By convention PSI below 0.1 is stable,
0.1-0.25 a moderate shift worth a look, above 0.25 a shift that calls for retraining.

The reference of a model's scores is saved in its folder when it is trained
(``drift_reference.parquet``, :func:`save_reference`): the calibrated risk of every patient of the
cohort it was trained on, by split. Every split, not the held-out one alone: scoring scores every
cohort patient, and a held-out split of a few dozen patients (a 300-patient cohort has 60) puts
the PSI of two samples of one distribution above 0.1 by chance. Being part of the model, the
reference does not move when a run publishes, as the last publication did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

PSI_WARN = 0.1
PSI_ALARM = 0.25
REFERENCE_FILE = "drift_reference.parquet"


def population_stability_index(reference: npt.ArrayLike, current: npt.ArrayLike, n_bins: int = 10) -> float:
    """PSI of ``current`` against ``reference`` over the reference's decile bins.

    Examples
    --------
    >>> round(population_stability_index(np.arange(1000), np.arange(1000)), 6)
    0.0
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.size == 0 or cur.size == 0:
        raise ValueError(f"population stability index: needs two non-empty samples (got {ref.size} and {cur.size})")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, n_bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / ref.size
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / cur.size
    # A small floor keeps empty bins from making the index infinite.
    ref_share, cur_share = np.clip(ref_share, 1e-4, None), np.clip(cur_share, 1e-4, None)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def save_reference(path: Path, risk_by_split: dict[str, npt.NDArray[np.float64]]) -> Path:
    """Write the training cohort's risks (``split``, ``risk``) to ``path``, a model folder's
    :data:`REFERENCE_FILE`."""
    pl.DataFrame({
        "split": [split for split, risk in risk_by_split.items() for _ in range(len(risk))],
        "risk": np.concatenate([np.asarray(risk, dtype=np.float64) for risk in risk_by_split.values()]),
    }).write_parquet(path)
    return path


def load_reference(model_dir: Path) -> npt.NDArray[np.float64] | None:
    """The training cohort's risks saved with a model, or None for a model folder written before
    cohortcast saved them (train the model again to get them)."""
    path = model_dir / REFERENCE_FILE
    if not path.is_file():
        return None
    return pl.read_parquet(path, columns=["risk"])["risk"].to_numpy()
