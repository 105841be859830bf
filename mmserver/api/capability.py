"""What a route needs of a model (to generate text, to embed text), and the entry of a model
that can do it: told from the loaded model or, before it is loaded, from its runtime reading its
files, so a lazy model loads for a route it can serve and never for one it cannot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..embedding import as_embedder
from ..entry import ModelEntry
from ..errors import InvalidInput, ModelNotReady
from ..generation import as_generator
from ..manager import ModelManager
from ..runtime import Runtime
from ..spec import ModelSpec


@dataclass(frozen=True)
class Capability:
    """What a route needs of a model, told from the loaded model or, before it is loaded, from
    its runtime reading its files."""

    what: str  # e.g. "generate text"
    of_loaded: Callable[[object], object | None]  # the model in that role, or None
    of_files: Callable[[Runtime, ModelSpec], bool]


GENERATES_TEXT = Capability("generate text", as_generator, lambda runtime, spec: runtime.generates_text(spec))
EMBEDS_TEXT = Capability("embed text", as_embedder, lambda runtime, spec: runtime.embeds_text(spec))


def capable_entry(manager: ModelManager, name: str, version: str | None, capability: Capability) -> ModelEntry:
    """The entry of a model that can do what ``capability`` says (400 for one that cannot: it
    is not loaded for the asking)."""
    entry = manager.entry(name, version)
    model = entry.model
    if model is not None:
        if capability.of_loaded(model) is None:
            raise InvalidInput(f"model '{entry.key}' does not {capability.what}")
        return entry
    if entry.spec is None:
        raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason}")
    try:
        runtime = manager.registry.get(entry.spec.runtime)
    except LookupError as exc:
        raise ModelNotReady(f"model '{entry.key}' is not ready: {exc}") from None
    if not capability.of_files(runtime, entry.spec):
        raise InvalidInput(f"model '{entry.key}' does not {capability.what}")
    return entry
