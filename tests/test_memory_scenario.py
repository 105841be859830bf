"""The memory manager's scenario with torch models, through the real server over HTTP, on each
device, judged by the device's own measurement sampled as it goes.

Six random Llamas served by the transformers runtime (one checkpoint, hard-linked): ``pinned``,
``a`` and ``b`` load at start-up, ``c`` and ``slow`` on their first request, and ``huge``
declares more memory than the budget. The budget holds three of them (and, on a GPU, the CUDA
context). Nothing in model.yaml states a size: admission runs on the runtime's prediction and
the ledger keeps what it measured. The steps: least-recently-used turns, the pinned model
staying, a busy model not evicted, 507 for ``huge``, then every model unloaded.

- On a GPU (``cuda``, skipped without CUDA): NVML is the judge. Its device-wide reading never
  rises more than the budget above what the GPU used before the server started; evicted models
  park in pinned host memory and come back from there; once every model is unloaded, NVML is back
  at that baseline plus the runtime's overhead (the CUDA context) within 64 MiB.
- On the CPU the same steps run against the host budget (evicted models are unloaded and reload
  from disk). The host's RAM is shared with everything else, so the judge there is the ledger the
  server exports (``memory_judge``), which checks the scenario's logic but not a measurement.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("mmserver_transformers")

from memory_judge import DeviceSampler, NvmlReader, cuda_context_bytes, ledger_bytes  # noqa: E402
from mmserver.checkpoint import checkpoint_bytes, read_config  # noqa: E402
from mmserver.memory import format_bytes  # noqa: E402
from mmserver_transformers.estimate import estimate_memory  # noqa: E402
from tiny_hf import build_sized_llama, link_model  # noqa: E402
from v2_helpers import scrape, value  # noqa: E402

MiB = 2**20
RELEASE_TOLERANCE = 64 * MiB
NAMES = ("pinned", "a", "b", "c", "slow", "huge")
LAZY = ("c", "slow", "huge")
#: the busy model's request: long enough to outlast two loads and a few requests on either device
BUSY_TOKENS = 400
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class Sizes:
    """What one model of the scenario is predicted to take on a device, and what it holds once
    loaded, both as the runtime works them out."""

    device: str
    predicted: int
    loaded: int
    overhead: int  # the CUDA context the server's first GPU load will create (0 on the CPU)

    @property
    def budget(self) -> int:
        """Room for the overhead, two loaded models and the prediction of a third, plus half a
        model: three fit, a fourth needs an eviction."""
        return self.overhead + self.predicted + 2 * self.loaded + self.loaded // 2


@dataclass
class Scenario:
    url: str
    sizes: Sizes
    baseline: int  # the device's reading before the server started (0 for the ledger)

    def index(self) -> dict[str, dict]:
        return {row["name"]: row for row in httpx.post(f"{self.url}/v2/repository/index", timeout=30).json()}

    def states(self) -> dict[str, str]:
        return {name: row["state"] for name, row in self.index().items()}

    def generate(self, model: str, tokens: int = 1, rows: int = 1) -> httpx.Response:
        doc = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [rows], "data": ["the cat"] * rows}],
               "parameters": {"max_new_tokens": tokens}}
        return httpx.post(f"{self.url}/v2/models/{model}/infer", json=doc, timeout=300)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def scenario(request, tmp_path_factory, start_server) -> Iterator[Scenario]:
    device = request.param
    if device.startswith("cuda") and not has_cuda():
        pytest.skip("needs CUDA")
    on_gpu = device.startswith("cuda")
    root = tmp_path_factory.mktemp(f"scenario-{device.replace(':', '')}") / "repo"
    first = root / NAMES[0] / "1"
    build_sized_llama(first, mib=384 if on_gpu else 12, dtype="float16" if on_gpu else "float32",
                      hidden=1024 if on_gpu else 256, max_positions=MAX_POSITIONS, never_eos=True)
    for name in NAMES[1:]:
        link_model(first, root / name / "1")
    predicted = estimate_memory(first, device, {})[device]
    # loaded: the weights, and on a GPU also the activation allowance the prediction adds to them
    weights = checkpoint_bytes(first, read_config(first), "float32")
    sizes = Sizes(device, predicted, predicted if on_gpu else weights, cuda_context_bytes() if on_gpu else 0)
    for name in NAMES:
        lines = ["runtime: transformers", f"device: {device.partition(':')[0]}",
                 f"load: {'lazy' if name in LAZY else 'startup'}"]
        lines += {"pinned": ["pinned: true"], "slow": ["batching: {max_batch_size: 1}"],
                  "huge": [f"memory: {sizes.budget + MiB}"]}.get(name, [])
        (root / name / "model.yaml").write_text("\n".join(lines) + "\n")
    flag = "--gpu-memory-budget" if on_gpu else "--host-memory-budget"
    baseline = NvmlReader()() if on_gpu else 0
    log = tmp_path_factory.mktemp("scenario-log") / "server.log"
    with start_server(root, log, flag, str(sizes.budget), timeout=180) as server:
        yield Scenario(server.url, sizes, baseline)


def test_torch_models_take_turns_within_the_budget_as_the_device_measures_it(scenario: Scenario) -> None:
    s, sizes = scenario, scenario.sizes
    device, on_gpu = sizes.device, sizes.device.startswith("cuda")
    with DeviceSampler(device, s.url, s.baseline) as judge:
        rows = s.index()
        assert {n: rows[n]["state"] for n in NAMES} == {n: "UNAVAILABLE" if n in LAZY else "READY" for n in NAMES}
        for name in ("pinned", "a", "b"):
            held = rows[name]["memory_bytes"][device]
            assert sizes.loaded <= held <= sizes.loaded + 64 * MiB, (name, held, sizes)

        # least recently used turns: b leaves for c, then a for b
        assert s.generate("a").status_code == 200
        assert s.generate("c").status_code == 200
        rows = s.index()
        assert [rows[n]["state"] for n in ("pinned", "a", "b", "c")] == ["READY", "READY", "UNAVAILABLE", "READY"]
        if on_gpu:  # parked in pinned host memory, the weights only
            assert rows["b"]["reason"] == "in host memory, restores on the next request"
            assert list(rows["b"]["memory_bytes"]) == ["cpu"] and rows["b"]["memory_bytes"]["cpu"] < sizes.loaded
        else:
            assert rows["b"]["reason"] == "evicted, reloads on the next request"
            assert "memory_bytes" not in rows["b"]
        assert s.generate("b").status_code == 200
        rows = s.index()
        assert [rows[n]["state"] for n in ("pinned", "a", "b", "c")] == ["READY", "UNAVAILABLE", "READY", "READY"]

        # a busy model stays: while slow generates, loading c and a evicts the idle b, then c
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(s.generate, "slow", BUSY_TOKENS)
            while s.states()["slow"] != "READY":
                assert not busy.done(), busy.result().text
                time.sleep(0.01)
            for name in ("pinned", "b", "c", "a"):
                assert s.generate(name).status_code == 200
            states = s.states()
            assert not busy.done(), "the busy request ended before the evictions it was meant to outlast"
            answer = busy.result()
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["output_ids"]["shape"] == [1, BUSY_TOKENS]  # every token: it never stops early
        assert {n: states[n] for n in ("pinned", "slow", "a", "b", "c")} == {
            "pinned": "READY", "slow": "READY", "a": "READY", "b": "UNAVAILABLE", "c": "UNAVAILABLE"}

        # what cannot fit is refused with the figures, and nothing else moves
        refused = s.generate("huge")
        assert refused.status_code == 507, refused.text
        assert f"needs {format_bytes(sizes.budget + MiB)} on {device}" in refused.json()["error"]
        assert "pinned: pinned:1" in refused.json()["error"]
        assert s.states() == states

    assert judge.samples and judge.peak <= sizes.budget, (judge.peak, sizes)
    overhead = int(value(scrape(s.url), "mmserver_memory_overhead_bytes", device=device))
    models = sum(r.get("memory_bytes", {}).get(device, 0) for r in s.index().values())
    assert ledger_bytes(s.url, device) == models + overhead
    if on_gpu:
        assert abs(overhead - sizes.overhead) <= RELEASE_TOLERANCE, (overhead, sizes)

    # every model unloaded: the device is back where it was, but for the runtime's overhead
    for name in NAMES:
        assert httpx.post(f"{s.url}/v2/repository/models/{name}/unload", timeout=60).status_code == 200
    assert all(row["state"] == "UNAVAILABLE" and "memory_bytes" not in row for row in s.index().values())
    assert ledger_bytes(s.url, "cpu") == 0
    assert ledger_bytes(s.url, device) == overhead
    if on_gpu:
        left = NvmlReader()() - s.baseline - overhead
        assert abs(left) <= RELEASE_TOLERANCE, f"{left / MiB:+.0f} MiB left on the GPU after unloading every model"
