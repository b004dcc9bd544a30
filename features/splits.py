"""Train / tuning / held-out splits, assigned per patient.

Stage: tasks. In: subject ids and a :class:`~features.tasks.SplitFractions`. Out: the ``splits``
table (:data:`features.schemas.SPLITS`). A patient's split depends only on its id and the seed,
never on which other patients are present or in what order they come: adding patients to an
export never moves an existing patient to another split, and a patient is in exactly one split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import polars as pl

from features.tasks import SplitFractions

SPLIT_NAMES = ("train", "tuning", "held_out")


def split_for(subject_id: int, fractions: SplitFractions) -> str:
    """Return the split of one patient.

    The first 8 bytes of BLAKE2b(seed, subject id) give a uniform number in [0, 1), compared with
    the cumulative fractions.

    Examples
    --------
    >>> split_for(3857833796827309321, SplitFractions(0.7, 0.15, 0.15, seed=0))
    'tuning'
    """
    digest = hashlib.blake2b(f"{fractions.seed}:{subject_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.tuning:
        return "tuning"
    return "held_out"


def assign_splits(subject_ids: Iterable[int], fractions: SplitFractions) -> pl.DataFrame:
    """Return ``subject_id, split`` for each distinct subject id, sorted by subject id."""
    ids = sorted({int(s) for s in subject_ids})
    return pl.DataFrame(
        {"subject_id": ids, "split": [split_for(s, fractions) for s in ids]},
        schema={"subject_id": pl.Int64, "split": pl.String},
    )
