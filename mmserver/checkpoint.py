"""Hugging Face checkpoint folders read without torch: ``config.json`` and the size of the weights.

Safetensors files start with an 8-byte little-endian header length and a JSON header that lists
every tensor's dtype and shape, so the weights' size in the dtype a model will run in is exact
from the headers alone. ``pytorch_model*.bin`` checkpoints (pickles) are sized from the file and
the dtype the config declares. Shared by the runtimes that serve such folders (transformers,
vLLM) for detection and memory prediction.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

CONFIG_FILE = "config.json"
TORCH_BIN = "pytorch_model.bin"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: bytes per element of every safetensors dtype; the floating ones are converted to the run dtype
ELEMENT_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_KINDS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                         "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_config(folder: Path) -> dict[str, Any]:
    """The model's ``config.json`` as a dict; raises ``ModelLoadError`` when unreadable."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no {CONFIG_FILE} in {folder}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return config


def config_dtype(config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint declares (``dtype``, or ``torch_dtype`` before transformers 5)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPE_BYTES else None


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
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) \
                or entry["dtype"] not in ELEMENT_BYTES or not _is_shape(entry.get("shape")):
            raise ModelLoadError(f"safetensors entry {name!r} is not a tensor description")
        tensors.append((entry["dtype"], tuple(entry["shape"])))
    return tensors


def _is_shape(value: Any) -> bool:
    """Whether ``value`` is a list of non-negative integer dimensions."""
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def weight_bytes(tensors: Iterable[tuple[str, tuple[int, ...]]], run_dtype: str) -> int:
    """Bytes of the tensors once loaded: floating tensors in ``run_dtype``, others as stored."""
    target = DTYPE_BYTES[run_dtype]
    total = 0
    for kind, shape in tensors:
        total += math.prod(shape) * (target if kind in FLOAT_KINDS else ELEMENT_BYTES[kind])
    return total


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: every ``*.safetensors`` (only those its index names when
    there is one: Mistral's folders also hold the same weights in ``consolidated.safetensors``),
    else ``pytorch_model*.bin``."""
    if not folder.is_dir():
        return []
    safetensors = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if (folder / SAFETENSORS_INDEX).is_file():
        indexed = _indexed_files(folder / SAFETENSORS_INDEX)
        safetensors = [p for p in safetensors if p.name in indexed]
    if safetensors:
        return safetensors
    return sorted(p for p in folder.glob("pytorch_model*.bin") if p.is_file())


def _indexed_files(index: Path) -> set[str]:
    """The file names a sharded checkpoint's index maps its tensors to."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index.name} has no weight_map")
    return {name for name in weight_map.values() if isinstance(name, str)}


def checkpoint_bytes(folder: Path, config: dict[str, Any], run_dtype: str) -> int:
    """Bytes of the checkpoint's weights in ``run_dtype``."""
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"no *.safetensors or {TORCH_BIN} in {folder}")
    if files[0].suffix == ".safetensors":
        return sum(weight_bytes(header_tensors(safetensors_header(p)), run_dtype) for p in files)
    stored = DTYPE_BYTES.get(config_dtype(config) or "float32", 4)
    return sum(p.stat().st_size for p in files) * DTYPE_BYTES[run_dtype] // stored


def config_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first positive integer ``config`` holds under one of ``keys`` (names vary by model family)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position scheme allows, when the config says."""
    return config_int(config, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def kv_bytes_per_token(config: dict[str, Any], run_dtype: str) -> int:
    """KV cache bytes one token takes in every layer (0 when the config does not say)."""
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    hidden = config_int(config, "hidden_size", "d_model", "n_embd") or 0
    layers = config_int(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    heads = config_int(config, "num_attention_heads", "n_head") or 0
    if not (hidden and layers and heads):
        return 0
    kv_heads = config_int(config, "num_key_value_heads") or heads
    head_dim = config_int(config, "head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[run_dtype]
