"""End-to-end fixtures: a model repository of real, freshly trained models and the real server.

``model_repo`` trains every model in-process on generated data (nothing is downloaded) and keeps
the in-process predictions for fixed rows, so the tests can compare what the server answers over
HTTP with what the framework itself computes. ``running_server`` starts ``python -m mmserver
serve`` as a subprocess on a free port; ``server`` is one such server shared by the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: every model the shared server must serve, with the version served by default
READY_MODELS = {"iris": "2", "rf-20": "1", "xgb-20": "v1", "xgb-reg": "1", "strings": "1"}
#: models whose folder is in the repository but which cannot load
BROKEN_MODELS = ("broken", "nort")

STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- the repository


@dataclass
class Reference:
    """Rows and what the model computed for them in-process."""

    x: np.ndarray
    predict: np.ndarray
    proba: np.ndarray | None = None


@dataclass
class ModelRepo:
    """The repository folder and the in-process references, by model (``iris@1``: a version)."""

    path: Path
    refs: dict[str, Reference] = field(default_factory=dict)
    #: the models that load, with the version each serves by default
    default_versions: dict[str, str] = field(default_factory=lambda: dict(READY_MODELS))
    #: the model folders that cannot load
    broken: tuple[str, ...] = BROKEN_MODELS

    def copy_to(self, target: Path) -> Path:
        """A private copy of the repository (for servers whose state a test changes)."""
        shutil.copytree(self.path, target)
        return target


def _dump_joblib(estimator: Any, path: Path) -> None:
    import joblib

    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, path)


def build_model_repo(root: Path) -> ModelRepo:
    """Train every model and write the repository under ``root``."""
    import xgboost as xgb
    from sklearn.datasets import load_iris, make_classification, make_regression
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    repo = ModelRepo(root)
    root.mkdir(parents=True, exist_ok=True)

    # iris: our model.yaml, two versions; version 2 is trained on shifted labels so that every
    # row's predicted class differs between the versions.
    x, y = load_iris(return_X_y=True)
    iris_v1 = LogisticRegression(max_iter=1000).fit(x, y)
    iris_v2 = LogisticRegression(C=0.05, max_iter=1000).fit(x, (y + 1) % 3)
    (root / "iris").mkdir()
    (root / "iris" / "model.yaml").write_text("runtime: sklearn\nversions: all\n")
    _dump_joblib(iris_v1, root / "iris" / "1" / "model.joblib")
    _dump_joblib(iris_v2, root / "iris" / "2" / "model.joblib")
    rows = x[[0, 50, 100, 25, 75, 125]]
    repo.refs["iris@1"] = Reference(rows, iris_v1.predict(rows), iris_v1.predict_proba(rows))
    repo.refs["iris@2"] = Reference(rows, iris_v2.predict(rows), iris_v2.predict_proba(rows))
    int_rows = np.array([[5, 3, 1, 0], [6, 3, 4, 1], [7, 3, 6, 2]], dtype=np.int64)
    repo.refs["iris@2:int"] = Reference(int_rows, iris_v2.predict(int_rows), iris_v2.predict_proba(int_rows))
    assert (repo.refs["iris@1"].predict != repo.refs["iris@2"].predict).all()

    # rf-20 and xgb-20: 20 features, binary classification; rf-20 has no config at all.
    x20, y20 = make_classification(
        n_samples=400, n_features=20, n_informative=8, n_redundant=4, random_state=7
    )
    # four rows of each class, interleaved, rounded so that JSON carries them exactly
    picks = np.stack([np.flatnonzero(y20 == 0)[:4], np.flatnonzero(y20 == 1)[:4]], axis=1).reshape(-1)
    rows20 = np.round(x20[picks], 6)
    forest = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0, n_jobs=1).fit(x20, y20)
    _dump_joblib(forest, root / "rf-20" / "model.joblib")
    repo.refs["rf-20"] = Reference(rows20, forest.predict(rows20), forest.predict_proba(rows20))

    booster = xgb.XGBClassifier(n_estimators=100, max_depth=4, random_state=0, n_jobs=1).fit(x20, y20)
    (root / "xgb-20").mkdir()
    booster.save_model(root / "xgb-20" / "model.json")
    (root / "xgb-20" / "model-settings.json").write_text(json.dumps({
        "name": "xgb-20",
        "implementation": "mlserver_xgboost.XGBoostModel",
        "parameters": {"uri": "./model.json", "version": "v1"},
    }))
    repo.refs["xgb-20"] = Reference(rows20, booster.predict(rows20), booster.predict_proba(rows20))

    # xgb-reg: a regressor in UBJSON, detected by its file.
    xr, yr = make_regression(n_samples=300, n_features=8, noise=0.5, random_state=3)
    regressor = xgb.XGBRegressor(n_estimators=50, max_depth=4, random_state=0, n_jobs=1).fit(xr, yr)
    (root / "xgb-reg").mkdir()
    regressor.save_model(root / "xgb-reg" / "model.ubj")
    rows_r = np.round(xr[:5], 6)
    repo.refs["xgb-reg"] = Reference(rows_r, regressor.predict(rows_r))

    # strings: a pipeline whose labels are strings (predict is a BYTES output).
    xs, ys = make_classification(n_samples=200, n_features=5, n_informative=3, random_state=11)
    labels = np.where(ys == 1, "dog", "cat")
    pipeline = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(xs, labels)
    _dump_joblib(pipeline, root / "strings" / "model.joblib")
    picks = np.stack([np.flatnonzero(ys == 0)[:3], np.flatnonzero(ys == 1)[:3]], axis=1).reshape(-1)
    rows_s = np.round(xs[picks], 6)
    repo.refs["strings"] = Reference(rows_s, pipeline.predict(rows_s), pipeline.predict_proba(rows_s))
    assert set(repo.refs["strings"].predict) == {"cat", "dog"}

    # broken: garbage where a pickle should be; nort: a runtime that does not exist.
    (root / "broken").mkdir()
    (root / "broken" / "model.joblib").write_bytes(b"this is not a pickle \x00\x01\x02" * 8)
    (root / "nort").mkdir()
    (root / "nort" / "model.yaml").write_text("runtime: nosuch\n")
    shutil.copy(root / "iris" / "1" / "model.joblib", root / "nort" / "model.joblib")
    return repo


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepo:
    return build_model_repo(tmp_path_factory.mktemp("e2e") / "model-repo")


# ----------------------------------------------------------------------------- the server


@dataclass
class RunningServer:
    """A server subprocess: its base URL, its process and the file its output goes to."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __str__(self) -> str:
        return self.url


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    repo: Path, log_path: Path, *extra_args: str, timeout: float = STARTUP_TIMEOUT_S,
    env: dict[str, str] | None = None, scheme: str = "http", verify: Any = True,
    strict_readiness: bool = False, until: str = "ready",
) -> Iterator[RunningServer]:
    """Start ``python -m mmserver serve repo``, wait until it is ready, stop it with SIGTERM.
    ``env`` adds environment variables; ``scheme="https"`` (with ``verify``, an httpx
    ``verify`` argument such as an ``ssl.SSLContext``) for a server started with TLS flags.
    The test repositories hold models that fail on purpose, so servers report ready with them
    failed unless ``strict_readiness``; ``until="live"`` waits only for ``/v2/health/live``."""
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mmserver", "serve", str(repo),
               "--host", "127.0.0.1", "--port", str(port), *extra_args]
    if not strict_readiness:
        command.append("--no-strict-readiness")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    server = RunningServer(url, process, log_path)
    try:
        _wait_ready(server, timeout, verify, until)
        yield server
    finally:
        _stop(server)


def _wait_ready(server: RunningServer, timeout: float, verify: Any = True, until: str = "ready") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode} while starting:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/v2/health/{until}", timeout=2.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not {until} within {timeout:.0f} s:\n{server.log()}")
        time.sleep(0.1)


def _stop(server: RunningServer) -> None:
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the server ignored SIGTERM for {SHUTDOWN_TIMEOUT_S:.0f} s:\n{server.log()}")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -SIGTERM is a clean exit
    assert process.returncode in (0, -signal.SIGTERM), (
        f"the server exited with {process.returncode}:\n{server.log()}"
    )
    assert "Application shutdown complete" in server.log(), f"no graceful shutdown:\n{server.log()}"


@pytest.fixture(scope="session")
def server(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server on ``model_repo`` for the whole session; tests must not change its state."""
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    with running_server(model_repo.path, log_path) as running:
        yield running


@pytest.fixture(scope="session")
def start_server() -> Callable[..., AbstractContextManager[RunningServer]]:
    """``running_server`` itself, for tests that need a server of their own (on a copy of the
    repository when they change its state): ``with start_server(repo, log_path, *args) as s:``."""
    return running_server
