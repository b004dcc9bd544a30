"""Probability calibration on the tuning split.

Stage: model. In: the model's risk logits, the known binary outcomes of the tuning split and their
censoring weights. Out: a fitted :class:`PlattCalibrator` that maps logits to calibrated
probabilities, saved as JSON next to the model weights. Platt scaling (a logistic regression on the
logit) has two parameters, so it cannot over-fit the tuning split the way isotonic regression does
when positives are few.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression


class PlattCalibrator:
    """Calibrated probability ``sigmoid(slope * logit + intercept)``.

    Parameters
    ----------
    min_positives
        Fewest positive and negative outcomes the tuning split must hold.
    """

    def __init__(self, min_positives: int = 5) -> None:
        self.min_positives = min_positives

    def fit(
        self, logits: npt.ArrayLike, y: npt.ArrayLike, sample_weight: npt.ArrayLike | None = None
    ) -> PlattCalibrator:
        """Fit on the tuning split's logits and outcomes; ``sample_weight`` are censoring weights
        (:func:`models.censoring.censoring_weights`), so the calibrated risk is the population's,
        not the complete cases'."""
        x = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
        labels = np.asarray(y, dtype=bool)
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        if min(n_pos, n_neg) < self.min_positives:
            raise ValueError(
                f"calibration: the tuning split has {n_pos} positive and {n_neg} negative outcomes "
                f"(need at least {self.min_positives} of each); use more patients or a longer horizon"
            )
        regression = LogisticRegression(C=1e6, max_iter=1000).fit(x, labels, sample_weight=sample_weight)
        self.slope_ = float(regression.coef_[0, 0])
        self.intercept_ = float(regression.intercept_[0])
        return self

    def transform(self, logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
        if not hasattr(self, "slope_"):
            raise ValueError("calibration: PlattCalibrator is not fitted yet (call fit first)")
        z = self.slope_ * np.asarray(logits, dtype=np.float64) + self.intercept_
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps({"method": "platt", "slope": self.slope_, "intercept": self.intercept_}))
        return path

    @classmethod
    def load(cls, path: Path) -> PlattCalibrator:
        state = json.loads(path.read_text())
        if state.get("method") != "platt":
            raise ValueError(f"{path}: expected a Platt calibration (method 'platt'), found {state.get('method')!r}")
        calibrator = cls()
        calibrator.slope_ = float(state["slope"])
        calibrator.intercept_ = float(state["intercept"])
        return calibrator
