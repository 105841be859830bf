"""Shared by the hardening tests (fuzz, faults, security, schemathesis): a small repository of
real models trained here, raw HTTP over a socket, and the server's resident memory.

Raw sockets, not an HTTP client: the fuzz must send bytes no client library would (lying
lengths, broken chunking, invalid UTF-8, a body that never comes) and read whatever comes back.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

TESTS = Path(__file__).resolve().parent

#: rows sent to the small repository's models, and their features
IRIS_ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]])


@dataclass
class SmallRepo:
    """A repository of tiny real models and what they predict in-process for ``IRIS_ROWS``."""

    path: Path
    expected: dict[str, list[int]] = field(default_factory=dict)


def build_small_repo(root: Path, *, spare: bool = True) -> SmallRepo:
    """``iris`` (scikit-learn LogisticRegression, model.yaml), ``xgb`` (XGBoost booster, detected
    from its file) and, with ``spare``, ``spare`` (another LogisticRegression, for tests that
    load and unload it without touching the others)."""
    import joblib
    import xgboost as xgb
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    repo = SmallRepo(root)
    logistic = LogisticRegression(max_iter=500).fit(x, y)
    (root / "iris" / "1").mkdir(parents=True)
    (root / "iris" / "model.yaml").write_text("runtime: sklearn\n")
    joblib.dump(logistic, root / "iris" / "1" / "model.joblib")
    repo.expected["iris"] = logistic.predict(IRIS_ROWS).tolist()

    booster = xgb.XGBClassifier(n_estimators=8, max_depth=3, n_jobs=1, random_state=0).fit(x, y)
    (root / "xgb").mkdir()
    booster.save_model(root / "xgb" / "model.json")
    repo.expected["xgb"] = booster.predict(IRIS_ROWS).tolist()

    if spare:
        other = LogisticRegression(C=0.1, max_iter=500).fit(x, y)
        (root / "spare").mkdir()
        joblib.dump(other, root / "spare" / "model.joblib")
        repo.expected["spare"] = other.predict(IRIS_ROWS).tolist()
    return repo


def infer_body(rows: np.ndarray = IRIS_ROWS, datatype: str = "FP64", name: str = "input-0") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(rows.shape),
                        "data": np.asarray(rows).ravel().tolist()}],
            "outputs": [{"name": "predict"}]}


def predicted(doc: dict) -> list:
    """The ``predict`` output's data of a V2 response."""
    return next(o["data"] for o in doc["outputs"] if o["name"] == "predict")


# ----------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The ``error`` of a JSON error body (fails loudly on anything else)."""
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.headers, self.body[:300])
        doc = self.json()
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
        return doc["error"]


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def connect(url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=timeout)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=address(url)[0])
    return sock


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_length: bool = True) -> bytes:
    """One HTTP/1.1 request as bytes. ``path`` goes on the wire exactly as given."""
    lines = [f"{method} {path} HTTP/1.1".encode("latin-1")]
    if not any(k.lower() == "host" for k in headers or {}):
        lines.append(b"Host: fuzz")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}".encode("latin-1"))
    if content_length and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def read_response(sock: socket.socket) -> RawResponse:
    """Read one response: status line, headers, then a Content-Length or chunked body (or up to EOF)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the connection closed before a full response head: {buffer[:200]!r}")
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = status_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:length]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(sock, rest)
    else:
        while chunk := sock.recv(65536):
            rest += chunk
        body = rest
    return RawResponse(int(status), reason[0] if reason else "", headers, body)


def _read_chunked(sock: socket.socket, data: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in data:
            data += sock.recv(65536)
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(data) < size + 2:
            data += sock.recv(65536)
        body += data[:size]
        data = data[size + 2:]
        if size == 0:
            return body


def send(url: str, raw: bytes, timeout: float = 10.0, context: ssl.SSLContext | None = None) -> RawResponse:
    """Send ``raw`` on a fresh connection and read one response."""
    with connect(url, timeout, context) as sock:
        sock.sendall(raw)
        return read_response(sock)


def http(url: str, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> RawResponse:
    """A well-formed request (a dict body is sent as JSON)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    return send(url, request_bytes(method, path, body or b"", headers), timeout)


# ----------------------------------------------------------------------------- the server process


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
