"""A faster predict for scikit-learn's linear models (logistic regression, linear regressors),
alone or after standard scaling in a pipeline.

A linear model's answer is one matrix product, a few microseconds for a small batch, but every
call to its ``predict`` or ``predict_proba`` first validates the input (dtype, finiteness,
feature names, dataframe detection), which costs ~90 µs whatever the batch size. The server has
validated the tensor already, so this computes the same expressions directly: the decision
``X @ coef_.T + intercept_``, labels by its argmax (or its sign for two classes), probabilities
by softmax (multinomial) or the logistic function (two classes), in scikit-learn's order of
operations, after the pipeline's ``StandardScaler`` steps (subtract the mean, divide by the
scale). One decision serves both outputs when both are asked.

As for the forests, the fast path is switched on only after it reproduced the estimator's own
outputs bit for bit on probe rows at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .estimators import from_sklearn

_CLASSIFIERS = ("LogisticRegression",)
_REGRESSORS = ("LinearRegression", "Ridge", "Lasso", "ElasticNet")
_PROBE_ROWS = 32


class LinearPredictor:
    """``predict`` (and ``predict_proba`` for a classifier) of a fitted linear model, after
    ``scalers``: the (mean or None, scale or None) of each standard scaling step before it."""

    def __init__(self, estimator: Any, scalers: Sequence[tuple[np.ndarray | None, np.ndarray | None]] = ()) -> None:
        self.scalers = list(scalers)
        coef = np.asarray(estimator.coef_)
        self.coef_t = coef.T if coef.ndim == 2 else coef
        self.intercept = estimator.intercept_
        classes = getattr(estimator, "classes_", None)
        self.classes = np.asarray(classes) if classes is not None else None
        from scipy.special import expit  # scikit-learn's logistic function (scipy comes with it)

        self._expit = expit

    def __call__(self, matrix: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs (``predict``, ``predict_proba``) for every row of ``matrix``."""
        for mean, scale in self.scalers:
            if mean is not None:
                matrix = matrix - mean
            if scale is not None:
                matrix = matrix / scale
        scores = matrix @ self.coef_t + self.intercept
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores.reshape(-1)
        if self.classes is None:
            return {"predict": scores} if "predict" in outputs else {}
        result: dict[str, np.ndarray] = {}
        if "predict" in outputs:
            best = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
            result["predict"] = self.classes.take(best)
        if "predict_proba" in outputs:
            result["predict_proba"] = self._probabilities(scores)
        return result

    def _probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Logistic regression's probabilities from its decision values (which are overwritten)."""
        if scores.ndim == 1:  # two classes: the logistic function of the one decision value
            positive = self._expit(scores, out=scores)
            return np.stack([1 - positive, positive], axis=1)
        scores -= scores.max(axis=1).reshape(-1, 1)  # softmax, as scikit-learn computes it
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1).reshape(-1, 1)
        return scores


def linear_predictor(estimator: Any, dtype: np.dtype) -> LinearPredictor | None:
    """The fast path for ``estimator`` fed ``dtype`` matrices, or None where it does not apply
    or does not match the estimator's own outputs exactly.

    It applies to a scikit-learn logistic regression, or a linear, ridge, lasso or elastic net
    regressor with one output, alone or as the last step of a pipeline whose other steps are
    standard scalers (or ``"passthrough"``).
    """
    *preceding, final = _steps(estimator)
    name = type(final).__name__
    if (name not in _CLASSIFIERS + _REGRESSORS
            or not from_sklearn(final)
            or np.ndim(final.coef_) > (2 if name in _CLASSIFIERS else 1)
            or not all(type(step).__name__ == "StandardScaler" and from_sklearn(step) for step in preceding)):
        return None
    try:
        predictor = LinearPredictor(final, [_scaling(step, dtype) for step in preceding])
        probe = _probe_rows(int(estimator.n_features_in_), dtype)
        outputs = ("predict", "predict_proba") if predictor.classes is not None else ("predict",)
        for rows in (probe[:1], probe):  # one row and a batch: numpy may take other paths for each
            ours = predictor(rows, outputs)
            for output in outputs:
                own = getattr(estimator, output)(rows)
                if ours[output].dtype != own.dtype or not np.array_equal(ours[output], own):
                    return None
    except Exception:  # anything unforeseen (sparse coefficients, ...): the estimator's own methods
        return None
    return predictor


def _steps(estimator: Any) -> list[Any]:
    """A pipeline's estimators in order, skipping ``"passthrough"`` steps; else the estimator."""
    if type(estimator).__name__ == "Pipeline" and from_sklearn(estimator):
        return [step for _, step in estimator.steps if step not in (None, "passthrough")]
    return [estimator]


def _scaling(scaler: Any, dtype: np.dtype) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A fitted StandardScaler's mean and scale (None where it does not apply them)."""
    mean = np.asarray(scaler.mean_, dtype=dtype) if scaler.with_mean else None
    scale = np.asarray(scaler.scale_, dtype=dtype) if scaler.with_std else None
    return mean, scale


def _probe_rows(n_features: int, dtype: np.dtype) -> np.ndarray:
    """Rows of every sign and magnitude, a zero row among them."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(_PROBE_ROWS, n_features)) * rng.choice([0.01, 1.0, 100.0], size=(_PROBE_ROWS, 1))
    rows[-1] = 0.0
    return rows.astype(dtype)
