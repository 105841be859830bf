"""XGBoost runtime for mmserver: native JSON / UBJSON / binary Boosters, including models saved
through the scikit-learn API (``XGBClassifier.save_model``).

Batches run through XGBoost's dense in-place prediction with one proxy DMatrix per model
(``dense.py``; ``Booster.inplace_predict`` where that path is unavailable), never a DMatrix per
request. Classifiers offer ``predict`` (labels) and ``predict_proba``, computed from one
prediction; other objectives offer ``predict``. xgboost is imported only when a model loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmserver.runtime import HOST, IMPORT_LOCK, Placement, Runtime, files_with_suffix, find_model_file, run_sync
from mmserver.spec import ModelSpec
from mmserver.tabular import TabularModel
from mmserver.types import TensorSpec

from .dense import dense_predictor

SUFFIXES = (".ubj", ".bst", ".json", ".model", ".xgb")
_SNIFF_BYTES = 4096
_PROBA_OBJECTIVES = ("binary:logistic", "multi:softprob")


def is_xgboost_file(path: Path) -> bool:
    """Whether a file looks like a saved Booster; JSON files must start like one. A ``.model``
    beside a Hugging Face ``config.json`` is a sentencepiece tokenizer (tokenizer.model,
    spiece.model), not a Booster."""
    if path.suffix == ".model":
        return not (path.parent / "config.json").is_file()
    if path.suffix != ".json":
        return True
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    return b'"learner"' in head


class XGBoostRuntime(Runtime):
    """Loads saved XGBoost Boosters."""

    name = "xgboost"
    priority = 10  # a lone model.json is XGBoost's before any other runtime's guess

    def matches(self, path: Path) -> bool:
        return any(is_xgboost_file(p) for p in files_with_suffix(path, SUFFIXES))

    def estimate(self, spec: ModelSpec, placement: Placement) -> dict[str, int]:
        # JSON is verbose; the in-memory trees are smaller than the text, binary formats are close.
        return {HOST: int(self._model_file(spec).stat().st_size * 1.2)}

    async def load(self, spec: ModelSpec, placement: Placement) -> XGBoostModel:
        path = self._model_file(spec)
        threads = int(spec.config.parameters.get("nthread", min(4, os.cpu_count() or 1)))
        return await run_sync(_load, path, threads)

    def _model_file(self, spec: ModelSpec) -> Path:
        return find_model_file(spec, SUFFIXES)


def _load(path: Path, threads: int) -> XGBoostModel:
    with IMPORT_LOCK:
        import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(path))
    booster.set_param({"nthread": threads})
    return XGBoostModel(booster, path.stat().st_size, threads)


class XGBoostModel(TabularModel):
    """A loaded Booster."""

    def __init__(self, booster: Any, host_bytes: int, threads: int = 1) -> None:
        booster = _best_rounds(booster)
        self.booster = booster
        self._dense = dense_predictor(booster, threads)
        learner = json.loads(booster.save_config())["learner"]
        self.objective: str = learner["objective"]["name"]
        sklearn_meta = _sklearn_attributes(booster)
        classes = sklearn_meta.get("classes_")
        n_classes = int(learner["learner_model_param"].get("num_class", "0")) or 2
        self.classes = np.asarray(classes) if classes is not None else np.arange(n_classes)
        self.is_classifier = self.objective.startswith(("binary:", "multi:"))
        # more than one target: a multi-label classifier or a multi-output regressor, a column each
        targets = int(learner["learner_model_param"].get("num_target", "1") or 1)
        self.multi_label = targets > 1 and self.objective == "binary:logistic"
        per_row = (-1, targets) if targets > 1 else (-1,)
        outputs = [TensorSpec("predict", "INT64" if self.is_classifier else "FP32", per_row)]
        if self.objective in _PROBA_OBJECTIVES:
            proba_shape = per_row if self.multi_label else (-1, len(self.classes))
            outputs.append(TensorSpec("predict_proba", "FP32", proba_shape))
        super().__init__(
            platform="xgboost",
            n_features=booster.num_features(),
            outputs=outputs,
            input_dtype=np.float32,
            feature_names=booster.feature_names,
            host_bytes=host_bytes,
            inline_allowed=True,  # native tree traversal, bounded by the input size
            allow_nan=True,  # NaN is XGBoost's missing value
        )

    def predict(self, matrix: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self._dense is not None:
            raw = self._dense(matrix)
        else:
            raw = self.booster.inplace_predict(matrix, validate_features=False)
        if not self.is_classifier:
            return {"predict": raw}
        if self.multi_label:  # a probability per label, each label on at 0.5 (as XGBClassifier does)
            labels = {"predict": (raw > 0.5).astype(np.int64), "predict_proba": raw.astype(np.float32, copy=False)}
            return {name: labels[name] for name in outputs}
        if self.objective == "binary:logistic":
            proba = np.column_stack([1.0 - raw, raw])
        elif self.objective == "multi:softprob":
            proba = raw
        else:  # class indices (multi:softmax), 0/1 (binary:hinge) or margins (binary:logitraw)
            labels = raw > 0 if self.objective == "binary:logitraw" else raw
            return {"predict": self.classes.take(labels.astype(np.int64)).astype(np.int64, copy=False)}
        result = {}
        if "predict" in outputs:
            result["predict"] = self.classes.take(np.argmax(proba, axis=1)).astype(np.int64, copy=False)
        if "predict_proba" in outputs:
            result["predict_proba"] = proba.astype(np.float32, copy=False)
        return result

    async def unload(self) -> None:
        if self._dense is not None:
            self._dense.close()
            self._dense = None
        self.booster = None
        await super().unload()


def _best_rounds(booster: Any) -> Any:
    """The booster cut to its best iteration when training stopped early: the rounds
    ``XGBClassifier.predict`` uses (the later ones made the model worse on its evaluation set)."""
    best = booster.attr("best_iteration")
    if best is None or not best.isdigit() or int(best) + 1 >= booster.num_boosted_rounds():
        return booster
    return booster[: int(best) + 1]


def _sklearn_attributes(booster: Any) -> dict[str, Any]:
    """What ``XGBClassifier.save_model`` stored about the estimator (e.g. ``classes_``)."""
    raw = booster.attr("scikit_learn")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}
