"""Tabular aggregates for the baseline models (logistic regression, gradient boosting).

Stage: model inputs. In: the ``events`` table, a task's ``cohort`` and the ids of its train
patients. Out: a wide table, one row per cohort patient: ``subject_id, prediction_time,
last_input_time`` (:data:`features.schemas.TABULAR_FEATURES_KEY`), then ``age_years``,
``sex_female``, counts per modality, and per selected code ``count__<code>`` (events before the
prediction time), ``days_since__<code>`` (days since the latest one was taken; null for static
facts and when never seen) and, for codes with numeric values, ``last__<code>`` (the latest value
taken among those known at the prediction time: a result counts once issued, and a stat repeat
issued before an earlier routine sample's result is still the latest). A "code" here
is the event's token, as the fusion model's vocabulary keys it (:func:`features.tokenize.token_expr`):
an observation's coded answer and a genotype's variant are part of it
(``LOINC//72166-2//SNOMED//77176002``, a current smoker; ``GENE//CYP2C19//rs4244285``), so the
baselines see what the fusion model sees, not only that smoking status was charted.

A value in a unit other than its token's main unit is read as the fusion model's vocabulary reads
it (:func:`features.tokenize.unit_columns`, with the main units and conversions the task's
:class:`~features.tokenize.EventTokenizer` learned on the train split): converted into the main
unit where UCUM allows (``last__LOINC//29463-7`` holds weights in kg, pounds converted, as do
units first seen after training), else keyed with its unit (an eGFR's ``mL/min`` values have
columns of their own when common enough).

Which codes get columns, and which of them get a ``last__<code>`` column, is learned on the train
split only (:func:`select_tabular_codes`), so the column set never depends on tuning or held-out
patients: a code whose train patients never have a value gets no ``last__`` column even where a
held-out patient has one, and a code with train values keeps its (null) column in a split without
any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from features.tokenize import (
    MICROSECONDS_PER_DAY,
    UnitConversions,
    conversions_in_use,
    events_before,
    extend_unit_conversions,
    main_units,
    token_expr,
    unit_columns,
    unit_counts,
    units_in_use,
    with_unit,
)
from features.tokenize import unit_conversions as learned_conversions


@dataclass(frozen=True)
class TabularCodes:
    """The codes that get columns, learned on the train split by :func:`select_tabular_codes`."""

    codes: list[str]
    """Codes (tokens: with the coded answer or variant, see the module docstring) with ``count__`` and
    ``days_since__`` columns, sorted."""
    numeric: list[str]
    """The codes of ``codes`` that also get a ``last__`` column: a train patient has a value of
    them (not null, not NaN) before their prediction time. Sorted."""
    by_token: bool = True
    """Columns keyed by token (with the coded answer or variant); False: by the bare code, as
    models trained before the token keys saved their input references (their drift check must
    compare like with like)."""
    units: dict[str, str] = field(default_factory=dict)
    """Token -> its main unit (the tokenizer's ``units_``); empty for columns keyed before units
    were (every value then under its bare token)."""
    unit_conversions: UnitConversions = field(default_factory=dict)
    """The tokenizer's ``unit_conversions_`` for these tokens: values in those units are converted
    into the main unit; empty for columns keyed before conversions (other units then kept apart)."""


def select_tabular_codes(events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame,
                         train_ids: pl.Series | list[int], max_codes: int,
                         units: dict[str, str] | None = None,
                         unit_conversions: UnitConversions | None = None) -> TabularCodes:
    """The ``max_codes`` codes seen in the most train patients before their prediction time (ties
    by code), and which of them have numeric values in those patients. ``units``: each token's
    main unit (the task tokenizer's ``units_``), into which values in a unit of
    ``unit_conversions`` (its ``unit_conversions_``) are converted; a value in any other unit is a
    code of its own. A code too rare for the tokenizer's vocabulary has no main unit there: it gets
    one learned here the same way (:func:`features.tokenize.main_units`), so that its values in
    two units are not aggregated as one."""
    units, unit_conversions = units or {}, unit_conversions or {}
    train = cohort.filter(pl.col("subject_id").is_in(list(train_ids)))
    seen = events_before(events, train)
    counts = unit_counts(with_unit(seen).with_columns(token_expr()))
    rare = counts.filter(~pl.col("token").is_in(list(units)))
    rare_units = main_units(rare)
    units = {**rare_units, **units}
    unit_conversions = {**learned_conversions(rare, rare_units), **unit_conversions}
    ranked = (
        _with_token_code(seen, units, unit_conversions)
        .group_by("code")
        .agg(
            pl.col("subject_id").n_unique().alias("patients"),
            (pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_not_nan()).any().alias("numeric"),
        )
        .sort(["patients", "code"], descending=[True, False])
        .head(max_codes)
        .sort("code")
        .collect()
    )
    codes = ranked["code"].to_list()
    in_use = units_in_use(units, codes)
    return TabularCodes(codes=codes, numeric=ranked.filter(pl.col("numeric"))["code"].to_list(),
                        units=in_use, unit_conversions=conversions_in_use(unit_conversions, in_use))


def _with_token_code(events: pl.LazyFrame, units: dict[str, str], unit_conversions: UnitConversions) -> pl.LazyFrame:
    """``code`` replaced by the event's token (the code, with its coded answer or variant, and its
    unit where that is not the token's main unit in ``units`` and ``unit_conversions`` does not
    convert it, in which case the value is converted)."""
    return (with_unit(events).with_columns(token_expr()).with_columns(unit_columns(units, unit_conversions))
            .with_columns(pl.col("token").alias("code")).drop("token"))


def aggregate_before(events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame,
                     selected: TabularCodes) -> pl.DataFrame:
    """Return the wide tabular-features table of a cohort (see the module docstring).

    Parameters
    ----------
    events
        The ``events`` table, eager or lazy.
    cohort
        The ``cohort`` table (``subject_id, prediction_time, age_years, sex``).
    selected
        Codes that get their own columns, and those of them with a ``last__`` column, from
        :func:`select_tabular_codes` on the train split.
    """
    codes = selected.codes
    # Decided on the train split, not on ``cohort``: which columns exist must not depend on which
    # patients are aggregated (see the module docstring).
    numeric_codes = set(selected.numeric)
    seen = events_before(events, cohort)
    if selected.by_token:
        # A unit first seen after training that UCUM converts is read as the fusion model reads it.
        conversions = extend_unit_conversions(events.lazy(), selected.units, selected.unit_conversions, codes)
        seen = _with_token_code(seen, selected.units, conversions)
    overall = (
        seen.group_by("subject_id")
        .agg(
            pl.col("time").max().alias("last_input_time"),
            *[(pl.col("modality") == m).sum().cast(pl.Float64).alias(f"n_{m}_events")
              for m in ("ehr", "notes", "genomics", "imaging")],
        )
        .collect()
    )
    per_code = (
        seen.filter(pl.col("code").is_in(codes))
        # Of the results known at the prediction time, the last one taken (a stat repeat drawn at
        # 10:00 and issued at 10:30 over a routine sample drawn at 08:00 and issued at 11:30), and
        # the days since it was taken. The value as the last key: of two values charted at the same
        # time, "last" is then the same one on every run (the larger), whatever order the join left
        # them in.
        .sort(["subject_id", "code", "event_time", "time", "numeric_value"], nulls_last=False)
        .group_by(["subject_id", "code"])
        .agg(
            pl.len().cast(pl.Float64).alias("count"),
            ((pl.col("prediction_time").first() - pl.col("event_time").max()).dt.total_microseconds()
             .cast(pl.Float64) / MICROSECONDS_PER_DAY).alias("days_since"),
            # A NaN is no value (as in the selection above): it must not hide an earlier reading.
            pl.col("numeric_value").drop_nulls().drop_nans().last().cast(pl.Float64).alias("last"),
        )
        .collect()
    )
    wide = cohort.select(
        "subject_id", "prediction_time",
        pl.col("age_years").cast(pl.Float64),
        (pl.col("sex") == "female").cast(pl.Float64).alias("sex_female"),
    ).join(overall, on="subject_id", how="left")
    columns: list[pl.Expr] = []
    for stat in ("count", "days_since", "last"):
        if per_code.height == 0:
            break
        pivoted = per_code.pivot(on="code", index="subject_id", values=stat)
        pivoted = pivoted.rename({c: f"{stat}__{c}" for c in pivoted.columns if c != "subject_id"})
        wide = wide.join(pivoted, on="subject_id", how="left")
    for code in codes:
        for stat in ("count", "days_since", "last"):
            name = f"{stat}__{code}"
            if stat == "last" and code not in numeric_codes:
                continue
            if name not in wide.columns:
                wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(name))
            columns.append(pl.col(name).cast(pl.Float64))
    counts = [c for c in wide.columns if c.startswith("n_") and c.endswith("_events")]
    return (
        wide.select(
            "subject_id", "prediction_time", "last_input_time", "age_years", "sex_female",
            *[pl.col(c).fill_null(0.0) for c in counts],
            *columns,
        )
        .with_columns(pl.col(f"count__{c}").fill_null(0.0) for c in codes)
        .sort("subject_id")
    )
