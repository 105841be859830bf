"""What a model folder and its ``model.yaml`` say before anything heavy is imported: the task, the
dtype, the runtime options, the model's length limit, and the per-request generation parameters.

Everything here is pure Python (no torch, no transformers), so detection, estimates and request
validation stay cheap and can be unit tested on their own.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from mmserver.checkpoint import config_dtype
from mmserver.errors import InvalidInput, ModelLoadError

log = logging.getLogger("mmserver_transformers")

CLASSIFICATION, EMBEDDING, GENERATION = "classification", "embedding", "generation"
TASKS = (CLASSIFICATION, EMBEDDING, GENERATION)
#: Hugging Face pipeline names (as MLServer's huggingface runtime takes them) for our tasks
TASK_ALIASES = {
    "text-classification": CLASSIFICATION,
    "sentiment-analysis": CLASSIFICATION,
    "sequence-classification": CLASSIFICATION,
    "feature-extraction": EMBEDDING,
    "embeddings": EMBEDDING,
    "text-generation": GENERATION,
    "causal-lm": GENERATION,
}
DTYPES = ("float32", "float16", "bfloat16")
POOLINGS = ("mean", "cls", "last")
DEFAULT_MAX_NEW_TOKENS = 32

#: keys of ``model.yaml`` ``parameters`` this runtime reads
KNOWN_PARAMETERS = frozenset({
    "task", "dtype", "threads", "truncation", "normalize", "pooling", "max_new_tokens",
})
#: keys MLServer's huggingface runtime uses that mean nothing here (ignored without a warning)
_MLSERVER_KEYS = frozenset({"pretrained_model", "pretrained_tokenizer", "framework", "optimum_model",
                            "device", "batch_size", "inter_op_threads", "intra_op_threads",
                            "task_suffix", "model_kwargs"})


def task_of(config: dict[str, Any], parameters: dict[str, Any]) -> str:
    """``parameters.task`` if given, else the task the checkpoint's ``architectures`` imply."""
    raw = parameters.get("task")
    if raw is not None:
        task = TASK_ALIASES.get(raw, raw) if isinstance(raw, str) else None
        if task not in TASKS:
            raise ModelLoadError(
                f"parameters.task is {raw!r}; expected one of {', '.join(TASKS)} "
                f"(or {', '.join(TASK_ALIASES)})"
            )
        return task
    architectures = config.get("architectures") or []
    for arch in architectures if isinstance(architectures, list) else []:
        if not isinstance(arch, str):
            continue
        if arch.endswith("ForSequenceClassification"):
            return CLASSIFICATION
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return GENERATION
        if arch.endswith("Model") and "For" not in arch:
            return EMBEDDING
    raise ModelLoadError(
        f"cannot tell the task from config.json architectures {architectures}; set parameters.task "
        f"in model.yaml to one of {', '.join(TASKS)}"
    )


def dtype_for(device: str, parameters: dict[str, Any], config: dict[str, Any]) -> str:
    """The dtype the model runs in on ``device``.

    ``parameters.dtype`` wins (``auto``: the checkpoint's own). Otherwise float32 on the CPU and
    half precision on a GPU: bfloat16 for checkpoints saved in bfloat16, float16 for the rest.
    """
    raw = parameters.get("dtype")
    if raw is not None:
        if raw == "auto":
            return config_dtype(config) or "float32"
        if raw not in DTYPES:
            raise ModelLoadError(f"parameters.dtype is {raw!r}; expected auto or one of {', '.join(DTYPES)}")
        return raw
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if config_dtype(config) == "bfloat16" else "float16"


@dataclass(frozen=True, slots=True)
class Options:
    """The runtime options of one model (``model.yaml`` ``parameters``), validated."""

    task: str
    threads: int
    truncation: bool = False
    normalize: bool = False
    pooling: str = "mean"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def parse(cls, parameters: dict[str, Any], config: dict[str, Any]) -> Options:
        unknown = sorted(set(parameters) - KNOWN_PARAMETERS - _MLSERVER_KEYS)
        if unknown:
            log.warning("model.yaml parameters %s mean nothing to the transformers runtime (it reads %s)",
                        unknown, ", ".join(sorted(KNOWN_PARAMETERS)))
        threads = parameters.get("threads", min(4, os.cpu_count() or 1))
        if type(threads) is not int or threads < 1:
            raise ModelLoadError(f"parameters.threads is {threads!r}; expected a positive integer")
        flags = {}
        for key in ("truncation", "normalize"):
            value = parameters.get(key, False)
            if type(value) is not bool:
                raise ModelLoadError(f"parameters.{key} is {value!r}; expected true or false")
            flags[key] = value
        pooling = parameters.get("pooling", "mean")
        if pooling not in POOLINGS:
            raise ModelLoadError(f"parameters.pooling is {pooling!r}; expected one of {', '.join(POOLINGS)}")
        max_new = parameters.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if type(max_new) is not int or max_new < 1:
            raise ModelLoadError(f"parameters.max_new_tokens is {max_new!r}; expected a positive integer")
        return cls(task_of(config, parameters), threads, pooling=pooling, max_new_tokens=max_new, **flags)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """One request's generation settings, validated (``None``: the model's generation_config)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, parameters: dict[str, Any], default_max_new_tokens: int, default_do_sample: bool,
              limit: int | None) -> GenerationParams:
        """Validate the request parameters; raises ``InvalidInput`` naming the parameter."""
        max_new = parameters.get("max_new_tokens", default_max_new_tokens)
        if type(max_new) is not int or max_new < 1:
            raise InvalidInput(f"parameter 'max_new_tokens' is {max_new!r}; expected a positive integer")
        if limit is not None and max_new >= limit:
            raise InvalidInput(
                f"parameter 'max_new_tokens' is {max_new}; the model handles {limit} positions in all, "
                f"prompt included, so at most {limit - 1}"
            )
        do_sample = parameters.get("do_sample", default_do_sample)
        if type(do_sample) is not bool:
            raise InvalidInput(f"parameter 'do_sample' is {do_sample!r}; expected true or false")
        temperature = parameters.get("temperature")
        if temperature is not None and (
            type(temperature) not in (int, float) or not math.isfinite(temperature) or temperature <= 0
        ):
            raise InvalidInput(f"parameter 'temperature' is {temperature!r}; expected a number above 0")
        top_p = parameters.get("top_p")
        if top_p is not None and (type(top_p) not in (int, float) or not 0 < top_p <= 1):
            raise InvalidInput(f"parameter 'top_p' is {top_p!r}; expected a number in (0, 1]")
        seed = parameters.get("seed")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
            raise InvalidInput(f"parameter 'seed' is {seed!r}; expected an integer in [0, 2**63)")
        if not do_sample:  # greedy: sampling settings have no effect, keep them out of the batch key
            return cls(max_new, False)
        return cls(max_new, True, None if temperature is None else float(temperature),
                   None if top_p is None else float(top_p), seed)
