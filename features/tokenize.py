"""Event tokens for the fusion transformer, cut at each patient's prediction time.

Stage: model inputs. In: the ``events`` table, a task's ``cohort`` and the ids of its train
patients. Out: the ``event_tokens`` table (:data:`features.schemas.EVENT_TOKENS`): per patient, the
token ids, numeric-value bins, days before the prediction time and modality of each event.

:class:`EventTokenizer` follows the scikit-learn pattern: ``fit`` sees only the train split and
learns the vocabulary (``vocabulary_``) and the quantile bins of each numeric code
(``bin_edges_``); ``transform`` applies them to any split. Learning them on all patients would
let the held-out patients shape the inputs the model is judged on.

A token is the event's code, with its ``text_value`` appended when that is a value: a coded answer
or a variant of an EHR or genomics event (``LOINC//72166-2//SNOMED//8517006``,
``GENE//CYP2C19//rs4244285``). Events of the code families in :data:`ID_TEXT_VALUE_FAMILIES`
(notes, imaging studies, images) keep their bare code (``IMAGING_STUDY//CT``): their
``text_value`` is a note or study id (see :mod:`features.events`), joined to the note and imaging
embeddings instead. An id in the token would make every event a token of its own, seen in one
patient: it would never reach ``min_code_count``, or would put patients' study ids in the
vocabulary.

Units: one code can come with values in several units (a weight in ``kg`` or ``[lb_av]``, an eGFR
in ``mL/min/{1.73_m2}`` or ``mL/min``, which is another quantity). ``fit`` learns each numeric
token's main unit, the unit of most of its train values (:func:`main_units`, kept in ``units_``).
A value in another unit that UCUM converts into the main one (pounds into kilograms, degrees
Fahrenheit into Celsius: :func:`features.units.unit_conversion`, learned as ``unit_conversions_``)
is converted and keeps the token, so one weight is one input however the scale was set. A value in
a unit that must stay apart (``mL/min`` beside ``mL/min/{1.73_m2}``, ``mmol/L`` beside ``mg/dL``),
or without one, becomes a token of its own with the unit appended (``LOINC//33914-3//mL/min``,
``LOINC//29463-7//{no unit}``: :func:`unit_columns`), with its own vocabulary entry and bins.
Binned together, a clearance would read as the eGFR it is not; a unit too rare in train for
``min_code_count`` leaves its values out rather than misread them. So does a unit first seen after
``fit`` that must stay apart; one that UCUM converts into the main unit is converted when
``transform`` meets it (:func:`extend_unit_conversions`): a laboratory that starts reporting
haemoglobin in ``g/L`` where the model learned ``g/dL`` is still read, on the scale it learned.

Sequence length: a patient's facts (birth, and the events without a time: sex, genomics) come
first, then their most recent timed events, ``max_events`` tokens in all. Facts take at most
``max_static_events`` of them (half by default): a patient with more (an expression panel of
thousands of genes) keeps birth, sex and genotypes first (:func:`fact_priority`), then the others
in vocabulary order (the tokens seen in the most train patients first; ties by token, then by
value), so a wide panel never crowds out the laboratory results, diagnoses and visits, nor the
patient's age and sex.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from features.cohorts import BIRTH_CODE, SEX_PREFIX, with_known_time
from features.io import write_bytes_atomic
from features.schemas import MAX_VALUE_BINS
from features.units import unit_conversion

PAD, UNK = "[PAD]", "[UNK]"
MODALITIES = ("ehr", "notes", "genomics", "imaging")
"""Modality names in the order of their ids in ``modality_ids``."""

MICROSECONDS_PER_DAY = 86_400_000_000

ID_TEXT_VALUE_FAMILIES = ("NOTE//", "IMAGING_STUDY//", "IMAGING//")
"""Code prefixes whose events carry an identifier in ``text_value`` (a note id, a study id), not a
value: see the table of :mod:`features.events`. Their tokens are the bare code."""


def events_before(events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame) -> pl.LazyFrame:
    """Events of cohort patients known at their prediction time, with ``prediction_time`` joined.

    Each event is placed at the time it became known (its ``known_time`` where it has one, else its
    ``time``): a lab drawn before the prediction time but issued after it is not an input, and one
    issued before it is read as that old. Static facts (null time) are known at every prediction
    time. Events exactly at the prediction time are kept: the prediction time is when the
    information is complete (e.g. a visit's end). When each happened (a specimen's draw) stays as
    ``event_time``.
    """
    return (
        with_known_time(events)
        .with_columns(pl.col("time").alias("event_time"), pl.col("known_at").alias("time"))
        .drop("known_at")
        .join(cohort.lazy().select("subject_id", "prediction_time"), on="subject_id")
        .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    )


def token_expr() -> pl.Expr:
    """The token string of each event (see the module docstring)."""
    is_id = pl.any_horizontal([pl.col("code").str.starts_with(prefix) for prefix in ID_TEXT_VALUE_FAMILIES])
    with_value = (pl.col("modality").is_in(["ehr", "genomics"]) & pl.col("text_value").is_not_null()
                  & ~is_id.fill_null(False))
    return (
        pl.when(with_value)
        .then(pl.concat_str([pl.col("code"), pl.lit("//"), pl.col("text_value")]))
        .otherwise(pl.col("code"))
        .alias("token")
    )


NO_UNIT = "{no unit}"
"""The unit key of a numeric value whose event gives no unit (a UCUM annotation: no dimension)."""


def with_unit(events: pl.LazyFrame) -> pl.LazyFrame:
    """``events`` with a ``unit`` column: a warehouse ingested before events carried units has none
    (every value then reads as in its token's main unit, as it was binned then)."""
    if "unit" in events.collect_schema().names():
        return events
    return events.with_columns(pl.lit(None, dtype=pl.String).alias("unit"))


def _unit_key() -> pl.Expr:
    return pl.col("unit").fill_null(NO_UNIT)


UnitConversions = dict[str, dict[str, tuple[float, float]]]
"""Token -> {another unit its values come in -> (scale, offset) into the token's main unit}."""


def unit_counts(seen: pl.LazyFrame) -> pl.DataFrame:
    """``token``, ``unit`` (:data:`NO_UNIT` where a value has none) and ``values``: how many numeric
    values of each token ``seen`` (events with ``token``, ``numeric_value`` and ``unit``) holds in
    each unit, by token, then most values first, ties by unit (so no choice depends on row order)."""
    numeric = with_unit(seen).filter(pl.col("numeric_value").is_not_null()).with_columns(_unit_key().alias("unit"))
    return (numeric.group_by("token", "unit").agg(pl.len().alias("values"))
            .sort(["token", "values", "unit"], descending=[False, True, False]).collect())


def main_units(counts: pl.DataFrame) -> dict[str, str]:
    """Token -> the unit most of its numeric values carry in :func:`unit_counts`' ``counts`` (ties
    to the unit first in alphabetical order); :data:`NO_UNIT` where most values have none."""
    return dict(counts.group_by("token", maintain_order=True).agg(pl.col("unit").first()).iter_rows())


def unit_conversions(counts: pl.DataFrame, units: dict[str, str]) -> UnitConversions:
    """The other units of each token in :func:`unit_counts`' ``counts`` that UCUM converts into its
    main unit in ``units`` (:func:`features.units.unit_conversion`): the values that can be read on
    the main unit's scale, rather than kept apart."""
    conversions: UnitConversions = {}
    for token, unit in counts.select("token", "unit").iter_rows():
        main = units.get(token)
        if main is None or unit == main or NO_UNIT in (unit, main):
            continue
        if (conversion := unit_conversion(unit, main)) is not None:
            conversions.setdefault(token, {})[unit] = conversion
    return conversions


def extend_unit_conversions(events: pl.LazyFrame, units: dict[str, str], conversions: UnitConversions,
                            own_tokens: Collection[str] = ()) -> UnitConversions:
    """``conversions`` with the other units that the numeric values in ``events`` come in and that
    UCUM converts into their token's main unit in ``units``: units first seen after the conversions
    were learned. A unit with a token of its own in ``own_tokens`` (the vocabulary's
    ``LOINC//29463-7//[lb_av]``, kept apart by a model trained before conversions) keeps it.

    ``fit`` converts every convertible unit of its train values, so no unit it saw is read
    differently; only values that would otherwise be dropped as unknown tokens are added. UCUM is
    loaded only when such a unit is found.
    """
    if not units:
        return conversions
    # Keyed as unit_columns keys a value in another unit (``LOINC//29463-7//[lb_av]``).
    known = [f"{token}//{unit}" for token, by_unit in conversions.items() for unit in by_unit] + list(own_tokens)
    counts = unit_counts(events.with_columns(token_expr()).filter(pl.col("token").is_in(list(units))))
    unseen = counts.filter(~pl.concat_str([pl.col("token"), pl.lit("//"), pl.col("unit")]).is_in(known))
    added = unit_conversions(unseen, units)
    if not added:
        return conversions
    return {token: {**conversions.get(token, {}), **added.get(token, {})}
            for token in sorted(conversions.keys() | added.keys())}


def unit_columns(units: dict[str, str], conversions: UnitConversions | None = None) -> list[pl.Expr]:
    """``token`` and ``numeric_value`` with each value read in its token's main unit (``units``): a
    value in a unit of ``conversions`` is converted into the main unit and keeps the token; a value
    in another unit, or in none, keeps its number and gets a token of its own, the unit appended
    (see the module docstring). Both read the events' own columns, so pass them together to one
    ``with_columns``."""
    if not units:
        return [pl.col("token")]
    main = pl.col("token").replace_strict(units, default=None, return_dtype=pl.String)
    other = main.is_not_null() & pl.col("numeric_value").is_not_null() & (_unit_key() != main)
    with_unit_token = pl.concat_str([pl.col("token"), pl.lit("//"), _unit_key()])
    if not conversions:
        return [pl.when(other).then(with_unit_token).otherwise(pl.col("token")).alias("token")]
    # Keyed as the token a value in that unit would otherwise be (``LOINC//29463-7//[lb_av]``).
    flat = {f"{token}//{unit}": conversion for token, by_unit in conversions.items()
            for unit, conversion in by_unit.items()}
    scale = with_unit_token.replace_strict({k: c[0] for k, c in flat.items()}, default=None, return_dtype=pl.Float64)
    offset = with_unit_token.replace_strict({k: c[1] for k, c in flat.items()}, default=None, return_dtype=pl.Float64)
    converted = other & scale.is_not_null()
    return [
        pl.when(other & ~converted).then(with_unit_token).otherwise(pl.col("token")).alias("token"),
        # Float32 as events hold values (features.schemas.EVENTS); the arithmetic in float64.
        pl.when(converted).then((pl.col("numeric_value").cast(pl.Float64) * scale + offset).cast(pl.Float32))
        .otherwise(pl.col("numeric_value")).alias("numeric_value"),
    ]


def conversions_in_use(conversions: UnitConversions, units: dict[str, str]) -> UnitConversions:
    """The entries of ``conversions`` whose token keeps a main unit in ``units`` (a vocabulary's,
    from :func:`units_in_use`)."""
    return {token: by_unit for token, by_unit in sorted(conversions.items()) if token in units}


def units_in_use(units: dict[str, str], tokens: list[str] | dict[str, int]) -> dict[str, str]:
    """The entries of ``units`` (token -> main unit) that ``tokens`` use: a token's own, or one of
    its values in another unit (``LOINC//29463-7//[lb_av]`` uses ``LOINC//29463-7``'s). The others
    are left out: a token too rare for the vocabulary must not be written beside it."""
    used: dict[str, str] = {}
    for token in tokens:
        parts = token.split("//")
        for end in range(len(parts), 1, -1):
            if (prefix := "//".join(parts[:end])) in units:
                used[prefix] = units[prefix]
    return dict(sorted(used.items()))


DIMENSIONLESS_UNITS = (NO_UNIT, "1")
"""Unit keys shown with no unit: none given, and UCUM's unity."""


def value_unit(token: str, units: dict[str, str]) -> str | None:
    """The unit of a vocabulary token's values, to show beside them: the token's main unit, or for
    a value in another unit (``LOINC//29463-7//[lb_av]``) that unit; None for a token without one.

    >>> value_unit("LOINC//29463-7//[lb_av]", {"LOINC//29463-7": "kg"})
    '[lb_av]'
    >>> value_unit("LOINC//29463-7", {"LOINC//29463-7": "kg"}), value_unit("GENE//LPA", {"GENE//LPA": NO_UNIT})
    ('kg', None)
    """
    unit = units.get(token)
    if unit is None:
        base, _, suffix = token.rpartition("//")
        unit = suffix if base in units else None
    return None if unit in DIMENSIONLESS_UNITS else unit


def value_bin_edges(values: np.ndarray, n_bins: int) -> list[float]:
    """Inner edges cutting finite ``values`` into at most ``n_bins`` bins of about equal count; a
    value's bin is ``1 + #(edges <= value)``.

    An edge never falls on a value: each lies halfway between two neighbouring distinct values, the
    lower one at or below a quantile. Quantile edges alone put a tied value in the bin above it,
    with larger values: with most patients at 0 alt alleles, a genotype's 0, 1 and 2 shared one
    bin, and so did a flag's 0 and 1. A token with at most ``n_bins`` distinct values gets one bin
    per value. A value held by a bin's worth of patients or more gets a bin of its own on both
    sides, wherever it lies: with 90 % of coma scores at the normal 15, a score of 3 must not
    share its bin, nor, with most saturations at 98 %, a hypoxic 88. Where that would make more
    than ``n_bins`` bins, the two neighbouring bins with the fewest values between them are merged
    until it does not.

    Examples
    --------
    >>> value_bin_edges(np.array([0.0] * 90 + [1.0] * 9 + [2.0]), 5)
    [0.5, 1.5]
    >>> value_bin_edges(np.arange(1.0, 11.0), 2)
    [5.5]
    >>> value_bin_edges(np.array([15.0] * 90 + [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]), 5)
    [13.5]
    """
    distinct, counts = np.unique(values, return_counts=True)
    if distinct.size <= 1 or n_bins <= 1:
        return []
    if distinct.size <= n_bins:
        lower = distinct[:-1]
    else:
        quantiles = np.quantile(values, np.arange(1, n_bins) / n_bins)
        at_quantiles = np.searchsorted(distinct, quantiles, side="right") - 1
        heavy = np.flatnonzero(counts >= values.size / n_bins)
        below_heavy = heavy[heavy > 0] - 1  # the cut under a heavy value: its own bin from below too
        lower = np.unique(distinct[np.concatenate([at_quantiles, below_heavy])])
        lower = lower[lower < distinct[-1]]
    upper = distinct[np.searchsorted(distinct, lower, side="right")]
    edges = lower + (upper - lower) / 2
    if edges.size > n_bins - 1:
        bin_counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
        while edges.size > n_bins - 1:
            merged = int(np.argmin(bin_counts[:-1] + bin_counts[1:]))  # drops the edge between them
            edges = np.delete(edges, merged)
            bin_counts = np.concatenate([bin_counts[:merged], [bin_counts[merged] + bin_counts[merged + 1]],
                                         bin_counts[merged + 2:]])
    result: list[float] = edges.tolist()
    return result


TIMED = 4
""":func:`fact_priority` of an event that is neither birth nor a static fact."""


def fact_priority() -> pl.Expr:
    """Which facts a sequence keeps first when it has more than ``max_static_events``: birth (its
    time before the prediction time is the patient's age, which the model has from no other
    input), sex, genotypes, then other static facts (expression values, features). By vocabulary
    order alone, a panel measured in every patient would come before sex (half of them each), and
    birth, the oldest event, would be the first timed event cut. :data:`TIMED` for other events."""
    token, time = pl.col("token"), pl.col("time")
    return (pl.when(token == BIRTH_CODE).then(0)
            .when(time.is_not_null()).then(TIMED)
            .when(token.str.starts_with(SEX_PREFIX)).then(1)
            .when(token.str.starts_with("GENE//")).then(2)
            .otherwise(3).cast(pl.Int8))


class EventTokenizer(BaseEstimator):  # type: ignore[misc]
    """Learn a vocabulary and value bins on train patients; turn events into token sequences.

    Parameters
    ----------
    max_events
        Longest sequence per patient, after out-of-vocabulary events (which carry no information)
        are dropped: static facts first, then the most recent timed events.
    max_static_events
        Most static facts per patient (the first ones in vocabulary order when there are more),
        0 to ``max_events``; None: half of ``max_events``. The rest of the sequence is the timed
        events': 1,000 expression values would otherwise leave no room for any of them.
    value_bins
        Quantile bins per numeric token (fewer when a token has fewer distinct values), 1 to
        :data:`MAX_VALUE_BINS`.
    min_code_count
        A token must occur in at least this many train patients to enter the vocabulary: rare
        codes would be memorised, and could identify a patient.
    """

    def __init__(self, max_events: int = 512, value_bins: int = 5, min_code_count: int = 5,
                 max_static_events: int | None = None) -> None:
        self.max_events = max_events
        self.value_bins = value_bins
        self.min_code_count = min_code_count
        self.max_static_events = max_static_events

    def static_limit(self) -> int:
        """Most static facts per patient: ``max_static_events``, or half of ``max_events``."""
        return self.max_events // 2 if self.max_static_events is None else self.max_static_events

    def fit(self, events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame,
            train_ids: pl.Series | list[int]) -> EventTokenizer:
        """Learn ``vocabulary_`` and ``bin_edges_`` from the train patients' events before their
        prediction time. Returns ``self``."""
        self._check_params()
        train = cohort.filter(pl.col("subject_id").is_in(list(train_ids)))
        if train.height == 0:
            raise ValueError("EventTokenizer.fit: no cohort patient is in the train split")
        seen = with_unit(events_before(events, train).with_columns(token_expr()))
        values_by_unit = unit_counts(seen)
        units = main_units(values_by_unit)
        conversions = unit_conversions(values_by_unit, units)
        seen = seen.with_columns(unit_columns(units, conversions))
        counts = (
            seen.group_by("token").agg(pl.col("subject_id").n_unique().alias("patients"))
            .filter(pl.col("patients") >= self.min_code_count)
            .sort(["patients", "token"], descending=[True, False])
            .collect()
        )
        vocabulary = {PAD: 0, UNK: 1}
        for token in counts["token"]:
            vocabulary[token] = len(vocabulary)
        numeric = (
            # Finite values only: an infinity would make NaN edges (the ingest refuses both, but the
            # events may come from elsewhere).
            seen.filter(pl.col("numeric_value").is_finite()
                        & pl.col("token").is_in(counts["token"].to_list()))
            .group_by("token")
            .agg(pl.col("numeric_value").cast(pl.Float64))
            .sort("token")
            .collect()
        )
        edges = {token: value_bin_edges(np.asarray(values, dtype=np.float64), self.value_bins)
                 for token, values in numeric.iter_rows()}
        self.vocabulary_ = vocabulary
        self.bin_edges_ = edges
        self.units_ = units_in_use(units, vocabulary)
        self.unit_conversions_ = conversions_in_use(conversions, self.units_)
        return self

    def _check_params(self) -> None:
        if self.max_events < 1:
            raise ValueError(f"EventTokenizer: max_events must be at least 1 (found {self.max_events})")
        if not 0 <= self.static_limit() <= self.max_events:
            raise ValueError(f"EventTokenizer: max_static_events must be between 0 and max_events "
                             f"({self.max_events}) (found {self.max_static_events})")
        if not 1 <= self.value_bins <= MAX_VALUE_BINS:
            # Beyond 127 the bins would wrap to negative numbers in the int8 column, silently.
            raise ValueError(f"EventTokenizer: value_bins must be between 1 and {MAX_VALUE_BINS}, as value bins "
                             f"are stored as int8 in event_tokens.value_bins (found {self.value_bins})")

    def transform(self, events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame) -> pl.DataFrame:
        """Return the ``event_tokens`` table (one row per cohort patient, sorted by subject id)."""
        check_is_fitted(self, ["vocabulary_", "bin_edges_", "units_", "unit_conversions_"])
        # Again here: a tokenizer loaded from a file, or whose settings were changed after fit.
        self._check_params()
        static_limit = self.static_limit()
        vocabulary = pl.DataFrame(
            {"token": list(self.vocabulary_), "token_id": list(self.vocabulary_.values())},
            schema={"token": pl.String, "token_id": pl.Int32},
        )
        conversions = extend_unit_conversions(events.lazy(), self.units_, self.unit_conversions_, self.vocabulary_)
        seen = (
            with_unit(events_before(events, cohort))
            .with_columns(token_expr())
            .with_columns(unit_columns(self.units_, conversions))
            .join(vocabulary.lazy(), on="token", how="inner")  # unknown tokens are dropped
            .with_columns(
                pl.col("modality").replace_strict(
                    {m: i for i, m in enumerate(MODALITIES)}, default=0, return_dtype=pl.Int8
                ).alias("modality_id"),
                ((pl.col("prediction_time") - pl.col("time")).dt.total_microseconds().cast(pl.Float64)
                 / MICROSECONDS_PER_DAY).cast(pl.Float32).alias("time_before_days"),
            )
            .with_columns(fact_priority().alias("priority"))
            # A total order first: the join above does not keep one, and events at the same time
            # (two weights charted in the same minute) must be cut and listed the same way on every
            # run. The ordinal rank then breaks ties in time by that order.
            .sort(["subject_id", "priority", "time", "token_id", "numeric_value"], nulls_last=False)
            # Facts first (birth and the static facts: the first static_limit of them in the order
            # above, by fact_priority, then token id, i.e. vocabulary order, then value), then the
            # most recent timed events up to the limit. Int64: the counts are UInt32, and
            # max_events - n_facts would wrap to ~4e9 (keeping every timed event) for a patient
            # with more facts than max_events.
            .with_columns(
                pl.min_horizontal(pl.col("priority").lt(TIMED).sum().over("subject_id").cast(pl.Int64),
                                  pl.lit(static_limit, dtype=pl.Int64)).alias("n_facts"),
                pl.col("priority").lt(TIMED).cum_sum().over("subject_id").cast(pl.Int64).alias("fact_rank"),
                pl.when(pl.col("priority") == TIMED).then(pl.col("time")).rank("ordinal", descending=True)
                .over("subject_id").cast(pl.Int64).alias("recency"),
                pl.len().over("subject_id").cast(pl.Int32).alias("known_events"),
            )
            .filter(pl.when(pl.col("priority") < TIMED)
                    .then(pl.col("fact_rank") <= static_limit)
                    .otherwise(pl.col("recency") <= pl.lit(self.max_events, dtype=pl.Int64) - pl.col("n_facts")))
            .select("subject_id", "prediction_time", "time", "token", "token_id", "numeric_value",
                    "time_before_days", "modality_id", "known_events")
            .collect()
        )
        seen = seen.with_columns(pl.Series("value_bin", self._bins(seen), dtype=pl.Int8))
        sequences = (
            seen.sort(["subject_id", "time", "token_id", "numeric_value"], nulls_last=False)
            .group_by("subject_id", maintain_order=True)
            .agg(
                pl.col("token_id").alias("token_ids"),
                pl.col("value_bin").alias("value_bins"),
                pl.col("time_before_days"),
                pl.col("modality_id").alias("modality_ids"),
                pl.col("time").max().alias("last_input_time"),
                (pl.col("known_events").first() - pl.len().cast(pl.Int32)).alias("dropped_events"),
            )
        )
        return (
            cohort.select("subject_id", "prediction_time")
            .join(sequences, on="subject_id", how="left")
            .with_columns(
                pl.col("token_ids").fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
                pl.col("value_bins").fill_null(pl.lit([], dtype=pl.List(pl.Int8))),
                pl.col("time_before_days").fill_null(pl.lit([], dtype=pl.List(pl.Float32))),
                pl.col("modality_ids").fill_null(pl.lit([], dtype=pl.List(pl.Int8))),
                pl.col("dropped_events").fill_null(0),
            )
            .sort("subject_id")
        )

    def _bins(self, seen: pl.DataFrame) -> np.ndarray:
        """1-based quantile bin of each event's value; 0 when it has none or its token has no bins."""
        bins = np.zeros(seen.height, dtype=np.int8)
        # Each numeric token's events gathered once (a loop comparing every event with each numeric
        # token costs tokens x events: minutes for a site's thousands of laboratory codes).
        numeric = (
            seen.select("token", pl.col("numeric_value").cast(pl.Float64).alias("value"))
            .with_row_index("row")
            .filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan()
                    & pl.col("token").is_in(list(self.bin_edges_)))
            .group_by("token")
            .agg("row", "value")
        )
        for token, rows, values in numeric.iter_rows():
            bins[np.asarray(rows, dtype=np.int64)] = 1 + np.searchsorted(
                np.asarray(self.bin_edges_[token]), np.asarray(values, dtype=np.float64), side="right")
        return bins

    def save(self, path: Path) -> Path:
        """Write the fitted vocabulary and bins as JSON (no pickle), atomically."""
        check_is_fitted(self, ["vocabulary_", "bin_edges_", "units_", "unit_conversions_"])
        state: dict[str, Any] = {
            "max_events": self.max_events, "max_static_events": self.max_static_events, "value_bins": self.value_bins,
            "min_code_count": self.min_code_count, "vocabulary": self.vocabulary_,
            "bin_edges": self.bin_edges_, "units": self.units_,
        }
        if self.unit_conversions_:
            # Written only where there are any: a site charting each code in one unit keeps the file
            # (and the fingerprint of the model trained on it) as it was before conversions.
            state["unit_conversions"] = {token: {unit: list(conversion) for unit, conversion in by_unit.items()}
                                         for token, by_unit in self.unit_conversions_.items()}
        return write_bytes_atomic(json.dumps(state, indent=1, sort_keys=True).encode(), path)

    @classmethod
    def load(cls, path: Path) -> EventTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        state = _saved_state(path)
        # A file written before the limit existed: static facts could fill the whole sequence, and
        # the model it belongs to must get the inputs it was trained on.
        tokenizer = cls(state["max_events"], state["value_bins"], state["min_code_count"],
                        state.get("max_static_events", state["max_events"]))
        tokenizer.vocabulary_ = {k: int(v) for k, v in state["vocabulary"].items()}
        tokenizer.bin_edges_ = {k: [float(x) for x in v] for k, v in state["bin_edges"].items()}
        tokenizer.units_ = _units_of(state)
        tokenizer.unit_conversions_ = _conversions_of(state)
        return tokenizer


def saved_unit_keys(path: Path) -> tuple[dict[str, str], UnitConversions]:
    """The main units (token -> unit) and the unit conversions (:func:`unit_conversions`) of a
    tokenizer file written by :meth:`EventTokenizer.save`, from one read; none of either in a file
    written before them, so the inputs are keyed as its model's were."""
    state = _saved_state(path)
    return _units_of(state), _conversions_of(state)


def _saved_state(path: Path) -> dict[str, Any]:
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError(f"tokenizer file {path}: expected a JSON object, found {type(state).__name__}")
    return state


def _conversions_of(state: dict[str, Any]) -> UnitConversions:
    # A file written before conversions kept every other unit apart: its model gets the same inputs.
    return {str(token): {str(unit): (float(scale), float(offset)) for unit, (scale, offset) in by_unit.items()}
            for token, by_unit in state.get("unit_conversions", {}).items()}


def _units_of(state: dict[str, Any]) -> dict[str, str]:
    # A file written before units were learned has none: its tokens were the bare token whatever
    # the unit, and the model it belongs to must get the same inputs.
    return {str(token): str(unit) for token, unit in state.get("units", {}).items()}
