"""One task's fusion model: train it, evaluate it against the baselines, save and load it.

Stage: model. In: a task folder written by :mod:`features.task_inputs` (``labels``, ``splits``,
``cohort``, ``event_tokens``, ``vocabulary.json``, ``tabular_features`` and, when the task has
them, ``note_embeddings`` and ``imaging_inputs``), optionally the simulator's ``truth.parquet``.
Out: a model folder

* ``config.json`` and ``model.safetensors`` (``save_pretrained``; loads without pickle),
* ``vocabulary.json`` (the tokenizer the model was trained with) and ``calibration.json``,
* ``metrics.json`` (held-out metrics of the model and of every baseline), ``history.json``,
* ``MODEL_CARD.md`` (what the model is for, its data, its metrics, by subgroup, and its limits),
* ``drift_reference.parquet`` (every training-cohort patient's risk: the drift check's reference),
* ``cohortcast_model.json`` (the format version, the task it was trained for and the SHA-256 of
  every file above, checked whenever the folder is loaded or deployed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import torch
import torch.distributed as dist

from features.errors import CohortcastError, TrainingDataError
from features.io import replace_dir, restore_retired_dir
from features.note_embeddings import quiet_transformers_progress
from features.simulate.state import (
    CARRIED_BY,
    SEVERITY_TERMS,
    TRUTH_COLUMNS,
    risk_given_estimated_severities,
    risk_given_observed_modalities,
)
from features.task_inputs import step_files_now
from features.tasks import USUAL_INTERVAL, TaskDefinition
from models.baselines import (
    feature_matrix,
    fit_cox,
    fit_cox_tuned,
    fit_lightgbm,
    fit_logistic,
    fit_logistic_tuned,
    fit_random_survival_forest,
    fit_ridge,
    fit_t_learner,
    mean_embeddings,
)
from models.calibration import PlattCalibrator
from models.data import IMAGING_MODALITIES, FusionDataset
from models.drift import INPUT_REFERENCE_FILE, PREVIOUS_PREFIX, REFERENCE_FILE, input_reference, save_reference
from models.fusion import MODALITIES, FusionConfig, FusionForRiskPrediction, survival_curve
from models.metrics import (
    auprc,
    auroc,
    auroc_interval,
    brier,
    calibration_error_if_calibrated,
    calibration_slope,
    expected_calibration_error,
    follows_policy,
    harrell_c_index,
    integrated_brier,
    observed_expected_ratio,
    paired_concordance_difference,
    pehe,
    policy_value,
    time_dependent_auc,
    uno_c_index,
)
from models.training import (
    TrainingArguments,
    check_trainable,
    check_treatment_arms,
    label_censoring_weights,
    predict_logits,
    train,
    training_precision,
)

TRAINING_VERSION = 2
"""Part of the training fingerprint: raised whenever training or evaluation computes something else
from the same inputs, so that an upgrade trains existing candidates again."""

# 2: each (code, value bin) pair has its own embedding; 3: modality summary path; 4: a SHA-256 of each
# file the training wrote, checked on every load
MODEL_FORMAT_VERSION = 4
# Still loaded: version 3 differs only in having no file digests, so a model deployed before an
# upgrade keeps scoring until a new one passes its gates.
READABLE_FORMAT_VERSIONS = (3, MODEL_FORMAT_VERSION)
MODEL_FILES = ("config.json", "model.safetensors", "vocabulary.json", "calibration.json", "cohortcast_model.json",
               "metrics.json")
MODEL_INFO_KEYS = ("format_version", "task", "targets", "files")
# Written by deployment, not by training: outside the folder's digests.
DEPLOYMENT_FILES = ("cohortcast_model.json", f"{PREVIOUS_PREFIX}{REFERENCE_FILE}",
                    f"{PREVIOUS_PREFIX}{INPUT_REFERENCE_FILE}")
DEFAULT_TEXT_DIM, DEFAULT_IMAGING_DIM = 384, 64


class ModelFolderError(CohortcastError):
    """A model folder is incomplete, altered since training wrote it, or of another format version."""


@dataclass(frozen=True)
class TaskData:
    """One task's tables, split into train / tuning / held_out."""

    task: str
    horizon_days: float
    has_treatment: bool
    datasets: dict[str, FusionDataset]
    tabular: dict[str, pl.DataFrame]
    cohort: dict[str, pl.DataFrame]
    vocabulary_size: int
    n_value_bins: int
    text_embedding_dim: int
    imaging_embedding_dim: int
    # The note and imaging embeddings the model reads (None: the task has none), for the
    # late-fusion baseline.
    note_embeddings: pl.DataFrame | None = None
    imaging_embeddings: pl.DataFrame | None = None
    # ``vocabulary.json`` as read with the tokens: the model folder keeps these bytes, not the
    # task folder's file at save time, which inputs built again meanwhile may have replaced.
    vocabulary_json: bytes = b""


def _read_input(path: Path) -> pl.DataFrame:
    """One of a task folder's tables, or :class:`ModelFolderError` when it cannot be read (cut short
    by a full disk or a killed copy)."""
    try:
        return pl.read_parquet(path, glob=False)
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise ModelFolderError(f"task folder {path.parent}: {path.name} cannot be read ({str(exc).splitlines()[0]}): "
                               "run `cohortcast features` again") from None


def _check_one_build(task_dir: Path, cohort: pl.DataFrame, tables: dict[str, pl.DataFrame | None]) -> None:
    """Raise :class:`ModelFolderError` when a table of the task folder holds patients its cohort does
    not: the folder mixes two builds (a ``cohortcast features`` run stopped after the cohort was
    written again, before the notes were), and a model trained on it would miss those inputs unseen."""
    members = cohort.select("subject_id")
    for name, table in tables.items():
        if table is None:
            continue
        strangers = table.select("subject_id").unique().join(members, on="subject_id", how="anti").height
        if strangers:
            raise ModelFolderError(f"task folder {task_dir}: {name} holds {strangers} patient(s) not in "
                                   "cohort.parquet, so its files come from two builds (a `cohortcast features` run "
                                   "cut short?): run `cohortcast features` again")


def _read_optional(path: Path) -> pl.DataFrame | None:
    return _read_input(path) if path.is_file() else None


def load_task_data(task_dir: Path, horizon_days: float, modalities: tuple[str, ...] = MODALITIES) -> TaskData:
    """Read a task folder and build one dataset per split, with only ``modalities`` visible."""
    required = ("labels.parquet", "splits.parquet", "cohort.parquet", "event_tokens.parquet", "vocabulary.json",
                "tabular_features.parquet")
    missing = [name for name in required if not (task_dir / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"task folder {task_dir}: missing {', '.join(missing)} (run `cohortcast features` first)"
        )
    labels = _read_input(task_dir / "labels.parquet")
    splits = _read_input(task_dir / "splits.parquet")
    cohort = _read_input(task_dir / "cohort.parquet")
    tokens = _read_input(task_dir / "event_tokens.parquet")
    tabular = _read_input(task_dir / "tabular_features.parquet")
    notes = _read_optional(task_dir / "note_embeddings.parquet")
    imaging = _read_optional(task_dir / "imaging_inputs.parquet")
    vocabulary_json = (task_dir / "vocabulary.json").read_bytes()
    try:
        vocabulary = json.loads(vocabulary_json)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"task folder {task_dir}: vocabulary.json is not JSON ({exc}): run `cohortcast "
                               "features` again") from None
    _check_one_build(task_dir, cohort, {"labels.parquet": labels, "splits.parquet": splits,
                                        "event_tokens.parquet": tokens, "tabular_features.parquet": tabular,
                                        "note_embeddings.parquet": notes, "imaging_inputs.parquet": imaging})
    text_dim = len(notes["embedding"][0]) if notes is not None and notes.height else DEFAULT_TEXT_DIM
    imaging_dim = len(imaging["embedding"][0]) if imaging is not None and imaging.height else DEFAULT_IMAGING_DIM
    datasets, tables, cohorts = {}, {}, {}
    for split in ("train", "tuning", "held_out"):
        ids = splits.filter(pl.col("split") == split).select("subject_id")
        split_tokens = tokens.join(ids, on="subject_id").sort("subject_id")
        datasets[split] = FusionDataset(
            split_tokens, notes, imaging, labels.join(ids, on="subject_id"), text_dim, imaging_dim,
            modalities=modalities,
        )
        # Row i of every table is patient i of the dataset: the subgroups and the baselines line up
        # with the labels by position.
        tables[split] = split_tokens.select("subject_id").join(tabular, on="subject_id", how="left",
                                                               maintain_order="left")
        cohorts[split] = split_tokens.select("subject_id").join(cohort, on="subject_id", how="left",
                                                                maintain_order="left")
    return TaskData(
        task=str(labels["task"][0]) if labels.height else task_dir.name,
        horizon_days=horizon_days,
        has_treatment=labels["treated"].null_count() < labels.height,
        datasets=datasets,
        tabular=tables,
        cohort=cohorts,
        vocabulary_size=len(vocabulary["vocabulary"]),
        n_value_bins=int(vocabulary["value_bins"]) + 1,
        text_embedding_dim=text_dim,
        imaging_embedding_dim=imaging_dim,
        note_embeddings=notes.select("subject_id", "embedding") if notes is not None else None,
        imaging_embeddings=imaging.select("subject_id", "embedding") if imaging is not None else None,
        vocabulary_json=vocabulary_json,
    )


def fusion_config(data: TaskData, **architecture: Any) -> FusionConfig:
    """The model configuration a task's data needs, with architecture overrides."""
    edges = sorted({30.0, 90.0, 180.0, data.horizon_days, 2 * data.horizon_days})
    return FusionConfig(
        event_vocab_size=data.vocabulary_size, n_value_bins=data.n_value_bins,
        text_embedding_dim=data.text_embedding_dim, imaging_embedding_dim=data.imaging_embedding_dim,
        n_imaging_modalities=len(IMAGING_MODALITIES), survival_bin_edges_days=edges,
        horizon_days=data.horizon_days, task=data.task, **architecture,
    )


@dataclass
class Predictions:
    risk: npt.NDArray[np.float64]  # calibrated probability of the outcome within the horizon
    survival: npt.NDArray[np.float64]  # (n, K) at config.survival_bin_edges_days
    treatment_effect: npt.NDArray[np.float64]  # risk if treated - risk if untreated


def predict(model: FusionForRiskPrediction, calibrator: PlattCalibrator, dataset: FusionDataset,
            bf16: bool = False) -> Predictions:
    logits = predict_logits(model, dataset, bf16=bf16, with_loss=False)
    arms = calibrator.transform_arms(logits["arm_logits"])
    curve = calibrator.transform_survival(survival_curve(torch.from_numpy(logits["hazard_logits"])).numpy())
    return Predictions(calibrator.transform(logits["risk_logits"]), curve, arms[:, 1] - arms[:, 0])


EVALUATION_TIMES_DAYS: tuple[float, ...] = (90.0, 180.0)
"""Times of the time-dependent survival metrics before the task's horizon, which ends the grid."""

COMPARISON_RESAMPLES = 1000
"""Bootstrap resamples of the held-out patients behind each comparison's interval (about 5 s per
comparison for 30,000 patients)."""


@dataclass(frozen=True)
class Scores:
    """A model's held-out scores: risk of the patients with a known outcome (for AUROC), and a
    risk score of every held-out patient (for Harrell's C); None where the model gives none."""

    risk: np.ndarray | None
    survival: np.ndarray | None


def survival_risk_score(predictions: Predictions, horizon_bin: int) -> np.ndarray:
    """The fusion model's score for the survival metrics: ``1 - S(horizon)`` from its curve."""
    return 1 - predictions.survival[:, horizon_bin]


def _risk_metrics(y: np.ndarray, risk: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    # Every metric on the patients with a known outcome weighted by their censoring weights, so
    # that it describes the cohort, not the complete cases (which over-represent early events: the
    # AUPRC, which depends on the event rate, most of all).
    return {"auroc": auroc(y, risk, weights), "auprc": auprc(y, risk, weights), "brier": brier(y, risk, weights),
            "calibration_error": expected_calibration_error(y, risk, sample_weight=weights)}


def label_weights(data: TaskData, split: str) -> np.ndarray:
    """Censoring weights of a split's risk labels (0 where unknown), the censoring distribution
    estimated on the train split (:func:`models.censoring.censoring_weights`)."""
    return label_censoring_weights(data.datasets[split], data.datasets["train"], data.horizon_days)


def _survival_metrics(train_labels: dict[str, np.ndarray], labels: dict[str, np.ndarray], score: np.ndarray,
                      horizon_days: float, survival: np.ndarray | None = None,
                      survival_times: list[float] | None = None) -> dict[str, float]:
    """Harrell's and Uno's C, time-dependent AUC and (given a survival curve at ``survival_times``)
    the integrated Brier score, on one grid for every model: 90 and 180 days and the horizon, and
    Uno's C truncated at the last of them. A model's own survival intervals must not change the
    grid: Uno's C up to two years and Uno's C up to one are different quantities."""
    event, duration = labels["event"] > 0.5, labels["duration_days"]
    # The censoring weights are the train split's Kaplan-Meier, which ends at its longest follow-up:
    # a held-out patient followed longer is censored just before it. Every evaluation time is
    # earlier, so no metric changes; scikit-survival would otherwise refuse the held-out times.
    last_train_day = float(train_labels["duration_days"].max())
    beyond = duration >= last_train_day
    weighted = (train_labels["event"], train_labels["duration_days"], labels["event"] * ~beyond,
                np.where(beyond, np.nextafter(last_train_day, -np.inf), duration))
    # Time-dependent metrics need, at each time, a case (an event by then) and a control (still
    # followed after it); in both splits, since the censoring weights come from the train split.
    grid = [t for t in EVALUATION_TIMES_DAYS if t < horizon_days] + [horizon_days]
    eval_times = [t for t in grid if (event & (duration <= t)).any() and (duration > t).any()
                  and t < last_train_day]
    metrics = {"harrell_c": harrell_c_index(event, duration, score)}
    if eval_times:
        metrics["uno_c"] = uno_c_index(*weighted, score, tau_days=max(eval_times))
        metrics["time_dependent_auc"] = time_dependent_auc(*weighted, score, np.array(eval_times))
        # An integral needs two times at least (a horizon of 90 days or less has one).
        if (survival is not None and survival_times is not None and len(eval_times) >= 2
                and set(eval_times) <= set(survival_times)):
            keep = [survival_times.index(t) for t in eval_times]
            metrics["integrated_brier"] = integrated_brier(*weighted, survival[:, keep], np.array(eval_times))
    return metrics


def evaluate(model: FusionForRiskPrediction, calibrator: PlattCalibrator, data: TaskData,
             truth: pl.DataFrame | None = None, baselines: bool = True, seed: int = 0) -> dict[str, Any]:
    """Held-out metrics of the fusion model and, when ``baselines``, of every baseline."""
    held_out = data.datasets["held_out"]
    labels = held_out.label_arrays()
    train_labels = data.datasets["train"].label_arrays()
    known = ~np.isnan(labels["risk_label"])
    y = labels["risk_label"][known]
    p = predict(model, calibrator, held_out)
    times = list(model.config.survival_bin_edges_days)
    horizon = data.horizon_days
    weights = label_weights(data, "held_out")
    w = weights[known]
    results: dict[str, Any] = {"n_held_out": len(held_out), "n_held_out_labelled": int(known.sum()),
                               "held_out_event_rate": float(y.mean()),
                               "held_out_event_rate_weighted": float(np.average(y, weights=w))}
    fusion = _risk_metrics(y, p.risk[known], w)
    fusion["calibration_slope"] = calibration_slope(y, p.risk[known], w)
    fusion["observed_expected_ratio"] = observed_expected_ratio(y, p.risk[known], w)
    floor_mean, floor_95 = calibration_error_if_calibrated(p.risk[known], sample_weight=w)
    fusion["calibration_error_if_calibrated"] = floor_mean
    fusion["calibration_error_if_calibrated_95"] = floor_95
    survival_score = survival_risk_score(p, model.config.horizon_bin)
    fusion.update(_survival_metrics(train_labels, labels, survival_score, horizon, p.survival, times))
    scores: dict[str, Scores] = {"fusion": Scores(p.risk[known], survival_score)}
    cohort = data.cohort["held_out"]
    for name, mask in _subgroups(cohort).items():
        sub = mask & known
        labelled, cases = int(sub.sum()), int((labels["risk_label"][sub] > 0.5).sum())
        fusion[f"subgroup_{name}_labelled"], fusion[f"subgroup_{name}_cases"] = labelled, cases
        # An AUROC from a handful of cases is noise (one case gives 0 or 1): not reported.
        if min(cases, labelled - cases) >= MIN_SUBGROUP_CASES:
            (fusion[f"auroc_{name}"], fusion[f"auroc_{name}_low"],
             fusion[f"auroc_{name}_high"]) = auroc_interval(labels["risk_label"][sub], p.risk[sub], weights[sub],
                                                           n_resamples=COMPARISON_RESAMPLES, seed=seed)
    models: dict[str, dict[str, float]] = {"fusion": fusion}
    effects: dict[str, np.ndarray] = {"fusion": p.treatment_effect}
    matrices = _InputMatrices(data)
    if baselines:
        models.update(_baselines(data, matrices, labels, known, w, horizon, effects, scores, seed))
    if data.has_treatment:
        _treatment_metrics(models, effects, data, matrices, labels, known, w, truth)
    if truth is not None:
        for name, risk in _truth_risks(truth, data, matrices.late_fusion).items():
            models[name], scores[name] = _truth_metrics(risk, labels, known, w, train_labels, horizon)
    results["models"] = models
    results["comparison_resamples"] = COMPARISON_RESAMPLES
    results["comparisons"] = compare_with_fusion(scores, labels, known, seed, results["comparison_resamples"], w)
    return results


def compare_with_fusion(scores: dict[str, Scores], labels: dict[str, np.ndarray], known: np.ndarray,
                        seed: int = 0, n_resamples: int = COMPARISON_RESAMPLES,
                        risk_weights: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Fusion minus every other model in AUROC and Harrell's C on the same held-out patients, with
    paired bootstrap 95 % intervals (``<metric>_difference``, ``_low``, ``_high``). The AUROC is
    weighted by ``risk_weights`` (the labelled patients' censoring weights) as in the metrics table.

    A difference of a few thousandths between two models is within what resampling the same
    patients moves; the interval says whether the fusion model is really ahead.
    """
    fusion = scores["fusion"]
    event, duration = labels["event"] > 0.5, labels["duration_days"]
    out: dict[str, dict[str, float]] = {}
    for name, other in scores.items():
        if name == "fusion":
            continue
        row: dict[str, float] = {}
        if other.risk is not None and fusion.risk is not None:
            d, low, high = paired_concordance_difference(labels["risk_label"][known], fusion.risk, other.risk,
                                                         n_resamples=n_resamples, seed=seed,
                                                         sample_weight=risk_weights)
            row.update(auroc_difference=d, auroc_difference_low=low, auroc_difference_high=high)
        if other.survival is not None and fusion.survival is not None:
            d, low, high = paired_concordance_difference(event, fusion.survival, other.survival, duration,
                                                         n_resamples, seed=seed)
            row.update(harrell_c_difference=d, harrell_c_difference_low=low, harrell_c_difference_high=high)
        out[name] = row
    return out


def _subgroup_auroc_cells(fusion: dict[str, Any], name: str) -> str:
    """A subgroup's AUROC and interval cells of the model card (metrics written before the
    intervals were computed have the AUROC alone)."""
    if f"auroc_{name}" not in fusion:
        return "too few to tell | "
    if f"auroc_{name}_low" not in fusion:
        return f"{fusion[f'auroc_{name}']:.3f} | not computed"
    return f"{fusion[f'auroc_{name}']:.3f} | {fusion[f'auroc_{name}_low']:.3f} to {fusion[f'auroc_{name}_high']:.3f}"


MIN_SUBGROUP_CASES = 10
"""Cases and controls a held-out subgroup needs for its AUROC to be reported."""


def _subgroups(cohort: pl.DataFrame) -> dict[str, np.ndarray]:
    """Held-out patients by sex and by age group; each family covers every patient once.

    Patients whose administrative gender is other, unknown or not recorded, and those whose age is
    unknown (no birth date), are groups of their own: a model card that left them out would hide how
    the model does for exactly the patients a registry records least well.
    """
    sex = cohort["sex"].fill_null("unknown").to_numpy()
    age = cohort["age_years"].fill_null(np.nan).to_numpy().astype(float)
    return {
        "sex_female": sex == "female", "sex_male": sex == "male",
        "sex_other_or_unknown": ~np.isin(sex, ["female", "male"]),
        "age_under_65": age < 65, "age_65_to_79": (age >= 65) & (age < 80), "age_80_plus": age >= 80,
        "age_unknown": np.isnan(age),
    }


def _baselines(data: TaskData, matrices: _InputMatrices, labels: dict[str, np.ndarray], known: np.ndarray,
               w: np.ndarray, horizon: float, effects: dict[str, np.ndarray], scores: dict[str, Scores],
               seed: int) -> dict[str, dict[str, float]]:
    """Every baseline on the same splits; the risk models learn from the censoring-weighted labels."""
    x_train, x_tuning, x_test = (matrices.tabular[split] for split in ("train", "tuning", "held_out"))
    train_labels = data.datasets["train"].label_arrays()
    tuning_labels = data.datasets["tuning"].label_arrays()
    k_train = ~np.isnan(train_labels["risk_label"])
    k_tuning = ~np.isnan(tuning_labels["risk_label"])
    y_train, y_tuning = train_labels["risk_label"][k_train], tuning_labels["risk_label"][k_tuning]
    w_train, w_tuning = label_weights(data, "train")[k_train], label_weights(data, "tuning")[k_tuning]
    y = labels["risk_label"][known]
    out: dict[str, dict[str, float]] = {}
    logistic = fit_logistic(x_train[k_train], y_train, sample_weight=w_train)
    fused = matrices.late_fusion
    late = fit_logistic_tuned(fused["train"][k_train], y_train, fused["tuning"][k_tuning], y_tuning,
                              sample_weight=w_train, tuning_weight=w_tuning)
    for name, risk in (
        ("logistic_regression", np.asarray(logistic.predict_proba(x_test[known]))[:, 1]),
        ("logistic_regression_all_modalities", np.asarray(late.predict_proba(fused["held_out"][known]))[:, 1]),
    ):
        scores[name] = Scores(risk, None)
        out[name] = _risk_metrics(y, risk, w)
    # LightGBM and Cox on the aggregates, as the task asks, and on every modality (the aggregates
    # beside the mean note and image embeddings), the inputs the fusion model has.
    for name, inputs in (("lightgbm", matrices.tabular), ("lightgbm_all_modalities", fused)):
        boosted = fit_lightgbm(inputs["train"][k_train], y_train, inputs["tuning"][k_tuning], y_tuning, seed,
                               w_train, w_tuning)
        risk = np.asarray(boosted.predict_proba(inputs["held_out"]))[:, 1]
        scores[name] = Scores(risk[known], risk)
        out[name] = _risk_metrics(y, risk[known], w)
        out[name].update(_survival_metrics(train_labels, labels, risk, horizon))
    survival_baselines: tuple[tuple[str, Any], ...] = (
        ("cox_ph", fit_cox), ("random_survival_forest", partial(fit_random_survival_forest, seed=seed)))
    for name, fit in survival_baselines:
        estimator = fit(x_train, train_labels["event"], train_labels["duration_days"])
        score = np.asarray(estimator.predict(x_test), dtype=np.float64)
        scores[name] = Scores(None, score)
        out[name] = _survival_metrics(train_labels, labels, score, horizon)
    cox_all = fit_cox_tuned(fused["train"], train_labels["event"], train_labels["duration_days"], fused["tuning"],
                            tuning_labels["event"], tuning_labels["duration_days"])
    score = np.asarray(cox_all.predict(fused["held_out"]), dtype=np.float64)
    scores["cox_ph_all_modalities"] = Scores(None, score)
    out["cox_ph_all_modalities"] = _survival_metrics(train_labels, labels, score, horizon)
    if data.has_treatment:
        learner = fit_t_learner(
            x_train[k_train], y_train, train_labels["treated"][k_train], x_tuning[k_tuning], y_tuning,
            tuning_labels["treated"][k_tuning], seed, w_train, w_tuning,
        )
        effects["t_learner_lightgbm"] = learner.effect(x_test)
        out["t_learner_lightgbm"] = {}
    return out


class _InputMatrices:
    """The baselines' inputs per split, each built once when first needed in an evaluation."""

    def __init__(self, data: TaskData) -> None:
        self.data = data

    @cached_property
    def tabular(self) -> dict[str, np.ndarray]:
        """The aggregates, in the train split's column order."""
        x_train, columns = feature_matrix(self.data.tabular["train"])
        return {"train": x_train, **{split: feature_matrix(self.data.tabular[split], columns)[0]
                                     for split in ("tuning", "held_out")}}

    @cached_property
    def late_fusion(self) -> dict[str, np.ndarray]:
        """The aggregates beside each patient's mean note and mean imaging embedding."""
        data = self.data
        out = {}
        for split, tabular in self.tabular.items():
            ids = data.tabular[split]["subject_id"].to_numpy()
            out[split] = np.hstack([
                tabular,
                mean_embeddings(ids, data.note_embeddings, data.text_embedding_dim),
                mean_embeddings(ids, data.imaging_embeddings, data.imaging_embedding_dim),
            ])
        return out


def _treatment_metrics(models: dict[str, dict[str, float]], effects: dict[str, np.ndarray], data: TaskData,
                       matrices: _InputMatrices, labels: dict[str, np.ndarray], known: np.ndarray, w: np.ndarray,
                       truth: pl.DataFrame | None) -> None:
    held_out = data.datasets["held_out"]
    true_effect = None
    if truth is not None:
        rows = pl.DataFrame({"subject_id": held_out.subject_ids}).join(
            truth.select("subject_id", "true_treatment_effect"), on="subject_id", how="left")
        if rows["true_treatment_effect"].null_count():
            raise ValueError("truth: some held-out patients are missing from truth.parquet")
        true_effect = rows["true_treatment_effect"].to_numpy()
    # Propensity from the treatment actually given, for the policy value (observed data only), on the
    # patients with an arm: prevalent users and those not observed past the grace period have
    # none (NaN), and are neither fitted nor evaluated.
    treated_train = data.datasets["train"].label_arrays()["treated"]
    has_arm = ~np.isnan(treated_train)
    propensity = fit_logistic(matrices.tabular["train"][has_arm], treated_train[has_arm]).predict_proba(
        matrices.tabular["held_out"])[:, 1]
    in_arm = ~np.isnan(labels["treated"][known])  # of the patients with a risk label (w's rows)
    arm = labels["treated"][known][in_arm]
    for name, effect in effects.items():
        metrics = models.setdefault(name, {})
        if true_effect is not None:
            metrics["pehe"] = pehe(effect, true_effect)
        # The policy's event rate is estimated from the patients whose arm it would have chosen;
        # with none (every held-out patient in the other arm), it is not reported.
        if follows_policy(effect[known][in_arm], arm == 1).any():
            metrics["policy_event_rate"] = policy_value(
                effect[known][in_arm], arm, labels["risk_label"][known][in_arm], propensity[known][in_arm], w[in_arm])


def _truth_risks(truth: pl.DataFrame, data: TaskData, late_fusion: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Three references from the simulator's hidden state, per held-out patient (arms averaged by
    the propensity: at the prediction time the treatment is not yet decided).

    * ``truth``: the true risk, every hidden term known; no model can reach it, since no model sees
      the genotype of a patient never sequenced.
    * ``truth_observed_modalities``: knowing only the terms of the modalities each patient has
      (:func:`~features.simulate.state.risk_given_observed_modalities`); still above what the data
      allow, since the modalities carry their terms with noise.
    * ``truth_estimated_severities``: the true hazard formula fed each term as the data tell it
      (:func:`_severities_read_from_data`); a reference for what a model of these inputs can reach.
    """
    rows = pl.DataFrame({"subject_id": data.datasets["held_out"].subject_ids}).join(truth, on="subject_id",
                                                                                     how="left")
    if rows["true_risk_untreated"].null_count():
        raise ValueError("truth: some held-out patients are missing from truth.parquet")
    propensity = rows["propensity"].to_numpy()
    table = rows.to_arrow()
    return {
        "truth": propensity * rows["true_risk_treated"].to_numpy() + (1 - propensity) * rows[
            "true_risk_untreated"].to_numpy(),
        "truth_observed_modalities": risk_given_observed_modalities(table, data.horizon_days),
        "truth_estimated_severities": risk_given_estimated_severities(
            table, _severities_read_from_data(data, late_fusion, truth), data.horizon_days),
    }


MIN_PATIENTS_TO_READ_A_TERM = 10
"""Fewest train and tuning patients carrying a hidden term for the reference to read it from the data."""


def _severities_read_from_data(data: TaskData, late_fusion: dict[str, np.ndarray],
                               truth: pl.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each hidden term of the held-out patients as a ridge regression on the late-fusion inputs reads it.

    The inputs are the aggregates and mean embeddings of ``logistic_regression_all_modalities``; each
    regression is fitted against the hidden values on the train patients whose data carry the term,
    and its standard deviation is the residual one on the tuning split's. Linear, so it may read
    less than a flexible model could; in the simulator each term enters its modality close to
    linearly (tuning R^2 about 0.84 for the EHR and notes at 20,000 patients).
    """
    hidden = {split: pl.DataFrame({"subject_id": data.tabular[split]["subject_id"]}).join(
        truth, on="subject_id", how="left") for split in late_fusion}
    held_out = late_fusion["held_out"]
    estimates = {}
    for term in SEVERITY_TERMS:
        carrier = CARRIED_BY[term]
        in_train, in_tuning = (hidden[split][carrier].to_numpy() if carrier is not None
                               else np.ones(hidden[split].height, dtype=bool) for split in ("train", "tuning"))
        if min(in_train.sum(), in_tuning.sum()) < MIN_PATIENTS_TO_READ_A_TERM:
            # Too few patients carry the term to read it: the data tell nothing beyond its distribution.
            estimates[term] = (np.zeros(len(held_out)), np.ones(len(held_out)))
            continue
        ridge = fit_ridge(late_fusion["train"][in_train], hidden["train"][term].to_numpy()[in_train])
        residual = hidden["tuning"][term].to_numpy()[in_tuning] - ridge.predict(late_fusion["tuning"][in_tuning])
        estimates[term] = (np.asarray(ridge.predict(held_out)), np.full(len(held_out), residual.std()))
    return estimates


def _truth_metrics(risk: np.ndarray, labels: dict[str, np.ndarray], known: np.ndarray, w: np.ndarray,
                   train_labels: dict[str, np.ndarray], horizon: float) -> tuple[dict[str, float], Scores]:
    """What a reference risk (:func:`_truth_risks`) achieves on the held-out patients."""
    metrics = _risk_metrics(labels["risk_label"][known], risk[known], w)
    metrics.update(_survival_metrics(train_labels, labels, risk, horizon))
    return metrics, Scores(risk[known], risk)


def save_task_model(folder: Path, model: FusionForRiskPrediction, calibrator: PlattCalibrator, vocabulary_json: bytes,
                    metrics: dict[str, Any], history: list[dict[str, float]], card: str,
                    has_treatment: bool, reference_risk: dict[str, np.ndarray],
                    reference_inputs: pl.DataFrame | None = None, fingerprint: str | None = None,
                    prediction_target: dict[str, Any] | None = None) -> Path:
    """Write the model folder atomically (a sibling folder renamed into place).

    ``prediction_target`` (:meth:`features.tasks.TaskDefinition.prediction_target`) is recorded
    for :func:`check_prediction_target`."""
    restore_retired_dir(folder)  # the model before, if a crash left it aside: its references are kept
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with quiet_transformers_progress():
        model.save_pretrained(staging)
    (staging / "vocabulary.json").write_bytes(vocabulary_json)
    calibrator.save(staging / "calibration.json")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (staging / "history.json").write_text(json.dumps(history, indent=1))
    (staging / "MODEL_CARD.md").write_text(card)
    save_reference(staging / REFERENCE_FILE, reference_risk)
    if reference_inputs is not None:
        input_reference(reference_inputs).write_parquet(staging / INPUT_REFERENCE_FILE)
    files = model_file_digests(staging)
    _keep_previous_references(folder, staging)
    (staging / "cohortcast_model.json").write_text(json.dumps({
        "format_version": MODEL_FORMAT_VERSION, "task": model.config.task,
        "targets": ["risk", "progression", *(["treatment"] if has_treatment else [])],
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": files,
        **({"training_fingerprint": fingerprint} if fingerprint is not None else {}),
        **({"prediction_target": prediction_target} if prediction_target is not None else {}),
    }, indent=2))
    return replace_dir(staging, folder)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_file_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of each file training wrote into a model folder, by name: every file but the
    ones deployment writes (``DEPLOYMENT_FILES``)."""
    return {path.name: _sha256(path) for path in sorted(folder.iterdir())
            if path.is_file() and path.name not in DEPLOYMENT_FILES and not path.name.startswith(".")}


def _keep_previous_references(replaced: Path, staging: Path) -> None:
    """Copy the references of the model in ``replaced`` into ``staging`` as ``previous_*``, so that
    drift after a retraining is measured against the data the model before was trained on
    (models.drift). Only references as that model's training wrote them are kept (their SHA-256
    as recorded; any for a folder of version 3, which records none): a damaged one would break the
    drift check. Without a model there, ``staging`` keeps none."""
    info = _model_info_or_empty(replaced)  # empty: no model there, or one too damaged to tell its references
    recorded: dict[str, str] = info["files"] if _is_digest_map(info.get("files")) else {}
    for name in (REFERENCE_FILE, INPUT_REFERENCE_FILE):
        (staging / f"{PREVIOUS_PREFIX}{name}").unlink(missing_ok=True)
        source = replaced / name
        if source.is_file() and (info.get("format_version") == READABLE_FORMAT_VERSIONS[0]
                                 or recorded.get(name) == _sha256(source)):
            shutil.copy(source, staging / f"{PREVIOUS_PREFIX}{name}")


def promote_model(candidate: Path, live: Path, accept: Callable[[Path], None] | None = None) -> Path:
    """Make the model folder ``candidate`` the one scoring reads, at ``live``; return ``live``.

    The candidate is copied, not moved, so it stays beside its training run's record. The copy is
    what is checked, against the digests it carries (:func:`check_model_folder`) and by ``accept``
    (given the copied folder, it raises to refuse it): a candidate trained again before or while
    the files are copied one by one is either deployed whole and checked, or refused. The copy
    takes the replaced model's drift references as ``previous_*`` (those the candidate was written
    with belong to whatever folder it was trained over) and the time of deployment (``deployed`` in
    ``cohortcast_model.json``), and replaces ``live`` by :func:`features.io.replace_dir`. Over a
    damaged copy of the same model (the same digests), it repairs: the deployment time and the
    ``previous_*`` references of ``live`` stay. :func:`models.publishing.deploy_model` passes the
    quality gates as ``accept``.

    Raises
    ------
    ModelFolderError
        When ``candidate`` is not a complete model folder of this version; and whatever ``accept``
        raises. ``live`` is left as it was.
    """
    check_model_folder(candidate)  # refuses a missing, partial, altered or other-version folder
    restore_retired_dir(live)  # the model before, if a crash left it aside: its references are kept
    staging = live.with_name(f".{live.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    accepted = False
    try:
        shutil.copytree(candidate, staging)
        # The copy too, against the digests it carries: a candidate trained again while the files
        # were copied one by one gives a copy that mixes two models, and is refused.
        check_model_folder(staging)
        if accept is not None:
            accept(staging)
        accepted = True
    finally:
        if not accepted:
            shutil.rmtree(staging, ignore_errors=True)
    info_path = staging / "cohortcast_model.json"
    info = json.loads(info_path.read_text())
    live_info = _model_info_or_empty(live)
    if _is_digest_map(live_info.get("files")) and live_info["files"] == info["files"] and "deployed" in live_info:
        # A repair: this model is the one deployed, and the drift check's reference stays the model before it.
        for name in (REFERENCE_FILE, INPUT_REFERENCE_FILE):
            (staging / f"{PREVIOUS_PREFIX}{name}").unlink(missing_ok=True)
            if (live / f"{PREVIOUS_PREFIX}{name}").is_file():
                shutil.copy(live / f"{PREVIOUS_PREFIX}{name}", staging / f"{PREVIOUS_PREFIX}{name}")
        info["deployed"] = live_info["deployed"]
    else:
        _keep_previous_references(live, staging)
        info["deployed"] = datetime.now(UTC).isoformat(timespec="seconds")
    info_path.write_text(json.dumps(info, indent=2))
    return replace_dir(staging, live)


def load_task_model(folder: Path) -> tuple[FusionForRiskPrediction, PlattCalibrator, dict[str, Any]]:
    """Load a model folder written by :func:`save_task_model`.

    Raises
    ------
    ModelFolderError
        As :func:`check_model_folder`.
    """
    info = check_model_folder(folder)
    # Sizes that differ are reported below as mismatched keys, not raised by transformers as a
    # bare RuntimeError.
    with quiet_transformers_progress():
        loaded: Any = FusionForRiskPrediction.from_pretrained(folder, output_loading_info=True,
                                                              ignore_mismatched_sizes=True)
    model: FusionForRiskPrediction = loaded[0]
    loading: dict[str, Any] = loaded[1]
    # A weight the config asks for but the file lacks would start random (transformers only logs
    # it): the config and weights of two models, which a folder of format 3 has no digests to catch.
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    unmatched = {kind.replace("_", " "): sorted(map(str, loading.get(kind, ()))) for kind in kinds}
    if any(unmatched.values()):
        found = "; ".join(f"{kind}: {', '.join(keys[:3])}" for kind, keys in unmatched.items() if keys)
        raise ModelFolderError(f"model folder {folder}: config.json and model.safetensors are not of one model "
                               f"({found}); train the model again")
    try:
        calibrator = PlattCalibrator.load(folder / "calibration.json")
    except ValueError as exc:
        raise ModelFolderError(f"model folder {folder}: {exc}; train or deploy the model again") from None
    return model.eval(), calibrator, info


def check_model_folder(folder: Path) -> dict[str, Any]:
    """Check that ``folder`` holds a whole model of a format version this cohortcast reads, its
    files as training wrote them; return its ``cohortcast_model.json``.

    Raises
    ------
    ModelFolderError
        When files are missing, ``cohortcast_model.json`` is damaged, the folder was written by
        another format version, or a file's SHA-256 differs from the one training recorded (edited,
        damaged, or mixed with another model's files).
    """
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist (train a model first: `cohortcast train`)")
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"model folder {folder} is missing {', '.join(missing)} (it is incomplete; train or deploy the model again)"
        )
    info = _read_model_info(folder)
    version = info.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ModelFolderError(
            f"model folder {folder} has format version {version!r}, this cohortcast reads version "
            f"{MODEL_FORMAT_VERSION} (or {READABLE_FORMAT_VERSIONS[0]}, written before file digests; train the "
            "model again with this version)"
        )
    required = MODEL_INFO_KEYS if version == MODEL_FORMAT_VERSION else MODEL_INFO_KEYS[:-1]
    if not set(required) <= set(info):
        raise ModelFolderError(f"model folder {folder}: cohortcast_model.json lacks "
                               f"{sorted(set(required) - set(info))} (train the model again)")
    if version == MODEL_FORMAT_VERSION:
        _check_digests(folder, info["files"])
    return info


def _read_model_info(folder: Path) -> dict[str, Any]:
    """``folder``'s ``cohortcast_model.json`` as a JSON object; a damaged one raises ModelFolderError."""
    path = folder / "cohortcast_model.json"
    damaged = f"model folder {folder}: cohortcast_model.json"
    try:
        info = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ModelFolderError(f"model folder {folder} is missing cohortcast_model.json (train a model first)") \
            from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{damaged} is not JSON ({exc}; it is damaged: train or deploy the model "
                               "again)") from exc
    if not isinstance(info, dict):
        raise ModelFolderError(f"{damaged} should hold a JSON object, found {type(info).__name__} (it is "
                               "damaged: train or deploy the model again)")
    return info


def _model_info_or_empty(folder: Path) -> dict[str, Any]:
    """``folder``'s ``cohortcast_model.json``, or an empty record where there is no model or its
    record is too damaged to read."""
    try:
        return _read_model_info(folder)
    except ModelFolderError:
        return {}


def _is_digest_map(files: Any) -> bool:
    return isinstance(files, dict) and all(isinstance(v, str) for v in files.values())


def _check_digests(folder: Path, recorded: Any) -> None:
    """Raise ModelFolderError unless every file ``recorded`` names is in ``folder`` with that SHA-256."""
    if not _is_digest_map(recorded):
        raise ModelFolderError(f"model folder {folder}: cohortcast_model.json 'files' should map file names to "
                               f"SHA-256 digests, found {type(recorded).__name__} {recorded!s:.60} (it is "
                               "damaged: train or deploy the model again)")
    absent = sorted(name for name in recorded if not (folder / name).is_file())
    if absent:
        raise ModelFolderError(
            f"model folder {folder} is missing {', '.join(absent)} (it is incomplete; train or deploy the model again)")
    changed = [f"{name} has SHA-256 {found[:12]} (expected {recorded[name][:12]})"
               for name in sorted(recorded) if (found := _sha256(folder / name)) != recorded[name]]
    if changed:
        raise ModelFolderError(
            f"model folder {folder}: {'; '.join(changed)}, as cohortcast_model.json 'files' records (the file was "
            "edited, damaged or taken from another model: train or deploy the model again)")


def truth_mismatch(truth: pl.DataFrame, cohort: pl.DataFrame, horizon_days: float) -> str | None:
    """Why a simulator's ``truth.parquet`` does not describe a task's patients, or None when it does.

    The truth holds each patient's true risk at the simulator's horizon from the simulator's
    prediction time: another horizon, or another prediction time (another cohort rule), asks
    another question, and its true risks and effects would be compared with the wrong answers.
    ``cohort`` is the task's ``cohort.parquet`` (``subject_id``, ``prediction_time``).
    """
    needed = {"subject_id", "prediction_time", "horizon_days", "true_risk_untreated", "true_risk_treated",
              "true_treatment_effect", "propensity"}
    if missing := sorted(needed - set(truth.columns)):
        return f"it has no column {', '.join(missing)} (not a cohortcast simulator's truth.parquet)"
    # The references read which modalities each patient's data hold, the expression panel apart.
    if older := [name for name in TRUTH_COLUMNS if name not in truth.columns]:
        return f"it has no column {', '.join(older)} (written by an older simulator: simulate the hospital again)"
    horizons = sorted(set(truth["horizon_days"].drop_nulls().to_list()))
    if horizons != [horizon_days]:
        return f"its true risks are at a horizon of {horizons} days, the task's is {horizon_days:g}"
    rows = cohort.select("subject_id", "prediction_time").join(
        truth.select("subject_id", pl.col("prediction_time").alias("true_prediction_time")), on="subject_id",
        how="left")
    if absent := rows["true_prediction_time"].null_count():
        return f"{absent:,} of the task's {rows.height:,} patients are not in it"
    if moved := rows.filter(pl.col("prediction_time") != pl.col("true_prediction_time")).height:
        return (f"{moved:,} of the task's {rows.height:,} patients are predicted at another time than the "
                "simulator's (another cohort rule)")
    return None


def read_truth(truth_path: Path) -> pl.DataFrame:
    """A simulator's ``truth.parquet``, or :class:`TrainingDataError` when it is not Parquet."""
    try:
        return pl.read_parquet(truth_path, glob=False)
    except (pl.exceptions.ComputeError, OSError) as exc:
        raise TrainingDataError(f"truth {truth_path} cannot be read as Parquet ({str(exc).splitlines()[0]}); "
                                "train without it") from None


def truth_file_mismatch(truth_path: Path, task_dir: Path, horizon_days: float) -> str | None:
    """:func:`truth_mismatch` of a ``truth.parquet`` and a task folder's ``cohort.parquet``."""
    return truth_mismatch(read_truth(truth_path), _read_input(task_dir / "cohort.parquet"), horizon_days)


def check_model_destination(model_dir: Path, task_dir: Path) -> None:
    """Raise :class:`ModelFolderError` unless ``model_dir`` may be replaced by a new model folder:
    absent, empty, or a model folder already. Writing a model replaces the whole folder, so a
    warehouse, a folder of several models or anyone's other files named there would be deleted.
    """
    target, inputs = model_dir.resolve(), task_dir.resolve()
    if target == inputs or target in inputs.parents:
        raise ModelFolderError(f"model folder {model_dir} holds the task's inputs ({task_dir}): writing the model "
                               "there would delete them; name a folder of its own")
    if target.is_dir() and any(target.iterdir()) and not (target / "cohortcast_model.json").is_file():
        raise ModelFolderError(f"model folder {model_dir} exists and is not a model folder (no "
                               "cohortcast_model.json): writing the model there would delete what it holds; name "
                               "a new or empty folder")
    if target.exists() and not target.is_dir():
        raise ModelFolderError(f"model folder {model_dir} is a file, not a folder")


def train_task_model(task_dir: Path, model_dir: Path, task: TaskDefinition, args: TrainingArguments,
                     architecture: dict[str, Any] | None = None, truth_path: Path | None = None,
                     baselines: bool = True, on_epoch: Any = None,
                     is_main_process: bool = True, modalities: tuple[str, ...] = MODALITIES) -> dict[str, Any] | None:
    """Train, calibrate and evaluate one task's model; write the model folder; return the metrics.

    Under DistributedDataParallel every process trains, and only the main process
    (``is_main_process``) evaluates and writes the folder; the others return None.
    """
    check_model_destination(model_dir, task_dir)
    fingerprint = training_fingerprint(task_dir, args, architecture, truth_path, baselines, modalities, task)
    data = load_task_data(task_dir, task.horizon_days, modalities)
    # Checked before training: the reference rows would otherwise answer another question.
    truth = read_truth(truth_path) if truth_path is not None else None
    if truth is not None and (why := truth_mismatch(truth, _read_input(task_dir / "cohort.parquet"),
                                                    task.horizon_days)):
        raise TrainingDataError(f"truth {truth_path} does not describe task '{task.name}': {why}; train without it")
    # Checked before training, not found after it: the held-out AUROC needs both outcomes.
    check_trainable("held_out", data.datasets["held_out"], 1)
    if data.has_treatment:
        check_treatment_arms(data.datasets["train"], data.datasets["tuning"], baselines)
    config = fusion_config(data, **(architecture or {}))
    torch.manual_seed(args.seed)
    model = FusionForRiskPrediction(config)
    result = train(model, data.datasets["train"], data.datasets["tuning"], args, on_epoch=on_epoch)
    if not is_main_process:
        return None
    metrics = evaluate(result.model, result.calibrator, data, truth, baselines=baselines, seed=args.seed)
    metrics["best_epoch"] = result.best_epoch
    metrics["survival_calibration"] = getattr(result.calibrator, "survival_calibration_", None)
    metrics["arm_calibration"] = getattr(result.calibrator, "arm_calibration_", None)
    metrics["training_arguments"] = asdict(args)
    metrics["trained_on"] = {"device": str(args.resolve_device()), "precision": training_precision(args),
                             "processes": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1}
    metrics["split_sizes"] = {k: len(v) for k, v in data.datasets.items()}
    card = model_card(task, data, config, metrics)
    # The cohort as this model scores it, so that drift is measured against training and not against
    # whatever was published last.
    reference = {split: predict(result.model, result.calibrator, dataset).risk
                 for split, dataset in data.datasets.items()}
    # Inputs built again while the model trained (an overlapping pipeline run) would pair these
    # weights with another vocabulary and other tokens than they learned.
    if fingerprint is not None and training_fingerprint(task_dir, args, architecture, truth_path, baselines,
                                                        modalities, task) != fingerprint:
        raise TrainingDataError(f"task folder {task_dir} changed while the model trained (its inputs were built "
                                "again); the model is not saved: train again")
    save_task_model(model_dir, result.model, result.calibrator, data.vocabulary_json, metrics, result.history, card,
                    data.has_treatment, reference, pl.concat(list(data.tabular.values()), how="diagonal_relaxed"),
                    fingerprint, task.prediction_target())
    return metrics


def check_prediction_target(model_dir: Path, info: dict[str, Any], task_name: str,
                            target: dict[str, Any]) -> None:
    """Refuse a model trained to predict something else than ``target`` (the task file's
    :meth:`~features.tasks.TaskDefinition.prediction_target`): its risks would be published under
    the task's outcome and horizon. A folder that does not record its target (written before it
    was recorded) is not checked.

    Raises
    ------
    ModelFolderError
        Naming the first element that differs, the model's value and the task's.
    """
    trained: dict[str, Any] | None = info.get("prediction_target")
    if trained is None:
        return
    for key in target:
        if trained.get(key) != target[key]:
            raise ModelFolderError(
                f"model {model_dir} was trained with {key} {json.dumps(trained.get(key))}, task {task_name!r} now "
                f"has {json.dumps(target[key])} (the task file was edited since training; train the model again)")


def training_fingerprint(task_dir: Path, args: TrainingArguments, architecture: dict[str, Any] | None,
                         truth_path: Path | None, baselines: bool,
                         modalities: tuple[str, ...] = MODALITIES,
                         task: TaskDefinition | None = None) -> str | None:
    """What a training of ``task_dir`` reads, as one hash; None for a folder without step fingerprints.

    It covers every input step's ``.fingerprint.json`` (the inputs it was computed from), every file
    those records name as it is now (:func:`features.task_inputs.step_files_now`: a step output
    replaced by hand, or written by a step killed before its record, counts as a change), the training arguments, the
    architecture, the truth file (by size and time), whether baselines run, the modalities and the
    model format. Training is seeded, so equal fingerprints give the same model: a pipeline run on
    unchanged inputs need not train again (:func:`trained_with`).
    """
    steps = sorted(task_dir.glob("*.fingerprint.json"))
    if not steps:
        return None
    recorded = [(path.name, json.loads(path.read_text())) for path in steps]
    truth = None if truth_path is None else [truth_path.stat().st_size, truth_path.stat().st_mtime_ns]
    steps_read = [(name, r.get("key"), r.get("output"), r.get("side_outputs")) for name, r in recorded]
    files_now = step_files_now(task_dir)
    payload = [TRAINING_VERSION, MODEL_FORMAT_VERSION, asdict(task) if task is not None else None, steps_read,
               files_now, asdict(args), architecture or {}, truth, baselines, list(modalities)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def trained_with(model_dir: Path, fingerprint: str | None) -> bool:
    """Whether ``model_dir`` holds a complete model trained with ``fingerprint``
    (:func:`training_fingerprint`); never for a None fingerprint."""
    if fingerprint is None or not (model_dir / "metrics.json").is_file():
        return False
    try:
        info = check_model_folder(model_dir)
    except ModelFolderError:  # incomplete, altered or of another version: trained again
        return False
    return bool(info.get("training_fingerprint") == fingerprint)


def metrics_table(metrics: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Rows (model name, metrics) in a stable order: fusion, baselines, truth."""
    order = ["fusion", "logistic_regression", "logistic_regression_all_modalities", "lightgbm",
             "lightgbm_all_modalities", "cox_ph", "cox_ph_all_modalities", "random_survival_forest",
             "t_learner_lightgbm", "truth_estimated_severities",
             "truth_observed_modalities", "truth"]
    models = metrics["models"]
    return [(name, models[name]) for name in order if name in models]


def format_difference(row: dict[str, float], metric: str) -> str:
    """``+0.012 (-0.004 to +0.028)``: a difference of :func:`compare_with_fusion` and its interval."""
    if f"{metric}_difference" not in row:
        return ""
    return (f"{row[f'{metric}_difference']:+.3f} ({row[f'{metric}_difference_low']:+.3f} to "
            f"{row[f'{metric}_difference_high']:+.3f})")


def comparison_lines(comparisons: dict[str, dict[str, float]], n_resamples: int) -> list[str]:
    """The model card's section on fusion minus each other model, with bootstrap intervals."""
    if not comparisons:
        return []
    lines = [
        "",
        "## Fusion against each other model",
        "",
        "Fusion minus the other model on the same held-out patients, with a 95 % paired bootstrap interval "
        f"({n_resamples:,} resamples of the patients). An interval above 0 means the fusion model ranks "
        "patients better; one that straddles 0, that this held-out split cannot tell the two apart.",
        "",
        "| model | AUROC difference | Harrell C difference |",
        "| --- | --- | --- |",
    ]
    order = [name for name, _ in metrics_table({"models": {"fusion": {}, **comparisons}}) if name != "fusion"]
    for name in order:
        row = comparisons[name]
        if row:
            lines.append(f"| {name} | {format_difference(row, 'auroc')} | {format_difference(row, 'harrell_c')} |")
    return lines


def _outcome_text(task: TaskDefinition) -> str:
    kinds = [f"`{code}`" for code in task.outcome.codes] + (["death"] if task.outcome.death else [])
    return kinds[0] if len(kinds) == 1 else f"the first of {', '.join(kinds[:-1])} or {kinds[-1]}"


def _follow_up_rule(task: TaskDefinition) -> str:
    after = task.follow_up_after_last_record
    after_text = ("their own usual interval between days with records (the year before the prediction time)"
                  if after == USUAL_INTERVAL else f"{float(after):g} days")
    end_text = (f"the end of the data ({task.follow_up_end:%Y-%m-%d})" if task.follow_up_end is not None
                else "the latest record in the data")
    death = "death is the event" if task.outcome.death else "death ends follow-up without the event"
    return (f"Follow-up of a patient without the event ends {after_text} after their last record, and never "
            f"later than {end_text}; {death}.")


def _label_counts(data: TaskData) -> str:
    parts = []
    for split, dataset in data.datasets.items():
        risk = dataset.label_arrays()["risk_label"]
        known = ~np.isnan(risk)
        parts.append(f"{split} {int((risk[known] > 0.5).sum()):,} with the event, {int((risk[known] < 0.5).sum()):,} "
                     f"without, {int((~known).sum()):,} followed less than the horizon")
    return "; ".join(parts)


def _training_text(metrics: dict[str, Any]) -> str:
    """How the model was trained, enough to train it again."""
    args, trained_on = metrics["training_arguments"], metrics["trained_on"]
    epochs = args["average_epochs"]
    average = (f"weights averaged over about {epochs:g} epoch{'' if epochs == 1 else 's'}"
               if epochs > 0 else "the last weights of the best epoch kept")
    # Training runs in bf16 only on a GPU (models.training.training_precision).
    rerun = ("A rerun with the same data and seed gives the same model on the same kind of device."
             if trained_on["precision"] == "float32" else
             "bf16 training on a GPU can differ slightly from one process to the next; train with "
             "`--float32` for an exact rerun.")
    processes = trained_on["processes"]
    batch = (f"batch {args['batch_size']}" if processes == 1
             else f"batch {args['batch_size']} per process, {processes} processes (DistributedDataParallel)")
    return (f"AdamW, peak learning rate {args['learning_rate']:g} (one-cycle), weight decay {args['weight_decay']:g}, "
            f"{batch}, at most {args['max_epochs']} epochs with early stopping on the tuning "
            f"loss (patience {args['patience']}), {average}; seed {args['seed']}; on {trained_on['device']} in "
            f"{trained_on['precision']}. {rerun}")


def model_card(task: TaskDefinition, data: TaskData, config: FusionConfig, metrics: dict[str, Any]) -> str:
    """A markdown model card: purpose, task definition, data, architecture, metrics, subgroups, limits."""
    columns = ["auroc", "auprc", "brier", "calibration_error", "harrell_c", "uno_c", "time_dependent_auc",
               "integrated_brier", "pehe", "policy_event_rate"]
    lines = [
        f"# Model card: {data.task}",
        "",
        f"Fusion transformer (cohortcast) predicting the outcome of task `{data.task}` within "
        f"{data.horizon_days:g} days of the prediction time, the survival curve up to "
        f"{config.survival_bin_edges_days[-1]:g} days and, when the task names a treatment, the outcome under "
        "each arm.",
        "",
        "## Task",
        "",
        f"Outcome: {_outcome_text(task)} after the prediction time, within {task.horizon_days:g} days. "
        + _follow_up_rule(task)
        + (f" Treated: {', '.join(f'`{c}`' for c in task.treatment.codes)} started "
           f"{task.treatment.window_start_days:g} to {task.treatment.window_end_days:g} days after the prediction "
           f"time (the grace period), by new users (none in the {task.treatment.washout_days:g} days before, "
           "nor at the prediction time); patients not observed past the grace period have no arm. "
           "Treatment-arm risks are "
           "calibrated on each arm's tuning patients when each arm holds 50 events and 50 non-events."
           if task.treatment is not None else ""),
        "",
        f"Risk labels by split: {_label_counts(data)}.",
        "",
        "## Data",
        "",
        f"Patients per split: {metrics['split_sizes']}. Held-out patients with a known outcome at the horizon: "
        f"{metrics['n_held_out_labelled']} (event rate {metrics['held_out_event_rate']:.3f}; "
        f"{metrics['held_out_event_rate_weighted']:.3f} weighted for censoring). Patients whose follow-up ended "
        "before the horizon without the event have no risk label: the labelled ones carry inverse probability "
        "of censoring weights (Kaplan-Meier, train split) in the calibration, the baselines' fits, every risk "
        "metric (AUROC, AUPRC, Brier score, calibration error, AUROC by subgroup) and the policy value, so the "
        "metrics are the cohort's and not those of the patients followed to the horizon; the survival "
        "metrics keep everyone, censored, on one grid for every model (90 and 180 days and the horizon).",
        "",
        "## Architecture",
        "",
        f"hidden size {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"vocabulary {config.event_vocab_size} tokens, modality dropout {config.modality_dropout}, "
        f"modality summary path {'on' if config.modality_summary else 'off'}; "
        f"best epoch {metrics['best_epoch']}; probabilities calibrated on the tuning split (Platt, "
        "censoring-weighted).",
        "",
        "## Training",
        "",
        _training_text(metrics),
        "",
        "## Held-out metrics",
        "",
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for name, row in metrics_table(metrics):
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
    lines += comparison_lines(metrics.get("comparisons", {}), metrics.get("comparison_resamples", 0))
    fusion = metrics["models"]["fusion"]
    if "calibration_slope" in fusion:
        lines += [
            "",
            "## Calibration",
            "",
            f"Calibration slope {fusion['calibration_slope']:.2f} (1 is ideal; below 1, risks too extreme), "
            f"observed / expected events {fusion['observed_expected_ratio']:.2f} (1 is ideal). Expected "
            f"calibration error {fusion['calibration_error']:.3f}; a perfectly calibrated model would show "
            f"{fusion['calibration_error_if_calibrated']:.3f} on this many patients from sampling alone "
            f"(95th percentile {fusion['calibration_error_if_calibrated_95']:.3f}).",
        ]
    for said in (metrics.get("survival_calibration"), data.has_treatment and metrics.get("arm_calibration")):
        if said:
            lines += ["", f"{said[0].upper()}{said[1:]}."]
    if not task.outcome.death:
        lines += ["", "Death is not part of this outcome and ends follow-up: the survival curve is cause-specific "
                  "(the chance of staying free of the outcome were no one to die first), so where deaths are "
                  "common its 1 - S(horizon) is above the risk, which counts a death before the outcome as no "
                  "outcome. The risk is the patient's chance of the outcome; read the curve for its shape."]
    groups = [k.removeprefix("subgroup_").removesuffix("_labelled") for k in fusion
              if k.startswith("subgroup_") and k.endswith("_labelled")]
    lines += ["", "## AUROC by subgroup", "",
              f"Held-out patients with a known outcome; an AUROC is given where a subgroup has at least "
              f"{MIN_SUBGROUP_CASES} cases and {MIN_SUBGROUP_CASES} controls, with its 95 % bootstrap interval: "
              "two subgroups whose intervals overlap widely are not shown to differ.", "",
              "| subgroup | patients | cases | AUROC | 95 % interval |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {fusion[f'subgroup_{name}_labelled']} | {fusion[f'subgroup_{name}_cases']} | "
              f"{_subgroup_auroc_cells(fusion, name)} |" for name in groups]
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on one site's data; check calibration before use elsewhere.",
        "- The treatment effect is estimated from observational data: it assumes every confounder of the "
        "treatment decision is in the record before the prediction time.",
        "- A patient lacking a modality is scored from the others; check the explanation of each score.",
        "",
    ]
    return "\n".join(lines)
