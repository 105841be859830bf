"""Memory prediction for a Hugging Face checkpoint without importing torch.

Safetensors files start with an 8-byte little-endian header length and a JSON header that lists
every tensor's dtype and shape: the weights' size in the dtype the model will run in is exact
from the headers alone. ``pytorch_model.bin`` checkpoints (pickles) are sized from the file and
the dtype the config declares. On top of the weights comes an activation allowance.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmserver.errors import ModelLoadError

from .options import config_dtype, dtype_for, max_positions, read_config, task_of

TORCH_BIN = "pytorch_model.bin"
#: bytes per element of every safetensors dtype; the floating ones are converted to the run dtype
ELEMENT_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_KINDS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

#: activation allowance: a fixed part (framework work buffers) plus room for this many tokens in
#: flight (a batch of 8 sequences of 256 tokens), each needing a few hidden-size work vectors and,
#: for generation, its key/value cache entries
ALLOWANCE_FIXED = 16 * 1024 * 1024
ALLOWANCE_TOKENS = 8 * 256
ALLOWANCE_VECTORS_PER_TOKEN = 8


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelLoadError(f"{path.name} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ModelLoadError(f"{path.name}: safetensors header claims {length} bytes")
            raw = f.read(length)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{path.name} has no valid safetensors header") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name} has no valid safetensors header")
    return header


def header_tensors(header: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every tensor a safetensors header lists."""
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in ELEMENT_BYTES \
                or not isinstance(entry.get("shape"), list):
            raise ModelLoadError(f"safetensors entry {name!r} is not a tensor description")
        tensors.append((entry["dtype"], tuple(int(d) for d in entry["shape"])))
    return tensors


def weight_bytes(tensors: Iterable[tuple[str, tuple[int, ...]]], run_dtype: str) -> int:
    """Bytes of the tensors once loaded: floating tensors in ``run_dtype``, others as stored."""
    target = DTYPE_BYTES[run_dtype]
    total = 0
    for kind, shape in tensors:
        total += math.prod(shape) * (target if kind in FLOAT_KINDS else ELEMENT_BYTES[kind])
    return total


def activation_allowance(config: dict[str, Any], task: str, run_dtype: str) -> int:
    """A modest allowance for activations (and the key/value cache when generating)."""
    size = DTYPE_BYTES[run_dtype]
    hidden = _first_int(config, "hidden_size", "d_model", "n_embd", "dim") or 0
    tokens = min(ALLOWANCE_TOKENS, 8 * (max_positions(config) or 256))
    per_token = ALLOWANCE_VECTORS_PER_TOKEN * hidden * size
    if task == "generation":
        layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers") or 0
        heads = _first_int(config, "num_attention_heads", "n_head") or 1
        kv_heads = _first_int(config, "num_key_value_heads") or heads
        head_dim = _first_int(config, "head_dim") or (hidden // heads if heads else 0)
        per_token += 2 * layers * kv_heads * head_dim * size
    return ALLOWANCE_FIXED + tokens * per_token


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: every ``*.safetensors``, else ``pytorch_model*.bin``."""
    if not folder.is_dir():
        return []
    safetensors = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if safetensors:
        return safetensors
    return sorted(p for p in folder.glob("pytorch_model*.bin") if p.is_file())


def checkpoint_bytes(folder: Path, config: dict[str, Any], run_dtype: str) -> int:
    """Bytes of the checkpoint's weights in ``run_dtype``."""
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"no *.safetensors or {TORCH_BIN} in {folder}")
    if files[0].suffix == ".safetensors":
        return sum(weight_bytes(header_tensors(safetensors_header(p)), run_dtype) for p in files)
    stored = DTYPE_BYTES.get(config_dtype(config) or "float32", 4)
    return sum(p.stat().st_size for p in files) * DTYPE_BYTES[run_dtype] // stored


def estimate_memory(folder: Path, device: str, parameters: dict[str, Any]) -> dict[str, int]:
    """Predicted bytes on ``device`` (``cpu`` or ``cuda:N``) for the checkpoint in ``folder``:
    weights converted to the dtype the model will run in, plus the activation allowance."""
    config = read_config(folder)
    run_dtype = dtype_for(device, parameters, config)
    task = task_of(config, parameters)
    return {device: checkpoint_bytes(folder, config, run_dtype) + activation_allowance(config, task, run_dtype)}


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
