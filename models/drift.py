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

The model's inputs are compared the same way, one PSI per input (:func:`input_drift`): the
training cohort's tabular aggregates (age, counts per modality, and per selected code its count,
days since and latest value) are saved as decile bins (``input_reference.parquet``,
:func:`input_reference`), with a bin for missing values. A feed that broke upstream shows there
before it shows in the risks: notes that stopped arriving move the notes count, a lab whose code
was renamed goes missing, a unit change moves the latest values.

A model trained again keeps the references of the model it replaces (``previous_*``): a run that
retrains and then scores compares today's data with the cohort the model before trained on (the
day before, in a nightly run), not with itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from features.tabular import TabularCodes
from features.tokenize import UnitConversions, conversions_in_use, units_in_use, value_bin_edges

PSI_WARN = 0.1
PSI_ALARM = 0.25
REFERENCE_FILE = "drift_reference.parquet"
INPUT_REFERENCE_FILE = "input_reference.parquet"
PREVIOUS_PREFIX = "previous_"
"""The references of the model a retrained one replaced, kept in the new model's folder under this prefix."""
INPUT_KEY_COLUMNS = ("subject_id", "prediction_time", "last_input_time")
"""Columns of the tabular aggregates that identify a row rather than describe the patient."""


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
    edges = _decile_edges(ref, n_bins)
    return _psi(_bin_shares(ref, edges), _bin_shares(cur, edges))


def _decile_edges(values: npt.NDArray[np.float64], n_bins: int = 10) -> npt.NDArray[np.float64]:
    """Edges of the decile bins of ``values`` (no NaN), with a bin below their smallest value and
    one above their largest.

    Tied values keep a bin of their own (:func:`features.tokenize.value_bin_edges`): a count that is
    0 for most patients gets fewer, wider bins rather than empty ones, and a code that became
    common today is not hidden in a bin it shares with the reference's zeros. The outer bins are
    empty in the reference, so values beyond anything it held (a flag that was always 0, now 1)
    move the index.
    """
    if values.size == 0:
        return np.empty(0)
    inner = value_bin_edges(values, n_bins)
    return np.array([values.min(), *inner, np.nextafter(values.max(), np.inf)])


def _bin_shares(values: npt.NDArray[np.float64], edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Share of ``values`` in each bin cut at ``edges`` (``len(edges) + 1`` bins), then the share
    missing (NaN); the shares sum to 1."""
    present = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
    return np.append(counts, values.size - present.size).astype(np.float64) / values.size


def _psi(reference_share: npt.NDArray[np.float64], current_share: npt.NDArray[np.float64]) -> float:
    # A small floor keeps empty bins from making the index infinite.
    ref, cur = np.clip(reference_share, 1e-4, None), np.clip(current_share, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def input_reference(inputs: pl.DataFrame, n_bins: int = 10) -> pl.DataFrame:
    """Each input's distribution over the cohort ``inputs`` (the tabular aggregates, one row per
    patient): ``feature``, the decile ``edges`` of its present values, and the ``shares`` of the
    cohort in each bin and then missing."""
    rows = []
    for name in (c for c in inputs.columns if c not in INPUT_KEY_COLUMNS):
        values = inputs[name].cast(pl.Float64).fill_nan(None).to_numpy()
        edges = _decile_edges(values[~np.isnan(values)], n_bins)
        rows.append((name, edges.tolist(), _bin_shares(values, edges).tolist(), TOKEN_KEYS))
    return pl.DataFrame(rows, schema={"feature": pl.String, "edges": pl.List(pl.Float64),
                                      "shares": pl.List(pl.Float64), "keys": pl.String}, orient="row")


TOKEN_KEYS = "token"
"""The ``keys`` of an input reference whose aggregates are keyed by token (code and coded answer or
variant); a reference without the column keyed them by the bare code."""


def reference_codes(reference: pl.DataFrame, units: dict[str, str] | None = None,
                    unit_conversions: UnitConversions | None = None) -> TabularCodes:
    """The codes whose aggregates :func:`input_reference` saved (``count__<code>`` and the rest), so
    that today's aggregates can be computed for exactly those codes, keyed as they were: ``units``
    and ``unit_conversions`` are the main units and conversions of the model's tokenizer
    (``vocabulary.json``), which keyed them."""
    features = reference["feature"].to_list()
    codes = sorted({f.split("__", 1)[1] for f in features if f.startswith("count__")})
    numeric = sorted({f.split("__", 1)[1] for f in features if f.startswith("last__")})
    if "keys" in reference.columns:
        by_token = bool((reference["keys"] == TOKEN_KEYS).all())
    else:
        # Written before the keys were recorded: by token if any key holds a coded answer or a
        # variant (a code is two parts, ``LOINC//72166-2``; a token with its answer more).
        by_token = any(len(code.split("//")) > 2 for code in codes)
    in_use = units_in_use(units or {}, codes)
    return TabularCodes(codes, numeric, by_token=by_token, units=in_use,
                        unit_conversions=conversions_in_use(unit_conversions or {}, in_use))


def input_drift(reference: pl.DataFrame, inputs: pl.DataFrame) -> pl.DataFrame:
    """PSI of each input of ``reference`` (:func:`input_reference`) in today's ``inputs``, largest
    first: ``feature``, ``psi``, ``missing_reference`` and ``missing_today`` (shares of patients).

    Compute ``inputs`` for the reference's codes (:func:`reference_codes`); a column they lack
    counts as missing for every patient.
    """
    if inputs.height == 0:
        raise ValueError("input drift: today's inputs have no rows (expected one per cohort patient)")
    rows = []
    for name, edges, shares in reference.select("feature", "edges", "shares").iter_rows():
        values = (inputs[name].cast(pl.Float64).fill_nan(None).to_numpy() if name in inputs.columns
                  else np.full(inputs.height, np.nan))
        today = _bin_shares(values, np.asarray(edges, dtype=np.float64))
        rows.append((name, _psi(np.asarray(shares), today), shares[-1], float(today[-1])))
    return pl.DataFrame(rows, schema={"feature": pl.String, "psi": pl.Float64, "missing_reference": pl.Float64,
                                      "missing_today": pl.Float64}, orient="row").sort(
        ["psi", "feature"], descending=[True, False])


def save_reference(path: Path, risk_by_split: dict[str, npt.NDArray[np.float64]]) -> Path:
    """Write the training cohort's risks (``split``, ``risk``) to ``path``, a model folder's
    :data:`REFERENCE_FILE`."""
    pl.DataFrame({
        "split": [split for split, risk in risk_by_split.items() for _ in range(len(risk))],
        "risk": np.concatenate([np.asarray(risk, dtype=np.float64) for risk in risk_by_split.values()]),
    }).write_parquet(path)
    return path


def load_reference(model_dir: Path, previous: bool = False) -> npt.NDArray[np.float64] | None:
    """The training cohort's risks saved with a model (``previous``: of the model it replaced), or
    None for a model folder written before cohortcast saved them (train the model again to get
    them), or without a previous model."""
    path = model_dir / f"{PREVIOUS_PREFIX if previous else ''}{REFERENCE_FILE}"
    if not path.is_file():
        return None
    return pl.read_parquet(path, columns=["risk"], glob=False)["risk"].to_numpy()


def load_input_reference(model_dir: Path, previous: bool = False) -> pl.DataFrame | None:
    """The training cohort's input distributions saved with a model (``previous``: of the model it
    replaced), or None for a model folder written before cohortcast saved them (train the model
    again to get them), or without a previous model."""
    path = model_dir / f"{PREVIOUS_PREFIX if previous else ''}{INPUT_REFERENCE_FILE}"
    return pl.read_parquet(path, glob=False) if path.is_file() else None
