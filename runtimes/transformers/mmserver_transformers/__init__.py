"""Hugging Face transformers runtime for mmserver: text classification, embeddings and (small,
CPU-friendly) text generation from a ``save_pretrained`` folder.

A model folder is ``config.json`` plus weights (``*.safetensors`` or ``pytorch_model.bin``) and its
tokenizer files. The task comes from ``model.yaml`` ``parameters.task`` or from the checkpoint's
``architectures``. Detection and memory estimates read files only: torch and transformers are
imported when the first model loads (``mmserver_transformers.model``).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from mmserver.checkpoint import CONFIG_FILE, TORCH_BIN, read_config
from mmserver.errors import ModelLoadError
from mmserver.runtime import IMPORT_LOCK, Placement, Runtime, run_sync
from mmserver.spec import ModelSpec

from .estimate import estimate_memory
from .gpu_cache import empty_gpu_caches
from .options import EMBEDDING, GENERATION, task_of

__all__ = ["TransformersRuntime", "estimate_memory"]


class TransformersRuntime(Runtime):
    """Loads Hugging Face checkpoints with transformers and torch."""

    name = "transformers"
    supports_gpu = True  # load() takes cuda:N placements (fp16/bf16) and offers the host tier

    def matches(self, path: Path) -> bool:
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            return False
        return (path / TORCH_BIN).is_file() or any(p.is_file() for p in path.glob("*.safetensors"))

    def estimate(self, spec: ModelSpec, placement: Placement) -> dict[str, int]:
        return estimate_memory(spec.artifact, placement.device, spec.config.parameters)

    async def load(self, spec: ModelSpec, placement: Placement):
        return await run_sync(_load, spec, placement)

    def prepare_device(self, placement: Placement) -> None:
        if not placement.is_gpu:
            return
        with IMPORT_LOCK:
            import torch
        torch.zeros(1, device=placement.device)  # creates the CUDA context on that device (once)

    def release_cached_memory(self, device: str) -> None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():  # no model brought torch in: no cache
            return
        gc.collect()  # tensors that only reference cycles still hold
        with torch.cuda.device(torch.device(device)):
            empty_gpu_caches(torch)
            torch.cuda.ipc_collect()

    def generates_text(self, spec: ModelSpec) -> bool:
        return _task(spec) == GENERATION

    def embeds_text(self, spec: ModelSpec) -> bool:
        return _task(spec) == EMBEDDING


def _task(spec: ModelSpec) -> str | None:
    """The model's task as its folder tells it, or None when it cannot (the load will say why)."""
    try:
        return task_of(read_config(spec.artifact), spec.config.parameters)
    except ModelLoadError:
        return None


def _load(spec: ModelSpec, placement: Placement):
    with IMPORT_LOCK:  # the first import of torch and transformers, off the event loop
        from .model import load_model
    return load_model(spec, placement)
