"""How many distinct values each numeric token's bins keep apart: quantile edges against the edges
the tokenizer learns (``features.tokenize.value_bin_edges``).

Usage: ``python benchmarks/value_bins.py --warehouse DIR [--task simulated_mace_1y] [--bins 5]``
on a warehouse whose task inputs were built (``cohortcast features``). Reads the train split's
values of every numeric token of the task's vocabulary, as ``EventTokenizer.fit`` sees them, and prints per modality how
many tokens the learned edges split into more bins than plain quantile edges, and how many a
single bin held, then the tokens with at most three distinct values (genotypes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.tokenize import (  # noqa: E402
    events_before,
    saved_unit_keys,
    token_expr,
    unit_columns,
    value_bin_edges,
    with_unit,
)


def bins_used(edges: np.ndarray, values: np.ndarray) -> int:
    """How many bins the distinct ``values`` fall in (a value's bin: ``1 + #(edges <= value)``)."""
    return int(np.unique(np.searchsorted(edges, np.unique(values), side="right")).size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, required=True)
    parser.add_argument("--task", default="simulated_mace_1y")
    parser.add_argument("--bins", type=int, default=5)
    args = parser.parse_args()
    folder = args.warehouse / "tasks" / args.task
    vocabulary = list(json.loads((folder / "vocabulary.json").read_text())["vocabulary"])
    cohort = pl.read_parquet(folder / "cohort.parquet")
    train = pl.read_parquet(folder / "splits.parquet").filter(pl.col("split") == "train")["subject_id"]
    seen = (
        with_unit(events_before(pl.scan_parquet(args.warehouse / "events.parquet"),
                                cohort.filter(pl.col("subject_id").is_in(train.implode()))))
        .with_columns(token_expr())
        .with_columns(unit_columns(*saved_unit_keys(folder / "vocabulary.json")))
        .filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_not_nan()
                & pl.col("token").is_in(vocabulary))
        .group_by("token").agg(pl.col("numeric_value").cast(pl.Float64), pl.col("modality").first())
        .collect()
    )
    rows = []
    for token, values, modality in seen.iter_rows():
        v = np.asarray(values)
        quantile_edges = np.unique(np.quantile(v, np.arange(1, args.bins) / args.bins))
        learned = np.asarray(value_bin_edges(v, args.bins))
        rows.append((token, modality, np.unique(v).size, bins_used(quantile_edges, v), bins_used(learned, v)))
    table = pl.DataFrame(rows, schema=["token", "modality", "distinct", "quantile_bins", "learned_bins"],
                         orient="row")
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True):
        print(table.group_by("modality").agg(
            pl.len().alias("numeric_tokens"),
            (pl.col("learned_bins") > pl.col("quantile_bins")).sum().alias("more_bins_now"),
            (pl.col("quantile_bins") == 1).sum().alias("one_bin_quantile"),
            (pl.col("learned_bins") == 1).sum().alias("one_bin_learned"),
        ).sort("modality"))
        print(table.filter(pl.col("distinct") <= 3).sort("token"))


if __name__ == "__main__":
    main()
