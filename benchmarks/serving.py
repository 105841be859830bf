"""Start and stop an mmserver process for a benchmark (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_model(repo: Path, source: Path | None, build: Callable[[Path], Path]) -> Path:
    """The benchmarked model's folder, ``repo/bench``: a copy of ``source``, or without one the
    tiny model ``build`` makes (a builder of the tests' ``tiny_hf``, see ``tiny_builder``)."""
    folder = repo / "bench"
    if source is None:
        build(folder)
    else:
        shutil.copytree(source, folder)
    return folder


def tiny_builder(name: str, **options: object) -> Callable[[Path], Path]:
    """``tests/tiny_hf.py``'s ``name`` (e.g. ``build_embedder``) with ``options``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_hf

    build = getattr(tiny_hf, name)
    return lambda folder: build(folder, **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    repo: Path,
    log: Path,
    extra: Sequence[str] = (),
    *,
    ready_path: str = "/v2/health/ready",
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Serve ``repo`` on a free port (its output in ``log``) and wait until ``ready_path``
    answers 200; returns the process and its base URL. The server runs in a session of its own,
    so a ``timeout`` that ends the benchmark does not reach it: SIGTERM then exits the benchmark
    through its ``finally`` blocks (which stop the server) instead of leaving it running."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mmserver", "serve", str(repo), "--port", str(port), *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited while starting:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + ready_path, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:  # not listening yet, or 503 while models load
            pass
        time.sleep(0.1)
    stop_server(process)
    raise RuntimeError(f"the server was not ready within {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains and stops its engines), then wait; kill after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
