"""Models and clients that misbehave fail only their own requests.

The misbehaving models are real pickles of ``faulty_estimators`` classes, loaded by the sklearn
runtime of a real server started with the tests folder on its PYTHONPATH: one whose predict
raises, one that hangs past its ``timeout_s`` (and one past the server's ``--infer-timeout-s``),
one that returns a row too many, and one whose unpickling hangs past ``--load-timeout-s``. Every
fault must stay inside its own requests: the model keeps serving, and the other models answer,
correctly and promptly, even while a fault is in progress.

Rude clients: one that disconnects mid-request, one that trickles its body past
``--request-read-timeout-s`` (408, while the server keeps answering others), and idle or
slow-header connections against a small ``--max-connections`` (the excess gets 503, except the
server's health probes, and normal clients are served again once the idle ones close or time out
after ``--keep-alive-s``).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest

import faulty_estimators as faulty
from hardening_support import (
    IRIS_ROWS,
    TESTS,
    build_small_repo,
    connect,
    infer_body,
    predicted,
    read_response,
    request_bytes,
    send,
    wait_until,
)

HANG_S = 3.0
MODEL_TIMEOUT_S = 1.0
SERVER_INFER_TIMEOUT_S = 1.5
# the well-behaved models' first load imports scikit-learn and SciPy (about 2 s on a 2-core
# machine), which must fit in the load timeout; the hanging load sleeps well past it
LOAD_TIMEOUT_S = 4.0
LOAD_SLEEP_S = 7.0
READ_TIMEOUT_S = 1.5

NORMAL = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.5, 0.5]])
EXPECTED_NORMAL = faulty.expected_labels(NORMAL)


def rows_with(value: float) -> np.ndarray:
    rows = NORMAL.copy()
    rows[0, 2] = value
    return rows


def write_faulty(repo: Path, name: str, estimator, yaml: str = "") -> None:
    (repo / name).mkdir()
    (repo / name / "model.yaml").write_text("runtime: sklearn\n" + yaml)
    joblib.dump(estimator, repo / name / "model.joblib")


def fitted(cls=faulty.FaultyClassifier, **kwargs):
    return cls(**kwargs).fit(np.zeros((2, 4)), [0, 1])


def server_env() -> dict[str, str]:
    return {"PYTHONPATH": str(TESTS)}


def post(url: str, model: str, rows: np.ndarray = IRIS_ROWS, timeout: float = 20.0) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=infer_body(rows), timeout=timeout)


def check_others(url: str, expected: dict[str, list[int]], budget_s: float = 0.5) -> None:
    """The well-behaved models answer correctly, each within ``budget_s``."""
    for name in ("iris", "xgb"):
        started = time.monotonic()
        response = post(url, name)
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert predicted(response.json()) == expected[name]
        assert took < budget_s, f"{name} took {took:.2f} s while a fault was in progress"


# ----------------------------------------------------------------------------- models that misbehave


@pytest.fixture(scope="module")
def faults_server(tmp_path_factory, start_server) -> Iterator:
    base = tmp_path_factory.mktemp("faults")
    repo = build_small_repo(base / "repo", spare=False)
    write_faulty(repo.path, "raiser", fitted())
    write_faulty(repo.path, "sleeper", fitted(hang_s=HANG_S), f"timeout_s: {MODEL_TIMEOUT_S}\n")
    write_faulty(repo.path, "sleeper-default", fitted(hang_s=HANG_S))
    write_faulty(repo.path, "wronglen", fitted())
    with start_server(repo.path, base / "server.log", "--infer-timeout-s", str(SERVER_INFER_TIMEOUT_S),
                      "--request-read-timeout-s", str(READ_TIMEOUT_S), env=server_env()) as server:
        server.expected = repo.expected
        yield server


def test_a_model_that_raises_fails_only_the_request_that_made_it_raise(faults_server):
    url = faults_server.url
    response = post(url, "raiser", rows_with(faulty.RAISE))
    assert response.status_code == 500
    error = response.json()["error"]
    assert faulty.RAISE_MESSAGE in error and "ValueError" in error and "raiser" in error, error
    # the model keeps serving, the others are untouched
    response = post(url, "raiser", NORMAL)
    assert response.status_code == 200 and predicted(response.json()) == EXPECTED_NORMAL
    check_others(url, faults_server.expected)
    # batch mates of the failing request are rerun alone and succeed
    bodies = [rows_with(faulty.RAISE) if i % 4 == 0 else NORMAL for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda rows: post(url, "raiser", rows), bodies))
    for rows, response in zip(bodies, responses):
        if (rows == faulty.RAISE).any():
            assert response.status_code == 500 and faulty.RAISE_MESSAGE in response.json()["error"]
        else:
            assert response.status_code == 200, response.text
            assert predicted(response.json()) == EXPECTED_NORMAL


@pytest.mark.parametrize("model, deadline_s", [("sleeper", MODEL_TIMEOUT_S),
                                               ("sleeper-default", SERVER_INFER_TIMEOUT_S)])
def test_a_model_that_hangs_gets_504_at_its_deadline_and_the_others_go_on(faults_server, model, deadline_s):
    url = faults_server.url
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        hanging = pool.submit(post, url, model, rows_with(faulty.HANG))
        time.sleep(0.2)
        while not hanging.done():  # while it hangs, the others answer at once, correctly
            check_others(url, faults_server.expected)
            time.sleep(0.05)
        response = hanging.result()
        took = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert model in response.json()["error"] and "deadline" in response.json()["error"]
    assert deadline_s - 0.1 < took < deadline_s + 1.0, took
    # once its call returns, the model serves again
    wait_until(lambda: post(url, model, NORMAL).status_code == 200, timeout=HANG_S + 5, interval=0.2,
               what=f"{model} to serve again")
    assert predicted(post(url, model, NORMAL).json()) == EXPECTED_NORMAL


def test_a_client_that_leaves_while_its_model_hangs_harms_nobody(faults_server):
    url = faults_server.url
    with connect(url) as sock:
        sock.sendall(request_bytes("POST", "/v2/models/sleeper/infer",
                                   httpx.Request("POST", "/", json=infer_body(rows_with(faulty.HANG))).read(),
                                   {"Content-Type": "application/json"}))
    check_others(url, faults_server.expected)
    wait_until(lambda: post(url, "sleeper", NORMAL).status_code == 200, timeout=HANG_S + 5, interval=0.2,
               what="sleeper to serve again")


def test_a_model_that_returns_the_wrong_number_of_rows_fails_with_500_naming_it(faults_server):
    url = faults_server.url
    response = post(url, "wronglen", rows_with(faulty.WRONG_LENGTH))
    assert response.status_code == 500
    error = response.json()["error"]
    assert "returned 3 rows for a batch of 2" in error, error
    response = post(url, "wronglen", NORMAL)
    assert response.status_code == 200 and predicted(response.json()) == EXPECTED_NORMAL
    check_others(url, faults_server.expected)


def test_a_client_that_disconnects_mid_request_harms_nobody(faults_server):
    url = faults_server.url
    body = httpx.Request("POST", "/", json=infer_body()).read()
    for cut in (0, 10, len(body) // 2, len(body) - 1):
        with connect(url) as sock:  # the headers promise the whole body; part of it comes
            sock.sendall(request_bytes("POST", "/v2/models/iris/infer", body, {"Content-Type": "application/json"})
                         [: -len(body) + cut or None])
    with connect(url) as sock:  # half a request line
        sock.sendall(b"POST /v2/models/ir")
    with connect(url) as sock:  # half the headers
        sock.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nContent-Len")
    check_others(url, faults_server.expected)
    assert "Traceback" not in faults_server.log(), faults_server.log()[-3000:]


def test_a_body_trickling_in_gets_408_and_the_server_answers_others_meanwhile(faults_server):
    url = faults_server.url
    body = httpx.Request("POST", "/", json=infer_body()).read()
    result: dict = {}

    def trickle() -> None:
        with connect(url, timeout=10) as sock:
            sock.sendall(request_bytes("POST", "/v2/models/iris/infer", body,
                                       {"Content-Type": "application/json"})[: -len(body)])
            started = time.monotonic()
            try:
                for byte in body:  # one byte every 0.25 s, until the server answers
                    sock.sendall(bytes([byte]))
                    if select.select([sock], [], [], 0.25)[0] or time.monotonic() - started > 5:
                        break
            except OSError:
                pass  # the server answered and closed
            result["response"] = read_response(sock)
            result["took"] = time.monotonic() - started

    thread = threading.Thread(target=trickle)
    thread.start()
    while thread.is_alive():
        check_others(url, faults_server.expected)
        time.sleep(0.05)
    thread.join()
    response = result["response"]
    assert response.status == 408, response.body
    assert f"within {READ_TIMEOUT_S:g} s" in response.error()
    assert READ_TIMEOUT_S - 0.1 < result["took"] < READ_TIMEOUT_S + 1.5


def test_a_request_answered_before_its_body_arrived_gets_no_second_response(faults_server):
    """A 404, a 413 or a 200 sent before the body the head announced: at the read deadline the
    connection is just closed, no 408 after the answer. A keep-alive connection whose next head
    or body does not arrive in time still gets its 408. (Here keep_alive_s, 5, outlasts the read
    deadline, so the keep-alive timer does not close the connection first.)"""
    url = faults_server.url
    expect = {"Content-Length": "500", "Expect": "100-continue"}
    heads = {  # no body follows any of them
        404: request_bytes("POST", "/v2/models/nope/infer", headers=expect),
        413: request_bytes("POST", "/v2/models/iris/infer", headers={"Content-Length": str(2**40)}),
        200: request_bytes("GET", "/v2/health/live", headers=expect),
    }
    answered = [connect(url) for _ in heads]
    late = [connect(url) for _ in range(2)]  # keep-alive connections, then half a head or a body
    try:
        for sock, (status, head) in zip(answered, heads.items()):
            sock.sendall(head)
            assert read_response(sock).status == status
        for sock, rest in zip(late, (b"GET /v2/health/live HTTP/1.1\r\nHo",
                                     request_bytes("POST", "/v2/models/iris/infer", headers={"Content-Length": "9"}))):
            sock.sendall(request_bytes("GET", "/v2/health/live"))
            assert read_response(sock).status == 200
            sock.sendall(rest)
        time.sleep(READ_TIMEOUT_S + 0.5)
        for sock in answered:
            sock.settimeout(1.0)
            assert sock.recv(65536) == b""  # closed, with nothing more sent
        for sock, part in zip(late, ("head", "body")):
            response = read_response(sock)
            assert response.status == 408 and f"request {part} did not arrive" in response.error()
    finally:
        for sock in answered + late:
            sock.close()


def test_the_faults_server_ends_healthy(faults_server):
    assert httpx.get(f"{faults_server.url}/v2/health/ready").status_code == 200
    check_others(faults_server.url, faults_server.expected)
    for model in ("raiser", "wronglen", "sleeper", "sleeper-default"):
        wait_until(lambda: post(faults_server.url, model, NORMAL).status_code == 200, timeout=HANG_S + 5,
                   interval=0.2, what=f"{model} to serve")


# ----------------------------------------------------------------------------- a load that hangs


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, start_server) -> Iterator:
    base = tmp_path_factory.mktemp("load-hang")
    repo = build_small_repo(base / "repo")
    write_faulty(repo.path, "slowload", fitted(faulty.SlowToUnpickle, load_sleep_s=LOAD_SLEEP_S), "load: lazy\n")
    with start_server(repo.path, base / "server.log", "--load-timeout-s", str(LOAD_TIMEOUT_S),
                      "--model-control-mode", "explicit", env=server_env()) as server:
        server.expected = repo.expected
        yield server


def index(url: str) -> dict[str, dict]:
    return {row["name"]: row for row in httpx.post(f"{url}/v2/repository/index").json()}


def test_a_load_that_hangs_is_cut_at_the_load_timeout(load_server):
    url = load_server.url
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(post, url, "slowload", NORMAL)
        time.sleep(0.2)
        while not waiting.done():  # the loaded models serve while the load hangs
            check_others(url, load_server.expected)
            time.sleep(0.05)
        response = waiting.result()
        took = time.monotonic() - started
    assert response.status_code == 503, response.text
    reason = f"loading did not finish within {LOAD_TIMEOUT_S:g} s (load_timeout_s)"
    assert reason in response.json()["error"]
    assert LOAD_TIMEOUT_S - 0.1 < took < LOAD_TIMEOUT_S + 1.5, took
    row = index(url)["slowload"]
    assert row["state"] == "UNAVAILABLE" and reason in row["reason"], row
    assert httpx.get(f"{url}/v2/models/slowload/ready").status_code == 503
    check_others(url, load_server.expected)


def test_other_models_load_while_a_hung_load_runs_on(load_server):
    url = load_server.url
    assert httpx.post(f"{url}/v2/repository/models/spare/unload").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        hung = pool.submit(post, url, "slowload", NORMAL)  # starts another hanging unpickle
        time.sleep(0.3)
        response = httpx.post(f"{url}/v2/repository/models/spare/load", timeout=20)
        hung.result()
    # make sure the next test starts with the lock free again
    time.sleep(LOAD_SLEEP_S)
    assert response.status_code == 200, response.text


def test_the_load_server_ends_healthy(load_server):
    url = load_server.url
    wait_until(lambda: httpx.post(f"{url}/v2/repository/models/spare/load", timeout=20).status_code == 200,
               timeout=3 * LOAD_SLEEP_S, interval=0.5, what="spare to load")
    assert predicted(post(url, "spare").json()) == load_server.expected["spare"]
    check_others(url, load_server.expected)


# ----------------------------------------------------------------------------- idle connections

MAX_CONNECTIONS = 6
KEEP_ALIVE_S = 1.0


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory, start_server) -> Iterator:
    base = tmp_path_factory.mktemp("capped")
    repo = build_small_repo(base / "repo", spare=False)
    with start_server(repo.path, base / "server.log", "--max-connections", str(MAX_CONNECTIONS),
                      "--keep-alive-s", str(KEEP_ALIVE_S), "--request-read-timeout-s", str(READ_TIMEOUT_S)) as server:
        server.expected = repo.expected
        yield server


def one_request(url: str) -> int:
    """A normal client's request on a fresh connection: its status."""
    raw = request_bytes("POST", "/v2/models/iris/infer", httpx.Request("POST", "/", json=infer_body()).read(),
                        {"Content-Type": "application/json", "Connection": "close"})
    return send(url, raw, timeout=5).status


@contextmanager
def idle_connections(url: str, count: int, first_request: bool) -> Iterator[list[socket.socket]]:
    """``count`` open connections that send nothing more (after one request with
    ``first_request``: keep-alive connections idling), closed when the block ends."""
    sockets = []
    try:
        for _ in range(count):
            sock = connect(url, timeout=10)
            sockets.append(sock)
            if first_request:
                sock.sendall(request_bytes("GET", "/v2/health/live"))
                assert read_response(sock).status == 200
        time.sleep(0.1)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (after whatever it sent last)."""
    sock.settimeout(0.05)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_the_connection_cap_answers_503_and_frees_up_when_idle_clients_leave(capped_server):
    url = capped_server.url
    assert one_request(url) == 200
    with idle_connections(url, MAX_CONNECTIONS - 1, first_request=False):  # the cap's last one is served
        assert one_request(url) == 200
    with idle_connections(url, MAX_CONNECTIONS, first_request=False):
        infer = request_bytes("POST", "/v2/models/iris/infer", httpx.Request("POST", "/", json=infer_body()).read(),
                              {"Content-Type": "application/json", "Connection": "close"})
        response = send(url, infer, timeout=5)
        # a busy server is alive and ready: its probes pass the cap (a refused liveness probe restarts it)
        probes = [send(url, request_bytes("GET", path, headers={"Connection": "close"}), timeout=5)
                  for path in ("/v2/health/live", "/v2/health/ready")]
        models_index = send(url, request_bytes("GET", "/v2/models/iris/ready", headers={"Connection": "close"}),
                            timeout=5)
    assert response.status == 503, response.body
    assert "connection cap" in response.error() and response.headers.get("retry-after") == "1"
    assert [probe.status for probe in probes] == [200, 200], [probe.body for probe in probes]
    assert models_index.status == 503, models_index.body
    wait_until(lambda: one_request(url) == 200, timeout=3, interval=0.1, what="a normal request to succeed")


@pytest.mark.parametrize("first_request", [True, False], ids=["keep-alive", "never-sent-a-request"])
def test_idle_connections_are_closed_after_keep_alive_s(capped_server, first_request):
    """Idle keep-alive connections, and sockets that connect and say nothing (each holds a
    connection slot: with the cap, a handful of them would lock every client out for good), are
    closed after ``--keep-alive-s``."""
    url = capped_server.url
    with idle_connections(url, MAX_CONNECTIONS, first_request=first_request) as idle:  # the cap: no room left
        assert one_request(url) == 503
        time.sleep(KEEP_ALIVE_S + 0.5)
        assert all(closed_by_server(sock) for sock in idle)
        assert one_request(url) == 200


def test_blank_lines_that_start_no_request_do_not_keep_a_connection_open(capped_server):
    """HTTP parsers skip empty lines before a request, and each byte stops uvicorn's own idle
    timer: a client sending a line break every 0.3 s must still be closed as idle."""
    url = capped_server.url
    with idle_connections(url, MAX_CONNECTIONS, first_request=True) as sockets:
        started = time.monotonic()
        while time.monotonic() - started < KEEP_ALIVE_S + 1.5:
            for sock in sockets:
                try:
                    sock.sendall(b"\r\n")
                except OSError:
                    pass
            time.sleep(0.3)
        assert all(closed_by_server(sock) for sock in sockets)
        assert one_request(url) == 200


def test_headers_trickled_in_slowly_do_not_hold_a_connection_forever(capped_server):
    """Slowloris: request heads sent a byte at a time. Each must be complete within
    ``--request-read-timeout-s`` or the connection is closed."""
    url = capped_server.url
    head = request_bytes("GET", "/v2/health/live")
    with idle_connections(url, MAX_CONNECTIONS, first_request=False) as sockets:
        stop = time.monotonic() + READ_TIMEOUT_S + 1.5
        sent = 0
        while time.monotonic() < stop and sent < len(head) - 4:
            for sock in sockets:
                try:
                    sock.sendall(head[sent:sent + 1])
                except OSError:
                    pass
            sent += 1
            time.sleep(0.2)
        response = read_response(sockets[0])
        assert response.status == 408
        assert f"request head did not arrive within {READ_TIMEOUT_S:g} s" in response.error()
        assert all(closed_by_server(sock) for sock in sockets)
        assert one_request(url) == 200


def test_the_capped_server_ends_healthy(capped_server):
    wait_until(lambda: one_request(capped_server.url) == 200, timeout=3, what="a normal request")
    check_others(capped_server.url, capped_server.expected)
