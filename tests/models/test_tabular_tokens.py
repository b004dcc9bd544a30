"""Tests of models/tabular_tokens.py: covariate tables to fusion tokens and survival labels."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from sklearn.exceptions import NotFittedError

from models.data import FusionDataset, collate
from models.tabular_tokens import TABLE_TIME, TabularTokenizer, survival_labels


def covariates() -> pl.DataFrame:
    return pl.DataFrame({
        "subject_id": [10, 11, 12, 13, 14],
        "age": [30.0, 40.0, 50.0, 60.0, None],
        "grade": ["I", "II", "I", None, "III"],
        "GENE_A": [0.5, 1.5, 2.5, 3.5, 4.5],
    })


def test_fit_learns_edges_and_vocabulary_on_train_only() -> None:
    tokenizer = TabularTokenizer(n_bins=2, genomics_columns=["GENE_A"]).fit(covariates().head(4))

    assert tokenizer.vocabulary_ == {"[PAD]": 0, "[UNK]": 1, "age": 2, "grade=I": 3, "grade=II": 4, "GENE_A": 5}
    assert tokenizer.bin_edges_ == {"age": [45.0], "GENE_A": [2.0]}
    assert tokenizer.numeric_columns_ == ["age", "GENE_A"]
    assert tokenizer.categorical_columns_ == ["grade"]


def test_transform_one_token_per_present_feature() -> None:
    tokenizer = TabularTokenizer(n_bins=2, genomics_columns=["GENE_A"]).fit(covariates().head(4))

    result = tokenizer.transform(covariates())

    expected = pl.DataFrame(
        {
            "subject_id": [10, 11, 12, 13, 14],
            "prediction_time": [TABLE_TIME] * 5,
            # Numeric columns first (age, GENE_A), then levels; a missing value gives no token and
            # grade=III, unseen in fit, is [UNK].
            "token_ids": [[2, 5, 3], [2, 5, 4], [2, 5, 3], [2, 5], [5, 1]],
            "value_bins": [[1, 1, 0], [1, 1, 0], [2, 2, 0], [2, 2], [2, 0]],
            "time_before_days": [[0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 2, [0.0] * 2],
            "modality_ids": [[0, 2, 0], [0, 2, 0], [0, 2, 0], [0, 2], [2, 0]],
            "last_input_time": [None] * 5,
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "token_ids": pl.List(pl.Int32),
                "value_bins": pl.List(pl.Int8), "time_before_days": pl.List(pl.Float32),
                "modality_ids": pl.List(pl.Int8), "last_input_time": pl.Datetime("us")},
    )
    assert_frame_equal(result, expected)


def test_bins_are_right_closed_at_quantile_edges_and_ties_merge() -> None:
    train = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5], "x": [1.0, 1.0, 1.0, 1.0, 9.0]})
    tokenizer = TabularTokenizer(n_bins=4).fit(train)
    test = pl.DataFrame({"subject_id": [1, 2, 3], "x": [0.0, 1.0, 100.0]})

    assert tokenizer.bin_edges_ == {"x": [1.0]}
    assert tokenizer.transform(test)["value_bins"].to_list() == [[1], [2], [2]]


def test_prediction_time_column_is_kept() -> None:
    table = covariates().with_columns(pl.lit(datetime(2020, 5, 1)).alias("prediction_time"))

    tokens = TabularTokenizer(n_bins=2).fit_transform(table)

    assert tokens["prediction_time"].to_list() == [datetime(2020, 5, 1)] * 5


def test_tokens_and_labels_feed_the_fusion_dataset() -> None:
    table = covariates()
    tokens = TabularTokenizer(n_bins=2).fit_transform(table)
    labels = survival_labels(table["subject_id"], [1, 0, 0, 1, 0], [100.0, 400.0, 200.0, 500.0, 365.0], 365)

    batch = collate(list(FusionDataset(tokens, None, None, labels, text_embedding_dim=4, imaging_embedding_dim=2)))

    assert batch["event_codes"].tolist()[4] == [6, 5, 0]  # GENE_A, grade=III, padding
    assert batch["event_mask"].sum().item() == 13
    assert np.allclose(batch["risk_labels"].numpy(), [1.0, 0.0, np.nan, 0.0, np.nan], equal_nan=True)


def test_survival_labels_exact() -> None:
    result = survival_labels([1, 2, 3, 4, 5], [True, True, False, False, True], [365.0, 366.0, 365.0, 366.0, 0.0],
                             365.0)

    expected = pl.DataFrame(
        {
            "subject_id": [1, 2, 3, 4, 5],
            "prediction_time": [TABLE_TIME] * 5,
            # Event at the horizon counts; event after it is a negative; censored at it is unknown.
            "boolean_value": [True, False, None, False, True],
            "event": [True, True, False, False, True],
            "duration_days": [365.0, 366.0, 365.0, 366.0, 0.0],
            "treated": [None] * 5,
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean,
                "event": pl.Boolean, "duration_days": pl.Float64, "treated": pl.Boolean},
    )
    assert_frame_equal(result, expected)


@pytest.mark.parametrize(
    ("kwargs", "table", "match"),
    [
        ({"n_bins": 0}, covariates(), r"n_bins must be an integer in \[1, 126\] \(got 0\)"),
        ({}, covariates().drop("subject_id"), r"fit table: no 'subject_id' column"),
        ({}, covariates().with_columns(pl.lit(1).alias("subject_id")), r"fit table.subject_id: 4 duplicated ids"),
        ({}, covariates().select("subject_id"), r"fit table: no feature columns"),
        ({"genomics_columns": ["GENE_B"]}, covariates(), r"genomics_columns: \['GENE_B'\] are not feature columns"),
        ({}, covariates().with_columns(pl.lit(None, dtype=pl.Float64).alias("age")),
         r"fit table.age: all 5 values are null"),
        ({}, covariates().with_columns(pl.lit(datetime(2020, 1, 1)).alias("when")),
         r"fit table.when: unsupported type Datetime"),
        ({}, covariates().head(0), r"fit table: no rows"),
    ],
)
def test_fit_rejects_bad_input(kwargs: dict[str, object], table: pl.DataFrame, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TabularTokenizer(**kwargs).fit(table)


def test_transform_rejects_bad_input() -> None:
    tokenizer = TabularTokenizer(n_bins=2).fit(covariates())

    with pytest.raises(ValueError, match=r"transform table: columns \['age'\] seen in fit are missing"):
        tokenizer.transform(covariates().drop("age"))
    with pytest.raises(ValueError, match=r"transform table.age: type String \(numeric in fit\)"):
        tokenizer.transform(covariates().with_columns(pl.col("age").cast(pl.String)))
    with pytest.raises(NotFittedError):
        TabularTokenizer().transform(covariates())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 2], [1], [1.0, 2.0], 365), r"subject_ids \(2,\), event \(1,\) and duration_days \(2,\)"),
        (([], [], [], 365), r"survival_labels: no patients"),
        (([1], [2], [1.0], 365), r"survival_labels.event: expected 0/1 or booleans \(found \[2\]\)"),
        (([1, 2], [1, 0], [-1.0, np.nan], 365), r"duration_days: 2 values are negative or not finite"),
        (([1], [1], [1.0], 0), r"horizon_days must be positive \(got 0\)"),
    ],
)
def test_survival_labels_rejects_bad_input(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        survival_labels(*args)  # type: ignore[arg-type]
