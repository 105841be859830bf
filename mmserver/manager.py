"""The one stateful orchestrator: model states, loading and unloading, and the inference entry point.

Every model version is a ``ModelEntry`` whose state moves UNAVAILABLE -> LOADING -> READY ->
UNLOADING -> UNAVAILABLE; each change is one log line with the memory figure. Loads are
single-flight: concurrent first requests to a lazy model share one load.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .batching import Batcher, BatchPolicy
from .errors import MMServerError, ModelLoadError, ModelNotFound, ModelNotReady
from .memory import MemoryLedger, format_bytes
from .metrics import Metrics, ModelMetrics, ModelSnapshot, NoMetrics, ServerSnapshot
from .repository import Repository, RepositoryModel
from .runtime import LoadedModel, Placement, RuntimeRegistry
from .settings import Settings
from .spec import ModelSpec
from .types import InferRequest, InferResponse, ModelMetadata, ModelState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelEntry:
    """One model version and everything the server holds for it."""

    name: str
    version: str
    spec: ModelSpec | None
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    loading: asyncio.Task[None] | None = None
    served: bool = True
    unloaded_by_operator: bool = False
    last_used: float = field(default_factory=time.monotonic)
    waiting: int = 0  # requests waiting for the model to finish loading
    metrics: ModelMetrics = field(default_factory=NoMetrics)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


class ModelManager:
    """Owns every model the repository describes."""

    def __init__(
        self,
        settings: Settings,
        registry: RuntimeRegistry,
        metrics: Metrics | None = None,
        ledger: MemoryLedger | None = None,
    ) -> None:
        self.settings = settings
        self.repository = Repository(settings.model_repository, registry)
        self.registry = registry
        self.metrics = metrics or Metrics(enabled=False)
        self.metrics.set_snapshot(self.snapshot)
        self.ledger = ledger or MemoryLedger()
        self.started = asyncio.Event()
        self._models: dict[str, dict[str, ModelEntry]] = {}
        self._default_version: dict[str, str] = {}
        self._load_slots = asyncio.Semaphore(settings.load_concurrency)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Read the repository and load every model whose load mode is ``startup``."""
        for model in self.repository.scan().values():
            self._register(model)
        startup = [
            entry
            for versions in self._models.values()
            for entry in versions.values()
            if entry.served and entry.spec and entry.spec.config.load == "startup"
        ]
        await asyncio.gather(*(self._ensure_loading(entry) for entry in startup), return_exceptions=True)
        gc.collect()
        gc.freeze()
        self.started.set()
        ready = sum(e.state is ModelState.READY for v in self._models.values() for e in v.values())
        log.info("repository %s: %d model versions ready, %d known", self.repository.root, ready,
                 sum(len(v) for v in self._models.values()))

    async def stop(self) -> None:
        """Drain every model's queue, then unload it."""
        self.started.clear()
        entries = [e for versions in self._models.values() for e in versions.values()]
        await asyncio.gather(*(self._unload(e, "server stopping") for e in entries))

    # ------------------------------------------------------------------ lookups

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry for a model version (the default version when ``version`` is None)."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        if version is None:
            version = self._default_version.get(name, "")
        entry = versions.get(version)
        if entry is None:
            known = ", ".join(v for v in versions if v) or "none"
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {known})")
        return entry

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The V2 model metadata response."""
        entry = self.entry(name, version)
        model = self._ready_model(entry)
        meta = _with_config_overrides(model.metadata(), entry.spec)
        doc: dict[str, Any] = {
            "name": name,
            "versions": sorted(self._served_versions(name), key=_version_order),
            "platform": meta.platform,
            "inputs": [t.to_json() for t in meta.inputs],
            "outputs": [t.to_json() for t in meta.outputs],
        }
        if meta.parameters:
            doc["parameters"] = meta.parameters
        return doc

    def is_ready(self, name: str, version: str | None = None) -> bool:
        return self.entry(name, version).state is ModelState.READY

    def index(self) -> list[dict[str, Any]]:
        """Every model version in the repository with its state (the repository extension)."""
        rows = []
        for name in sorted(self._models):
            for entry in self._models[name].values():
                row: dict[str, Any] = {
                    "name": name,
                    "version": entry.version,
                    "state": entry.state.value,
                    "reason": entry.reason,
                }
                held = self.ledger.held(entry.key)
                if held:
                    row["memory_bytes"] = held
                rows.append(row)
        return rows

    def snapshot(self) -> ServerSnapshot:
        """State, queue depth and memory of every model version (for scrape-time metrics)."""
        models = [
            ModelSnapshot(
                entry.name,
                entry.version,
                entry.state.value,
                entry.batcher.pending if entry.batcher else 0,
                self.ledger.held(entry.key),
            )
            for versions in self._models.values()
            for entry in versions.values()
            if entry.spec is not None
        ]
        return ServerSnapshot(models, dict(self.ledger.budgets))

    # ------------------------------------------------------------------ inference

    async def infer(
        self,
        entry: ModelEntry,
        request: InferRequest,
        deadline: float | None = None,
        is_gone: Callable[[], bool] | None = None,
    ) -> InferResponse:
        """Run one request through its model's queue; loads a lazy model on first use.
        ``deadline`` and ``is_gone`` are passed to the batcher (see ``Batcher.submit``)."""
        batcher = entry.batcher
        if batcher is None or entry.state is not ModelState.READY:
            batcher = await self._wait_until_ready(entry)
        entry.model.validate(request)  # type: ignore[union-attr]
        entry.last_used = time.monotonic()
        response = await batcher.submit(request, deadline, is_gone)
        response.model_name = entry.name
        response.model_version = entry.version
        response.id = request.id
        return response

    # ------------------------------------------------------------------ repository API

    async def load(self, name: str) -> None:
        """(Re)read a model's folder and load the versions its policy serves."""
        model = self.repository.read(name)
        current = self._models.get(name, {})
        for version, entry in current.items():
            fresh = model.versions.get(version)
            if fresh is None or version not in model.served or fresh != entry.spec:
                await self._unload(entry, "replaced by a new load")
        self._register(model)
        if model.error:
            raise ModelLoadError(f"model '{name}' cannot be loaded: {model.error}")
        entries = [self._models[name][v] for v in model.served]
        for entry in entries:
            entry.unloaded_by_operator = False
        await asyncio.gather(*(self._ensure_loading(e) for e in entries), return_exceptions=True)
        failed = [e for e in entries if e.state is not ModelState.READY]
        if failed:
            raise ModelLoadError("; ".join(f"{e.key}: {e.reason}" for e in failed))

    async def unload(self, name: str) -> None:
        """Drain and unload every version of a model; it stays unloaded until loaded again."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        for entry in versions.values():
            entry.unloaded_by_operator = True
        await asyncio.gather(*(self._unload(e, "unloaded by request") for e in versions.values()))

    # ------------------------------------------------------------------ internals

    def _register(self, model: RepositoryModel) -> None:
        """Create or refresh the entries of one model folder (keeps loaded entries as they are)."""
        old = self._models.get(model.name, {})
        if model.error:
            entry = ModelEntry(model.name, "", None, reason=model.error)  # no metrics: it never serves
            self._models[model.name] = {"": entry}
            self._default_version.pop(model.name, None)
            return
        entries: dict[str, ModelEntry] = {}
        for version, spec in model.versions.items():
            previous = old.get(version)
            if previous is not None and previous.spec == spec:
                entry = previous
            else:
                entry = ModelEntry(model.name, version, spec, metrics=self.metrics.for_model(model.name, version))
                entry.unloaded_by_operator = previous is not None and previous.unloaded_by_operator
            entry.served = version in model.served
            if not entry.served:
                entry.reason = f"not served: the version policy is '{spec.config.versions}'"
            elif entry.state is ModelState.UNAVAILABLE and not entry.reason:
                entry.reason = "loads on first request" if spec.config.load == "lazy" else "not loaded"
            entries[version] = entry
        self._models[model.name] = entries
        self._default_version[model.name] = model.served[0] if model.served else ""

    def _served_versions(self, name: str) -> list[str]:
        return [v for v, e in self._models.get(name, {}).items() if e.served]

    def _ready_model(self, entry: ModelEntry) -> LoadedModel:
        if entry.state is not ModelState.READY or entry.model is None:
            raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason or entry.state.value}")
        return entry.model

    async def _wait_until_ready(self, entry: ModelEntry) -> Batcher:
        """Wait for a loading model (starting the load of a lazy one); at most ``max_queue``
        requests wait per model, the next ones get 503 at once."""
        lazy = entry.spec is not None and entry.spec.config.load == "lazy"
        if entry.loading is None and entry.state is ModelState.UNAVAILABLE:
            if not (lazy and entry.served and not entry.unloaded_by_operator):
                raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason}")
        limit = self._batch_policy(entry.spec).max_queue if entry.spec else 0
        if entry.waiting >= limit:
            raise ModelNotReady(
                f"model '{entry.key}' is loading and {entry.waiting} requests already wait for it",
                retry_after=1.0,
            )
        entry.waiting += 1
        try:
            await self._ensure_loading(entry)
        finally:
            entry.waiting -= 1
        if entry.state is not ModelState.READY or entry.batcher is None:
            raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason}")
        return entry.batcher

    async def _ensure_loading(self, entry: ModelEntry) -> None:
        """Start the entry's load unless one is running or it is loaded; wait for it."""
        if entry.state is ModelState.READY:
            return
        if entry.loading is None:
            entry.loading = asyncio.create_task(self._load(entry), name=f"load {entry.key}")
        await asyncio.shield(entry.loading)

    async def _load(self, entry: ModelEntry) -> None:
        spec = entry.spec
        assert spec is not None
        try:
            async with self._load_slots:
                started = time.monotonic()
                try:
                    runtime = self.registry.get(spec.runtime)
                except LookupError as exc:
                    raise ModelLoadError(str(exc)) from None
                predicted = (
                    {"cpu": int(spec.config.memory)} if spec.config.memory else runtime.estimate(spec)
                )
                self.ledger.reserve(entry.key, predicted)
                self._set_state(entry, ModelState.LOADING, "loading")
                model = await runtime.load(spec, Placement())
                self.ledger.commit(entry.key, model.memory())
                entry.model = model
                entry.batcher = Batcher(model, self._batch_policy(spec), entry.key, entry.metrics)
                took = time.monotonic() - started
                entry.metrics.loaded(took)
                self._set_state(entry, ModelState.READY, "", took)
                # Long-lived objects of the model (and its framework's modules) leave the
                # collector's generations: full collections over them stalled requests for ~60 ms.
                gc.freeze()
        except Exception as exc:  # a broken model is reported, never fatal
            self.ledger.release(entry.key)
            message = exc.message if isinstance(exc, MMServerError) else f"{type(exc).__name__}: {exc}"
            self._set_state(entry, ModelState.UNAVAILABLE, f"load failed: {message}")
        finally:
            entry.loading = None

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.model is None:
            entry.reason = reason if entry.served else entry.reason
            return
        self._set_state(entry, ModelState.UNLOADING, reason)
        started = time.monotonic()
        model, batcher = entry.model, entry.batcher
        entry.batcher = None
        if batcher is not None:
            await batcher.drain()
        try:
            await model.unload()
        except Exception:
            log.exception("model %s raised while unloading", entry.key)
        entry.model = None
        self.ledger.release(entry.key)
        self._set_state(entry, ModelState.UNAVAILABLE, reason, time.monotonic() - started)

    def _set_state(self, entry: ModelEntry, state: ModelState, reason: str, took: float | None = None) -> None:
        entry.state = state
        entry.reason = reason
        held = self.ledger.held(entry.key)
        memory = ", ".join(f"{dev} {format_bytes(n)}" for dev, n in held.items()) or "no memory"
        timing = f" in {took:.3f}s" if took is not None else ""
        level = logging.ERROR if reason.startswith("load failed") else logging.INFO
        log.log(level, "model %s %s%s (%s)%s", entry.key, state.value, timing, memory,
                f": {reason}" if reason else "")

    def _batch_policy(self, spec: ModelSpec) -> BatchPolicy:
        batching, s = spec.config.batching, self.settings
        return BatchPolicy(
            max_batch_size=batching.max_batch_size or s.max_batch_size,
            max_delay_s=(batching.max_delay_ms if batching.max_delay_ms is not None else s.max_delay_ms) / 1000.0,
            max_queue=batching.max_queue or s.max_queue,
            preferred_batch_sizes=tuple(batching.preferred_batch_sizes),
            timeout_s=spec.config.timeout_s,
            adaptive_fill=s.adaptive_fill if batching.adaptive_fill is None else batching.adaptive_fill,
        )


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def _with_config_overrides(meta: ModelMetadata, spec: ModelSpec | None) -> ModelMetadata:
    """Inputs/outputs declared in the model's config win over what the runtime infers."""
    if spec is None or (spec.config.inputs is None and spec.config.outputs is None):
        return meta
    config = spec.config
    return ModelMetadata(
        platform=meta.platform,
        inputs=[t.to_spec() for t in config.inputs] if config.inputs is not None else meta.inputs,
        outputs=[t.to_spec() for t in config.outputs] if config.outputs is not None else meta.outputs,
        parameters=meta.parameters,
    )

