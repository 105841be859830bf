"""vLLM runtime for mmserver: one ``AsyncLLM`` engine (its own processes) per model, with vLLM's
continuous batching, serving V2 inference, Triton's generate extension and the OpenAI routes.

Detection and estimates read files only (config.json, safetensors headers, the installed vLLM's
model registry as source text): vllm and torch are imported when the first model loads
(``mmserver_vllm.engine``). A Hugging Face folder of an architecture vLLM supports is detected as
``vllm`` ahead of the transformers runtime when vllm is installed; ``model.yaml`` ``runtime:``
forces either.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmserver.runtime import IMPORT_LOCK, LoadedModel, Placement, Runtime, run_sync
from mmserver.spec import ModelSpec

from mmserver.errors import ModelLoadError

from .options import EMBEDDING, GENERATION, Options, is_servable, task_of

__all__ = ["VllmRuntime"]


class VllmRuntime(Runtime):
    """Serves decoder-only Hugging Face checkpoints through vLLM engines: text generation, or
with ``parameters.task: embedding`` embeddings (vLLM's pooling runner)."""

    name = "vllm"
    priority = 10  # ahead of transformers for the checkpoints vLLM can serve
    supports_gpu = True

    def matches(self, path: Path) -> bool:
        return is_servable(path)

    def estimate(self, spec: ModelSpec, placement: Placement) -> dict[str, int]:
        options = Options.parse(spec.artifact, placement.device, spec.config.parameters, _declared(spec))
        return options.sizes()

    async def load(self, spec: ModelSpec, placement: Placement) -> LoadedModel:
        engine = await run_sync(_import_engine)  # vllm and torch: seconds to import, off the loop
        return await engine.load_model(spec, placement, _declared(spec))

    def generates_text(self, spec: ModelSpec) -> bool:
        return _task(spec) == GENERATION

    def embeds_text(self, spec: ModelSpec) -> bool:
        return _task(spec) == EMBEDDING

    def collect_metrics(self) -> Iterable[Any]:
        import sys

        engine = sys.modules.get(f"{__name__}.engine")  # nothing to export before a model loaded
        return engine.collect_metrics() if engine is not None else ()


def _import_engine() -> Any:
    with IMPORT_LOCK:
        from . import engine
    return engine


def _task(spec: ModelSpec) -> str | None:
    """The task ``model.yaml`` gives, or None when it names none we serve (the load will say so)."""
    try:
        return task_of(spec.config.parameters)
    except ModelLoadError:
        return None


def _declared(spec: ModelSpec) -> int | None:
    return int(spec.config.memory) if spec.config.memory else None
