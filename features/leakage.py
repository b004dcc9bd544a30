"""Leakage guards: no model input after its patient's prediction time, no patient in two splits.

Stage: model inputs (checks). In: any model-input table with ``subject_id`` and a time column, the
task's ``cohort``, and the ``splits`` table. Out: the offending rows (empty when clean). The Dagster
asset checks of :mod:`pipelines.assets.tasks` fail when either function returns a row.
"""

from __future__ import annotations

import polars as pl


def find_leaks(inputs: pl.DataFrame, cohort: pl.DataFrame, time_column: str = "time") -> pl.DataFrame:
    """Rows of ``inputs`` dated after their patient's prediction time, or of no cohort patient.

    Parameters
    ----------
    inputs
        A model-input table with ``subject_id`` and ``time_column`` (null = static, never a leak).
    cohort
        ``subject_id, prediction_time`` per patient.
    time_column
        The column holding each row's (latest) event time.

    Returns
    -------
    pl.DataFrame
        ``subject_id, <time_column>, prediction_time`` of each leaking row.

    Examples
    --------
    >>> from datetime import datetime
    >>> cohort = pl.DataFrame({"subject_id": [1], "prediction_time": [datetime(2022, 1, 1)]})
    >>> rows = pl.DataFrame({"subject_id": [1, 1], "time": [datetime(2021, 1, 1), datetime(2022, 1, 2)]})
    >>> find_leaks(rows, cohort)["time"].to_list()
    [datetime.datetime(2022, 1, 2, 0, 0)]
    """
    index = cohort.select("subject_id", pl.col("prediction_time").alias("_cohort_prediction_time"))
    joined = inputs.select("subject_id", time_column).join(index, on="subject_id", how="left")
    return joined.filter(
        pl.col("_cohort_prediction_time").is_null()
        | (pl.col(time_column).is_not_null() & (pl.col(time_column) > pl.col("_cohort_prediction_time")))
    ).rename({"_cohort_prediction_time": "prediction_time"})


def find_negative_offsets(tokens: pl.DataFrame) -> pl.DataFrame:
    """Patients of an ``event_tokens`` table with any event after the prediction time
    (a negative ``time_before_days``)."""
    return tokens.filter(
        pl.col("time_before_days").list.eval(pl.element() < 0).list.any().fill_null(False)
    ).select("subject_id", "prediction_time")


def find_split_overlap(splits: pl.DataFrame) -> pl.DataFrame:
    """Subject ids assigned to more than one split, with their splits.

    Examples
    --------
    >>> splits = pl.DataFrame({"subject_id": [1, 1, 2], "split": ["train", "held_out", "train"]})
    >>> find_split_overlap(splits)["subject_id"].to_list()
    [1]
    """
    return (
        splits.group_by("subject_id")
        .agg(pl.col("split").unique().sort().alias("splits"))
        .filter(pl.col("splits").list.len() > 1)
        .sort("subject_id")
    )
