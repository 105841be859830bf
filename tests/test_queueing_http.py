"""Queues, backpressure, deadlines, disconnects and metrics, through the real server over HTTP.

The repository holds real scikit-learn models trained here: ``slow`` is a 3000-tree forest
(300 trees fitted, each in it ten times: tens of ms per call on this machine) with one request per batch and a queue of 4, so queues
fill on demand; ``batched`` batches up to 16 rows; ``lazy-big`` is a large forest that loads on
its first request; ``counted`` is a LogisticRegression used only for exact metric counts.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from v2_helpers import binary_request, body, scrape, value

FEATURES = 8


def _write(root: Path, name: str, estimator, yaml_text: str) -> None:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    joblib.dump(estimator, folder / "model.joblib")
    (root / name / "model.yaml").write_text(yaml_text)


def _forest(x: np.ndarray, y: np.ndarray, **params) -> RandomForestClassifier:
    """A forest fitted on every core, then kept to predict as one would save it (n_jobs unset)."""
    return RandomForestClassifier(n_jobs=-1, random_state=0, **params).fit(x, y).set_params(n_jobs=None)


@pytest.fixture(scope="module")
def queue_repo(tmp_path_factory):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, FEATURES))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    root = tmp_path_factory.mktemp("queues") / "repo"
    # tens of ms a call even through the runtime's forest path: a burst arrives well within one call
    slow = _forest(x, y, n_estimators=300, max_depth=4)
    slow.estimators_ *= 10  # the cost of 3000 trees a call, without fitting them; same predictions
    slow.n_estimators = len(slow.estimators_)
    _write(root, "slow", slow, "batching: {max_batch_size: 1, max_queue: 4}\n")
    batched = _forest(x, y, n_estimators=20)
    _write(root, "batched", batched, "batching: {max_batch_size: 16, max_delay_ms: 5}\n")
    big = _forest(rng.normal(size=(6000, FEATURES)), rng.integers(0, 2, 6000), n_estimators=600)
    _write(root, "lazy-big", big, "load: lazy\nbatching: {max_queue: 2}\n")
    counted = LogisticRegression().fit(x, y)
    _write(root, "counted", counted, "batching: {max_batch_size: 8}\n")
    return root, {"slow": slow, "batched": batched, "counted": counted, "big": big}


@pytest.fixture(scope="module")
def queue_server(queue_repo, start_server, tmp_path_factory):
    root, _ = queue_repo
    with start_server(root, tmp_path_factory.mktemp("queue-log") / "server.log", "--triton-metrics") as s:
        yield s


def model_labels(model: str) -> dict[str, str]:
    return {"model_name": model, "model_version": "1"}


async def _burst(url: str, model: str, payloads: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads), max_keepalive_connections=len(payloads))
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        return await asyncio.gather(*(
            client.post(f"{url}/v2/models/{model}/infer", json=p, headers=headers) for p in payloads
        ))


def test_a_burst_of_ten_times_the_queue_is_answered_exactly_once_each(queue_server, queue_repo):
    _, models = queue_repo
    rows = np.random.default_rng(1).normal(size=(40, FEATURES))
    before = scrape(queue_server.url)
    responses = asyncio.run(_burst(queue_server.url, "slow", [body(rows[i:i + 1]) for i in range(40)]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    ok = [i for i, r in enumerate(responses) if r.status_code == 200]
    shed = [r for r in responses if r.status_code == 429]
    assert len(ok) >= 4  # at least a full queue of four (plus one running if it started first)
    assert shed, "a burst of 10x the queue must shed load"
    for response in shed:
        assert response.headers["retry-after"] == "1"
        assert "slow" in response.json()["error"] and "max_queue 4" in response.json()["error"]
    expected = models["slow"].predict(rows)
    for i in ok:
        assert responses[i].json()["outputs"][0]["data"] == [int(expected[i])]
    after = scrape(queue_server.url)
    labels = model_labels("slow")
    assert value(after, "mmserver_inference_requests_total", **labels, outcome="success") - value(
        before, "mmserver_inference_requests_total", **labels, outcome="success") == len(ok)
    assert value(after, "mmserver_inference_requests_total", **labels, outcome="rejected") - value(
        before, "mmserver_inference_requests_total", **labels, outcome="rejected") == len(shed)
    assert value(after, "mmserver_queue_pending_requests", **labels) == 0


@pytest.mark.parametrize("how", ["parameter", "header"])
def test_requests_past_their_deadline_get_504_and_never_run(queue_server, how):
    rows = np.random.default_rng(2).normal(size=(4, FEATURES))  # what the queue of 4 always takes
    if how == "parameter":
        payloads, headers = [body(rows[i:i + 1], timeout=1000) for i in range(4)], None  # 1 ms, in µs
    else:
        payloads, headers = [body(rows[i:i + 1]) for i in range(4)], {"Request-Timeout": "0.001"}
    labels = model_labels("slow")
    before = scrape(queue_server.url)
    responses = asyncio.run(_burst(queue_server.url, "slow", payloads, headers))
    assert [r.status_code for r in responses] == [504] * 4
    assert all("deadline" in r.json()["error"] for r in responses)
    after = scrape(queue_server.url)
    # at most the request already running when its deadline passed was computed (none, when the
    # machine is so busy that even the first one expired before the worker took it)
    assert value(after, "mmserver_inference_items_total", **labels) - value(
        before, "mmserver_inference_items_total", **labels) <= 1
    assert value(after, "mmserver_inference_requests_total", **labels, outcome="timeout") - value(
        before, "mmserver_inference_requests_total", **labels, outcome="timeout") == 4


@pytest.mark.parametrize("bad", [{"timeout": -5}, {"timeout": "soon"}])
def test_bad_timeout_parameter_is_400(queue_server, bad):
    rows = np.zeros((1, FEATURES))
    response = httpx.post(f"{queue_server.url}/v2/models/slow/infer", json=body(rows, **bad))
    assert response.status_code == 400
    assert "timeout" in response.json()["error"]


def test_requests_whose_client_left_are_dropped_before_they_run(queue_server):
    labels = model_labels("slow")
    before = scrape(queue_server.url)
    raw = httpx.Request("POST", f"{queue_server.url}/v2/models/slow/infer",
                        json=body(np.zeros((1, FEATURES))))
    payload = raw.read()
    host, port = queue_server.url.removeprefix("http://").split(":")

    async def scenario():
        async with httpx.AsyncClient(timeout=60.0) as client:
            # a long first request (many rows, binary so it decodes at once) keeps the model busy
            # while the others queue behind it
            content, headers = binary_request(np.ones((200_000, FEATURES)))
            occupying = asyncio.create_task(
                client.post(f"{queue_server.url}/v2/models/slow/infer", content=content, headers=headers))
            await asyncio.sleep(0.3)
            sockets = []
            for _ in range(3):
                sock = socket.create_connection((host, int(port)))
                sock.sendall(
                    f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                sockets.append(sock)
            while value(scrape(queue_server.url), "mmserver_queue_pending_requests", **labels) < 3:
                assert not occupying.done(), "the first request finished before the others queued"
                await asyncio.sleep(0.005)
            for sock in sockets:
                sock.close()
            first = await occupying
            last = await client.post(f"{queue_server.url}/v2/models/slow/infer", json=body(np.ones((1, FEATURES))))
            return first, last

    first, last = asyncio.run(scenario())
    assert first.status_code == 200 and last.status_code == 200
    after = scrape(queue_server.url)
    outcomes = {o: value(after, "mmserver_inference_requests_total", **labels, outcome=o) - value(
        before, "mmserver_inference_requests_total", **labels, outcome=o) for o in
        ("success", "cancelled", "invalid", "error", "timeout", "rejected", "unavailable")}
    assert outcomes["cancelled"] == 3, outcomes
    assert value(after, "mmserver_inference_items_total", **labels) - value(
        before, "mmserver_inference_items_total", **labels) == 200_000 + 1


def test_concurrent_mixed_size_requests_get_exactly_their_rows(queue_server, queue_repo):
    _, models = queue_repo
    rng = np.random.default_rng(3)
    sizes = [int(n) for n in rng.integers(1, 6, size=50)]
    chunks = [rng.normal(size=(n, FEATURES)) for n in sizes]
    labels = model_labels("batched")
    before = scrape(queue_server.url)
    responses = asyncio.run(_burst(queue_server.url, "batched", [
        {**body(c), "id": f"req-{i}", "outputs": [{"name": "predict_proba"}]} for i, c in enumerate(chunks)
    ]))
    for i, (response, chunk) in enumerate(zip(responses, chunks)):
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["id"] == f"req-{i}"
        assert [o["name"] for o in doc["outputs"]] == ["predict_proba"]
        got = np.array(doc["outputs"][0]["data"]).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_allclose(got, models["batched"].predict_proba(chunk))
    after = scrape(queue_server.url)

    def delta(name: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mmserver_inference_items_total") == sum(sizes)
    assert delta("mmserver_inference_batch_size_sum") == sum(sizes)
    assert delta("mmserver_inference_queue_duration_seconds_count") == len(sizes)
    assert delta("mmserver_inference_batches_total") < len(sizes)  # requests shared batches


def test_requests_beyond_the_queue_get_503_while_the_model_loads(queue_server, queue_repo):
    _, models = queue_repo
    rows = np.random.default_rng(4).normal(size=(8, FEATURES))
    responses = asyncio.run(_burst(queue_server.url, "lazy-big", [body(rows[i:i + 1]) for i in range(8)]))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2  # the load's own trigger and the queue of 2 are served
    assert statuses.count(503) >= 1
    for i, response in enumerate(responses):
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert "loading" in response.json()["error"]
        else:
            assert response.json()["outputs"][0]["data"] == [int(models["big"].predict(rows[i:i + 1])[0])]


def test_metrics_after_a_known_sequence(queue_server, queue_repo):
    url = queue_server.url
    labels = model_labels("counted")
    before = scrape(url)
    for _ in range(5):
        assert httpx.post(f"{url}/v2/models/counted/infer", json=body(np.zeros((1, FEATURES)))).status_code == 200
    for _ in range(2):
        assert httpx.post(f"{url}/v2/models/counted/infer", json=body(np.ones((3, FEATURES)))).status_code == 200
    assert httpx.post(f"{url}/v2/models/counted/infer", json=body(np.zeros((1, 3)))).status_code == 400
    assert httpx.post(f"{url}/v2/models/counted/infer",
                      json={**body(np.zeros((1, FEATURES))), "outputs": [{"name": "nope"}]}).status_code == 400
    assert httpx.post(f"{url}/v2/models/counted/infer", content=b"{").status_code == 400
    after = scrape(url)

    def delta(name: str, **extra) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert delta("mmserver_inference_requests_total", outcome="success") == 7
    assert delta("mmserver_inference_requests_total", outcome="invalid") == 3
    assert delta("mmserver_inference_requests_total", outcome="error") == 0
    assert delta("mmserver_inference_items_total") == 5 + 2 * 3
    assert delta("mmserver_inference_batches_total") == 7  # sequential requests: one batch each
    assert delta("mmserver_inference_batch_size_sum") == 11
    assert delta("mmserver_inference_request_duration_seconds_count") == 7
    assert delta("mmserver_inference_compute_duration_seconds_count") == 7
    assert value(after, "mmserver_queue_pending_requests", **labels) == 0
    assert value(after, "mmserver_model_state", **labels, state="READY") == 1
    assert value(after, "mmserver_model_state", **labels, state="LOADING") == 0
    assert value(after, "mmserver_memory_reserved_bytes", **labels, device="cpu") > 0
    assert value(after, "mmserver_model_load_duration_seconds_count", **labels) == 1
    # the Triton names follow the same counts
    triton = {"model": "counted", "version": "1"}
    assert value(after, "nv_inference_request_success", **triton) - value(
        before, "nv_inference_request_success", **triton) == 7
    assert value(after, "nv_inference_request_failure", **triton) - value(
        before, "nv_inference_request_failure", **triton) == 3
    assert value(after, "nv_inference_count", **triton) - value(before, "nv_inference_count", **triton) == 11
    assert value(after, "nv_inference_pending_request_count", **triton) == 0
