"""The one stateful orchestrator: model states, loading, eviction and unloading, and the
inference entry point.

Every model version is a ``ModelEntry`` whose state moves UNAVAILABLE -> LOADING -> READY ->
UNLOADING -> UNAVAILABLE; each change is one log line with the memory figure. Loads are
single-flight: concurrent first requests to a lazy (or evicted) model share one load. Memory
admission, placement and the choice of victims are ``Residency``'s; this module carries them
out: a victim that can (a torch model on a GPU) moves to host RAM and comes back at PCIe speed,
any other is unloaded and reloaded from disk on its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .batching import Batcher, BatchPolicy
from .devices import Device, discover_devices
from .entry import ModelEntry
from .errors import (
    Forbidden,
    InferenceTimeout,
    InsufficientMemory,
    MMServerError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
)
from .heap import HeapKeeper
from .memory import MemoryLedger, format_bytes
from .metrics import Metrics, ModelSnapshot, ServerSnapshot
from .repository import Repository, RepositoryModel, select_versions
from .residency import Residency
from .runtime import HOST, LoadedModel, Placement, Runtime, RuntimeRegistry, run_sync
from .settings import Settings
from .spec import ModelSpec
from .types import InferRequest, InferResponse, ModelMetadata, ModelState, RequestedOutput

log = logging.getLogger(__name__)
IDLE_SWEEP_MIN_S = 0.5
IDLE_SWEEP_MAX_S = 30.0
HEAP_CHECK_S = 1.0  # how often pending full garbage collections look for an idle moment
LOAD_PROGRESS_S = 10.0  # a load that takes longer logs that it is still going this often
BUSY_VICTIM_WAIT_S = 5.0  # how long a load that needs room waits for busy models to be idle
BUSY_VICTIM_POLL_S = 0.002
# after this long of that wait, the busy models it needs hold new requests back (take turns)
BUSY_VICTIM_YIELD_S = 0.5


class ModelManager:
    """Owns every model the repository describes."""

    def __init__(
        self,
        settings: Settings,
        registry: RuntimeRegistry,
        metrics: Metrics | None = None,
        devices: dict[str, Device] | None = None,
    ) -> None:
        self.settings = settings
        self.repository = Repository(settings.model_repository, registry, settings.model_name)
        self.registry = registry
        self.metrics = metrics or Metrics(enabled=False)
        self.metrics.set_snapshot(self.snapshot)
        self.ledger = MemoryLedger()
        self.residency = Residency(settings, devices if devices is not None else discover_devices(), self.ledger)
        self.started = asyncio.Event()
        self._models: dict[str, dict[str, ModelEntry]] = {}
        self._default_version: dict[str, str] = {}
        self._load_slots = asyncio.Semaphore(settings.load_concurrency)
        self._background: list[asyncio.Task[None]] = []  # the idle sweeper and the collector
        self._heap = HeapKeeper()
        self._sync_locks: dict[str, asyncio.Lock] = {}
        self._folder_errors: dict[str, str] = {}  # folders that changed into something unreadable
        self._loads: set[ModelEntry] = set()  # entries whose load runs (new ones are not in _models yet)
        self._was_ready = False  # readiness is judged until the server is first ready
        # entries holding a loaded model, in _models or not (a load whose scan was cancelled)
        self._holding: set[ModelEntry] = set()
        self._loaded = asyncio.Event()  # a model became ready (wakes the idle sweeper)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Set the memory budgets, read the repository and load every ``startup`` model."""
        self.residency.set_budgets()
        await self.rescan()
        self._heap.full_collection()
        self.started.set()
        self._background = [asyncio.create_task(self._sweep_idle(), name="idle unloads"),
                            asyncio.create_task(self._collect_garbage(), name="garbage collection")]
        ready = sum(e.state is ModelState.READY for e in self._entries())
        log.info("repository %s: %d model versions ready, %d known", self.repository.root, ready,
                 sum(len(v) for v in self._models.values()))
        if (why := self.unready_reason()) is not None:
            log.warning("not ready (/v2/health/ready answers 503) until these load: %s; "
                        "--no-strict-readiness reports ready with them failed", why)

    async def stop(self) -> None:
        """Cancel the loads still running (a runtime cleans up what a cancelled load started),
        drain every model's queue, then unload it, also models whose startup scan was cancelled
        before they were registered."""
        self.started.clear()
        for task in self._background:
            task.cancel()
        loads = [e.loading for e in self._loads if e.loading is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        await asyncio.gather(*(self._unload(e, "server stopping") for e in self._holders()))

    def unready_reason(self) -> str | None:
        """Why the server is not ready, or None when it is: not ready while it starts or stops,
        and (with ``strict_readiness``) while a model meant to load at startup has failed. Once
        ready, a model that breaks later shows in its own readiness, not the server's: replicas
        sharing a repository must not all leave service over one bad folder."""
        if not self.started.is_set():
            return "the server is starting or stopping"
        if self._was_ready or not self.settings.strict_readiness:
            return None
        failed = [e for e in self._entries() if e.spec is None or e.load_error is not None]
        if failed:
            return "; ".join(f"{e.key}: {e.reason}" for e in failed)
        self._was_ready = True
        return None

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
                held = self.ledger.held(entry)
                if held:
                    row["memory_bytes"] = held
                rows.append(row)
            if name in self._folder_errors:
                rows.append({"name": name, "version": "", "state": ModelState.UNAVAILABLE.value,
                             "reason": f"folder cannot be read, loaded versions keep serving: {self._folder_errors[name]}"})
        return rows

    def snapshot(self) -> ServerSnapshot:
        """State, queue depth and memory of every model version (for scrape-time metrics)."""
        models = [
            ModelSnapshot(
                entry.name,
                entry.version,
                entry.state.value,
                entry.waiting + (entry.batcher.pending if entry.batcher else 0),
                self.ledger.held(entry),
            )
            for entry in self._entries()
            if entry.spec is not None
        ]
        gpus = {name: device for name, device in self.residency.devices.items() if name != HOST}
        readings = {device.uuid: device.read() for device in gpus.values()}
        return ServerSnapshot(
            models,
            dict(self.ledger.budgets),
            {uuid: r.total for uuid, r in readings.items()},
            {uuid: r.used for uuid, r in readings.items()},
            self.residency.overheads(),
        )

    # ------------------------------------------------------------------ inference

    async def infer(
        self,
        entry: ModelEntry,
        request: InferRequest,
        deadline: float | None = None,
        is_gone: Callable[[], bool] | None = None,
    ) -> InferResponse:
        """Run one request through its model's queue; loads a lazy model on first use.
        ``deadline`` and ``is_gone`` are passed to the batcher (see ``Batcher.submit``); the
        wait for a load counts against the deadline and the model's ``timeout_s`` too. An entry
        a rollover retired since it was looked up hands the request to its successor."""
        entry = entry.current()
        deadline = self.deadline(entry, deadline)  # the model's timeout_s counts from now
        batcher = entry.batcher
        if batcher is None or entry.state is not ModelState.READY or entry.yielding is not None:
            batcher = await self._wait_until_ready_before(entry, deadline)
        if not request.outputs and entry.default_outputs:
            request.outputs = list(entry.default_outputs)
        entry.model.validate(request)  # type: ignore[union-attr]
        entry.last_used = time.monotonic()
        try:
            response = await batcher.submit(request, deadline, is_gone)
        finally:
            entry.last_used = time.monotonic()  # idle counts from the end of its last request
        response.model_name = entry.name
        response.model_version = entry.version
        response.id = request.id
        return response

    @contextlib.asynccontextmanager
    async def holding(self, entry: ModelEntry, deadline: float | None = None) -> AsyncIterator[LoadedModel]:
        """The loaded model, for a request that calls it directly (a streamed text generation)
        or in several parts (embeddings): loads a lazy or evicted one like ``infer`` does (the
        wait bounded the same way, by ``deadline`` and the model's ``timeout_s``), and holds it
        in its batcher's in-flight count for as long as the context lasts, so it is not evicted
        or unloaded underneath. A retired entry hands over to its successor."""
        entry = entry.current()
        batcher = entry.batcher
        if batcher is None or entry.state is not ModelState.READY or entry.yielding is not None:
            batcher = await self._wait_until_ready_before(entry, self.deadline(entry, deadline))
        entry.last_used = time.monotonic()
        try:
            async with batcher.hold() as model:
                yield model
        finally:
            entry.last_used = time.monotonic()

    # ------------------------------------------------------------------ repository changes

    async def rescan(self) -> None:
        """Bring every model in line with the repository folder: new folders are registered (and
        loaded per their load mode), changed ones roll over, removed ones drain and unload."""
        found = self.repository.scan()
        names = set(found) | set(self._models)
        await asyncio.gather(*(self.sync_model(name, found.get(name)) for name in sorted(names)))

    async def load(self, name: str) -> None:
        """The repository API's load: re-read the model's folder and load what its policy serves,
        also when an operator unloaded it before."""
        self._check_api_allowed("load")
        await self.sync_model(name, self.repository.read(name), explicit=True)

    async def unload(self, name: str) -> None:
        """Drain and unload every version of a model; it stays unloaded until loaded again."""
        self._check_api_allowed("unload")
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{name}' is not in the repository")
        for entry in versions.values():
            entry.unloaded_by_operator = True
        await asyncio.gather(*(self._unload(e, "unloaded by request") for e in versions.values()))

    def _check_api_allowed(self, action: str) -> None:
        if self.settings.model_control_mode == "none":
            raise Forbidden(f"cannot {action} models: the server runs with --model-control-mode none")

    async def sync_model(self, name: str, found: RepositoryModel | None, explicit: bool = False) -> None:
        """Make one model match its folder (``found``; None when the folder is gone).

        New or changed versions load while the current ones keep serving; only then do requests
        switch over, and the versions no longer served drain and unload. A version that fails to
        load is reported and skipped: the previous one goes on serving. ``explicit`` (the
        repository API) loads even a model an operator unloaded, and raises on failure.
        """
        async with self._sync_locks.setdefault(name, asyncio.Lock()):
            current = self._models.get(name, {})
            if found is None:
                await self._remove(name, current)
                return
            if found.error:
                self._report_broken(name, found, current)
                if explicit:
                    raise ModelLoadError(f"model '{name}' cannot be loaded: {found.error}")
                return
            self._folder_errors.pop(name, None)
            operator_unloaded = not explicit and any(e.unloaded_by_operator for e in current.values())
            wanted = self._desired_entries(found, current, operator_unloaded)
            fresh = [e for e in wanted.values() if e not in current.values()]
            to_load = [e for v, e in wanted.items() if v in found.served and self._should_load(e, current.get(v), explicit)]
            await asyncio.gather(*(self._ensure_loading(e) for e in to_load), return_exceptions=True)
            failed = [e for e in to_load if e.state is not ModelState.READY]
            for version, entry in list(wanted.items()):
                previous = current.get(version)
                if entry in failed and previous is not None and previous.state is ModelState.READY:
                    previous.reason = f"still serving: its new files failed to load ({entry.reason})"
                    wanted[version] = previous  # the old files keep serving this version
            serving = [v for v in found.versions if wanted[v].load_error is None]
            served = set(select_versions(serving, found.served_policy))
            for version, entry in wanted.items():
                entry.served = version in served
                if not entry.served and entry.load_error is None:
                    entry.reason = f"not served: the version policy is '{found.served_policy}'"
            self._models[name] = wanted
            # the newest version that serves; with none, the one the policy names (its requests
            # then get the reason it does not serve)
            newest = select_versions([v for v in serving if v in served], "latest") or found.served
            self._default_version[name] = newest[0] if newest else ""
            retired = [e for e in current.values() if e not in wanted.values() or not e.served]
            for entry in retired:  # a request holding one goes to its successor, never loads an orphan
                entry.served = False
                successor = wanted.get(entry.version)
                entry.successor = successor if successor is not None and successor.served else None
            await asyncio.gather(*(self._unload(e, "replaced by a newer version or files")
                                   for e in retired if e.model is not None))
            self.metrics.keep_only(name, wanted)  # a version whose folder is gone loses its series
            if fresh or retired:
                log.info("model %s: versions %s, serving %s (default %s)", name, ", ".join(wanted),
                         ", ".join(sorted(served, key=_version_order)) or "none", self._default_version[name])
            if explicit and failed:
                error = ModelLoadError("; ".join(f"{e.key}: {e.reason}" for e in failed))
                if all(isinstance(e.load_error, InsufficientMemory) for e in failed):
                    error = InsufficientMemory(error.message)
                raise error

    def _desired_entries(
        self, found: RepositoryModel, current: dict[str, ModelEntry], operator_unloaded: bool
    ) -> dict[str, ModelEntry]:
        """One entry per version found: the current one when its files are unchanged, else new."""
        wanted: dict[str, ModelEntry] = {}
        for version, spec in found.versions.items():
            previous = current.get(version)
            if previous is not None and previous.spec == spec:
                wanted[version] = previous
                continue
            entry = ModelEntry(found.name, version, spec, metrics=self.metrics.for_model(found.name, version))
            entry.unloaded_by_operator = operator_unloaded
            entry.reason = "not loaded" if spec.config.load == "startup" else "loads on first request"
            wanted[version] = entry
        return wanted

    def _should_load(self, entry: ModelEntry, previous: ModelEntry | None, explicit: bool) -> bool:
        """Load now: explicitly asked, new files of a startup model, or new files of a loaded
        version. A rescan leaves an entry whose files did not change as it is: one that was
        evicted, or failed to load, waits for its next request or an explicit load."""
        if entry.state is ModelState.READY or entry.spec is None:
            return False
        if explicit:
            entry.unloaded_by_operator = False
            return True
        if entry.unloaded_by_operator or entry is previous:
            return False
        was_loaded = previous is not None and previous.state is ModelState.READY
        return entry.spec.config.load == "startup" or was_loaded

    def _report_broken(self, name: str, found: RepositoryModel, current: dict[str, ModelEntry]) -> None:
        """A folder that cannot be read: keep serving what was loaded, and say why."""
        assert found.error is not None
        if any(e.state is ModelState.READY for e in current.values()):
            self._folder_errors[name] = found.error
            log.error("model %s: its folder changed and cannot be read (%s); the loaded versions keep serving",
                      name, found.error)
            return
        self._models[name] = {"": ModelEntry(name, "", None, reason=found.error)}
        self._default_version.pop(name, None)

    async def _remove(self, name: str, entries: dict[str, ModelEntry]) -> None:
        """The folder is gone: drain and unload every version, then forget the model."""
        for entry in entries.values():  # a request still holding one gets 503, never loads an orphan
            entry.served = False
        await asyncio.gather(*(self._unload(e, "its folder was removed") for e in entries.values()))
        self._models.pop(name, None)
        self._default_version.pop(name, None)
        self._folder_errors.pop(name, None)
        self.metrics.keep_only(name, ())
        log.info("model %s removed: its folder is gone", name)

    def _served_versions(self, name: str) -> list[str]:
        return [v for v, e in self._models.get(name, {}).items() if e.served]

    def _ready_model(self, entry: ModelEntry) -> LoadedModel:
        if entry.state is not ModelState.READY or entry.model is None:
            raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason or entry.state.value}")
        return entry.model

    async def _wait_until_ready(self, entry: ModelEntry) -> Batcher:
        """Wait for a loading model (starting the load of a lazy or evicted one); at most
        ``max_queue`` requests wait per model, the next ones get 503 at once. A request that
        arrives while the model is being unloaded or evicted waits for that to finish first, then
        loads it again only where a request may (never after an operator's unload). One that
        arrives while the model yields its room to a load waits for that first (not counted as
        waiting: the model must become idle)."""
        while entry.yielding is not None:
            await entry.yielding.wait()
        _check_may_load(entry)
        limit = self._batch_policy(entry.spec).max_queue if entry.spec else 0
        if entry.waiting >= limit:
            raise ModelNotReady(
                f"model '{entry.key}' is loading and {entry.waiting} requests already wait for it",
                retry_after=1.0,
            )
        entry.waiting += 1
        try:
            while entry.leaving is not None:
                await asyncio.shield(entry.leaving)
                _check_may_load(entry)
            await self._ensure_loading(entry)
        finally:
            entry.waiting -= 1
        if entry.state is not ModelState.READY or entry.batcher is None:
            raise _not_ready(entry)
        return entry.batcher

    async def _wait_until_ready_before(self, entry: ModelEntry, deadline: float | None) -> Batcher:
        """``_wait_until_ready``, given up (the load goes on) once a request's deadline passes.
        It runs in the caller's task (``asyncio.wait_for`` would run it in another), so that
        nothing runs between the end of the wait and the caller queueing its request: the model
        stays busy throughout, and no eviction can take it in between."""
        if deadline is None:
            return await self._wait_until_ready(entry)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await self._wait_until_ready(entry)
        except TimeoutError:
            raise InferenceTimeout(f"model '{entry.key}' was still loading when the request's deadline passed") from None

    def deadline(self, entry: ModelEntry, deadline: float | None) -> float | None:
        """When work on the model that starts now must end (``time.monotonic()``; None: never):
        after the model's ``timeout_s`` (else the server's ``infer_timeout_s``), or at the
        request's own ``deadline`` if that is sooner."""
        timeout = self._batch_policy(entry.spec).timeout_s if entry.spec is not None else None
        if timeout is None:
            return deadline
        return min(time.monotonic() + timeout, deadline if deadline is not None else float("inf"))

    async def _ensure_loading(self, entry: ModelEntry) -> None:
        """Start the entry's load unless one is running or it is loaded; wait for it. An unload
        or eviction of the entry under way is waited for first: a load beside a model that is
        still draining would hold two copies, and the unload would then drop the new one."""
        while entry.leaving is not None:
            await asyncio.shield(entry.leaving)
        if entry.state is ModelState.READY:
            return
        if entry.loading is None:
            entry.loading = asyncio.create_task(self._load(entry), name=f"load {entry.key}")
            self._loads.add(entry)
            entry.loading.add_done_callback(lambda _: self._loads.discard(entry))
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
                placement = self.residency.placement(spec, runtime)
                if entry.parked is not None and entry.model is not None:
                    await self._restore(entry, placement)
                else:
                    await self._load_onto(entry, spec, runtime, placement)
                entry.default_outputs = _declared_outputs(spec, entry.model)
                entry.evicted = False
                entry.load_error = None
                entry.batcher = Batcher(entry.model, self._batch_policy(spec), entry.key, entry.metrics)
                model = entry.model
                model.watch(lambda reason: self._on_failure(entry, model, reason))
                took = time.monotonic() - started
                entry.metrics.loaded(took)
                self._set_state(entry, ModelState.READY, "", took)
                self._loaded.set()
                self._heap.freeze_survivors()
        except asyncio.CancelledError:  # the server stops; what loaded is unloaded by stop()
            if entry.model is None:
                self.ledger.release(entry)
            self._set_state(entry, ModelState.UNAVAILABLE, "load cancelled: the server is stopping")
            raise
        except Exception as exc:  # a broken model is reported, never fatal
            message = exc.message if isinstance(exc, MMServerError) else f"{type(exc).__name__}: {exc}"
            if entry.model is not None and entry.parked is None:  # it loaded, then a later step failed
                await self._unload_loaded(entry, f"load failed: {message}")
            if entry.model is None:
                self.ledger.release(entry)
            entry.load_error = exc
            self._set_state(entry, ModelState.UNAVAILABLE, f"load failed: {message}")
        finally:
            entry.loading = None

    async def _load_onto(self, entry: ModelEntry, spec: ModelSpec, runtime: Runtime, placement: Placement) -> None:
        """Make room, reserve the predicted size, load, and keep the measured size."""
        predicted = self.residency.predicted(spec, runtime, placement)
        # (on a GPU, the runtime is readied first, so that room is made for the CUDA context too)
        prepare = functools.partial(self.residency.prepare, runtime, placement) if placement.is_gpu else None
        async with self._room_for(entry, predicted, prepare):
            self.ledger.reserve(entry, predicted)
            self._set_state(entry, ModelState.LOADING, f"loading onto {placement.device}")
            if placement.is_gpu:  # the whole GPU load holds the lock: its size is a before/after difference
                before = self.residency.used(placement.device)
                entry.model = await self._timed_load(runtime, spec, placement)
                self._holding.add(entry)
                self._commit_arrival(entry, entry.model, placement, before)
                return
        entry.model = await self._timed_load(runtime, spec, placement)
        self._holding.add(entry)
        self.ledger.commit(entry, self.residency.measured(spec, entry.model, placement, None))

    async def _timed_load(self, runtime: Runtime, spec: ModelSpec, placement: Placement) -> LoadedModel:
        """The runtime's load, abandoned after ``load_timeout_s`` (its thread may run on, but the
        model is reported unavailable and its reservation released). A long load logs that it is
        still going every ``LOAD_PROGRESS_S``."""
        timeout = self.settings.load_timeout_s
        progress = asyncio.create_task(_log_load_progress(spec, placement), name=f"progress {spec.name}")
        try:
            return await asyncio.wait_for(runtime.load(spec, placement), timeout)
        except TimeoutError:
            raise ModelLoadError(f"loading did not finish within {timeout:g} s (load_timeout_s)") from None
        finally:
            progress.cancel()

    async def _restore(self, entry: ModelEntry, placement: Placement) -> None:
        """Bring a model parked in host RAM back onto a GPU."""
        model, parked = entry.model, entry.parked
        assert model is not None and parked is not None
        sizes = {placement.device: sum(size for device, size in parked.items() if device != HOST)}
        async with self._room_for(entry, sizes):
            self._set_state(entry, ModelState.LOADING, f"restoring from host memory onto {placement.device}")
            before = self.residency.used(placement.device)
            try:
                await model.restore(placement)
            except Exception:  # it cannot come back (its engine died, say): the load unloads it
                entry.parked = None
                raise
            entry.parked = None
            self.ledger.reserve(entry, {**sizes, HOST: 0})
            self._commit_arrival(entry, model, placement, before)

    def _commit_arrival(self, entry: ModelEntry, model: LoadedModel, placement: Placement, before: int | None) -> None:
        """The ledger keeps the measured size of a model that came onto a GPU; the entry keeps
        what the GPU grew by (what an eviction waits to see come back)."""
        grown = self.residency.growth(placement.device, before)
        entry.arrived = {placement.device: grown} if grown is not None and grown > 0 else {}
        self.ledger.commit(entry, self.residency.measured(entry.spec, model, placement, grown))

    @contextlib.asynccontextmanager
    async def _room_for(self, entry: ModelEntry, sizes: dict[str, int],
                        prepare: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[None]:
        """Hold the residency lock, with room made for ``entry`` (after ``prepare``, each time
        the lock is taken). Where room may come later (a load under way measuring less than it
        reserved, a busy model becoming idle), that is waited for without the lock, so that
        loads that fit go on meanwhile, and the lock is then taken again to try anew. Busy
        models asked to yield their room take new requests again once this is over."""
        wait_for_room = _RoomWait.starting_now()
        try:
            while True:
                async with self.residency.lock:
                    if prepare is not None:
                        await prepare()
                    wait = await self._make_room(entry, sizes, wait_for_room)
                    if wait is None:
                        yield
                        return
                await wait
        finally:
            for victim in wait_for_room.yielded:
                victim.end_yield()

    async def _make_room(self, entry: ModelEntry, sizes: dict[str, int],
                         wait_for_room: _RoomWait) -> Awaitable[None] | None:
        """Evict what ``Residency`` picks until ``entry`` fits, measuring again after each round
        (memory that does not come back forces another victim, or the error); called with the
        residency lock held. None once it fits; else what to wait for before trying again (busy
        models that wait asks to yield are added to ``wait_for_room.yielded``)."""
        while True:
            try:
                victims = self.residency.victims(entry, sizes, self._holders())
            except InsufficientMemory:
                wait = self._what_may_make_room(entry, sizes, wait_for_room)
                if wait is None:
                    raise
                return wait
            if not victims:
                return None
            for victim in victims:
                if not victim.evictable:  # it got a request, or was unloaded, since it was chosen
                    break
                await self._evict(victim, f"making room for {entry.key}")

    def _what_may_make_room(self, entry: ModelEntry, sizes: dict[str, int],
                            wait_for_room: _RoomWait) -> Awaitable[None] | None:
        """What to wait for that may make room for ``entry``; None when nothing can. Loads past
        their admission hold their predicted size until they measure what they take (often
        less): the end of one on a device that lacks room. Else, until it gives up, models that
        are busy but would make enough room once idle: until one is idle (most are busy for
        milliseconds), those of them the room is taken from asked to yield (``_until_one_idle``)
        so that steady traffic cannot keep them busy for good."""
        lacking = self.residency.shortfall(entry, sizes)
        loads = [e.loading for e in self._loads
                 if e is not entry and e.state is ModelState.LOADING and e.loading is not None
                 and any(self.ledger.held(e).get(device) for device in lacking)]
        if loads:
            return asyncio.wait(loads, return_when=asyncio.FIRST_COMPLETED)
        holders = self._holders()
        busy = [e for e in holders if e is not entry and e.busy and e.movable and e.state is ModelState.READY]
        if not busy or time.monotonic() >= wait_for_room.give_up:
            return None
        try:
            picked = self.residency.victims(entry, sizes, holders, assume_idle=busy)
        except InsufficientMemory:  # not enough even with them: fail now
            return None
        busy_picked = [victim for victim in picked if victim in busy]
        return _until_one_idle(busy, busy_picked, wait_for_room, entry)

    async def _evict(self, entry: ModelEntry, reason: str) -> None:
        """Move an idle model out of its device: to host RAM when it can go there, else unload it."""
        async with _leaving(entry):
            if entry.model is not None:  # else an unload that was under way took it
                await self._move_out(entry, reason)

    async def _move_out(self, entry: ModelEntry, reason: str) -> None:
        model = entry.model
        assert model is not None
        held = self.ledger.held(entry)
        on_gpus = {device: size for device, size in held.items() if device != HOST}
        # what leaving gives back: what the GPU grew by when the model came, at most its size
        given_back = {device: min(size, entry.arrived.get(device, size)) for device, size in on_gpus.items()}
        entry.metrics.evicted()
        parks = entry.parked is None and model.can_offload and bool(on_gpus)  # a parked model is unloaded
        used = {device: self.residency.used(device) for device in on_gpus}
        remaining = None  # once parked: its host copy, and what it could not take off a GPU
        if parks and self.residency.host_room_for(sum(on_gpus.values())):
            remaining = await self._park(entry, reason, on_gpus)
        if remaining is not None:
            given_back = {device: max(0, size - remaining.get(device, 0)) for device, size in given_back.items()}
        else:
            await self._unload_loaded(entry, f"evicted: {reason}")
            entry.reason = "evicted, reloads on the next request"
        entry.evicted = True
        for device, size in given_back.items():
            if used[device] is not None:
                await self.residency.wait_released(
                    device, used[device], size, lambda d=device: run_sync(self.registry.release_cached_memory, d)
                )

    async def _park(self, entry: ModelEntry, reason: str, on_gpus: dict[str, int]) -> dict[str, int] | None:
        """Move a model's weights off ``on_gpus`` to host RAM; what it holds then (None, the
        model left as it was, if it could not move)."""
        model = entry.model
        assert model is not None
        started = time.monotonic()
        self._set_state(entry, ModelState.UNLOADING, f"moving to host memory: {reason}")
        batcher, entry.batcher = entry.batcher, None
        if batcher is not None:
            await batcher.drain()
        try:
            await model.offload()
        except Exception as exc:  # e.g. no host memory for its copy: the caller unloads it
            log.warning("model %s could not move to host memory (%s: %s)", entry.key, type(exc).__name__, exc)
            return None
        entry.parked = on_gpus
        remaining = model.memory()
        self.ledger.reserve(entry, remaining)
        self.ledger.commit(entry, remaining)
        self._set_state(entry, ModelState.UNAVAILABLE, "in host memory, restores on the next request",
                        time.monotonic() - started)
        return remaining

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        """Drain and unload a model, after any load, eviction or unload of it in progress."""
        async with _leaving(entry):
            if entry.model is None:
                entry.reason = reason if entry.served else entry.reason
                return
            await self._unload_loaded(entry, reason)

    async def _unload_loaded(self, entry: ModelEntry, reason: str) -> None:
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
        self._holding.discard(entry)
        entry.parked = None
        self.ledger.release(entry)
        self._heap.unloaded()
        self._set_state(entry, ModelState.UNAVAILABLE, reason, time.monotonic() - started)

    def _on_failure(self, entry: ModelEntry, model: LoadedModel, reason: str) -> None:
        """A loaded model broke for good (its engine process died): unload it (which cleans up
        what is left of it) and report it unavailable with the reason; like an evicted model, it
        loads again on its next request."""
        if entry.model is not model or entry.state is not ModelState.READY:
            return
        log.error("model %s failed: %s", entry.key, reason)
        asyncio.get_running_loop().create_task(self._unload_failed(entry, model, reason),
                                               name=f"unload failed {entry.key}")

    async def _unload_failed(self, entry: ModelEntry, model: LoadedModel, reason: str) -> None:
        # Under the residency lock, so that no load measures its size while the broken model's
        # memory comes back. Waiting for the lock, the model may have been moved: an eviction or
        # unload then cleans it up, and a restore of it (which may wait behind this lock, so it
        # is not waited for here) fails and unloads it.
        async with self.residency.lock:
            if entry.model is not model or entry.loading is not None or entry.leaving is not None:
                return
            async with _leaving(entry):  # nothing to wait for: no load or move of it runs
                await self._unload_loaded(entry, f"failed: {reason}")
                entry.evicted = True
                entry.reason = f"failed: {reason}; restarts on its next request"

    async def _sweep_idle(self) -> None:
        """Evict models that have been idle longer than their ``idle_unload_s``, checking a
        quarter of the shortest timeout apart; a model that loads wakes the sweeper, so that its
        own timeout counts from then on."""
        while True:
            timeouts = [t for e in self._entries() if (t := self._idle_timeout(e)) is not None]
            interval = min(timeouts, default=IDLE_SWEEP_MAX_S) / 4
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), min(max(interval, IDLE_SWEEP_MIN_S), IDLE_SWEEP_MAX_S))
            self._loaded.clear()
            for entry in list(self._entries()):
                timeout = self._idle_timeout(entry)
                if timeout is None or not self._idle_past(entry, timeout):
                    continue
                async with self.residency.lock:  # (waiting for it, the model may have been used)
                    if self._idle_past(entry, timeout):
                        try:
                            await self._evict(entry, f"idle for {time.monotonic() - entry.last_used:.0f} s")
                        except Exception:  # one model that cannot leave must not end the sweeps
                            log.exception("model %s: the idle unload failed", entry.key)

    @staticmethod
    def _idle_past(entry: ModelEntry, timeout: float) -> bool:
        return entry.evictable and time.monotonic() - entry.last_used > timeout

    async def _collect_garbage(self) -> None:
        """Run the full garbage collection that unloads leave pending (``HeapKeeper``) at a moment
        when no request runs and no model loads."""
        while True:
            await asyncio.sleep(HEAP_CHECK_S)
            if self._heap.pending:
                self._heap.collect_frozen(idle=not any(e.busy or e.loading for e in self._entries()))

    def _idle_timeout(self, entry: ModelEntry) -> float | None:
        if entry.spec is None or entry.pinned:
            return None
        own = entry.spec.config.idle_unload_s
        return own if own is not None else self.settings.idle_unload_s

    def _entries(self) -> Iterator[ModelEntry]:
        for versions in self._models.values():
            yield from versions.values()

    def _holders(self) -> list[ModelEntry]:
        """Every entry that may hold memory: those of the repository's models, and those that
        loaded while their model's first sync still runs (at startup, one startup model may
        have to make room for another before either is registered)."""
        return list(dict.fromkeys([*self._entries(), *self._holding]))

    def _set_state(self, entry: ModelEntry, state: ModelState, reason: str, took: float | None = None) -> None:
        entry.state = state
        entry.reason = reason
        held = self.ledger.held(entry)
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
            timeout_s=spec.config.timeout_s if spec.config.timeout_s is not None else s.infer_timeout_s,
            adaptive_fill=s.adaptive_fill if batching.adaptive_fill is None else batching.adaptive_fill,
        )


async def _log_load_progress(spec: ModelSpec, placement: Placement) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(LOAD_PROGRESS_S)
        log.info("model %s:%s still loading onto %s (%.0f s so far)", spec.name, spec.version,
                 placement.device, time.monotonic() - started)


@dataclass(slots=True)
class _RoomWait:
    """One load's wait for room: when it gives up, when the busy models its room would come from
    are asked to yield, and those that yield for it."""

    give_up: float
    yield_at: float
    yielded: list[ModelEntry] = field(default_factory=list)

    @classmethod
    def starting_now(cls) -> _RoomWait:
        now = time.monotonic()
        return cls(now + BUSY_VICTIM_WAIT_S, now + BUSY_VICTIM_YIELD_S)


async def _until_one_idle(busy: list[ModelEntry], victims: list[ModelEntry], wait_for_room: _RoomWait,
                          loading: ModelEntry) -> None:
    """Poll until one of ``busy`` is idle (evictable) or the wait gives up. From its
    ``yield_at``, the ``victims`` the room of ``loading`` would come from yield (hold new
    requests back, when they may) and are added to its ``yielded``."""
    while not any(e.evictable for e in busy) and time.monotonic() < wait_for_room.give_up:
        if time.monotonic() >= wait_for_room.yield_at:
            for victim in victims:
                if victim.may_yield and victim.start_yield():
                    wait_for_room.yielded.append(victim)
                    log.info("model %s holds new requests back until it is idle, to make room for %s",
                             victim.key, loading.key)
        await asyncio.sleep(BUSY_VICTIM_POLL_S)


def _check_may_load(entry: ModelEntry) -> None:
    """Raise for a request to a model that is down and that a request must not bring back."""
    if entry.loading is None and entry.state is ModelState.UNAVAILABLE and not entry.reloads_on_request():
        raise ModelNotReady(f"model '{entry.key}' is not ready: {entry.reason}")


@contextlib.asynccontextmanager
async def _leaving(entry: ModelEntry) -> AsyncIterator[None]:
    """Mark ``entry`` as being unloaded or evicted for as long as the context lasts, once no
    load of it runs and no other unload or eviction of it does (those are waited for): requests
    arriving meanwhile wait for the end before loading it again."""
    while entry.loading is not None or entry.leaving is not None:
        await asyncio.shield(entry.loading or entry.leaving)  # type: ignore[arg-type]
    done = asyncio.get_running_loop().create_future()
    entry.leaving = done
    try:
        yield
    finally:
        entry.leaving = None
        done.set_result(None)


def _not_ready(entry: ModelEntry) -> MMServerError:
    """The error for a request to a model that is not ready: 507 when it could not get memory."""
    message = f"model '{entry.key}' is not ready: {entry.reason}"
    if isinstance(entry.load_error, InsufficientMemory):
        return InsufficientMemory(message)
    return ModelNotReady(message)


def _version_order(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def _declared_outputs(spec: ModelSpec, model: LoadedModel | None) -> list[RequestedOutput]:
    """The outputs ``model.yaml`` declares, checked against those the model computes."""
    if spec.config.outputs is None or model is None:
        return []
    declared = [t.name for t in spec.config.outputs]
    computed = [t.name for t in model.metadata().outputs]
    unknown = [name for name in declared if name not in computed]
    if computed and unknown:
        raise ModelLoadError(f"model.yaml declares the outputs {unknown}, which the model does not compute "
                             f"(it computes {computed})")
    return [RequestedOutput(name) for name in declared]


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

