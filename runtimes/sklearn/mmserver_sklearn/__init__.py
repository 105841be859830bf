"""scikit-learn runtime for mmserver: joblib/pickle estimators and pipelines.

Outputs: ``predict`` for every estimator, ``predict_proba`` for classifiers that have it.
scikit-learn and joblib are imported only when a model loads.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmserver.codec import DTYPES
from mmserver.errors import ModelLoadError
from mmserver.runtime import HOST, IMPORT_LOCK, Placement, Runtime, files_with_suffix, find_model_file, run_sync
from mmserver.spec import ModelSpec
from mmserver.tabular import TabularModel
from mmserver.types import TensorSpec

from .estimators import from_sklearn
from .forest import forest_predictor
from .linear import linear_predictor

SUFFIXES = (".joblib", ".pkl", ".pickle")
# How predict() relates to predict_proba(), so that one predict_proba call can yield both outputs
# (scikit-learn's own validation costs ~40 us per call whatever the batch):
# - trees and forests define predict() as classes_[argmax(predict_proba)], ties included;
# - logistic regression predicts the argmax of its decision function, of which its probabilities
#   are a non-decreasing function: the argmax agrees except where rounding ties the top
#   probabilities, and those rows are asked of predict() itself.
_ARGMAX_OF_PROBA = ("RandomForestClassifier", "ExtraTreesClassifier", "DecisionTreeClassifier",
                    "ExtraTreeClassifier")
_ARGMAX_OF_PROBA_BUT_TIES = ("LogisticRegression",)


class SKLearnRuntime(Runtime):
    """Loads pickled scikit-learn estimators."""

    name = "sklearn"

    def matches(self, path: Path) -> bool:
        return bool(files_with_suffix(path, SUFFIXES))

    def estimate(self, spec: ModelSpec, placement: Placement) -> dict[str, int]:
        # A pickled estimator is mostly numpy buffers: memory is close to the file size.
        return {HOST: int(find_model_file(spec, SUFFIXES).stat().st_size * 1.2)}

    async def load(self, spec: ModelSpec, placement: Placement) -> SKLearnModel:
        path = find_model_file(spec, SUFFIXES)
        return await run_sync(_load, path)


# scikit-learn's packages that pickled estimators usually name: imported once, one thread at a
# time (concurrent first imports of scikit-learn deadlock), so that unpickling itself, which may
# take long for a large model or hang for a broken one, runs without holding the import lock.
_PACKAGES = ("joblib", "sklearn.base", "sklearn.pipeline", "sklearn.compose", "sklearn.preprocessing",
             "sklearn.linear_model", "sklearn.ensemble", "sklearn.tree", "sklearn.svm",
             "sklearn.neighbors", "sklearn.naive_bayes", "sklearn.impute", "sklearn.feature_extraction")
_imported = False


def _import_sklearn() -> None:
    global _imported
    if _imported:
        return
    with IMPORT_LOCK:
        for package in _PACKAGES:
            importlib.import_module(package)
        _imported = True


def _load(path: Path) -> SKLearnModel:
    _import_sklearn()
    import joblib

    estimator = joblib.load(path)
    if not hasattr(estimator, "predict"):
        raise ModelLoadError(f"{path.name} holds a {type(estimator).__name__}, which has no predict()")
    return SKLearnModel(estimator, path.stat().st_size)


class SKLearnModel(TabularModel):
    """A loaded estimator; batches are one predict/predict_proba call."""

    def __init__(self, estimator: Any, host_bytes: int) -> None:
        self.estimator = estimator
        final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
        classes = getattr(final, "classes_", None)
        # a classifier of several outputs has classes (and predicts a label) per output; its
        # per-output probabilities are not offered
        per_output = isinstance(classes, list)
        self.classes = np.asarray(classes) if classes is not None and not per_output else None
        label_datatype = _label_datatype(np.concatenate(classes) if per_output else self.classes)
        self._label_dtype = None if label_datatype == "BYTES" else DTYPES[label_datatype]
        n_outputs = len(classes) if per_output else int(getattr(final, "n_outputs_", 1))
        predict_shape = (-1, n_outputs) if n_outputs > 1 else (-1,)
        if classes is None:  # only trees keep n_outputs_; a regressor's answer to one row tells the rest
            predict_shape = _predicted_shape(estimator) or predict_shape
        outputs = [TensorSpec("predict", label_datatype, predict_shape)]
        if self.classes is not None and hasattr(estimator, "predict_proba"):
            outputs.append(TensorSpec("predict_proba", "FP64", (-1, len(self.classes))))
        sklearn_own = from_sklearn(final) and getattr(final, "n_outputs_", 1) == 1
        self._argmax_of_proba = sklearn_own and type(final).__name__ in _ARGMAX_OF_PROBA
        self._argmax_but_ties = sklearn_own and type(final).__name__ in _ARGMAX_OF_PROBA_BUT_TIES
        # predict_proba of a forest classifier, predict of a forest regressor, or None
        self._forest = forest_predictor(estimator)
        # trees work in float32; giving them float32 saves a copy per batch (not to a pipeline,
        # whose earlier steps compute in float64, nor to an ensemble of other models)
        input_dtype = np.float32 if _is_trees(estimator) else np.float64
        self._linear = linear_predictor(estimator, np.dtype(input_dtype))
        names = getattr(estimator, "feature_names_in_", None)
        super().__init__(
            platform="sklearn",
            n_features=getattr(estimator, "n_features_in_", None),
            outputs=outputs,
            input_dtype=input_dtype,
            feature_names=[str(n) for n in names] if names is not None else None,
            host_bytes=host_bytes,
            inline_allowed=_library_code_only(estimator),
            allow_nan=_accepts_missing_values(estimator),
        )

    def predict(self, matrix: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self._linear is not None:
            result = self._linear(matrix, outputs)
        elif self._forest is not None and self.classes is None:  # a forest regressor
            result = {"predict": self._forest(matrix)} if "predict" in outputs else {}
        else:
            result = self._estimator_outputs(matrix, outputs)
        if "predict" in result and self._label_dtype is not None:
            result["predict"] = result["predict"].astype(self._label_dtype, copy=False)
        return result

    def _estimator_outputs(self, matrix: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        from_proba = "predict" in outputs and (self._argmax_of_proba or self._argmax_but_ties)
        if "predict_proba" in outputs or from_proba:
            proba = self._forest(matrix) if self._forest is not None else self.estimator.predict_proba(matrix)
            if "predict_proba" in outputs:
                result["predict_proba"] = proba
            if from_proba:
                result["predict"] = self._labels_of(proba, matrix)
        if "predict" in outputs and "predict" not in result:
            result["predict"] = np.asarray(self.estimator.predict(matrix))
        return result

    def _labels_of(self, proba: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """predict() from predict_proba(): the most probable class of each row; where the top
        probabilities tie and the estimator may break the tie otherwise, its own predict()."""
        best = np.argmax(proba, axis=1)
        labels = self.classes.take(best)
        if self._argmax_but_ties and len(best):
            top = proba[np.arange(len(best)), best]
            tied = np.count_nonzero(proba == top[:, None], axis=1) > 1
            if tied.any():
                labels[tied] = self.estimator.predict(matrix[tied])
        return labels

    async def unload(self) -> None:
        self.estimator = None
        self._forest = None
        self._linear = None
        await super().unload()


def _predicted_shape(estimator: Any) -> tuple[int, ...] | None:
    """The shape of what ``predict`` answers per batch (``(-1,)`` or ``(-1, targets)``), from
    one row of zeros; None when it cannot be asked (no feature count, code of the user's that
    could take any time, or it refuses the row)."""
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int) or not _library_code_only(estimator):
        return None
    try:
        with warnings.catch_warnings():  # (a model fitted on named columns warns of a bare array)
            warnings.simplefilter("ignore")
            shape = np.shape(estimator.predict(np.zeros((1, n_features))))
    except Exception:  # the shape stays as the attributes tell it
        return None
    return (-1, *shape[1:]) if len(shape) in (1, 2) else None


def _library_code_only(estimator: Any) -> bool:
    """Whether predicting runs only scikit-learn's own estimators, with no user-supplied code
    (custom classes, FunctionTransformer, callables in parameters) that could take unbounded time."""
    parts = [estimator]
    if hasattr(estimator, "get_params"):
        parts.extend(estimator.get_params(deep=True).values())
    for part in parts:
        if callable(part) and not hasattr(part, "fit"):
            return False
        if hasattr(part, "fit") and (not from_sklearn(part) or type(part).__name__ == "FunctionTransformer"):
            return False
    return True


def _accepts_missing_values(estimator: Any) -> bool:
    """scikit-learn's own tag for estimators that handle NaN (e.g. forests since 1.4)."""
    try:
        return bool(estimator.__sklearn_tags__().input_tags.allow_nan)
    except AttributeError:  # scikit-learn before 1.6 has no tags object
        return False


def _is_trees(estimator: Any) -> bool:
    """A decision tree, or an ensemble made only of decision trees (forests, gradient boosting);
    not a stacking model, whose final estimator may see the features themselves (passthrough)."""
    if hasattr(estimator, "tree_"):
        return True
    members = getattr(estimator, "estimators_", None)
    if members is None or hasattr(estimator, "final_estimator_"):
        return False
    flat = np.asarray(members, dtype=object).ravel()
    return flat.size > 0 and all(hasattr(member, "tree_") for member in flat)


def _label_datatype(classes: np.ndarray | None) -> str:
    if classes is None:
        return "FP64"
    kind = classes.dtype.kind
    if kind in "iu":
        return "INT64"
    if kind == "b":
        return "BOOL"
    if kind == "f":
        return "FP64"
    return "BYTES"
