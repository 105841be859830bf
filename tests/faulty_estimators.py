"""scikit-learn-compatible estimators that misbehave on purpose, for the fault tests and the soak.

They are pickled with joblib into a test repository and unpickled by the real server (started
with this folder on its ``PYTHONPATH``), so they exercise the sklearn runtime exactly as a user's
custom estimator would. Each behaves like a plain two-class classifier except on a magic input
value anywhere in the batch:

- ``RAISE`` (666): ``predict``/``predict_proba`` raise ``ValueError``;
- ``HANG`` (777): they sleep ``hang_s`` seconds, then answer normally;
- ``WRONG_LENGTH`` (888): they return one row more than they were given.

``SlowToUnpickle`` sleeps ``load_sleep_s`` seconds in ``__setstate__``: loading it hangs.

This module imports only numpy (and time), so unpickling it costs nothing else.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

RAISE = 666.0
HANG = 777.0
WRONG_LENGTH = 888.0
RAISE_MESSAGE = "faulty estimator: magic input 666 makes predict raise"


class FaultyClassifier:
    """A threshold classifier on the first feature that misbehaves on the magic values."""

    def __init__(self, hang_s: float = 3.0) -> None:
        self.hang_s = hang_s

    def fit(self, x: Any, y: Any) -> FaultyClassifier:
        x = np.asarray(x, dtype=np.float64)
        self.classes_ = np.unique(np.asarray(y))
        self.n_features_in_ = x.shape[1]
        return self

    def _misbehave(self, x: np.ndarray) -> int:
        """Raise or hang on the magic values; the number of extra rows to return."""
        if (x == RAISE).any():
            raise ValueError(RAISE_MESSAGE)
        if (x == HANG).any():
            time.sleep(self.hang_s)
        return 1 if (x == WRONG_LENGTH).any() else 0

    def predict_proba(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        extra = self._misbehave(x)
        positive = 1.0 / (1.0 + np.exp(-x[:, 0]))
        proba = np.column_stack([1.0 - positive, positive])
        return np.concatenate([proba, proba[:extra]]) if extra else proba

    def predict(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        extra = self._misbehave(x)
        labels = self.classes_.take((x[:, 0] > 0).astype(np.int64))
        return np.concatenate([labels, labels[:extra]]) if extra else labels


def expected_labels(x: np.ndarray) -> list[int]:
    """What a well-behaved ``FaultyClassifier`` fitted on labels {0, 1} predicts."""
    return [int(v > 0) for v in np.asarray(x, dtype=np.float64)[:, 0]]


class SlowToUnpickle(FaultyClassifier):
    """A classifier whose unpickling sleeps: a model load that hangs."""

    def __init__(self, load_sleep_s: float = 30.0) -> None:
        super().__init__()
        self.load_sleep_s = load_sleep_s

    def __setstate__(self, state: dict[str, Any]) -> None:
        time.sleep(state.get("load_sleep_s", 30.0))
        self.__dict__.update(state)
