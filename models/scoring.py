"""Scoring: every cohort patient of a task, with risk, survival, treatment effect, tier and explanation.

Stage: scoring. In: a model folder (:func:`models.task_model.load_task_model`), the task folder the
model inputs were built in, the tier thresholds, and optionally the previously published scores.
Out: the ``scores`` table (:data:`features.schemas.SCORES`), one row per cohort patient, whatever
their split: care teams need a score for every patient, not only held-out ones.

The model must have been trained for this task and this tokenizer (vocabulary and value bins):
token ids mean nothing under another vocabulary, nor value bins under other bin edges, so a
mismatch is refused rather than scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from features.errors import TrainingDataError
from features.schemas import SCORES
from features.task_inputs import inputs_events_key
from features.tokenize import EventTokenizer, value_unit
from features.units import unit_print_symbol
from models.data import FusionDataset
from models.explain import ItemContribution, explain
from models.task_model import (
    DEFAULT_IMAGING_DIM,
    DEFAULT_TEXT_DIM,
    ModelFolderError,
    check_prediction_target,
    load_task_model,
    predict,
)
from models.training import native_bf16


@dataclass(frozen=True)
class RiskTiers:
    """Tiers by rank of risk: the top ``high_share`` is high, the next ``medium_share`` medium.

    Ranking (rather than fixed probabilities) keeps the high-risk list the size a care team can act
    on, whatever the base rate. Patients tied with the last one a tier takes are in it too: two
    patients shown with the same risk are never told apart by the order of their rows, so a tier
    can hold a few more than its share.
    """

    high_share: float = 0.05
    medium_share: float = 0.15

    def __post_init__(self) -> None:
        if not (0 < self.high_share <= 1 and 0 <= self.medium_share <= 1 and self.high_share + self.medium_share <= 1):
            raise ValueError(f"risk tiers: high_share ({self.high_share}) and medium_share ({self.medium_share}) "
                             "must be shares (high in (0, 1], medium in [0, 1]) that add up to at most 1")

    def assign(self, risk: np.ndarray) -> list[str]:
        """``high``, ``medium`` or ``low`` for each risk, in the order given.

        Examples
        --------
        >>> RiskTiers(0.07, 0.14).assign(np.linspace(1, 0, 100)).count("high")
        7
        >>> RiskTiers(0.25, 0.25).assign(np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]))
        ['high', 'high', 'high', 'high', 'low', 'low', 'low', 'low']
        """
        risk = np.asarray(risk, dtype=np.float64)
        if len(risk) == 0:
            return []
        if (missing := int(np.isnan(risk).sum())) > 0:
            # A NaN sorts first and would take the high tier's last place, emptying it.
            raise ValueError(f"risk tiers: {missing} of {len(risk)} risks are NaN (expected a probability for "
                             "every patient): the model's outputs are broken, score again with a sound model")
        descending = np.sort(risk)[::-1]

        def at_least_last_of(share: Fraction) -> np.ndarray:
            size = math.ceil(share * len(risk))
            return risk >= descending[size - 1] if size else np.zeros(len(risk), dtype=bool)

        # The decimals the task file wrote: in binary 0.07 * 100 is 7.000000000000001, 0.1 + 0.2 is
        # 0.30000000000000004, and a ceiling of either takes one patient too many.
        high_share, medium_share = Fraction(str(self.high_share)), Fraction(str(self.medium_share))
        high, medium = at_least_last_of(high_share), at_least_last_of(high_share + medium_share)
        return ["high" if h else "medium" if m else "low" for h, m in zip(high, medium, strict=True)]


def vocabulary_fingerprint(path: Path) -> str:
    """Hash of the whole tokenizer state in a ``vocabulary.json`` (:meth:`EventTokenizer.save
    <features.tokenize.EventTokenizer.save>`): the token-to-id map, the value-bin edges and the
    settings (``value_bins``, ``max_events``, ``min_code_count``).

    Not the token ids alone: with other bin edges the same measurement falls in another bin, and the
    model reads the bin, so its inputs would change meaning under it all the same.
    """
    state = json.loads(path.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


VERSIONED_FILES = ("model.safetensors", "config.json", "calibration.json")
"""What gives a model its risks: the weights, the architecture and the calibration (a model
calibrated again on other tuning labels gives other risks from the same weights)."""


def model_version(model_dir: Path) -> str:
    """A model's version: its task and a hash of :data:`VERSIONED_FILES`."""
    info = json.loads((model_dir / "cohortcast_model.json").read_text())
    digest = hashlib.sha256()
    for name in VERSIONED_FILES:
        digest.update(hashlib.sha256((model_dir / name).read_bytes()).digest())
    return f"{info['task']}-{digest.hexdigest()[:12]}"


def score_task(model_dir: Path, task_dir: Path, task_name: str, tiers: RiskTiers,
               previous: pl.DataFrame | None = None, explain_top_k: int = 5,
               with_explanations: bool = True, bf16: bool | None = None,
               horizon_days: float | None = None, target: dict[str, Any] | None = None) -> pa.Table:
    """Score every cohort patient of a task.

    ``bf16`` runs the forward passes under bfloat16 autocast; None (the default) does so where the
    hardware computes bfloat16 natively (:func:`models.training.native_bf16`), where it is about
    1.2-1.4x faster and the risks differ from float32 ones by about 0.001.

    ``horizon_days``, the task file's horizon, must be the one the model was trained for: its
    risks are probabilities by that horizon, and are published as such; so must ``target``, the
    task file's outcome, horizon and treatment (:meth:`features.tasks.TaskDefinition.prediction_target`).

    Raises
    ------
    ModelFolderError
        When the model was trained for another task, outcome, horizon, treatment or vocabulary, or
        its folder is broken.
    TrainingDataError
        When the task's inputs hold no cohort patient.
    """
    model, calibrator, info = load_task_model(model_dir)
    if info["task"] != task_name:
        raise ModelFolderError(f"model {model_dir} was trained for task {info['task']!r}, not {task_name!r} "
                               "(train a model for this task)")
    if horizon_days is not None and float(model.config.horizon_days) != float(horizon_days):
        raise ModelFolderError(f"model {model_dir} predicts risk within {model.config.horizon_days:g} days, task "
                               f"{task_name!r} asks within {horizon_days:g} (the task file was edited since "
                               "training; train the model again)")
    if target is not None:
        check_prediction_target(model_dir, info, task_name, target)
    trained_with = vocabulary_fingerprint(model_dir / "vocabulary.json")
    inputs_with = vocabulary_fingerprint(task_dir / "vocabulary.json")
    if trained_with != inputs_with:
        raise ModelFolderError(f"model {model_dir} was trained with a different vocabulary or value bins than the "
                               f"inputs in {task_dir} (tokenizer {trained_with}, inputs' tokenizer {inputs_with}: "
                               "the inputs were rebuilt since; train the model again)")
    tokens = pl.read_parquet(task_dir / "event_tokens.parquet", glob=False).sort("subject_id")
    if tokens.is_empty():
        raise TrainingDataError(f"task {task_name!r}: {task_dir / 'event_tokens.parquet'} holds no cohort patient "
                                "(expected at least one; `cohortcast features` prints the cohort's attrition per rule)")
    dataset = FusionDataset(
        tokens,
        _read_present(task_dir / "note_embeddings.parquet", ["subject_id", "note_id", "time", "embedding"]),
        _read_present(task_dir / "imaging_inputs.parquet", ["subject_id", "study_id", "time", "modality", "embedding"]),
        None,
        model.config.text_embedding_dim or DEFAULT_TEXT_DIM,
        model.config.imaging_embedding_dim or DEFAULT_IMAGING_DIM,
    )
    if bf16 is None:
        bf16 = native_bf16(next(model.parameters()).device)
    p = predict(model, calibrator, dataset, bf16=bf16)
    n = len(dataset)
    tokenizer = EventTokenizer.load(model_dir / "vocabulary.json")  # tokens, bins and units in one read
    vocabulary = token_names(tokenizer.vocabulary_)
    explanations = (explain(model, calibrator, dataset.patients, vocabulary, explain_top_k, bf16=bf16)
                    if with_explanations else [])
    previous_risk: list[float | None] = [None] * n
    previous_model: list[str | None] = [None] * n
    version = model_version(model_dir)
    if previous is not None and previous.height:
        # Carried whichever model gave it, with that model's version: the models are retrained as
        # the data change (nightly, in the pipeline), so a change shown only under one model would
        # almost never be shown; where the versions differ, part of the change is the models'.
        if "model_version" not in previous.columns:
            previous = previous.with_columns(model_version=pl.lit(None, dtype=pl.String))
        # The same patient at the same prediction time: a moved index event makes another question.
        before = {(subject, when): (risk, model) for subject, when, risk, model
                  in previous.select("subject_id", "prediction_time", "risk", "model_version").iter_rows()}
        carried = [before.get((int(s), when), (None, None))
                   for s, when in zip(dataset.subject_ids, tokens["prediction_time"].to_list(), strict=True)]
        previous_risk = [risk for risk, _ in carried]
        previous_model = [model for _, model in carried]
    times = [float(t) for t in model.config.survival_bin_edges_days]
    has_treatment = "treatment" in info["targets"]
    effect: list[float | None] = [None] * n
    if has_treatment:
        # The effect is that of starting the treatment: it does not apply to a patient on it already.
        labels = pl.read_parquet(task_dir / "labels.parquet", columns=["subject_id", "prevalent_user"], glob=False)
        on_it = set(labels.filter(pl.col("prevalent_user").fill_null(False))["subject_id"].to_list())
        effect = [None if int(s) in on_it else float(e) for s, e in zip(dataset.subject_ids, p.treatment_effect,
                                                                          strict=True)]
    return pa.table(
        {
            "subject_id": dataset.subject_ids,
            "prediction_time": tokens["prediction_time"].to_list(),
            "task": [task_name] * n,
            "risk": p.risk,
            "risk_tier": tiers.assign(p.risk),
            "previous_risk": pa.array(previous_risk, type=pa.float64()),
            "previous_model_version": pa.array(previous_model, type=pa.string()),
            "survival_times_days": [times] * n,
            "survival_curve": [row.astype(np.float32).tolist() for row in p.survival],
            "treatment_effect": pa.array(effect, type=pa.float64()),
            "modality_shares": [list(e.modality_shares.items()) for e in explanations] if explanations else [[]] * n,
            "top_items": (
                [[_published_item(item, tokenizer.bin_edges_, tokenizer.units_) for item in e.top_items]
                 for e in explanations]
                if explanations else [[]] * n
            ),
            "model_version": [version] * n,
        },
        schema=_scores_schema(task_dir),
    )


SCORED_EVENTS_KEY = b"cohortcast.scored_events"
"""Schema metadata of a scores table: the key of the warehouse ``events.parquet`` the scored inputs
were built from (:func:`features.task_inputs.inputs_events_key`), which publishing compares with the
warehouse's at the time (:func:`models.publishing.check_publishable`)."""


def _scores_schema(task_dir: Path) -> pa.Schema:
    events_key = inputs_events_key(task_dir)
    return SCORES if events_key is None else SCORES.with_metadata({SCORED_EVENTS_KEY: events_key.encode()})


def _read_present(path: Path, columns: list[str]) -> pl.DataFrame | None:
    """The ``columns`` of a Parquet file that it has (the note table is mostly vectors: reading
    only what the model and the explanations use saves time), or None when there is no file."""
    if not path.is_file():
        return None
    present = pl.read_parquet_schema(path)
    return pl.read_parquet(path, columns=[c for c in columns if c in present], glob=False)


def value_range(edges: list[float], value_bin: int) -> str | None:
    """The values a 1-based value bin holds (:meth:`features.tokenize.EventTokenizer`: a value on an
    edge falls in the bin above it), as text; None for bin 0 (no value) or a token without edges.

    >>> [value_range([0.5, 1.5], b) for b in (0, 1, 2, 3)]
    [None, '< 0.5', '0.5 to 1.5', '>= 1.5']
    >>> value_range([1250.5, 120000.5], 2)
    '1250.5 to 120000.5'
    """
    if value_bin <= 0 or not edges:
        return None
    if value_bin == 1:
        return f"< {_edge_text(edges[0])}"
    if value_bin > len(edges):
        return f">= {_edge_text(edges[-1])}"
    return f"{_edge_text(edges[value_bin - 2])} to {_edge_text(edges[value_bin - 1])}"


def _edge_text(edge: float) -> str:
    """A bin edge as plain decimals, never in exponent form: 4 significant digits (a weight's edge
    between two readings converted from pounds reads 76.11, not 76.1064), and always its first
    decimal: an edge lies halfway between two charted values (1250.5 between 1250 and 1251), and
    rounded to one of them (``< 1250``) it would read as excluding a value its bin holds."""
    digits = max(4, int(np.floor(np.log10(abs(edge)))) + 2) if edge else 4
    return str(np.format_float_positional(edge, precision=digits, unique=True, fractional=False, trim="-"))


def _published_item(item: ItemContribution, bin_edges: dict[str, list[float]],
                    units: dict[str, str]) -> dict[str, Any]:
    shown = value_range(bin_edges.get(item.item, []), item.value_bin)
    # "120 to 135 mm Hg": a range without its unit cannot be read (a weight of "< 75" in pounds?).
    if shown is not None and (unit := value_unit(item.item, units)) is not None:
        shown = f"{shown} {unit_print_symbol(unit)}"
    return {"modality": item.modality, "item": item.item, "contribution": item.contribution,
            "value_range": shown, "readings": item.readings}


def inverse_vocabulary(path: Path) -> list[str]:
    """Token strings by id, from a tokenizer's ``vocabulary.json``."""
    return token_names(json.loads(path.read_text())["vocabulary"])


def token_names(vocabulary: dict[str, int]) -> list[str]:
    """Token strings by id, from a tokenizer's token -> id map."""
    names = [""] * (max(vocabulary.values()) + 1)
    for token, index in vocabulary.items():
        names[index] = token
    return names
