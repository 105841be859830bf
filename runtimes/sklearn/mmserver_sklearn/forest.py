"""A faster predict for scikit-learn's tree ensembles (random forests, extra trees).

scikit-learn's forests dispatch every tree through joblib, which costs ~4 ms per call for 100
trees whatever the batch size: more than the trees themselves for a batch of 64 rows. Calling each
tree's compiled ``tree_.predict`` in a plain loop and summing in the same order gives the same
floating-point result in a fraction of the time (~0.3 ms for one row, ~0.8 ms for 64 rows).

The fast path is switched on only after it reproduced the estimator's own output bit for bit on
probe rows at load time, so a scikit-learn release that changes how trees store their values
falls back to the estimator's own methods instead of answering differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .estimators import from_sklearn

# Only these compute their prediction as the plain mean of their trees' outputs.
_FOREST_CLASSES = ("RandomForestClassifier", "ExtraTreesClassifier",
                   "RandomForestRegressor", "ExtraTreesRegressor")
_PROBE_ROWS = 32


class ForestPredictor:
    """Mean of the trees' outputs: class probabilities for classifiers, values for regressors."""

    def __init__(self, estimator: Any) -> None:
        self.trees = [tree.tree_ for tree in estimator.estimators_]  # scikit-learn's compiled trees
        self.classifier = hasattr(estimator, "classes_")
        self._width = int(estimator.n_classes_) if self.classifier else 1

    def __call__(self, matrix: np.ndarray) -> np.ndarray:
        """``predict_proba`` of a classifier (``[N, classes]``) or ``predict`` of a regressor (``[N]``)."""
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        total = np.zeros((rows.shape[0], self._width))
        for tree in self.trees:
            total += tree.predict(rows)[:, : self._width]
        total /= len(self.trees)
        return total if self.classifier else total[:, 0]


def forest_predictor(estimator: Any) -> ForestPredictor | None:
    """The fast path for ``estimator``, or None where it does not apply or does not match exactly.

    It applies to a bare random forest or extra-trees model with one output that predicts on
    one thread (``n_jobs`` None or 1: a user who asked for parallel trees keeps them).
    """
    if (type(estimator).__name__ not in _FOREST_CLASSES
            or not from_sklearn(estimator)
            or getattr(estimator, "n_outputs_", 1) != 1
            or getattr(estimator, "n_jobs", None) not in (None, 1)):
        return None
    predictor = ForestPredictor(estimator)
    probe = _probe_rows(predictor, int(estimator.n_features_in_))
    own = estimator.predict_proba(probe) if predictor.classifier else estimator.predict(probe)
    return predictor if np.array_equal(predictor(probe), own) else None


def _probe_rows(predictor: ForestPredictor, n_features: int) -> np.ndarray:
    """Rows spread over each feature's split thresholds, so probes reach many different leaves."""
    features = np.concatenate([tree.feature for tree in predictor.trees])
    thresholds = np.concatenate([tree.threshold for tree in predictor.trees])
    split = (features >= 0) & np.isfinite(thresholds)
    low = np.zeros(n_features)
    high = np.zeros(n_features)
    np.minimum.at(low, features[split], thresholds[split])
    np.maximum.at(high, features[split], thresholds[split])
    rng = np.random.default_rng(0)
    return rng.uniform(low - 1.0, high + 1.0, size=(_PROBE_ROWS, n_features)).astype(np.float32)
