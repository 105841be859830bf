"""Dense predictions through XGBoost's C API with one proxy DMatrix kept per model.

``Booster.inplace_predict`` builds a new proxy DMatrix on every call, and each new one reads the
cgroup CPU quota files (five file operations and two system calls): with the Python wrapper's
own work that is ~170 µs per call, where one row through 100 trees needs a few µs. Calling the
same C function, ``XGBoosterPredictFromDense``, with a proxy made once per model costs ~50 µs.

The thread count follows the batch: XGBoost predicts in blocks of 64 rows, so a batch of a few
blocks gains nothing from more threads, whose OpenMP workers still wake and spin (twice the CPU
for the same time on a small batch); large batches get the configured ``nthread``.

As for the scikit-learn shortcuts, the path is switched on only after it reproduced
``inplace_predict`` bit for bit on probe rows at load time; anything else (an XGBoost release
without these functions, an error) keeps ``inplace_predict``.
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

import numpy as np

#: rows per thread before a batch is spread over more threads (XGBoost's block is 64 rows)
ROWS_PER_THREAD = 128
_PROBE_ROWS = 300  # several blocks, so the multi-threaded setting is checked too
_ARGS = json.dumps({
    "type": 0,  # plain predictions, as inplace_predict gives by default
    "training": False,
    "iteration_begin": 0,
    "iteration_end": 0,  # every tree
    "strict_shape": False,
    "missing": float("nan"),
    "cache_id": 0,
}).encode()


class DensePredictor:
    """``booster.inplace_predict(matrix)`` for float32 matrices, without a DMatrix per call."""

    def __init__(self, booster: Any, lib: ctypes.CDLL, threads: int) -> None:
        self._booster = booster  # holds the handle alive
        self._lib = lib
        self._threads = threads
        self._current_threads = threads
        self._proxy = ctypes.c_void_p()
        self._check(lib.XGProxyDMatrixCreate(ctypes.byref(self._proxy)))
        self._lock = threading.Lock()  # the proxy and XGBoost's output buffer serve one call at a time

    def __call__(self, matrix: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        interface = b'{"data":[%d,true],"shape":[%d,%d],"typestr":"<f4","version":3}' % (
            rows.ctypes.data, rows.shape[0], rows.shape[1])
        shape = ctypes.POINTER(ctypes.c_uint64)()
        dims = ctypes.c_uint64()
        values = ctypes.POINTER(ctypes.c_float)()
        with self._lock:
            self._use_threads(max(1, min(self._threads, rows.shape[0] // ROWS_PER_THREAD)))
            self._check(self._lib.XGBoosterPredictFromDense(
                self._booster.handle, interface, _ARGS, self._proxy,
                ctypes.byref(shape), ctypes.byref(dims), ctypes.byref(values)))
            out = np.empty(tuple(shape[i] for i in range(dims.value)), dtype=np.float32)
            ctypes.memmove(out.ctypes.data, values, out.nbytes)  # XGBoost reuses its buffer
        return out

    def close(self) -> None:
        """Free the proxy DMatrix."""
        if self._proxy:
            self._lib.XGDMatrixFree(self._proxy)
            self._proxy = ctypes.c_void_p()

    def _use_threads(self, threads: int) -> None:
        if threads != self._current_threads:
            self._booster.set_param({"nthread": threads})
            self._current_threads = threads

    def _check(self, code: int) -> None:
        if code != 0:
            from xgboost.core import XGBoostError

            raise XGBoostError(self._lib.XGBGetLastError().decode(errors="replace"))


def dense_predictor(booster: Any, threads: int) -> DensePredictor | None:
    """The C API path for ``booster``, or None where it is unavailable or does not match
    ``inplace_predict`` exactly."""
    try:
        from xgboost.core import _LIB as lib  # the library the Python package loaded (errors as bytes)

        predictor = DensePredictor(booster, lib, threads)
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError):
        return None
    probe = _probe_rows(booster.num_features())
    try:
        for rows in (probe[:1], probe[:64], probe):  # one thread, then several
            ours = predictor(rows)
            own = booster.inplace_predict(rows, validate_features=False)
            if ours.dtype != own.dtype or not np.array_equal(ours, own, equal_nan=True):
                raise ValueError("the C API path answers differently")
    except Exception:  # whatever went wrong, inplace_predict stays
        predictor.close()
        booster.set_param({"nthread": threads})
        return None
    return predictor


def _probe_rows(n_features: int) -> np.ndarray:
    """Rows of every sign and magnitude, with missing values."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(_PROBE_ROWS, n_features)) * rng.choice([0.1, 1.0, 100.0], size=(_PROBE_ROWS, 1))
    rows[::7, ::3] = np.nan
    return rows.astype(np.float32)
