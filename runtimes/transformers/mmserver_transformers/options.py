"""What a model folder and its ``model.yaml`` say before anything heavy is imported: the task, the
dtype, the runtime options, the model's length limit, and the per-request generation parameters.

Everything here is pure Python (no torch, no transformers), so detection, estimates and request
validation stay cheap and can be unit tested on their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mmserver.checkpoint import config_dtype
from mmserver.embedding import RETURN_INPUT_TOKENS
from mmserver.errors import ModelLoadError
from mmserver.generation import V2_ALIASES, InvalidParameter, SamplingParams, parse_v2_sampling

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


#: what V2 inference on a generation model takes besides the sampling parameters and their aliases
V2_GENERATION_FLAGS = frozenset({"truncation", RETURN_INPUT_TOKENS})


def check_supported(params: SamplingParams) -> None:
    """Refuse what ``model.generate`` cannot do (400 naming the parameter)."""
    if params.presence_penalty or params.frequency_penalty:
        name = "presence_penalty" if params.presence_penalty else "frequency_penalty"
        raise InvalidParameter(f"parameter '{name}' is not supported by the transformers runtime "
                               "(repetition_penalty is)", name)
    if params.n > 1 and params.greedy:
        raise InvalidParameter("n > 1 needs sampling (temperature above 0): greedy sequences are all alike", "n")


def v2_sampling(parameters: Mapping[str, Any], defaults: Mapping[str, Any], limit: int | None) -> SamplingParams:
    """The sampling parameters of a V2 inference request on a generation model
    (``parse_v2_sampling``), refusing what ``model.generate`` cannot do and a ``max_tokens`` the
    model's ``limit`` of positions cannot hold. Greedy parameters leave out the sampling-only
    settings, so that these do not split batches."""
    params = parse_v2_sampling(parameters, defaults, V2_GENERATION_FLAGS)
    check_supported(params)
    if limit is not None and params.max_tokens is not None and params.max_tokens >= limit:
        name = next((key for key in V2_ALIASES if parameters.get(key) is not None), "max_tokens")
        raise InvalidParameter(
            f"parameter '{name}' is {params.max_tokens}; the model handles {limit} positions in all, "
            f"prompt included, so at most {limit - 1}", name)
    if params.greedy:
        return replace(params, temperature=0.0, top_p=1.0, top_k=0, seed=None)
    return params
