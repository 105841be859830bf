"""The host-memory budget scenario, through the real server over HTTP: more real scikit-learn
models than fit, lazy loads, least-recently-used eviction, a pinned model, in-flight protection,
and the error when nothing can make room.

Each model declares its size in model.yaml (``memory: 100MiB``), so the scenario does not depend
on pickle sizes; the budget (``--host-memory-budget 350MiB``) holds three of them.
"""

from __future__ import annotations

import asyncio
import importlib.util

import httpx
import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from v2_helpers import binary_request, body, scrape, value

FEATURES = 8

MODELS = {
    "pinned": "memory: 100MiB\npinned: true\n",
    "a": "memory: 100MiB\n",
    "b": "memory: 100MiB\n",
    "c": "memory: 100MiB\nload: lazy\n",
    "slow": "memory: 100MiB\nload: lazy\nbatching: {max_batch_size: 1}\n",
    "huge": "memory: 400MiB\nload: lazy\n",
}
#: tiny Hugging Face models served by the transformers runtime (torch on the CPU)
TORCH_MODELS = {"torch-cls": "memory: 100MiB\nload: lazy\n", "torch-emb": "memory: 100MiB\nload: lazy\n"}
HAS_TORCH = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory, start_server):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(400, FEATURES))
    y = (x[:, 0] > 0).astype(int)
    root = tmp_path_factory.mktemp("memory") / "repo"
    for name, yaml_text in MODELS.items():
        folder = root / name / "1"
        folder.mkdir(parents=True)
        estimator = (RandomForestClassifier(n_estimators=300, max_depth=4, random_state=0) if name == "slow"
                     else LogisticRegression()).fit(x, y)
        joblib.dump(estimator, folder / "model.joblib")
        (root / name / "model.yaml").write_text(yaml_text)
    if HAS_TORCH:
        from tiny_hf import build_classifier, build_embedder

        for name, build in (("torch-cls", build_classifier), ("torch-emb", build_embedder)):
            build(root / name / "1")
            (root / name / "model.yaml").write_text(TORCH_MODELS[name])
    log = tmp_path_factory.mktemp("memory-log") / "server.log"
    with start_server(root, log, "--host-memory-budget", "350MiB") as server:
        yield server


def index(url: str) -> dict[str, dict]:
    return {row["name"]: row for row in httpx.post(f"{url}/v2/repository/index").json()}


def infer(url: str, model: str, rows: int = 1) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body(np.ones((rows, FEATURES))), timeout=60)


def test_models_beyond_the_budget_take_turns_least_recently_used_first(memory_server):
    url = memory_server.url
    rows = index(url)
    assert {n: rows[n]["state"] for n in MODELS} == {
        "pinned": "READY", "a": "READY", "b": "READY", "c": "UNAVAILABLE", "slow": "UNAVAILABLE",
        "huge": "UNAVAILABLE"}
    assert rows["c"]["reason"] == "loads on first request"
    assert all(rows[n]["memory_bytes"] == {"cpu": 100 * 2**20} for n in ("pinned", "a", "b"))
    before = scrape(url)

    assert infer(url, "a").status_code == 200  # b is now the least recently used
    assert infer(url, "c").status_code == 200  # a lazy load that needs b's place
    rows = index(url)
    assert [rows[n]["state"] for n in ("pinned", "a", "b", "c")] == ["READY", "READY", "UNAVAILABLE", "READY"]
    assert rows["b"]["reason"] == "evicted, reloads on the next request"
    assert "memory_bytes" not in rows["b"]

    assert infer(url, "b").status_code == 200  # b comes back; a is now the LRU and leaves
    rows = index(url)
    assert [rows[n]["state"] for n in ("pinned", "a", "b", "c")] == ["READY", "UNAVAILABLE", "READY", "READY"]
    assert rows["pinned"]["state"] == "READY"  # never evicted, though least recently used of all

    after = scrape(url)
    assert value(after, "mmserver_model_evictions_total", model_name="b", model_version="1") - value(
        before, "mmserver_model_evictions_total", model_name="b", model_version="1") == 1
    assert value(after, "mmserver_model_evictions_total", model_name="pinned", model_version="1") == 0
    assert value(after, "mmserver_memory_budget_bytes", device="cpu") == 350 * 2**20
    held = sum(value(after, "mmserver_memory_reserved_bytes", model_name=n, model_version="1", device="cpu")
               for n in [*MODELS, *TORCH_MODELS])
    assert held == 300 * 2**20 <= 350 * 2**20


def test_a_model_that_cannot_fit_gets_507_naming_needed_and_available_bytes(memory_server):
    response = infer(memory_server.url, "huge")
    assert response.status_code == 507
    error = response.json()["error"]
    assert "needs 400.0 MiB on cpu" in error
    assert "of a 350.0 MiB budget" in error
    assert "pinned: pinned:1" in error
    rows = index(memory_server.url)
    assert rows["huge"]["state"] == "UNAVAILABLE" and "needs 400.0 MiB" in rows["huge"]["reason"]
    assert sum(r["state"] == "READY" for r in rows.values()) == 3  # nothing else was disturbed
    assert infer(memory_server.url, "pinned").status_code == 200
    load = httpx.post(f"{memory_server.url}/v2/repository/models/huge/load")
    assert load.status_code == 507 and "needs 400.0 MiB on cpu" in load.json()["error"]


def test_a_model_serving_requests_is_not_evicted(memory_server):
    url = memory_server.url

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            # slow loads (evicting the LRU), then stays busy with a long request...
            content, headers = binary_request(np.ones((300_000, FEATURES)))
            busy = asyncio.create_task(
                client.post(f"{url}/v2/models/slow/infer", content=content, headers=headers))
            while index(url)["slow"]["state"] != "READY":
                await asyncio.sleep(0.02)
            for name in ("pinned", "b", "c"):
                assert (await client.post(f"{url}/v2/models/{name}/infer", json=body(np.ones((1, FEATURES))))).status_code == 200
            # ...so although it is now the least recently used, loading a evicts another model
            assert (await client.post(f"{url}/v2/models/a/infer", json=body(np.ones((1, FEATURES))))).status_code == 200
            states = {n: r["state"] for n, r in index(url).items()}
            return await busy, states

    busy, states = asyncio.run(scenario())
    assert busy.status_code == 200
    assert states["slow"] == "READY" and states["a"] == "READY" and states["pinned"] == "READY"
    assert sum(states[n] == "READY" for n in ("b", "c")) == 0  # both idle ones made room in turn


@pytest.mark.skipif(not HAS_TORCH, reason="the transformers runtime is not installed")
def test_torch_and_sklearn_models_take_turns_in_one_budget(memory_server):
    url = memory_server.url
    texts = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a cat", "the dog runs"]}]}

    def ready() -> set[str]:
        return {n for n, r in index(url).items() if r["state"] == "READY"}

    # a known order of use among the loaded sklearn models, least recent first
    loaded = sorted(ready() - {"pinned"})
    for name in loaded:
        assert infer(url, name).status_code == 200
    assert infer(url, "pinned").status_code == 200
    order = list(loaded)
    for torch_model, output in (("torch-cls", "scores"), ("torch-emb", "embedding")):
        response = httpx.post(f"{url}/v2/models/{torch_model}/infer", json=texts, timeout=60)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert outputs[output]["shape"][0] == 2
        evicted = order.pop(0)  # the least recently used model made room
        assert ready() == {"pinned", *order, *([torch_model] if torch_model == "torch-cls" else []),
                           *(["torch-cls", "torch-emb"] if torch_model == "torch-emb" else [])}
        assert index(url)[evicted]["reason"] == "evicted, reloads on the next request"
    # and a scikit-learn model coming back pushes out the least recently used torch model
    assert infer(url, evicted).status_code == 200
    assert ready() == {"pinned", "torch-emb", evicted}
    held = sum(r.get("memory_bytes", {}).get("cpu", 0) for r in index(url).values())
    assert held <= 350 * 2**20
