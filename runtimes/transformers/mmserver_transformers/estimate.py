"""Memory prediction for a Hugging Face checkpoint without importing torch: the weights in the
dtype the model will run in (``mmserver.checkpoint``), plus an activation allowance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmserver.checkpoint import (
    DTYPE_BYTES,
    checkpoint_bytes,
    config_int,
    kv_bytes_per_token,
    max_positions,
    read_config,
)

from .options import dtype_for, task_of

#: activation allowance: a fixed part (framework work buffers) plus room for this many tokens in
#: flight (a batch of 8 sequences of 256 tokens), each needing a few hidden-size work vectors and,
#: for generation, its key/value cache entries
ALLOWANCE_FIXED = 16 * 1024 * 1024
ALLOWANCE_TOKENS = 8 * 256
ALLOWANCE_VECTORS_PER_TOKEN = 8


def activation_allowance(config: dict[str, Any], task: str, run_dtype: str) -> int:
    """A modest allowance for activations (and the key/value cache when generating)."""
    size = DTYPE_BYTES[run_dtype]
    hidden = config_int(config, "hidden_size", "d_model", "n_embd", "dim") or 0
    tokens = min(ALLOWANCE_TOKENS, 8 * (max_positions(config) or 256))
    per_token = ALLOWANCE_VECTORS_PER_TOKEN * hidden * size
    if task == "generation":
        per_token += kv_bytes_per_token(config, run_dtype)
    return ALLOWANCE_FIXED + tokens * per_token


def estimate_memory(folder: Path, device: str, parameters: dict[str, Any]) -> dict[str, int]:
    """Predicted bytes on ``device`` (``cpu`` or ``cuda:N``) for the checkpoint in ``folder``:
    weights converted to the dtype the model will run in, plus the activation allowance."""
    config = read_config(folder)
    run_dtype = dtype_for(device, parameters, config)
    task = task_of(config, parameters)
    return {device: checkpoint_bytes(folder, config, run_dtype) + activation_allowance(config, task, run_dtype)}
