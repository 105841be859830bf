"""What the runtime asks of an estimator object in more than one place."""

from __future__ import annotations

from typing import Any


def from_sklearn(estimator: Any) -> bool:
    """Whether ``estimator`` is an instance of one of scikit-learn's own classes (a subclass
    defined elsewhere may change any method, so the shortcuts leave it alone)."""
    return type(estimator).__module__.startswith("sklearn.")
