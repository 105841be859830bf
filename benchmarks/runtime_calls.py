#!/usr/bin/env python3
"""Cost of one model call: the framework's own call against mmserver's runtime, in one process.

Trains the benchmark models (iris LogisticRegression; RandomForest and XGBoost with 100 trees on
20 features, as batching.py does), loads them through mmserver's runtimes, and times one call at
batch sizes 1, 8 and 64:

- ``own``: what the runtime would call without its shortcuts: ``predict`` and ``predict_proba``
  for the LogisticRegression, ``predict_proba`` for the forest (its predict is the argmax),
  ``Booster.inplace_predict`` for XGBoost;
- ``runtime``: ``LoadedModel.predict`` computing every output the model offers (the linear,
  forest and dense paths of the scikit-learn and XGBoost runtimes).

    python benchmarks/runtime_calls.py [--seconds 1.0]

Prints µs per call and the ratio own / runtime for each model and batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from batching import build_repo

BATCH_SIZES = (1, 8, 64)


def per_call_us(call: Callable[[], object], seconds: float) -> float:
    """Mean µs of ``call`` over ``seconds`` (after one warm-up call)."""
    call()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per point")
    args = parser.parse_args()

    import numpy as np
    import xgboost as xgb
    from mmserver_sklearn import SKLearnModel
    from mmserver_xgboost import _load as load_xgboost

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        models = build_repo(root)
        rows = np.load(root.parent / "x20.npy")
        print("| model | rows | own µs/call | runtime µs/call | own / runtime |")
        print("|---|---|---|---|---|")
        for name, (model, width) in models.items():
            if isinstance(model, xgb.XGBClassifier):
                booster = model.get_booster()
                loaded = load_xgboost(root / f"{name}-on" / "1" / "model.json", threads=1)
                booster.set_param({"nthread": 1})
                own = lambda batch: booster.inplace_predict(batch)  # noqa: E731
            else:
                loaded = SKLearnModel(model, host_bytes=0)
                own = ((lambda batch: model.predict_proba(batch)) if name.startswith("rf")  # noqa: E731
                       else (lambda batch: (model.predict(batch), model.predict_proba(batch))))
            outputs = [spec.name for spec in loaded.metadata().outputs]
            for size in BATCH_SIZES:
                batch = rows[:size, :width].astype(loaded.input_dtype)
                own_us = per_call_us(lambda: own(batch), args.seconds)  # noqa: B023
                ours_us = per_call_us(lambda: loaded.predict(batch, outputs), args.seconds)  # noqa: B023
                print(f"| {name} | {size} | {own_us:.1f} | {ours_us:.1f} | {own_us / ours_us:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
