"""Tests of models/tabular_tokens.py: covariate tables to fusion tokens and survival labels."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from sklearn.exceptions import NotFittedError

from models.data import FusionDataset, collate
from models.fusion import FusionConfig, FusionForRiskPrediction
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


def test_tied_values_never_share_a_bin_with_larger_ones() -> None:
    # Every inner quantile is 1: the edge goes between 1 and 9, so the tie keeps a bin of its own.
    train = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5], "x": [1.0, 1.0, 1.0, 1.0, 9.0]})
    tokenizer = TabularTokenizer(n_bins=4).fit(train)
    test = pl.DataFrame({"subject_id": [1, 2, 3, 4], "x": [0.0, 1.0, 5.0, 100.0]})

    assert tokenizer.bin_edges_ == {"x": [5.0]}
    assert tokenizer.transform(test)["value_bins"].to_list() == [[1], [1], [2], [2]]
    # Many distinct values: edges between the neighbours of the quartiles (3, 5 and 7 of 1..9).
    many = TabularTokenizer(n_bins=4).fit(pl.DataFrame({"subject_id": range(9), "x": range(1, 10)}))
    assert many.bin_edges_ == {"x": [3.5, 5.5, 7.5]}


def test_boolean_covariates_are_tokens_of_their_levels() -> None:
    train = pl.DataFrame({"subject_id": [1, 2, 3], "smoker": [True, False, None]})
    tokenizer = TabularTokenizer().fit(train)
    assert {"smoker=true", "smoker=false"} <= set(tokenizer.vocabulary_)
    ids = tokenizer.transform(train)["token_ids"].to_list()
    assert ids == [[tokenizer.vocabulary_["smoker=true"]], [tokenizer.vocabulary_["smoker=false"]], []]


def test_infinite_values_are_no_value_in_fit_as_in_transform() -> None:
    train = pl.DataFrame({"subject_id": [1, 2, 3, 4], "x": [1.0, 2.0, 3.0, float("inf")]})
    tokenizer = TabularTokenizer(n_bins=2, value_scaling="standard").fit(train)
    assert (tokenizer.value_mean_, tokenizer.value_sd_["x"]) == ({"x": 2.0}, pytest.approx((2 / 3) ** 0.5))
    assert tokenizer.transform(train)["value_bins"].to_list() == [[1], [1], [2], []]


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
    assert np.allclose(batch["risk_labels"].numpy(), [1.0, 0.0, np.nan, 0.0, 0.0], equal_nan=True)


def test_survival_labels_exact() -> None:
    result = survival_labels([1, 2, 3, 4, 5], [True, True, False, False, True], [365.0, 366.0, 365.0, 366.0, 0.0],
                             365.0)

    expected = pl.DataFrame(
        {
            "subject_id": [1, 2, 3, 4, 5],
            "prediction_time": [TABLE_TIME] * 5,
            # Event at the horizon counts; event after it is a negative; so is followed to it event-free.
            "boolean_value": [True, False, False, False, True],
            "event": [True, True, False, False, True],
            "duration_days": [365.0, 366.0, 365.0, 366.0, 0.0],
            "treated": [None] * 5,
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean,
                "event": pl.Boolean, "duration_days": pl.Float64, "treated": pl.Boolean},
    )
    assert_frame_equal(result, expected)


def test_value_scaling_adds_values_learned_on_train_only() -> None:
    train = pl.DataFrame({"subject_id": [1, 2, 3, 4], "x": [0.0, 0.0, 2.0, 6.0], "g": ["a", "b", "a", "b"]})
    test = pl.DataFrame({"subject_id": [5, 6, 7], "x": [2.0, 100.0, None], "g": ["a", "a", "b"]})

    standard = TabularTokenizer(n_bins=2, value_scaling="standard").fit(train).transform(test)
    scores = TabularTokenizer(n_bins=2, value_scaling="normal_scores").fit(train).transform(test)

    # Train mean 2, sd sqrt(6); 100 is clipped at 5 sd; categorical tokens have no value; no x, no token.
    assert np.allclose(standard["values"].to_list()[0], [0.0, np.nan], equal_nan=True)
    assert np.allclose(standard["values"].to_list()[1], [5.0, np.nan], equal_nan=True)
    assert np.allclose(standard["values"].to_list()[2], [np.nan], equal_nan=True)
    # 2.0 is the train split's 2/3 quantile (linear interpolation), 0.4307 on the normal scale;
    # above the train maximum: the 99.9th percentile.
    assert scores["values"].to_list()[0][0] == pytest.approx(0.4307, abs=2e-3)
    assert np.allclose(scores["values"].to_list()[1][0], 3.0902, atol=1e-4)
    assert "values" not in TabularTokenizer(n_bins=2).fit(train).transform(test).columns


def test_normal_scores_average_the_rank_of_tied_values() -> None:
    train = pl.DataFrame({"subject_id": list(range(8)), "n": [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]})
    tokenizer = TabularTokenizer(n_bins=2, value_scaling="normal_scores").fit(train)

    values = tokenizer.transform(train)["values"].list.first().to_numpy()

    # Half of the train split is 0: the train quantiles 0 to 3/7 are all 0, so 0 gets the middle
    # rank 3/14 (not 0 or 3/7), -0.7926 on the normal scale; the scale keeps the order.
    assert values[0] == pytest.approx(-0.7926, abs=1e-3)
    assert np.all(np.diff(values[3:]) > 0)


def test_values_reach_a_model_with_the_numeric_value_embedding() -> None:
    table = covariates()
    labels = survival_labels(table["subject_id"], [1, 0, 0, 1, 0], [100.0, 400.0, 200.0, 500.0, 365.0], 365)
    tokenizer = TabularTokenizer(n_bins=2, genomics_columns=["GENE_A"], value_scaling="standard").fit(table)
    tokens = tokenizer.transform(table)
    config = FusionConfig(event_vocab_size=len(tokenizer.vocabulary_), n_value_bins=3, text_embedding_dim=4,
                          imaging_embedding_dim=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                          dropout=0.0, numeric_value_embedding=True)
    torch.manual_seed(0)
    model = FusionForRiskPrediction(config).eval()

    batch = collate(list(FusionDataset(tokens, None, None, labels, text_embedding_dim=4, imaging_embedding_dim=2)))
    shifted = collate(list(FusionDataset(tokens.with_columns(pl.col("values").list.eval(pl.element() + 1.0)), None,
                                         None, labels, text_embedding_dim=4, imaging_embedding_dim=2)))
    plain = collate(list(FusionDataset(TabularTokenizer(n_bins=2).fit_transform(table), None, None, labels,
                                       text_embedding_dim=4, imaging_embedding_dim=2)))

    # Padded with NaN; patient 14 has GENE_A (a value) and grade=III (none).
    assert batch["event_values"].shape == batch["event_codes"].shape
    assert batch["event_values"][4].isnan().tolist() == [False, True, True]
    assert "event_values" not in plain
    with torch.no_grad():
        out, moved = model(**batch).risk_logits, model(**shifted).risk_logits
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, moved)  # the values are read, not only the bins
        with pytest.raises(ValueError, match=r"numeric_value_embedding is set, so event_values"):
            model(**plain)
        # A model without the embedding ignores values and has no extra weights.
        torch.manual_seed(0)
        without = FusionForRiskPrediction(FusionConfig(**{**config.to_dict(), "numeric_value_embedding": False}))
        assert torch.equal(without.eval()(**batch).risk_logits, without(**shifted).risk_logits)
        assert not any("slope" in name for name in without.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "table", "match"),
    [
        ({"n_bins": 0}, covariates(), r"n_bins must be an integer in \[1, 126\] \(got 0\)"),
        ({"value_scaling": "log"}, covariates(), r"value_scaling must be None or one of \('standard', "),
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

