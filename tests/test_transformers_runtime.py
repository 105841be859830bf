"""The transformers runtime: detection, estimates, validation, batching, and the three tasks end to
end through the real server, compared with what transformers computes in-process.

The models are tiny and random (``tests/tiny_hf.py``), built in the session; nothing is downloaded.
torch and transformers are imported by fixtures only, so collecting this module stays cheap.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("mmserver_transformers")

import tiny_hf  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest mode)
from v2_helpers import live_while  # noqa: E402
from mmserver.errors import InvalidInput, ModelLoadError  # noqa: E402
from mmserver.generation import InvalidParameter, SamplingParams  # noqa: E402
from mmserver.runtime import Placement, RuntimeRegistry  # noqa: E402
from mmserver.spec import ModelConfig, ModelSpec  # noqa: E402
from mmserver.types import InferInput, InferRequest, RequestedOutput  # noqa: E402
from mmserver_transformers import TransformersRuntime  # noqa: E402
from mmserver.checkpoint import (  # noqa: E402
    ELEMENT_BYTES,
    FLOAT_KINDS,
    checkpoint_bytes,
    header_tensors,
    read_config,
    safetensors_header,
    weight_bytes,
)
from mmserver_transformers.estimate import ALLOWANCE_FIXED, activation_allowance, estimate_memory  # noqa: E402
from mmserver_transformers.options import (  # noqa: E402
    Options,
    dtype_for,
    task_of,
    v2_sampling,
)

#: the estimate of the weights may miss buffers a checkpoint does not store (BERT's position_ids
#: and token_type_ids, Llama's rotary inv_freq): at most this share of the real bytes
ESTIMATE_TOLERANCE = 0.02

TEXTS = [
    "the cat is quick",
    "hi",
    "a dog ran along the river with seven bright stones and a light green queue of tokens",
    "memory device tensor shape",
]


def _texts(*texts: str | bytes) -> np.ndarray:
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode() if isinstance(t, str) else t for t in texts]
    return array


def text_request(*texts: str | bytes, name: str = "text", outputs: tuple[str, ...] = (),
                 **parameters: Any) -> InferRequest:
    return InferRequest([InferInput(name, "BYTES", _texts(*texts))],
                        outputs=[RequestedOutput(o) for o in outputs], parameters=parameters)


def spec_for(folder: Path, name: str = "m", **parameters: Any) -> ModelSpec:
    return ModelSpec(name, "1", folder, "transformers", ModelConfig(parameters=parameters), "test")


# ----------------------------------------------------------------------------- fixtures


@dataclass
class HFRepo:
    path: Path

    def folder(self, model: str) -> Path:
        return self.path / model


@pytest.fixture(scope="session")
def hf_repo(tmp_path_factory: pytest.TempPathFactory) -> HFRepo:
    """A repository with the three tiny models (and a truncating copy of the classifier)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf") / "repo"
    tiny_hf.build_classifier(root / "classifier")  # no model.yaml: detected from its files
    shutil.copytree(root / "classifier", root / "classifier-trunc")
    (root / "classifier-trunc" / "model.yaml").write_text(
        "runtime: transformers\nparameters: {truncation: true}\n"
    )
    tiny_hf.build_embedder(root / "embedder")
    (root / "embedder" / "model.yaml").write_text(
        "parameters: {task: embedding}\nbatching: {max_delay_ms: 50, max_batch_size: 64}\n"
    )
    tiny_hf.build_generator(root / "generator", chat_template=True)
    (root / "generator" / "model.yaml").write_text(
        "runtime: transformers\nparameters: {max_new_tokens: 6, threads: 1}\n"
        "batching: {max_delay_ms: 50}\n"
    )
    return HFRepo(root)


@dataclass
class Reference:
    """The checkpoints loaded by transformers itself, for in-process answers."""

    classifier: Any
    classifier_tok: Any
    embedder: Any
    embedder_tok: Any
    generator: Any
    generator_tok: Any

    def scores(self, text: str) -> np.ndarray:
        import torch

        with torch.inference_mode():
            enc = self.classifier_tok([text], return_tensors="pt")
            return torch.softmax(self.classifier(**enc).logits, -1)[0].numpy()

    def embedding(self, text: str) -> np.ndarray:
        import torch

        with torch.inference_mode():
            enc = self.embedder_tok([text], return_tensors="pt")
            hidden = self.embedder(**enc).last_hidden_state[0]
            mask = enc["attention_mask"][0].unsqueeze(-1).float()
            return ((hidden * mask).sum(0) / mask.sum()).numpy()

    def generate(self, text: str, max_new_tokens: int) -> list[int]:
        import torch

        with torch.inference_mode():
            enc = self.generator_tok([text], return_tensors="pt")
            out = self.generator.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.generator_tok.pad_token_id)
        tokens = out[0, enc["input_ids"].shape[1]:].tolist()
        eos = self.generator_tok.eos_token_id
        return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.fixture(scope="session")
def reference(hf_repo: HFRepo) -> Reference:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    load = lambda cls, name: cls.from_pretrained(hf_repo.folder(name)).eval()  # noqa: E731
    tok = lambda name: AutoTokenizer.from_pretrained(hf_repo.folder(name))  # noqa: E731
    return Reference(
        load(AutoModelForSequenceClassification, "classifier"), tok("classifier"),
        load(AutoModel, "embedder"), tok("embedder"),
        load(AutoModelForCausalLM, "generator"), tok("generator"),
    )


@pytest.fixture(scope="session")
def loaded(hf_repo: HFRepo) -> Iterator[dict[str, Any]]:
    """The three models loaded in-process by the runtime (CPU placement)."""
    runtime = TransformersRuntime()
    models = {
        name: asyncio.run(runtime.load(spec_for(hf_repo.folder(name), name, **params), Placement()))
        for name, params in (("classifier", {}), ("embedder", {}), ("generator", {"max_new_tokens": 6}))
    }
    yield models
    for model in models.values():
        asyncio.run(model.unload())


def infer(model: Any, *requests: InferRequest) -> list[dict[str, np.ndarray]]:
    for request in requests:
        model.validate(request)
    responses = asyncio.run(model.infer(list(requests)))
    assert len(responses) == len(requests)
    return [{o.name: o.data for o in r.outputs} for r in responses]


@pytest.fixture(scope="session")
def hf_server(hf_repo: HFRepo, tmp_path_factory: pytest.TempPathFactory, start_server):
    log_path = tmp_path_factory.mktemp("hf-server-log") / "server.log"
    with start_server(hf_repo.path, log_path) as server:
        yield server


def post(server: Any, model: str, inputs: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json={"inputs": inputs, **extra}, timeout=30)


def text_input(*texts: str, name: str = "text") -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}


def outputs_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


# ----------------------------------------------------------------------------- detection


def test_matches_config_plus_weights(hf_repo: HFRepo, tmp_path: Path) -> None:
    runtime = TransformersRuntime()
    for name in ("classifier", "embedder", "generator"):
        assert runtime.matches(hf_repo.folder(name))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(hf_repo.folder("classifier") / "config.json", config_only)
    assert not runtime.matches(config_only)
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(hf_repo.folder("classifier") / "model.safetensors", weights_only)
    assert not runtime.matches(weights_only)
    torch_bin = tmp_path / "torch-bin"
    torch_bin.mkdir()
    shutil.copy(hf_repo.folder("classifier") / "config.json", torch_bin)
    (torch_bin / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert runtime.matches(torch_bin)
    assert not runtime.matches(hf_repo.folder("classifier") / "config.json")  # a file, not a folder


def test_repository_detects_the_runtime(hf_repo: HFRepo) -> None:
    from mmserver.repository import Repository

    models = Repository(hf_repo.path, RuntimeRegistry.discover()).scan()
    assert {name: next(iter(m.versions.values())).runtime for name, m in models.items()} == {
        "classifier": "transformers", "classifier-trunc": "transformers",
        "embedder": "transformers", "generator": "transformers",
    }
    assert next(iter(models["classifier"].versions.values())).source == "detected"


def test_detection_and_estimate_import_neither_torch_nor_transformers(hf_repo: HFRepo) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from mmserver.runtime import Placement, RuntimeRegistry\n"
        "from mmserver.spec import ModelConfig, ModelSpec\n"
        "registry = RuntimeRegistry.discover()\n"
        f"folder = Path({str(hf_repo.folder('generator'))!r})\n"
        "assert registry.detect(folder) in ('transformers', 'vllm')  # vllm ranks first where installed\n"
        "spec = ModelSpec('g', '1', folder, 'transformers', ModelConfig(), 'detected')\n"
        "print(registry.get('transformers').estimate(spec, Placement())['cpu'])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > ALLOWANCE_FIXED


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("architectures, task", [
    (["BertForSequenceClassification"], "classification"),
    (["LlamaForSequenceClassification"], "classification"),
    (["LlamaForCausalLM"], "generation"),
    (["GPT2LMHeadModel"], "generation"),
    (["BertModel"], "embedding"),
    (["XLMRobertaModel"], "embedding"),
])
def test_task_from_architectures(architectures: list[str], task: str) -> None:
    assert task_of({"architectures": architectures}, {}) == task


def test_task_from_parameters_and_errors() -> None:
    config = {"architectures": ["BertForMaskedLM"]}
    assert task_of(config, {"task": "embedding"}) == "embedding"
    assert task_of(config, {"task": "feature-extraction"}) == "embedding"
    assert task_of(config, {"task": "text-generation"}) == "generation"
    with pytest.raises(ModelLoadError, match="set parameters.task"):
        task_of(config, {})
    with pytest.raises(ModelLoadError, match="parameters.task is 'translation'"):
        task_of(config, {"task": "translation"})


def test_dtype_choice() -> None:
    fp32, bf16 = {"dtype": "float32"}, {"torch_dtype": "bfloat16"}
    assert dtype_for("cpu", {}, bf16) == "float32"
    assert dtype_for("cuda:0", {}, fp32) == "float16"
    assert dtype_for("cuda:1", {}, bf16) == "bfloat16"
    assert dtype_for("cuda:0", {"dtype": "float32"}, bf16) == "float32"
    assert dtype_for("cpu", {"dtype": "auto"}, bf16) == "bfloat16"
    assert dtype_for("cpu", {"dtype": "auto"}, {}) == "float32"
    with pytest.raises(ModelLoadError, match="parameters.dtype is 'int4'"):
        dtype_for("cpu", {"dtype": "int4"}, fp32)


def test_options_validation() -> None:
    config = {"architectures": ["BertModel"]}
    options = Options.parse({}, config)
    assert (options.task, options.truncation, options.normalize, options.pooling) == ("embedding", False, False, "mean")
    assert 1 <= options.threads <= 4
    assert Options.parse({"threads": 3, "normalize": True}, config).threads == 3
    for bad, where in (({"threads": 0}, "threads"), ({"threads": "2"}, "threads"),
                       ({"truncation": "yes"}, "truncation"), ({"pooling": "max"}, "pooling"),
                       ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ModelLoadError, match=f"parameters.{where}"):
            Options.parse(bad, config)


def test_v2_generation_parameters() -> None:
    parse = lambda **p: v2_sampling(p, {"max_tokens": 16, "temperature": 0.0}, 256)  # noqa: E731
    assert parse() == SamplingParams(16, 0.0)
    # greedy leaves the sampling-only settings out, so they do not split batches
    assert parse(do_sample=False, temperature=0.5, top_p=0.9, top_k=5, seed=3) == SamplingParams(16, 0.0)
    assert parse(top_k=5, seed=3, timeout=10**6, binary_data_output=True, truncation=True) == SamplingParams(16, 0.0)
    # what tritonclient sends for features this server lacks is no sampling parameter: not refused
    assert parse(priority=1, sequence_id=7, sequence_start=True, sequence_end=False) == SamplingParams(16, 0.0)
    assert parse(do_sample=True, top_p=0.9, seed=3, max_new_tokens=4) == SamplingParams(4, 1.0, 0.9, seed=3)
    assert parse(max_tokens=5, temperature=0.7, top_k=4, stop="x", ignore_eos=True, min_tokens=2,
                 repetition_penalty=1.2) == SamplingParams(5, 0.7, top_k=4, stop=("x",), ignore_eos=True,
                                                           min_tokens=2, repetition_penalty=1.2)
    for params, name in (({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": "8"}, "max_new_tokens"),
                         ({"max_new_tokens": True}, "max_new_tokens"), ({"max_new_tokens": 256}, "max_new_tokens"),
                         ({"max_tokens": 256}, "max_tokens"), ({"max_tokens": 4, "max_new_tokens": 4}, "max_new_tokens"),
                         ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
                         ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
                         ({"do_sample": "yes"}, "do_sample"), ({"do_sample": True, "temperature": 0}, "do_sample"),
                         ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"stop": 3}, "stop"), ({"stop": ""}, "stop"),
                         ({"ignore_eos": "yes"}, "ignore_eos"), ({"min_tokens": -1}, "min_tokens"), ({"n": 2}, "n"),
                         ({"presence_penalty": 0.5}, "presence_penalty"), ({"max_length": 8}, "max_length"),
                         ({"normalize": True}, "normalize")):
        with pytest.raises(InvalidParameter, match=f"'{name}'") as info:
            parse(**params)
        assert info.value.param == name


# ----------------------------------------------------------------------------- estimates


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_weight_bytes_from_headers(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"w": ("F16", [10, 20]), "b": ("BF16", [20]), "ids": ("I64", [1, 7]),
                              "flags": ("U8", [3])})
    tensors = header_tensors(safetensors_header(path))
    assert sorted(tensors) == [("BF16", (20,)), ("F16", (10, 20)), ("I64", (1, 7)), ("U8", (3,))]
    # floating tensors take the run dtype, the others keep theirs
    assert weight_bytes(tensors, "float32") == 220 * 4 + 7 * 8 + 3
    assert weight_bytes(tensors, "float16") == 220 * 2 + 7 * 8 + 3
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ModelLoadError, match="no valid safetensors header"):
        safetensors_header(broken)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(ModelLoadError, match="header claims"):
        safetensors_header(huge)


def test_every_dtype_safetensors_reads_has_its_element_size() -> None:
    import safetensors.torch
    import torch
    known = {name: dtype for name, dtype in safetensors.torch._TYPES.items() if dtype is not None}
    assert {name: ELEMENT_BYTES.get(name) for name in known} == \
        {name: dtype.itemsize for name, dtype in known.items()}
    assert {name for name in known if known[name].is_floating_point} <= FLOAT_KINDS


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": ["a"]},
    {"dtype": "F32", "shape": [None]},
    {"dtype": "F32", "shape": [-4, 2]},
    {"dtype": "F32", "shape": [1.5]},
    {"dtype": ["F32"], "shape": [2]},
])
def test_a_header_with_a_malformed_tensor_entry_is_refused_with_a_reason(tmp_path: Path, entry: dict) -> None:
    path = tmp_path / "model.safetensors"
    raw = json.dumps({"w": {**entry, "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="'w' is not a tensor description"):
        header_tensors(safetensors_header(path))


def test_the_estimate_of_a_sharded_checkpoint_counts_only_the_files_its_index_names(tmp_path: Path) -> None:
    # Mistral's repositories hold the sharded checkpoint and the same weights in consolidated.safetensors
    _write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F32", [10, 10])})
    _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("F32", [5])})
    _write_safetensors(tmp_path / "consolidated.safetensors", {"a": ("F32", [10, 10]), "b": ("F32", [5])})
    index = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    assert checkpoint_bytes(tmp_path, {}, "float32") == 105 * 4
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json has no weight_map"):
        checkpoint_bytes(tmp_path, {}, "float32")


def test_estimate_is_weights_in_the_run_dtype_plus_allowance(hf_repo: HFRepo) -> None:
    folder = hf_repo.folder("generator")
    config = read_config(folder)
    fp32 = checkpoint_bytes(folder, config, "float32")
    header = safetensors_header(folder / "model.safetensors")
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    assert fp32 == stored  # a float32 checkpoint run in float32: exactly the stored bytes
    assert checkpoint_bytes(folder, config, "float16") * 2 == fp32  # every tensor is floating
    assert estimate_memory(folder, "cpu", {}) == {
        "cpu": fp32 + activation_allowance(config, "generation", "float32")
    }
    assert estimate_memory(folder, "cuda:1", {}) == {
        "cuda:1": fp32 // 2 + activation_allowance(config, "generation", "float16")
    }
    assert estimate_memory(folder, "cuda:0", {"dtype": "float32"})["cuda:0"] == estimate_memory(folder, "cpu", {})["cpu"]
    # the generation allowance holds the key/value cache: 2 x layers x kv heads x head size per token
    kv_per_token = 2 * 2 * 2 * 32 * 4
    assert activation_allowance(config, "generation", "float32") - activation_allowance(
        config, "embedding", "float32") == 8 * 256 * kv_per_token


@pytest.mark.parametrize("name", ["classifier", "embedder", "generator"])
def test_estimate_matches_the_loaded_bytes(name: str, hf_repo: HFRepo, loaded: dict[str, Any]) -> None:
    folder = hf_repo.folder(name)
    predicted = checkpoint_bytes(folder, read_config(folder), "float32")
    measured = loaded[name].memory()
    assert list(measured) == ["cpu"]
    real = sum(p.numel() * p.element_size() for p in loaded[name].model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in loaded[name].model.buffers())
    assert measured["cpu"] == real + buffers  # exact: parameters plus buffers, tied weights once
    assert abs(predicted - measured["cpu"]) <= ESTIMATE_TOLERANCE * measured["cpu"]
    assert predicted == real  # the checkpoint holds every parameter; buffers are the only gap
    total = TransformersRuntime().estimate(spec_for(folder), Placement())
    assert total["cpu"] > measured["cpu"]


def test_estimate_converts_a_half_precision_checkpoint(hf_repo: HFRepo, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(hf_repo.folder("generator")).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(hf_repo.folder("generator")).save_pretrained(folder)
    config = read_config(folder)
    assert config["dtype"] == "bfloat16"
    assert checkpoint_bytes(folder, config, "float32") == 2 * checkpoint_bytes(folder, config, "bfloat16")
    on_cpu = asyncio.run(TransformersRuntime().load(spec_for(folder), Placement()))
    try:
        assert on_cpu.dtype == "float32"
        real = sum(p.numel() * p.element_size() for p in on_cpu.model.parameters())
        assert checkpoint_bytes(folder, config, "float32") == real
    finally:
        asyncio.run(on_cpu.unload())


# ----------------------------------------------------------------------------- validation


BAD_REQUESTS = [
    (InferRequest([InferInput("text", "FP32", np.zeros(2, np.float32))]), "input 'text' is FP32"),
    (InferRequest([InferInput("text", "BYTES", _texts("a", "b").reshape(1, 2))]), "input 'text' has shape [1, 2]"),
    (InferRequest([InferInput("prompt", "BYTES", _texts("a"))]), "input 'prompt' is not an input"),
    (InferRequest([InferInput("text", "BYTES", _texts("a")), InferInput("text_input", "BYTES", _texts("b"))]),
     "inputs 'text' and 'text_input'"),
    (InferRequest([InferInput("text", "BYTES", _texts("a")),
                   InferInput("input_ids", "INT64", np.ones((1, 2), np.int64))]), "input 'input_ids' cannot be combined"),
    (InferRequest([InferInput("attention_mask", "INT64", np.ones((1, 2), np.int64))]), "input 'attention_mask' needs"),
    (InferRequest([InferInput("input_ids", "FP32", np.ones((1, 2), np.float32))]), "input 'input_ids' is FP32"),
    (InferRequest([InferInput("input_ids", "INT64", np.ones(3, np.int64))]), "input 'input_ids' has shape [3]"),
    (InferRequest([InferInput("input_ids", "INT64", np.ones((1, 3), np.int64)),
                   InferInput("attention_mask", "INT64", np.ones((1, 2), np.int64))]), "input 'attention_mask' has shape"),
    (InferRequest([InferInput("input_ids", "INT64", np.ones((1, 3), np.int64)),
                   InferInput("attention_mask", "INT64", np.full((1, 3), 2, np.int64))]), "input 'attention_mask' must hold 0"),
    (InferRequest([InferInput("input_ids", "INT64", np.full((1, 3), 10**6, np.int64))]), "input 'input_ids': token ids must be"),
    (InferRequest([InferInput("input_ids", "INT64", np.ones((1, 3), np.int64)),
                   InferInput("attention_mask", "INT64", np.array([[0, 0, 0]]))]), "input 'input_ids': row 0 has no tokens"),
    (InferRequest([InferInput("input_ids", "INT64", np.ones((1, 65), np.int64))]), "input 'input_ids': row 0 is 65 tokens long"),
    (InferRequest([InferInput("text", "BYTES", _texts(b"\xff\xfe"))]), "input 'text': text 0 is not valid UTF-8"),
    (text_request("a", outputs=("logits",)), "unknown output 'logits'"),
    (text_request(" ".join(["dog"] * 70)), "input 'text': text 0 is 72 tokens long and the model takes at most 64"),
    (text_request("cat " * 3000), "input 'text': text 0 is 12000 bytes long"),
    (text_request("a", truncation="yes"), "parameter 'truncation'"),
]


@pytest.mark.parametrize("request_, message", BAD_REQUESTS)
def test_classifier_refuses(request_: InferRequest, message: str, loaded: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as info:
        loaded["classifier"].validate(request_)
    assert message in info.value.message


def test_generator_and_embedder_refuse(loaded: dict[str, Any]) -> None:
    generator, embedder = loaded["generator"], loaded["embedder"]
    with pytest.raises(InvalidInput, match="parameter 'max_new_tokens' is -1"):
        generator.validate(text_request("hi", max_new_tokens=-1))
    with pytest.raises(InvalidInput, match="parameter 'top_p'"):
        generator.validate(text_request("hi", do_sample=True, top_p=2))
    # 256 positions: a prompt of 250 tokens leaves no room for 8 new ones
    with pytest.raises(InvalidInput, match=r"text 0 is \d+ tokens long and the model takes at most 248 tokens "
                                           r"\(256 positions minus max_new_tokens 8\)"):
        generator.validate(text_request("seven " * 300, max_new_tokens=8))
    with pytest.raises(InvalidInput, match="unknown output 'scores'"):
        generator.validate(text_request("hi", outputs=("scores",)))
    with pytest.raises(InvalidParameter, match="unknown parameter 'normalize'"):
        generator.validate(text_request("hi", normalize=True))
    with pytest.raises(InvalidInput, match="parameter 'normalize'"):
        embedder.validate(text_request("hi", normalize=1))
    generator.validate(text_request("seven " * 300, max_new_tokens=8, truncation=True))


# ----------------------------------------------------------------------------- batching in-process


def test_batch_key_separates_outputs_parameters_and_lengths(loaded: dict[str, Any]) -> None:
    classifier, generator = loaded["classifier"], loaded["generator"]
    key = classifier.batch_key
    assert key(text_request("short one")) == key(text_request("other one", "and two"))
    assert key(text_request("short one")) != key(text_request("short one", outputs=("label",)))
    assert key(text_request("short one")) != key(text_request("a much longer text of more than thirty-two bytes"))
    assert key(text_request("x" * 40)) == key(text_request("y" * 60))  # the same power of two
    ids = InferRequest([InferInput("input_ids", "INT64", np.ones((1, 5), np.int64))])
    assert key(ids) != key(text_request("short"))
    gkey = generator.batch_key
    assert gkey(text_request("hi")) == gkey(text_request("yo"))
    assert gkey(text_request("hi", max_new_tokens=4)) != gkey(text_request("hi", max_new_tokens=5))
    assert gkey(text_request("hi", do_sample=True, temperature=0.7)) != gkey(text_request("hi", do_sample=True))
    assert gkey(text_request("hi", do_sample=True)) == gkey(text_request("yo", do_sample=True))
    assert gkey(text_request("hi", top_k=3)) == gkey(text_request("hi"))  # greedy: top_k means nothing
    assert gkey(text_request("hi", stop="x")) != gkey(text_request("hi"))
    # seeded sampling runs alone, so the seed alone decides its draws
    assert gkey(text_request("hi", do_sample=True, seed=1)) != gkey(text_request("hi", do_sample=True, seed=1))
    assert classifier.rows(text_request("a", "b", "c")) == 3
    assert classifier.rows(InferRequest([InferInput("text", "BYTES", _texts("a", "b").reshape(2, 1))])) == 2


def test_classifier_batch_equals_single_requests(loaded: dict[str, Any], reference: Reference) -> None:
    model = loaded["classifier"]
    requests = [text_request(TEXTS[0], TEXTS[1]), text_request(TEXTS[2]), text_request(TEXTS[3])]
    batched = infer(model, *requests)
    singles = [infer(model, text_request(t))[0] for t in TEXTS]
    rows = [row for result in batched for row in result["scores"]]
    assert [r["scores"].shape for r in batched] == [(2, 3), (1, 3), (1, 3)]
    for row, single, text in zip(rows, singles, TEXTS):
        np.testing.assert_allclose(row, single["scores"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row, reference.scores(text), rtol=1e-5, atol=1e-6)
    labels = [label for result in batched for label in result["label"]]
    expected = [tiny_hf.LABELS[int(np.argmax(reference.scores(t)))].encode() for t in TEXTS]
    assert labels == expected
    assert len(set(labels)) > 1  # the random classifier does tell these texts apart


@pytest.mark.parametrize("config_pad", ["eos", "not a token"])
def test_a_decoder_classifier_scores_a_batched_row_as_alone(config_pad: str, tmp_path: Path) -> None:
    """A Llama classifier scores the last token that is not its config's padding id: a batch
    padded with another id (the tokenizer's) would score a short row at a padding position."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pad = {"eos": 2, "not a token": -1}[config_pad]
    folder = tiny_hf.build_decoder_classifier(tmp_path / "llama-classifier", config_pad_token_id=pad)
    model = asyncio.run(TransformersRuntime().load(spec_for(folder, "llama-classifier"), Placement()))
    try:
        batched = infer(model, text_request(*TEXTS))[0]["scores"]
        singles = [infer(model, text_request(text))[0]["scores"][0] for text in TEXTS]
    finally:
        asyncio.run(model.unload())
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for row, single, text in zip(batched, singles, TEXTS):
        with torch.inference_mode():  # one unpadded row: transformers' own answer
            alone = torch.softmax(hf(**tokenizer(text, return_tensors="pt")).logits, -1)[0].numpy()
        np.testing.assert_allclose(single, alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(row, alone, rtol=1e-5, atol=1e-6)


def test_generator_batch_equals_single_requests(loaded: dict[str, Any], reference: Reference) -> None:
    model = loaded["generator"]
    batched = infer(model, text_request(TEXTS[0], TEXTS[1]), text_request(TEXTS[2]))
    rows = [list(r) for result in batched for r in result["output_ids"]]
    for row, text in zip(rows, TEXTS[:3]):
        assert [t for t in row if t >= 0] == reference.generate(text, 6)
    texts = [t for result in batched for t in result["text_output"]]
    tok = reference.generator_tok
    assert texts == [tok.decode(reference.generate(t, 6), skip_special_tokens=True).encode() for t in TEXTS[:3]]


def test_generated_texts_come_back_in_the_shape_of_the_texts_sent(loaded: dict[str, Any]) -> None:
    model = loaded["generator"]
    column = np.empty((2, 1), dtype=object)
    column[:, 0] = [TEXTS[0].encode(), TEXTS[1].encode()]
    flat, shaped = infer(model, text_request(TEXTS[0], TEXTS[1]),
                         InferRequest([InferInput("text_input", "BYTES", column)]))
    assert flat["text_output"].shape == (2,) and shaped["text_output"].shape == (2, 1)  # as vLLM's runtime
    assert shaped["text_output"][:, 0].tolist() == flat["text_output"].tolist()
    assert shaped["output_ids"].tolist() == flat["output_ids"].tolist()


def test_generation_stops_at_eos_and_pads_ids_per_request(hf_repo: HFRepo, reference: Reference,
                                                          tmp_path: Path) -> None:
    # make the third token greedy decoding picks for TEXTS[0] the end-of-sequence token
    greedy = reference.generate(TEXTS[0], 6)
    folder = tmp_path / "eos"
    shutil.copytree(hf_repo.folder("generator"), folder)
    gen_config = json.loads((folder / "generation_config.json").read_text())
    gen_config["eos_token_id"] = greedy[2]
    (folder / "generation_config.json").write_text(json.dumps(gen_config))
    model = asyncio.run(TransformersRuntime().load(spec_for(folder, max_new_tokens=6), Placement()))
    try:
        other = next(t for t in TEXTS[1:] if greedy[2] not in reference.generate(t, 6))
        result = infer(model, text_request(TEXTS[0], other))[0]
        assert result["output_ids"].tolist() == [greedy[:2] + [-1] * 4, reference.generate(other, 6)]
        tok = reference.generator_tok
        assert result["text_output"][0] == tok.decode(greedy[:2], skip_special_tokens=True).encode()
        alone = infer(model, text_request(TEXTS[0]))[0]
        assert alone["output_ids"].tolist() == [greedy[:2]]  # padded to the request's own longest row
    finally:
        asyncio.run(model.unload())


def test_a_repetition_penalty_leaves_a_batched_rows_padding_out(loaded: dict[str, Any], hf_repo: HFRepo,
                                                                 reference: Reference, tmp_path: Path) -> None:
    # a checkpoint whose tokenizer has no padding token pads with end-of-sequence (as GPT-2's):
    # the penalty must not count a row's left padding as tokens it holds, or it stops later batched
    import torch

    penalized = infer(loaded["generator"], text_request(TEXTS[0], repetition_penalty=1.3))[0]["output_ids"][0]
    with torch.inference_mode():  # transformers' own penalty, on the row alone
        enc = reference.generator_tok([TEXTS[0]], return_tensors="pt")
        out = reference.generator.generate(**enc, max_new_tokens=6, do_sample=False, repetition_penalty=1.3,
                                           pad_token_id=reference.generator_tok.pad_token_id)
    assert penalized.tolist() == out[0, enc["input_ids"].shape[1]:].tolist()
    eos = int(penalized[2])
    folder = tmp_path / "pad-eos"
    shutil.copytree(hf_repo.folder("generator"), folder)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "eos_token_id": eos, "pad_token_id": None}))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token")
    tokenizer_config["eos_token"] = loaded["generator"].tokenizer.convert_ids_to_tokens(eos)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model = asyncio.run(TransformersRuntime().load(spec_for(folder, max_new_tokens=6, threads=1), Placement()))
    try:
        assert model.pad_id == eos
        alone = infer(model, text_request(TEXTS[0], repetition_penalty=1.3))[0]["output_ids"].tolist()
        assert alone == [penalized[:2].tolist()]
        batched = infer(model, text_request(TEXTS[0], TEXTS[2], repetition_penalty=1.3))[0]["output_ids"]
        assert [t for t in batched[0].tolist() if t >= 0] == alone[0]
    finally:
        asyncio.run(model.unload())


def _stop_within(reference: Reference, text: str, tokens: int) -> tuple[list[int], str, int]:
    """Greedy ids for ``text``, a two-character stop string from the middle of their text, and
    the number of tokens up to the one that completes it."""
    tok = reference.generator_tok
    greedy = reference.generate(text, tokens)
    full = tok.decode(greedy, skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    needed = next(n for n in range(1, len(greedy) + 1) if stop in tok.decode(greedy[:n], skip_special_tokens=True))
    assert stop.strip() and "\ufffd" not in stop and needed < len(greedy)
    return greedy, stop, needed


def test_a_stop_string_ends_a_v2_generation_at_its_token(loaded: dict[str, Any], reference: Reference) -> None:
    model = loaded["generator"]
    greedy, stop, needed = _stop_within(reference, TEXTS[0], 12)
    other = next(t for t in TEXTS[1:] if stop not in reference.generator_tok.decode(reference.generate(t, 12)))
    steps: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda *_: steps.append(1))
    try:
        alone = infer(model, text_request(TEXTS[0], max_tokens=12, temperature=0, stop=[stop]))[0]
        forwards_alone = len(steps)
        pair = infer(model, text_request(TEXTS[0], other, max_tokens=12, temperature=0, stop=[stop]))[0]
    finally:
        hook.remove()
    assert alone["output_ids"].tolist() == [greedy[:needed]]
    assert forwards_alone == needed  # the generation stopped there: it did not run all 12 steps
    full = reference.generator_tok.decode(greedy, skip_special_tokens=True)
    assert alone["text_output"].tolist() == [full[:full.index(stop)].encode()]
    # a batch mate without the stop string generates on, unchanged
    assert pair["output_ids"].tolist() == [greedy[:needed] + [-1] * (12 - needed), reference.generate(other, 12)]
    assert pair["text_output"][0] == alone["text_output"][0]


def test_stop_strings_cut_a_beam_search_checkpoints_rows(hf_repo: HFRepo, tmp_path: Path) -> None:
    # beam search makes candidate rows of its own: the criterion stays out, the rows are cut after
    folder = tmp_path / "beams"
    shutil.copytree(hf_repo.folder("generator"), folder)
    gen_config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen_config, "num_beams": 2}))
    model = asyncio.run(TransformersRuntime().load(spec_for(folder, threads=1), Placement()))
    try:
        plain = infer(model, text_request(TEXTS[0], TEXTS[1], max_tokens=8, temperature=0))[0]
        first = plain["text_output"][0].decode()
        stop = first[len(first) // 2:len(first) // 2 + 2]
        assert stop.strip() and "\ufffd" not in stop
        cut = infer(model, text_request(TEXTS[0], TEXTS[1], max_tokens=8, temperature=0, stop=[stop]))[0]
        assert cut["text_output"][0].decode() == first[:first.index(stop)]
        ids = [t for t in cut["output_ids"][0].tolist() if t >= 0]
        decode = lambda tokens: model._decode(tokens)  # noqa: E731, SLF001
        assert ids == plain["output_ids"][0].tolist()[:len(ids)]
        assert stop in decode(ids) and stop not in decode(ids[:-1])  # up to the token that completes it
    finally:
        asyncio.run(model.unload())


def test_compute_uses_the_models_thread_count(loaded: dict[str, Any]) -> None:
    import torch

    model = loaded["classifier"]
    seen: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = model.threads
    try:
        for count in (1, 2, 1):
            model.threads = count
            infer(model, text_request("hi"))
    finally:
        hook.remove()
        model.threads = threads
    assert seen == [1, 2, 1]


def test_token_ids_input_equals_text_input(loaded: dict[str, Any], reference: Reference) -> None:
    model = loaded["embedder"]
    enc = reference.embedder_tok(TEXTS[:3], padding=True, return_tensors="np")
    ids = InferRequest([InferInput("input_ids", "INT64", enc["input_ids"].astype(np.int64)),
                        InferInput("attention_mask", "INT64", enc["attention_mask"].astype(np.int64))])
    from_ids = infer(model, ids)[0]["embedding"]
    from_text = infer(model, text_request(*TEXTS[:3]))[0]["embedding"]
    np.testing.assert_allclose(from_ids, from_text, rtol=1e-5, atol=1e-6)
    for row, text in zip(from_ids, TEXTS):
        np.testing.assert_allclose(row, reference.embedding(text), rtol=1e-5, atol=1e-5)


def test_zero_rows_and_normalize(loaded: dict[str, Any]) -> None:
    model = loaded["embedder"]
    empty = infer(model, InferRequest([InferInput("text", "BYTES", np.empty(0, dtype=object))]))[0]
    assert empty["embedding"].shape == (0, 32)
    plain, unit = infer(model, text_request(TEXTS[0]), text_request(TEXTS[0], normalize=True))
    np.testing.assert_allclose(unit["embedding"], plain["embedding"] / np.linalg.norm(plain["embedding"]), rtol=1e-6)
    assert abs(float(np.linalg.norm(unit["embedding"])) - 1.0) < 1e-6


def test_truncation_keeps_the_first_tokens(hf_repo: HFRepo, reference: Reference) -> None:
    model = asyncio.run(TransformersRuntime().load(spec_for(hf_repo.folder("classifier"), truncation=True), Placement()))
    try:
        long_text = " ".join(["cat", "dog"] * 50)
        scores = infer(model, text_request(long_text))[0]["scores"][0]
        import torch

        enc = reference.classifier_tok([long_text], truncation=True, max_length=64, return_tensors="pt")
        assert enc["input_ids"].shape[1] == 64
        with torch.inference_mode():
            expected = torch.softmax(reference.classifier(**enc).logits, -1)[0].numpy()
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    finally:
        asyncio.run(model.unload())


def test_unload_frees_and_is_idempotent(hf_repo: HFRepo) -> None:
    model = asyncio.run(TransformersRuntime().load(spec_for(hf_repo.folder("embedder")), Placement()))
    params = list(model.model.parameters())
    assert model.memory()["cpu"] > 100_000
    assert not model.can_offload  # CPU placement: no host tier
    asyncio.run(model.unload())
    asyncio.run(model.unload())
    assert model.memory() == {}
    assert model.model is None
    assert all(p.numel() == 0 for p in params)  # the storage is gone even if the modules live on


# ----------------------------------------------------------------------------- through the server


def test_server_serves_the_three_tasks(hf_server: Any) -> None:
    index = httpx.post(f"{hf_server.url}/v2/repository/index", json={}).json()
    assert {row["name"]: row["state"] for row in index} == {
        "classifier": "READY", "classifier-trunc": "READY", "embedder": "READY", "generator": "READY",
    }
    meta = httpx.get(f"{hf_server.url}/v2/models/classifier").json()
    assert meta["platform"] == "transformers"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    assert meta["parameters"]["task"] == "classification"
    assert httpx.get(f"{hf_server.url}/v2/models/generator").json()["parameters"]["max_tokens"] == 256


def test_http_classification_equals_in_process(hf_server: Any, reference: Reference) -> None:
    out = outputs_of(post(hf_server, "classifier", [text_input(*TEXTS)]))
    assert out["scores"]["shape"] == [4, 3]
    scores = np.array(out["scores"]["data"], dtype=np.float32).reshape(4, 3)
    for row, text in zip(scores, TEXTS):
        np.testing.assert_allclose(row, reference.scores(text), rtol=1e-5, atol=1e-6)
    assert out["label"]["data"] == [tiny_hf.LABELS[int(np.argmax(reference.scores(t)))] for t in TEXTS]
    # [N, 1] texts under the other accepted name, asking for one output
    only = outputs_of(post(hf_server, "classifier", [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1],
                                                      "data": [TEXTS[2]]}], outputs=[{"name": "label"}]))
    assert list(only) == ["label"]
    assert only["label"]["data"] == out["label"]["data"][2:3]


def test_http_embedding_equals_in_process_mean_pooling(hf_server: Any, reference: Reference) -> None:
    out = outputs_of(post(hf_server, "embedder", [text_input(*TEXTS)]))
    assert out["embedding"]["shape"] == [4, 32] and out["embedding"]["datatype"] == "FP32"
    rows = np.array(out["embedding"]["data"], dtype=np.float32).reshape(4, 32)
    for row, text in zip(rows, TEXTS):
        np.testing.assert_allclose(row, reference.embedding(text), rtol=1e-5, atol=1e-5)


def test_http_greedy_generation_equals_in_process_generate(hf_server: Any, reference: Reference) -> None:
    first = outputs_of(post(hf_server, "generator", [text_input(TEXTS[0], TEXTS[2])],
                            parameters={"max_new_tokens": 5, "do_sample": False}))
    again = outputs_of(post(hf_server, "generator", [text_input(TEXTS[0], TEXTS[2])],
                            parameters={"max_new_tokens": 5, "do_sample": False}))
    assert first == again
    tok = reference.generator_tok
    for i, text in enumerate((TEXTS[0], TEXTS[2])):
        expected = reference.generate(text, 5)
        assert len(expected) == 5
        assert first["output_ids"]["data"][i * 5:(i + 1) * 5] == expected
        assert first["text_output"]["data"][i] == tok.decode(expected, skip_special_tokens=True)
    # the model's default max_new_tokens (6, from model.yaml)
    default = outputs_of(post(hf_server, "generator", [text_input(TEXTS[1])]))
    assert default["output_ids"]["data"] == reference.generate(TEXTS[1], 6)


def test_http_seeded_sampling_is_reproducible(hf_server: Any) -> None:
    def sample(seed: int) -> list[int]:
        return outputs_of(post(hf_server, "generator", [text_input(TEXTS[0])], parameters={
            "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": seed, "max_new_tokens": 12,
        }))["output_ids"]["data"]

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3)}) > 1


def _v2_ids(server: Any, text: str, **parameters: Any) -> list[int]:
    return outputs_of(post(server, "generator", [text_input(text)], parameters=parameters))["output_ids"]["data"]


def test_http_v2_infer_takes_max_tokens_and_top_k(hf_server: Any, reference: Reference) -> None:
    assert _v2_ids(hf_server, TEXTS[0], max_tokens=3) == reference.generate(TEXTS[0], 3)
    # top_k 1 leaves only the most likely token to draw: hot sampling is greedy again
    greedy = reference.generate(TEXTS[0], 12)
    assert _v2_ids(hf_server, TEXTS[0], max_tokens=12, temperature=2.0, top_k=1, seed=5) == greedy
    assert _v2_ids(hf_server, TEXTS[0], max_tokens=12, temperature=2.0, seed=5) != greedy


def test_http_v2_stop_ends_as_generate_does(hf_server: Any, reference: Reference) -> None:
    greedy = reference.generate(TEXTS[0], 12)
    full = reference.generator_tok.decode(greedy, skip_special_tokens=True)
    cut = len(full) // 2
    stop = full[cut:cut + 2]
    cut = full.index(stop)
    assert cut > 0 and stop.strip() and "\ufffd" not in stop
    parameters = {"max_tokens": 12, "temperature": 0, "stop": [stop]}
    out = outputs_of(post(hf_server, "generator", [text_input(TEXTS[0])], parameters=parameters))
    generated = httpx.post(f"{hf_server.url}/v2/models/generator/generate", timeout=60,
                           json={"text_input": TEXTS[0], "parameters": parameters})
    assert generated.status_code == 200, generated.text
    assert out["text_output"]["data"] == [full[:cut]] == [generated.json()["text_output"]]
    ids = out["output_ids"]["data"]  # up to the token that completes the stop string
    assert ids == greedy[:len(ids)] and len(ids) < len(greedy)
    assert stop in reference.generator_tok.decode(ids) and stop not in reference.generator_tok.decode(ids[:-1])


def test_stop_strings_count_only_after_min_tokens_as_in_vllm(hf_server: Any, reference: Reference) -> None:
    # a stop string completed within the first min_tokens tokens is passed over; one more and it ends the text
    tok = reference.generator_tok
    for prompt in TEXTS:
        greedy, stop, needed = _stop_within(reference, prompt, 12)
        full = tok.decode(greedy, skip_special_tokens=True)
        if full.count(stop) == 1:  # it does not come again later
            break
    else:
        pytest.fail("no prompt whose greedy text holds its stop string once")
    for min_tokens, text in ((needed, full), (needed - 1, full[:full.index(stop)])):
        parameters = {"max_tokens": 12, "temperature": 0, "stop": [stop], "min_tokens": min_tokens}
        batched = outputs_of(post(hf_server, "generator", [text_input(prompt)], parameters=parameters))
        assert batched["text_output"]["data"] == [text], min_tokens
        assert (batched["output_ids"]["data"] == greedy) == (text == full)
        body = {"model": "generator", "prompt": prompt, **parameters}
        whole = httpx.post(f"{hf_server.url}/v1/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["text"] == text, min_tokens
        streamed = httpx.post(f"{hf_server.url}/v1/completions", json={**body, "stream": True}, timeout=60)
        docs = [json.loads(event) for event in _events(streamed)[:-1]]
        assert "".join(d["choices"][0]["text"] for d in docs if d["choices"]) == text, min_tokens


@pytest.mark.parametrize("model", ["classifier", "embedder", "generator"])
def test_v2_infer_reports_the_input_tokens_when_asked(hf_server: Any, reference: Reference, model: str) -> None:
    tok = {"classifier": reference.classifier_tok, "embedder": reference.embedder_tok,
           "generator": reference.generator_tok}[model]
    texts = TEXTS[:3]
    asked = post(hf_server, model, [text_input(*texts)], parameters={"return_num_input_tokens": True})
    assert asked.status_code == 200, asked.text
    assert asked.json()["parameters"] == {"num_input_tokens": sum(len(tok(t)["input_ids"]) for t in texts)}
    plain = post(hf_server, model, [text_input(*texts)])
    assert "parameters" not in plain.json()
    refused = post(hf_server, model, [text_input(*texts)], parameters={"return_num_input_tokens": "yes"})
    assert refused.status_code == 400 and "return_num_input_tokens" in refused.json()["error"]


def _batches(server: Any, model: str) -> int:
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        if line.startswith("mmserver_inference_batches_total{") and f'model_name="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.mark.parametrize("model", ["embedder", "generator"])
def test_http_concurrent_requests_of_different_lengths_equal_single_requests(
    hf_server: Any, model: str
) -> None:
    texts = TEXTS + ["cat", "the quick dog and the slow cat", "one two three four five six seven eight",
                     "river"]
    output = "embedding" if model == "embedder" else "output_ids"
    singles = [outputs_of(post(hf_server, model, [text_input(t)]))[output]["data"] for t in texts]
    before = _batches(hf_server, model)
    with ThreadPoolExecutor(len(texts)) as pool:
        concurrent = list(pool.map(lambda t: outputs_of(post(hf_server, model, [text_input(t)]))[output]["data"],
                                   texts))
    batches = _batches(hf_server, model) - before
    assert 1 <= batches < len(texts), f"{len(texts)} concurrent requests ran in {batches} batches"
    for got, single in zip(concurrent, singles):
        if model == "embedder":
            np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-5)
        else:
            assert got == single


def test_http_truncation_setting(hf_server: Any) -> None:
    long_text = " ".join(["dog"] * 100)
    refused = post(hf_server, "classifier", [text_input(long_text)])
    assert refused.status_code == 400
    assert "input 'text': text 0 is 102 tokens long and the model takes at most 64 tokens" in refused.json()["error"]
    assert outputs_of(post(hf_server, "classifier-trunc", [text_input(long_text)]))["scores"]["shape"] == [1, 3]
    assert outputs_of(post(hf_server, "classifier", [text_input(long_text)],
                           parameters={"truncation": True}))["scores"]["shape"] == [1, 3]


@pytest.mark.parametrize("model, body, message", [
    ("classifier", {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     "input 'text' is FP32; texts must be BYTES"),
    ("classifier", {"inputs": [{"name": "sentence", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
     "input 'sentence' is not an input of this model"),
    ("embedder", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]},
     "input 'text' has shape [1, 2]; expected [N] or [N, 1]"),
    ("embedder", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 99999]}]},
     "input 'input_ids': token ids must be in [0, 300)"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"max_new_tokens": 0}},
     "parameter 'max_new_tokens' is 0; expected an integer at least 1"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"max_tokens": 0}},
     "parameter 'max_tokens' is 0; expected an integer at least 1"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"temperature": -1, "do_sample": True}},
     "parameter 'temperature' is -1"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"top_k": "many"}}, "parameter 'top_k' is 'many'"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"stop": [3]}}, "parameter 'stop' must be"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"ignore_eos": 1}}, "parameter 'ignore_eos' is 1"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"frequency_penalty": 1}},
     "parameter 'frequency_penalty' is not supported by the transformers runtime"),
    ("generator", {"inputs": [text_input("hi")], "parameters": {"max_lenght": 5}}, "unknown parameter 'max_lenght'"),
    ("generator", {"inputs": [text_input("hi")], "outputs": [{"name": "embedding"}]},
     "unknown output 'embedding'; this generation model offers text_output, output_ids"),
])
def test_http_bad_inputs_get_400_naming_the_input(hf_server: Any, model: str, body: dict[str, Any],
                                                   message: str) -> None:
    response = httpx.post(f"{hf_server.url}/v2/models/{model}/infer", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


# ----------------------------------------------------------------------------- GPU


# ----------------------------------------------------------------------------- OpenAI and generate routes


def _events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]


def test_openai_completion_streamed_equals_the_whole_answer(hf_server: Any) -> None:
    body = {"model": "generator", "prompt": "the cat", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(f"{hf_server.url}/v1/completions", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.json()["usage"]["completion_tokens"] == 5
    streamed = httpx.post(f"{hf_server.url}/v1/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    docs = [json.loads(event) for event in events[:-1]]
    assert "".join(d["choices"][0]["text"] for d in docs if d["choices"]) == whole.json()["choices"][0]["text"]
    assert docs[-1]["usage"] == whole.json()["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_the_runtime_refuses_is_a_400_naming_the_prompt(hf_server: Any, stream: bool) -> None:
    body = {"model": "generator", "prompt": [1, 10**6], "max_tokens": 2, "stream": stream}
    response = httpx.post(f"{hf_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "token ids must be integers" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_too_long_for_the_model_is_a_400_naming_the_messages(hf_server: Any, stream: bool) -> None:
    """A chat request has no 'prompt': the error names its 'messages' (as the README says)."""
    body = {"model": "generator", "messages": [{"role": "user", "content": "the cat " * 200}], "max_tokens": 2,
            "stream": stream}
    response = httpx.post(f"{hf_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "tokens" in error["message"], error


@pytest.mark.parametrize("param, value", [("temperature", 1e-300), ("temperature", 5e-324),
                                          ("repetition_penalty", 1e-300), ("repetition_penalty", 5e-324)])
def test_a_tiny_positive_temperature_or_penalty_samples_instead_of_a_500(hf_server: Any, param: str,
                                                                       value: float) -> None:
    """Logits divided by such a value overflow: vLLM samples at a temperature of 0.01 instead,
    and the generator also floors the repetition penalty there."""
    body = {"model": "generator", "prompt": "the cat", "max_tokens": 3, "temperature": 0.7, param: value,
            "ignore_eos": True}
    response = httpx.post(f"{hf_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_a_parameter_the_runtime_refuses_gets_its_400_also_when_streamed(hf_server: Any) -> None:
    body = {"model": "generator", "prompt": "the cat", "max_tokens": 4, "presence_penalty": 0.5}
    for stream in (False, True):
        response = httpx.post(f"{hf_server.url}/v1/completions", json={**body, "stream": stream}, timeout=60)
        assert response.status_code == 400, (stream, response.text)
        assert response.json()["error"]["param"] == "presence_penalty"
    for route in ("generate", "generate_stream"):
        response = httpx.post(f"{hf_server.url}/v2/models/generator/{route}", timeout=60,
                              json={"text_input": "the cat", "max_tokens": 4, "presence_penalty": 0.5})
        assert response.status_code == 400, (route, response.text)
        assert "presence_penalty" in response.json()["error"]


@pytest.mark.parametrize("coding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_the_json_routes_take_compressed_bodies_as_infer_does(hf_server: Any, coding: str, compress: Any) -> None:
    routes = (("/v1/completions", {"model": "generator", "prompt": "the cat", "max_tokens": 3, "temperature": 0}),
              ("/v2/models/generator/generate", {"text_input": "the cat", "max_tokens": 3, "temperature": 0}),
              ("/v2/repository/index", {"ready": True}))
    for path, body in routes:
        plain = httpx.post(f"{hf_server.url}{path}", json=body, timeout=60)
        packed = httpx.post(f"{hf_server.url}{path}", content=compress(json.dumps(body).encode()), timeout=60,
                            headers={"Content-Type": "application/json", "Content-Encoding": coding})
        assert plain.status_code == packed.status_code == 200, (path, packed.text)
        if path == "/v1/completions":
            assert packed.json()["choices"] == plain.json()["choices"]
        else:
            assert packed.json() == plain.json(), path
    refused = httpx.post(f"{hf_server.url}/v1/completions", content=b"x", timeout=60,
                         headers={"Content-Encoding": "br"})
    assert refused.status_code == 415 and "'br' is not supported" in refused.json()["error"]["message"]
    broken = httpx.post(f"{hf_server.url}/v2/models/generator/generate", content=b"not gzip", timeout=60,
                        headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400 and "not valid gzip data" in broken.json()["error"]


def test_a_long_prompt_is_tokenized_off_the_event_loop(hf_server: Any) -> None:
    # seconds of tokenizing, then a 400 (far beyond the model's positions); the server answers meanwhile
    prompt = "the cat sat on the mat " * 300_000
    for path, body in (("/v1/completions", {"model": "generator", "prompt": prompt, "max_tokens": 2}),
                       ("/v2/models/generator/generate", {"text_input": prompt, "max_tokens": 2})):
        result: dict[str, Any] = {}

        def send(path: str = path, body: dict[str, Any] = body) -> None:
            response = httpx.post(f"{hf_server.url}{path}", json=body, timeout=120)
            result["status"], result["text"] = response.status_code, response.text[:300]

        worst = live_while(hf_server.url, threading.Thread(target=send))
        assert result["status"] == 400 and "tokens" in result["text"], result
        assert worst < 1.0, f"{path}: /v2/health/live took {worst:.1f} s while the prompt was tokenized"


def test_chat_max_tokens_holds_when_max_completion_tokens_is_null(hf_server: Any) -> None:
    body = {"model": "generator", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "max_completion_tokens": None, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{hf_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_null_fields_take_their_defaults_as_in_openai(hf_server: Any) -> None:
    optional = ("temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "presence_penalty",
                "frequency_penalty", "top_k", "min_tokens", "repetition_penalty", "user", "logprobs", "logit_bias")
    nulls = dict.fromkeys(optional)
    completion = {"model": "generator", "prompt": "the cat", "ignore_eos": True, **nulls, "max_tokens": None,
                  "echo": None, "suffix": None, "best_of": None}
    response = httpx.post(f"{hf_server.url}/v1/completions", json=completion, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1 and response.json()["usage"]["completion_tokens"] == 16
    chat = {"model": "generator", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **nulls,
            "max_completion_tokens": None, "top_logprobs": None, "tools": None, "tool_choice": None,
            "parallel_tool_calls": None, "response_format": None, "ignore_eos": True}
    response = httpx.post(f"{hf_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    streamed = httpx.post(f"{hf_server.url}/v1/completions", timeout=60, json={
        **completion, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.status_code == 200 and _events(streamed)[-1] == "[DONE]"
    assert all(json.loads(e).get("usage") is None for e in _events(streamed)[:-1])  # include_usage: false
    embedded = httpx.post(f"{hf_server.url}/v1/embeddings", timeout=60, json={
        "model": "embedder", "input": "hi", "encoding_format": None, "dimensions": None, "user": None})
    assert embedded.status_code == 200 and isinstance(embedded.json()["data"][0]["embedding"], list)


LONG = {"max_tokens": 220, "ignore_eos": True}  # about a second on the tiny generator (256 positions)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, timeout", [
    ("/v2/models/generator/generate", {"text_input": "the cat", **LONG}, "0.05"),
    ("/v2/models/generator/generate", {"text_input": "the cat", **LONG, "parameters": {"timeout": 50_000}}, None),
    ("/v2/models/generator/generate_stream", {"text_input": "the cat", **LONG, "timeout": 1}, None),
    ("/v1/completions", {"model": "generator", "prompt": "the cat", **LONG}, "0.05"),
    ("/v1/completions", {"model": "generator", "prompt": "the cat", **LONG, "stream": True}, "0.000001"),
    ("/v1/chat/completions", {"model": "generator", "messages": CHAT, **LONG}, "0.05"),
    ("/v1/embeddings", {"model": "embedder", "input": TEXTS}, "0.000001"),
])
def test_the_generation_routes_keep_the_requests_own_deadline(hf_server: Any, path: str, body: dict[str, Any],
                                                               timeout: str | None) -> None:
    """Triton's timeout parameter (microseconds) or Request-Timeout (seconds), as on V2 inference;
    a deadline passed before a stream's first event gets the 504 of an answer without one."""
    started = time.monotonic()
    response = httpx.post(f"{hf_server.url}{path}", json=body, timeout=60,
                          headers={"Request-Timeout": timeout} if timeout else {})
    assert response.status_code == 504, response.text
    assert time.monotonic() - started < 0.5
    error = response.json()["error"]
    if path.startswith("/v1/"):
        assert error["code"] == "timeout"
        error = error["message"]
    assert "the request's deadline passed" in error


def test_a_generous_deadline_or_none_lets_the_generation_finish_and_a_bad_one_is_a_400(hf_server: Any) -> None:
    url = hf_server.url
    short = {"text_input": "the cat", "max_tokens": 2}
    for body, headers in (({**short, "timeout": 60_000_000}, {}), ({**short, "parameters": {"timeout": 0}}, {}),
                          (short, {"Request-Timeout": "60"})):
        response = httpx.post(f"{url}/v2/models/generator/generate", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, (body, response.text)
    refused = httpx.post(f"{url}/v2/models/generator/generate", json={**short, "timeout": -1}, timeout=60)
    assert refused.status_code == 400 and "parameter 'timeout'" in refused.json()["error"]
    for path, body in (("/v1/completions", {"model": "generator", "prompt": "the cat", "max_tokens": 2}),
                       ("/v1/embeddings", {"model": "embedder", "input": "hi"})):
        response = httpx.post(f"{url}{path}", json=body, headers={"Request-Timeout": "soon"}, timeout=60)
        assert response.status_code == 400 and "Request-Timeout" in response.json()["error"]["message"]


def test_a_deadline_passing_mid_stream_ends_it_with_an_openai_error_event(hf_server: Any) -> None:
    # sixteen sequences of 200 tokens, one after the other: seconds, far more than the deadline
    body = {"model": "generator", "prompt": ["the cat", "a dog", "hi", "memory"], "n": 4, "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    response = httpx.post(f"{hf_server.url}/v1/completions", json=body, headers={"Request-Timeout": "0.5"},
                          timeout=60)
    assert time.monotonic() - started < 1.5
    assert response.status_code == 200, response.text
    events = _events(response)
    assert events[-1] == "[DONE]" and len(events) > 3
    error = json.loads(events[-2])["error"]
    assert error["code"] == "timeout" and "deadline passed" in error["message"]
    assert all("error" not in json.loads(e) for e in events[:-2])


@pytest.fixture(scope="module")
def eos_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generator, re-saved with the first token it generates greedily after 'the cat'
    as its end-of-sequence token: a generation ends at once unless ``ignore_eos`` holds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_hf.build_generator(tmp_path_factory.mktemp("eos-first") / "gen")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        first = int(model.generate(**tokenizer(["the cat"], return_tensors="pt"), max_new_tokens=1,
                                   do_sample=False)[0, -1])
    model.generation_config.eos_token_id = model.config.eos_token_id = first
    model.save_pretrained(folder)
    return folder


def _generated(folder: Path, prompt: str | list[int], **params: Any) -> Any:
    from mmserver.generation import GenerationRequest, SamplingParams, generate_all

    model = asyncio.run(TransformersRuntime().load(spec_for(folder, threads=1), Placement("cpu")))
    try:
        return asyncio.run(generate_all(model, GenerationRequest(prompt, SamplingParams(**params))))[0]
    finally:
        asyncio.run(model.unload())


def test_ignore_eos_generates_max_tokens(eos_first: Path) -> None:
    ended = _generated(eos_first, "the cat", max_tokens=5, temperature=0.0)
    assert ended.finish_reason == "stop" and ended.completion_tokens == 1  # its first token is the end
    done = _generated(eos_first, "the cat", max_tokens=5, temperature=0.0, ignore_eos=True)
    assert done.completion_tokens == 5 and done.finish_reason == "length"


def test_v2_ignore_eos_and_min_tokens_generate_past_the_end(eos_first: Path) -> None:
    model = asyncio.run(TransformersRuntime().load(spec_for(eos_first, threads=1), Placement("cpu")))
    try:
        def length(**parameters: Any) -> int:
            return len(infer(model, text_request("the cat", max_tokens=5, **parameters))[0]["output_ids"][0])

        assert length() == 0  # its first token is the end
        assert length(ignore_eos=True) == 5
        assert length(min_tokens=3) >= 3
    finally:
        asyncio.run(model.unload())


def test_top_k_zero_samples_from_the_whole_vocabulary(hf_repo: HFRepo, reference: Reference) -> None:
    import torch

    folder = hf_repo.folder("generator")
    ids = reference.generator_tok("the cat")["input_ids"]
    done = _generated(folder, ids, max_tokens=30, temperature=2.0, top_k=0, seed=123)
    x = torch.tensor([ids])
    expected = {}
    for k in (0, 50):  # transformers' own sampling with top-k off, and with its default of 50
        torch.manual_seed(123)
        with torch.inference_mode():
            out = reference.generator.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                                               temperature=2.0, top_p=1.0, top_k=k, max_new_tokens=30,
                                               pad_token_id=reference.generator_tok.pad_token_id)
        tokens = out[0, x.shape[1]:].tolist()
        eos = reference.generator_tok.eos_token_id
        expected[k] = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
    assert expected[0] != expected[50]
    generated = list(done.token_ids)
    assert generated == expected[0][:len(generated)] != expected[50][:len(generated)]


def test_a_roberta_style_model_takes_no_more_tokens_than_its_offset_positions_allow(tmp_path: Path) -> None:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tokenizer = tiny_hf.wordpiece_tokenizer()
    tokenizer.model_max_length = int(1e30)  # saved without a length limit: the config's decides
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1, num_labels=2)
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).eval().save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    model = asyncio.run(TransformersRuntime().load(spec_for(tmp_path / "roberta", threads=1), Placement("cpu")))
    try:
        assert model.limit == 64  # positions 2..65: padding_idx 1 and the one before it are never used
        longest = InferRequest([InferInput("input_ids", "INT64", np.full((1, 64), 7, dtype=np.int64))])
        model.validate(longest)
        assert infer(model, longest)[0]["scores"].shape == (1, 2)  # it runs
        with pytest.raises(InvalidInput):
            model.validate(InferRequest([InferInput("input_ids", "INT64", np.full((1, 65), 7, dtype=np.int64))]))
    finally:
        asyncio.run(model.unload())


@pytest.fixture
def cuda() -> str:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda:0"


@pytest.mark.gpu
def test_gpu_half_precision_placement(cuda: str, hf_repo: HFRepo, reference: Reference) -> None:
    folder = hf_repo.folder("classifier")
    model = asyncio.run(TransformersRuntime().load(spec_for(folder), Placement(cuda)))
    try:
        assert model.dtype == "float16"
        assert next(model.model.parameters()).dtype.itemsize == 2
        memory = model.memory()
        assert list(memory) == [cuda]
        predicted = checkpoint_bytes(folder, read_config(folder), "float16")
        params = sum(p.numel() * p.element_size() for p in model.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.model.buffers())
        assert predicted == params and memory[cuda] == params + buffers + model.workspace
        assert model.workspace == activation_allowance(read_config(folder), "classification", "float16")
        assert abs(predicted - (memory[cuda] - model.workspace)) <= ESTIMATE_TOLERANCE * memory[cuda]
        assert TransformersRuntime().estimate(spec_for(folder), Placement(cuda)) == estimate_memory(folder, cuda, {})
        scores = infer(model, text_request(*TEXTS))[0]["scores"]
        for row, text in zip(scores, TEXTS):
            np.testing.assert_allclose(row, reference.scores(text), atol=5e-3)
    finally:
        asyncio.run(model.unload())
    assert model.memory() == {}


@pytest.mark.gpu
def test_gpu_offload_restore_round_trip(cuda: str, hf_repo: HFRepo) -> None:
    import torch

    model = asyncio.run(TransformersRuntime().load(spec_for(hf_repo.folder("generator")), Placement(cuda)))
    try:
        assert model.can_offload
        before = infer(model, text_request(*TEXTS))[0]
        on_gpu = model.memory()
        allocated = torch.cuda.memory_allocated(cuda)
        asyncio.run(model.offload())
        assert model.workspace > 0 and model.memory() == {"cpu": on_gpu[cuda] - model.workspace}
        assert all(p.device.type == "cpu" and p.is_pinned() for p in model.model.parameters())
        # what it allocated is gone (its workspace is room kept for batches, not an allocation)
        assert torch.cuda.memory_allocated(cuda) <= allocated - (on_gpu[cuda] - model.workspace)
        with pytest.raises(Exception, match="offloaded"):
            infer(model, text_request("hi"))
        asyncio.run(model.restore(Placement(cuda)))
        assert model.memory() == on_gpu
        after = infer(model, text_request(*TEXTS))[0]
        assert after["output_ids"].tolist() == before["output_ids"].tolist()
        assert after["text_output"].tolist() == before["text_output"].tolist()
    finally:
        asyncio.run(model.unload())


# ----------------------------------------------------------------------------- OpenAI embeddings


def _openai(server: Any, prefix: str = "/v1") -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + prefix, api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_openai_embeddings_through_the_official_client(hf_server: Any, reference: Reference, prefix: str) -> None:
    tok = reference.embedder_tok
    with _openai(hf_server, prefix) as client:
        listed = {m.id for m in client.models.list().data}
        assert {"embedder", "generator"} <= listed and "classifier" not in listed  # a classifier serves no route
        packed = client.embeddings.create(model="embedder", input=TEXTS[:3])  # the client asks for base64
        floats = client.embeddings.create(model="embedder", input=TEXTS[:3], encoding_format="float")
        single = client.embeddings.create(model="embedder", input=TEXTS[0])
    for answer in (packed, floats):
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == "embedder"
        for item, text in zip(answer.data, TEXTS[:3]):
            assert np.allclose(item.embedding, reference.embedding(text), atol=1e-4)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS[:3])
    assert np.allclose(single.data[0].embedding, reference.embedding(TEXTS[0]), atol=1e-4)


def test_openai_embeddings_of_token_ids_equal_those_of_texts(hf_server: Any, reference: Reference) -> None:
    ids = [reference.embedder_tok(t)["input_ids"] for t in TEXTS[:2]]
    url = f"{hf_server.url}/v1/embeddings"
    from_ids = httpx.post(url, json={"model": "embedder", "input": ids}, timeout=60)
    from_one = httpx.post(url, json={"model": "embedder", "input": ids[1]}, timeout=60)
    from_texts = httpx.post(url, json={"model": "embedder", "input": TEXTS[:2]}, timeout=60)
    assert from_ids.status_code == from_one.status_code == from_texts.status_code == 200, from_ids.text
    vectors = [d["embedding"] for d in from_ids.json()["data"]]
    assert np.allclose(vectors, [d["embedding"] for d in from_texts.json()["data"]], atol=1e-5)
    assert np.allclose(from_one.json()["data"][0]["embedding"], vectors[1], atol=1e-5)
    assert from_ids.json()["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_openai_embeddings_of_more_inputs_than_a_batch_keep_their_order(hf_server: Any,
                                                                        reference: Reference) -> None:
    texts = [f"{TEXTS[i % 4]} {i}" for i in range(150)]  # the embedder's max_batch_size is 64: three calls
    before = _batches(hf_server, "embedder")
    response = httpx.post(f"{hf_server.url}/v1/embeddings", json={"model": "embedder", "input": texts}, timeout=60)
    assert response.status_code == 200, response.text
    assert _batches(hf_server, "embedder") - before >= 3
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(150))
    expected = np.stack([reference.embedding(t) for t in texts])
    assert np.allclose([d["embedding"] for d in data], expected, atol=1e-4)


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "embedder", "input": []}, 400, "input", "'input' must be"),
    ({"model": "embedder", "input": ["a", ""]}, 400, "input", "input 1 is an empty string"),
    ({"model": "embedder", "input": [{"text": "a"}]}, 400, "input", "'input' must be"),
    ({"model": "embedder", "input": [[1, 2], []]}, 400, "input", "'input' must be"),
    ({"model": "embedder", "input": ["a"] * 2049}, 400, "input", "at most 2048"),
    ({"model": "embedder", "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "one of float, base64"),
    ({"model": "embedder", "input": "a", "dimensions": 7}, 400, "dimensions", "embeds into 32 dimensions"),
    ({"model": "embedder", "input": "a", "dimensions": "32"}, 400, "dimensions", "positive integer"),
    ({"model": "embedder", "input": "a", "truncate": True}, 400, "truncate", "unrecognized request argument"),
    ({"input": "a"}, 400, "model", "you must provide a model"),
    ({"model": "embedder", "input": [[1, 10**6]]}, 400, "input", "token ids must be in"),
    ({"model": "embedder", "input": ["word " * 5000]}, 400, "input", "takes at most 64 tokens"),
    ({"model": "embedder", "input": [[2**63]]}, 400, "input", "'input' must be"),  # beyond int64: not a 500
    ({"model": "embedder", "input": [2**64 - 1, 5]}, 400, "input", "'input' must be"),
    ({"model": "embedder", "input": [-1, 5]}, 400, "input", "'input' must be"),
    ({"model": "generator", "input": "a"}, 400, None, "does not embed text"),
    ({"model": "classifier", "input": "a"}, 400, None, "does not embed text"),
    ({"model": "nothing", "input": "a"}, 404, None, "does not exist"),
])
def test_openai_embeddings_refusals(hf_server: Any, body: dict[str, Any], status: int, param: str | None,
                                    message: str) -> None:
    response = httpx.post(f"{hf_server.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param, error


def test_a_lazy_embedding_model_loads_on_its_first_request_queues_parts_in_turn_and_unloads(
        hf_repo: HFRepo, reference: Reference, tmp_path: Path, start_server: Any) -> None:
    folder = tiny_hf.link_model(hf_repo.folder("embedder"), tmp_path / "repo" / "lazy-embedder")
    (folder / "model.yaml").unlink()
    (folder / "model.yaml").write_text("load: lazy\nparameters: {task: embedding}\n"
                                       "batching: {max_batch_size: 1, max_queue: 2}\n")
    with start_server(tmp_path / "repo", tmp_path / "server.log") as server:
        (row,) = httpx.post(f"{server.url}/v2/repository/index").json()
        assert row["state"] == "UNAVAILABLE" and row["reason"] == "loads on first request"
        listed = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["lazy-embedder"]  # told from its files, before it loads
        response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "lazy-embedder", "input": TEXTS[1]},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert np.allclose(response.json()["data"][0]["embedding"], reference.embedding(TEXTS[1]), atol=1e-4)
        # one input per call and room for two in the queue: 12 inputs still pass, two at a time
        many = httpx.post(f"{server.url}/v1/embeddings", json={"model": "lazy-embedder", "input": TEXTS * 3},
                          timeout=60)
        assert many.status_code == 200, many.text
        expected = [reference.embedding(t) for t in TEXTS * 3]
        assert np.allclose([d["embedding"] for d in many.json()["data"]], expected, atol=1e-4)
        (row,) = httpx.post(f"{server.url}/v2/repository/index").json()
        assert row["state"] == "READY"
        # an operator's unload while a request of 2048 parts runs: both end (its parts queued
        # under the model's hold would have waited for the unload, which waited for the hold)
        result: dict[str, Any] = {}

        def embed() -> None:
            body = {"model": "lazy-embedder", "input": [f"the dog {i}" for i in range(2048)]}
            result["response"] = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)

        worker = threading.Thread(target=embed)
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive(), "the request ended before the unload"
        unload = httpx.post(f"{server.url}/v2/repository/models/lazy-embedder/unload", timeout=30)
        worker.join(60)
        assert unload.status_code == 200 and not worker.is_alive()
        assert result["response"].status_code == 503
        assert "unloaded by request" in result["response"].json()["error"]["message"]
