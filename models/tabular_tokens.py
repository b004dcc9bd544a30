"""Tokens for the fusion transformer from a flat table of patient covariates (one row per patient).

Stage: model inputs, for data that arrive as a table rather than as dated events (a trial's
baseline covariates, a gene-expression matrix). In: a polars table with a ``subject_id`` column and
one column per covariate, plus event indicators and follow-up times. Out: an ``event_tokens``-like
table that :class:`~models.data.FusionDataset` accepts (``subject_id, prediction_time, token_ids,
value_bins, time_before_days, modality_ids, last_input_time``) and a ``labels`` table
(``subject_id, prediction_time, boolean_value, event, duration_days, treated``).

:class:`TabularTokenizer` follows the scikit-learn pattern: ``fit`` sees only the training rows and
learns the quantile bin edges of every numeric column (``bin_edges_``) and the levels of every
categorical column (``vocabulary_``); ``transform`` applies them to any rows. Learning them on all
rows would let the test patients shape the inputs the model is judged on.

Every covariate is one token, all measured at the prediction time (``time_before_days`` 0):

* numeric column: the column's code, with the value's 1-based quantile bin (0 is "no value") and,
  with ``value_scaling``, the value itself on a common scale (a ``values`` column, for models with
  ``numeric_value_embedding``; the scale is learned in ``fit`` too);
* categorical column: the code of the column's level (``grade=II``), with value bin 0 (value NaN).

A missing value gives no token: the model sees the covariate as absent, never as an imputed value.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt
import polars as pl
from scipy.special import ndtri
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from features.tokenize import value_bin_edges
from models.fusion.configuration_fusion import MODALITIES

PAD, UNK = "[PAD]", "[UNK]"
ID_COLUMN = "subject_id"
TABLE_TIME = datetime(1970, 1, 1)
"""Prediction time of tables without dates: only the order of tokens' days matters, and all are 0."""

NUMERIC_DTYPES = (pl.Float32, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32,
                  pl.UInt64)
CATEGORICAL_DTYPES = (pl.String, pl.Categorical, pl.Enum, pl.Boolean)
VALUE_SCALINGS = ("standard", "normal_scores")
N_VALUE_QUANTILES = 1001
"""Training-quantile grid of ``value_scaling="normal_scores"`` (every 0.1 %)."""
STANDARD_CLIP = 5.0
"""``value_scaling="standard"`` clips values to this many training standard deviations."""


def _feature_columns(table: pl.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in (ID_COLUMN, "prediction_time")]


def _check_ids(table: pl.DataFrame, name: str) -> None:
    if ID_COLUMN not in table.columns:
        raise ValueError(f"{name}: no '{ID_COLUMN}' column (found {table.columns[:5]})")
    if table.height == 0:
        raise ValueError(f"{name}: no rows")
    if table[ID_COLUMN].null_count():
        raise ValueError(f"{name}.{ID_COLUMN}: {table[ID_COLUMN].null_count()} null ids")
    duplicated = table.height - table[ID_COLUMN].n_unique()
    if duplicated:
        raise ValueError(f"{name}.{ID_COLUMN}: {duplicated} duplicated ids (expected one row per patient)")


class TabularTokenizer(BaseEstimator):  # type: ignore[misc]
    """Turn a one-row-per-patient covariate table into fusion-model tokens.

    Parameters
    ----------
    n_bins
        Quantile bins per numeric column (:func:`features.tokenize.value_bin_edges`: near the train
        split's ``1/n_bins ... (n_bins-1)/n_bins`` quantiles, never splitting tied values; one bin per
        value for a column with at most ``n_bins`` of them). The model needs ``n_value_bins >= n_bins + 1``.
    genomics_columns
        Columns that carry genomic measurements (e.g. gene expression); their tokens get modality
        ``genomics`` (id 2), all others ``ehr`` (id 0).
    prediction_time
        Prediction time written for every patient when the table has no ``prediction_time`` column.
    value_scaling
        None (default): tokens carry only the value bin. ``"standard"``: they also carry the value as
        ``(value - mean) / sd`` of the train split, clipped to +-5; ``"normal_scores"``: as the
        standard-normal quantile of its rank among the train split's values (interpolated between
        the train split's quantiles, ties averaged; within +-3.1), which tames skewed columns such
        as counts. Either adds a ``values`` column (NaN for categorical tokens).

    Attributes
    ----------
    vocabulary_ : dict[str, int]
        Token ids: ``[PAD]`` 0, ``[UNK]`` 1 (a category level unseen in training), then one per
        numeric column (named as the column) and one per categorical level (``column=level``).
    bin_edges_ : dict[str, list[float]]
        Inner quantile edges of each numeric column; value bin ``1 + #(edges <= value)``.
    numeric_columns_, categorical_columns_ : list[str]
        Feature columns by kind, in the order of the training table.
    value_quantiles_ : dict[str, list[float]]
        Train-split quantiles of each numeric column at ``0, 0.001, ..., 1`` (for ``normal_scores``).
    value_mean_, value_sd_ : dict[str, float]
        Train-split mean and standard deviation of each numeric column (for ``standard``; sd 1 for
        constant columns).

    Examples
    --------
    >>> table = pl.DataFrame({"subject_id": [1, 2, 3, 4], "age": [30.0, 40.0, 50.0, 60.0],
    ...                       "grade": ["I", "II", "I", None]})
    >>> tokens = TabularTokenizer(n_bins=2).fit(table).transform(table)
    >>> tokens["token_ids"].to_list()
    [[2, 3], [2, 4], [2, 3], [2]]
    >>> tokens["value_bins"].to_list()
    [[1, 0], [1, 0], [2, 0], [2]]
    """

    def __init__(self, n_bins: int = 10, genomics_columns: Sequence[str] = (),
                 prediction_time: datetime = TABLE_TIME,
                 value_scaling: Literal["standard", "normal_scores"] | None = None) -> None:
        self.n_bins = n_bins
        self.genomics_columns = genomics_columns
        self.prediction_time = prediction_time
        self.value_scaling = value_scaling

    def fit(self, table: pl.DataFrame) -> TabularTokenizer:
        """Learn the bin edges and category levels from the training rows ``table``.

        Raises
        ------
        ValueError
            When ``n_bins`` is below 1, ``value_scaling`` is unknown, ``subject_id`` is missing, null
            or duplicated, a genomics column is not in the table, a column has an unsupported type
            or is entirely null.
        """
        if not isinstance(self.n_bins, int) or self.n_bins < 1 or self.n_bins > 126:
            raise ValueError(f"n_bins must be an integer in [1, 126] (got {self.n_bins!r})")
        if self.value_scaling is not None and self.value_scaling not in VALUE_SCALINGS:
            raise ValueError(f"value_scaling must be None or one of {VALUE_SCALINGS} (got {self.value_scaling!r})")
        _check_ids(table, "fit table")
        features = _feature_columns(table)
        if not features:
            raise ValueError("fit table: no feature columns besides subject_id and prediction_time")
        missing = [c for c in self.genomics_columns if c not in features]
        if missing:
            raise ValueError(f"genomics_columns: {missing[:3]} are not feature columns of the fit table")
        numeric, categorical = [], []
        for column in features:
            dtype = table.schema[column]
            if isinstance(dtype, NUMERIC_DTYPES):
                numeric.append(column)
            elif isinstance(dtype, CATEGORICAL_DTYPES):
                categorical.append(column)
            else:
                raise ValueError(f"fit table.{column}: unsupported type {dtype} (expected numeric, string, "
                                 "categorical or boolean)")
            if table[column].null_count() == table.height:
                raise ValueError(f"fit table.{column}: all {table.height} values are null")
        vocabulary = {PAD: 0, UNK: 1}
        bin_edges: dict[str, list[float]] = {}
        value_quantiles: dict[str, list[float]] = {}
        value_mean: dict[str, float] = {}
        value_sd: dict[str, float] = {}
        for column in features:
            if column in numeric:
                values = table[column].cast(pl.Float64).to_numpy()
                values = values[np.isfinite(values)]  # as transform reads them: inf is no value
                if values.size == 0:
                    raise ValueError(f"fit table.{column}: no finite values")
                bin_edges[column] = value_bin_edges(values, self.n_bins)
                value_quantiles[column] = np.quantile(values, np.linspace(0.0, 1.0, N_VALUE_QUANTILES)).tolist()
                value_mean[column] = float(values.mean())
                value_sd[column] = float(values.std()) or 1.0
                vocabulary[column] = len(vocabulary)
            else:
                # Spelled as transform spells them: a Boolean level is "true", not Python's "True".
                levels = sorted(table[column].drop_nulls().unique().cast(pl.String).to_list())
                for level in levels:
                    vocabulary[f"{column}={level}"] = len(vocabulary)
        self.vocabulary_ = vocabulary
        self.bin_edges_ = bin_edges
        self.value_quantiles_ = value_quantiles
        self.value_mean_ = value_mean
        self.value_sd_ = value_sd
        self.numeric_columns_ = numeric
        self.categorical_columns_ = categorical
        return self

    def transform(self, table: pl.DataFrame) -> pl.DataFrame:
        """Return the ``event_tokens``-like table of ``table``'s patients, in its row order.

        Raises
        ------
        ValueError
            When ``subject_id`` is missing, null or duplicated, or a column seen in ``fit`` is
            missing or became non-numeric.
        """
        check_is_fitted(self, ["vocabulary_", "bin_edges_"])
        _check_ids(table, "transform table")
        missing = [c for c in (*self.numeric_columns_, *self.categorical_columns_) if c not in table.columns]
        if missing:
            raise ValueError(f"transform table: columns {missing[:3]} seen in fit are missing")
        n = table.height
        genomics = set(self.genomics_columns)
        # Per column: (n,) token ids, value bins and presence, stacked then read row by row.
        codes, bins, present, modality, scaled = [], [], [], [], []
        for column in self.numeric_columns_:
            if not isinstance(table.schema[column], NUMERIC_DTYPES):
                raise ValueError(f"transform table.{column}: type {table.schema[column]} (numeric in fit)")
            values = table[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
            finite = np.isfinite(values)
            edges = np.asarray(self.bin_edges_[column], dtype=np.float64)
            bins.append(np.where(finite, 1 + np.searchsorted(edges, np.nan_to_num(values), side="right"), 0))
            codes.append(np.full(n, self.vocabulary_[column]))
            present.append(finite)
            modality.append(MODALITIES.index("genomics" if column in genomics else "ehr"))
            scaled.append(np.where(finite, self._scale(column, np.where(finite, values, 0.0)), np.nan))
        for column in self.categorical_columns_:
            levels = table[column].cast(pl.String).to_list()
            codes.append(np.array([self.vocabulary_.get(f"{column}={v}", 1) for v in levels]))
            bins.append(np.zeros(n, dtype=np.int64))
            scaled.append(np.full(n, np.nan))
            present.append(np.array([v is not None for v in levels], dtype=bool))
            modality.append(MODALITIES.index("genomics" if column in genomics else "ehr"))
        code_matrix = np.stack(codes, axis=1)  # (n, n_columns)
        bin_matrix = np.stack(bins, axis=1)
        value_matrix = np.stack(scaled, axis=1)
        mask = np.stack(present, axis=1)
        modalities = np.asarray(modality)
        rows = [(code_matrix[i][mask[i]].tolist(), bin_matrix[i][mask[i]].tolist(),
                 modalities[mask[i]].tolist(), value_matrix[i][mask[i]].tolist()) for i in range(n)]
        prediction_time = (table["prediction_time"] if "prediction_time" in table.columns
                           else pl.Series([self.prediction_time] * n))
        tokens = pl.DataFrame(
            {
                ID_COLUMN: table[ID_COLUMN].cast(pl.Int64),
                "prediction_time": prediction_time.cast(pl.Datetime("us")),
                "token_ids": [r[0] for r in rows],
                "value_bins": [r[1] for r in rows],
                "time_before_days": [[0.0] * len(r[0]) for r in rows],
                "modality_ids": [r[2] for r in rows],
                "last_input_time": pl.Series([None] * n, dtype=pl.Datetime("us")),
            },
            schema_overrides={"token_ids": pl.List(pl.Int32), "value_bins": pl.List(pl.Int8),
                              "time_before_days": pl.List(pl.Float32), "modality_ids": pl.List(pl.Int8)},
        )
        if self.value_scaling is None:
            return tokens
        return tokens.with_columns(pl.Series("values", [r[3] for r in rows], dtype=pl.List(pl.Float32)))

    def _scale(self, column: str, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``values`` of a numeric column on the common scale of ``value_scaling`` (NaN when None)."""
        if self.value_scaling == "standard":
            z = (values - self.value_mean_[column]) / self.value_sd_[column]
            return np.asarray(np.clip(z, -STANDARD_CLIP, STANDARD_CLIP))
        if self.value_scaling == "normal_scores":
            grid = np.linspace(0.0, 1.0, N_VALUE_QUANTILES)
            q = np.asarray(self.value_quantiles_[column])
            # Ties among the quantiles (a count's many zeros): average the rank seen from both sides.
            rank = 0.5 * (np.interp(values, q, grid) - np.interp(-values, -q[::-1], -grid[::-1]))
            return np.asarray(ndtri(np.clip(rank, 0.001, 0.999)))
        return np.full(values.shape, np.nan)

    def fit_transform(self, table: pl.DataFrame) -> pl.DataFrame:
        return self.fit(table).transform(table)


def survival_labels(
    subject_ids: npt.ArrayLike,
    event: npt.ArrayLike,
    duration_days: npt.ArrayLike,
    horizon_days: float,
    prediction_time: datetime = TABLE_TIME,
) -> pl.DataFrame:
    """The ``labels`` table of right-censored follow-up, with the risk label at ``horizon_days``.

    ``boolean_value`` is True when the event came at or before the horizon, False when the patient
    was followed to the horizon (or past it) without it, and null when follow-up ended earlier without the
    event (outcome at the horizon unknown: never counted as a negative). ``treated`` is null.

    Raises
    ------
    ValueError
        When the arrays differ in length or are empty, ``event`` is not 0/1, a duration is negative
        or not finite, or ``horizon_days`` is not positive.

    Examples
    --------
    >>> survival_labels([1, 2, 3], [True, False, False], [100.0, 400.0, 200.0], 365)["boolean_value"].to_list()
    [True, False, None]
    """
    ids = np.asarray(subject_ids)
    events = np.asarray(event)
    durations = np.asarray(duration_days, dtype=np.float64)
    if not ids.shape == events.shape == durations.shape or ids.ndim != 1:
        raise ValueError(f"survival_labels: subject_ids {ids.shape}, event {events.shape} and duration_days "
                         f"{durations.shape} must be 1-d and of one length")
    if ids.size == 0:
        raise ValueError("survival_labels: no patients")
    if not set(np.unique(events).tolist()) <= {0, 1}:  # True == 1, False == 0
        raise ValueError(f"survival_labels.event: expected 0/1 or booleans (found {np.unique(events)[:5].tolist()})")
    bad = ~np.isfinite(durations) | (durations < 0)
    if bad.any():
        raise ValueError(f"survival_labels.duration_days: {int(bad.sum())} values are negative or not finite "
                         "(expected >= 0)")
    if not horizon_days > 0:
        raise ValueError(f"survival_labels: horizon_days must be positive (got {horizon_days})")
    had_event = events.astype(bool)
    positive = had_event & (durations <= horizon_days)
    # Followed to the horizon without the event is a negative, as in features.labels (and the
    # censoring weights, which count a patient censored exactly there as followed).
    value = [True if p else (False if d >= horizon_days else None) for p, d in zip(positive, durations, strict=True)]
    return pl.DataFrame(
        {
            ID_COLUMN: ids.astype(np.int64),
            "prediction_time": pl.Series([prediction_time] * ids.size, dtype=pl.Datetime("us")),
            "boolean_value": pl.Series(value, dtype=pl.Boolean),
            "event": had_event,
            "duration_days": durations,
            "treated": pl.Series([None] * ids.size, dtype=pl.Boolean),
        }
    )
