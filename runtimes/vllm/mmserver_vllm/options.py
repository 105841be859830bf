"""What a model folder and its ``model.yaml`` say before vLLM is imported: whether vLLM can serve
the checkpoint, the engine options, and the memory the engine will take.

Pure Python: detection and estimates never import vllm or torch (importing vLLM's model registry
alone takes about 10 s). The architectures vLLM supports are read from the source of the
installed vLLM's model registry (a literal dict), so they follow the installed version.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmserver.checkpoint import CONFIG_FILE, checkpoint_bytes, kv_bytes_per_token, max_positions, read_config
from mmserver.errors import ModelLoadError
from mmserver.runtime import HOST
from mmserver.sizes import parse_size

log = logging.getLogger("mmserver_vllm")

MiB = 1024**2
GiB = 1024**3

#: KV cache on the CPU when model.yaml does not size it (FACTS: plenty for small models)
DEFAULT_CPU_KV_CACHE = 256 * MiB
#: KV cache on a GPU when neither model.yaml nor a declared ``memory`` size it: room for
#: ``max_num_seqs`` full-length sequences, within these bounds
MIN_GPU_KV_CACHE, MAX_GPU_KV_CACHE = 256 * MiB, 4 * GiB
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_TOKENS = 16  # V2 infer and generate, as vLLM's and OpenAI's completions
#: positions when model.yaml gives no max_model_len and the config is silent or huge
DEFAULT_MAX_MODEL_LEN = 8192
#: below this many weight bytes a model runs eagerly (no CUDA graphs, no torch.compile): their
#: capture and compilation cost more start-up time than they save on small models
EAGER_BELOW = 2 * GiB
#: memory an engine takes beyond weights and KV cache: its processes' own host memory (their
#: Python, torch and vLLM: PSS measured about 1.0 GiB for a tiny model on the CPU), and on a
#: GPU the CUDA context, activations and sampler buffers
ENGINE_HOST_OVERHEAD = 1 * GiB
GPU_ENGINE_OVERHEAD = 768 * MiB

KNOWN_PARAMETERS = frozenset({
    "task", "kv_cache_memory_bytes", "max_model_len", "max_num_seqs", "dtype", "enforce_eager", "max_tokens",
    "temperature", "seed", "sleep_level", "trust_remote_code", "engine_args",
})
#: what an engine does: generate text, or embed it (vLLM's pooling runner)
GENERATION, EMBEDDING = "generation", "embedding"
TASKS = (GENERATION, EMBEDDING)
DTYPES = ("auto", "float32", "float16", "bfloat16")

#: used when the installed vLLM's registry cannot be read (common decoder-only families)
FALLBACK_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "GPTJForCausalLM", "OPTForCausalLM", "FalconForCausalLM",
    "BloomForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM",
    "GraniteForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
})


def vllm_installed() -> bool:
    """Whether ``import vllm`` can be tried (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def supported_architectures() -> frozenset[str]:
    """The decoder-only architectures of the installed vLLM (its ``_TEXT_GENERATION_MODELS``),
    read from the registry's source without importing it."""
    try:
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return frozenset()
        source = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "models" / "registry.py"
        tree = ast.parse(source.read_text())
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            if target is None and isinstance(node, ast.AnnAssign):
                target = node.target
            if isinstance(target, ast.Name) and target.id == "_TEXT_GENERATION_MODELS":
                value = node.value
                if isinstance(value, ast.Dict):
                    names = {k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                    if names:
                        return frozenset(names)
    except (OSError, SyntaxError, ImportError, ValueError) as exc:
        log.warning("cannot read the installed vLLM's model registry (%s); assuming common architectures", exc)
    return FALLBACK_ARCHITECTURES


def architectures(config: dict[str, Any]) -> list[str]:
    names = config.get("architectures") or []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def is_servable(folder: Path) -> bool:
    """A Hugging Face folder (config.json and weights) of an architecture vLLM generates with."""
    if not folder.is_dir() or not (folder / CONFIG_FILE).is_file():
        return False
    if not any(p.is_file() for p in folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        return False
    try:
        config = read_config(folder)
    except ModelLoadError:
        return False
    wanted = architectures(config)
    return bool(wanted) and vllm_installed() and any(a in supported_architectures() for a in wanted)


# ----------------------------------------------------------------------------- options


def task_of(parameters: dict[str, Any]) -> str:
    """The task ``parameters.task`` names (generation when it names none)."""
    task = parameters.get("task", GENERATION)
    if task not in TASKS:
        raise ModelLoadError(f"parameters.task is {task!r}; the vllm runtime serves {' or '.join(TASKS)}")
    return task


def _size(name: str, value: Any) -> int:
    try:
        size = parse_size(value)
    except ValueError:
        size = -1
    if size <= 0:
        raise ModelLoadError(f"parameters.{name} is {value!r}; expected a size like 256MiB or a byte count")
    return size


def _positive_int(name: str, value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ModelLoadError(f"parameters.{name} is {value!r}; expected a positive integer")
    return value


@dataclass(frozen=True, slots=True)
class Options:
    """The engine options of one model (``model.yaml`` ``parameters``), validated and resolved."""

    device: str
    dtype: str  # what vLLM is told (auto or a dtype)
    run_dtype: str  # what the weights will be in
    kv_cache_bytes: int
    max_model_len: int
    max_num_seqs: int
    enforce_eager: bool
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    seed: int | None = None
    sleep_level: int = 1
    trust_remote_code: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0
    task: str = GENERATION

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def parse(cls, folder: Path, device: str, parameters: dict[str, Any], declared: int | None) -> Options:
        """``declared``: the ``memory`` of model.yaml, which sizes the KV cache on a GPU when
        ``kv_cache_memory_bytes`` is not given."""
        unknown = sorted(set(parameters) - KNOWN_PARAMETERS)
        if unknown:
            log.warning("model.yaml parameters %s mean nothing to the vllm runtime (it reads %s)",
                        unknown, ", ".join(sorted(KNOWN_PARAMETERS)))
        config = read_config(folder)
        dtype = parameters.get("dtype", "auto")
        if dtype not in DTYPES:
            raise ModelLoadError(f"parameters.dtype is {dtype!r}; expected one of {', '.join(DTYPES)}")
        run_dtype = dtype if dtype != "auto" else _auto_dtype(config)
        weights = checkpoint_bytes(folder, config, run_dtype)
        gpu = device.startswith("cuda")
        max_num_seqs = _positive_int("max_num_seqs", parameters.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS))
        per_token = kv_bytes_per_token(config, run_dtype)
        positions = max_positions(config)
        if "kv_cache_memory_bytes" in parameters:
            kv = _size("kv_cache_memory_bytes", parameters["kv_cache_memory_bytes"])
        elif gpu and declared:
            kv = declared - weights - GPU_ENGINE_OVERHEAD
            if kv < MIN_GPU_KV_CACHE // 4:
                raise ModelLoadError(
                    f"memory {declared} leaves {max(kv, 0)} bytes for the KV cache after the weights "
                    f"({weights}) and the engine ({GPU_ENGINE_OVERHEAD}); raise memory or set "
                    f"parameters.kv_cache_memory_bytes")
        elif gpu:
            wanted = per_token * min(positions or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN) * max_num_seqs
            kv = min(max(wanted, MIN_GPU_KV_CACHE), MAX_GPU_KV_CACHE)
        else:
            kv = DEFAULT_CPU_KV_CACHE
        if "max_model_len" in parameters:
            max_len = _positive_int("max_model_len", parameters["max_model_len"])
        else:  # the model's own length, but no longer than one sequence the KV cache can hold
            max_len = min(positions or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
            if per_token:
                max_len = max(16, min(max_len, kv // per_token))
        eager = parameters.get("enforce_eager", (not gpu) or weights < EAGER_BELOW)
        flag = parameters.get("trust_remote_code", False)
        for name, value in (("enforce_eager", eager), ("trust_remote_code", flag)):
            if type(value) is not bool:
                raise ModelLoadError(f"parameters.{name} is {value!r}; expected true or false")
        if per_token * max_len > kv:
            raise ModelLoadError(
                f"max_model_len {max_len} needs {per_token * max_len} bytes of KV cache for one sequence "
                f"({per_token} a token), but the KV cache has {kv} (kv_cache_memory_bytes); raise "
                f"parameters.kv_cache_memory_bytes or lower parameters.max_model_len")
        max_tokens = _positive_int("max_tokens", parameters.get("max_tokens", DEFAULT_MAX_TOKENS))
        if max_tokens >= max_len:
            raise ModelLoadError(
                f"parameters.max_tokens {max_tokens} (the output length of V2 requests that do not set "
                f"it) leaves no room for a prompt within max_model_len {max_len}; lower it")
        temperature = parameters.get("temperature", 1.0)
        if type(temperature) not in (int, float) or not 0 <= temperature <= 2:
            raise ModelLoadError(f"parameters.temperature is {temperature!r}; expected a number in [0, 2]")
        seed = parameters.get("seed")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise ModelLoadError(f"parameters.seed is {seed!r}; expected a non-negative integer")
        sleep_level = parameters.get("sleep_level", 1)
        if sleep_level not in (1, 2):
            raise ModelLoadError(f"parameters.sleep_level is {sleep_level!r}; expected 1 or 2")
        extra = parameters.get("engine_args", {})
        if not isinstance(extra, dict):
            raise ModelLoadError("parameters.engine_args must be a mapping of vLLM engine arguments")
        return cls(device, dtype, run_dtype, kv, max_len, max_num_seqs, eager, max_tokens, float(temperature),
                   seed, sleep_level, flag, dict(extra), weights, task_of(parameters))

    def footprint(self) -> int:
        """Bytes the engine takes on its device: weights, KV cache and the engine's overhead."""
        overhead = GPU_ENGINE_OVERHEAD if self.is_gpu else ENGINE_HOST_OVERHEAD
        return self.weight_bytes + self.kv_cache_bytes + overhead

    def sizes(self) -> dict[str, int]:
        """The bytes the engine will take per device: its footprint, and on a GPU also its
        processes' own host memory."""
        if self.is_gpu:
            return {self.device: self.footprint(), HOST: ENGINE_HOST_OVERHEAD}
        return {self.device: self.footprint()}

    def measured(self, resident: int, asleep: bool) -> dict[str, int]:
        """The bytes a running engine takes per device, given ``resident``, its processes'
        proportional share of resident memory (PSS): on the CPU at least weights and KV cache; on
        a GPU the footprint there, and in host RAM what its processes hold (their own Python,
        torch and CUDA libraries, and the pinned copies sleep mode makes). Asleep, its processes
        keep their CUDA context and buffers on the GPU (the engine's overhead) and, at level 1,
        the weights in host RAM."""
        if asleep:
            copied = self.weight_bytes if self.sleep_level == 1 else 0
            return {HOST: max(resident, copied), self.device: GPU_ENGINE_OVERHEAD}
        if not self.is_gpu:
            return {self.device: max(self.footprint(), resident + self.kv_cache_bytes)}
        return {self.device: self.footprint(), HOST: resident}


def _auto_dtype(config: dict[str, Any]) -> str:
    """What vLLM's ``dtype: auto`` runs a checkpoint in: its half-precision dtype, and float32
    checkpoints in bfloat16 (measured on the CPU; 16-bit on GPUs too)."""
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in ("float16", "bfloat16") else "bfloat16"


# ----------------------------------------------------------------------------- weights
