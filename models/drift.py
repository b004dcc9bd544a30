"""Drift: how far today's inputs and scores have moved from what the model was trained on.

Stage: scoring. In: two samples of one quantity (for example the risks of the training split and
today's risks). Out: the population stability index (PSI). By convention PSI below 0.1 is stable,
0.1-0.25 a moderate shift worth a look, above 0.25 a shift that calls for retraining.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PSI_WARN = 0.1
PSI_ALARM = 0.25


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
