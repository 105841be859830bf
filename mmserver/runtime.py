"""The runtime plugin contract and the registry that discovers plugins by entry point.

A ``Runtime`` is stateless, one per framework: it recognises model folders, predicts their size
and loads them. A ``LoadedModel`` is one model in memory: it validates requests cheaply on the
event loop and computes whole batches (``infer(list) -> list``, same length, same order).

Plugins register under the entry-point group ``mmserver.runtimes`` and must import their
framework lazily (inside ``load``), so detection and start-up never pay for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from .errors import ModelLoadError
from .spec import ModelSpec
from .types import InferRequest, InferResponse, ModelMetadata

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mmserver.runtimes"
HOST = "cpu"
T = TypeVar("T")


class BatchingMode(str, Enum):
    """Who batches a model's requests."""

    DYNAMIC = "dynamic"  # the server's batcher merges requests into one infer() call
    INTERNAL = "internal"  # the engine batches by itself; the server only caps concurrency
    NONE = "none"  # one request per infer() call


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the memory manager wants a model: ``cpu`` or a GPU as torch names it (``cuda:0``,
    an index into CUDA_VISIBLE_DEVICES). Memory figures use the same device names."""

    device: str = HOST

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


class LoadedModel(ABC):
    """A model in memory, ready to compute."""

    batching: BatchingMode = BatchingMode.DYNAMIC

    @abstractmethod
    def metadata(self) -> ModelMetadata:
        """Inputs, outputs and platform of the model."""

    def check_input(self, name: str, datatype: str) -> None:
        """Refuse an input from its header alone, before its data is decoded (raise
        ``InvalidInput``); the default takes any. Must be cheap."""

    def validate(self, request: InferRequest) -> None:
        """Reject a request that cannot fit the model (raise ``InvalidInput``). Must be cheap."""

    def batch_key(self, request: InferRequest) -> Hashable:
        """Requests with equal keys may be merged into one batch."""
        return (
            tuple((t.name, t.datatype, t.data.shape[1:]) for t in request.inputs),
            request.output_names,
        )

    def rows(self, request: InferRequest) -> int:
        """How many batch rows a request carries (its first dimension)."""
        first = request.inputs[0].data
        return first.shape[0] if first.ndim else 1

    @abstractmethod
    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        """Compute a batch of compatible requests; one response per request, in order."""

    @abstractmethod
    async def unload(self) -> None:
        """Free every resource the model holds. Idempotent."""

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes the model occupies per device (``cpu``, ``cuda:N``)."""

    @property
    def can_offload(self) -> bool:
        """Whether ``offload``/``restore`` move the model to host memory and back (host tier)."""
        return False

    async def offload(self) -> None:
        """Move the model's device memory to (pinned) host memory, freeing the device; what
        ``memory`` reports afterwards is what the model still holds, on the host and on any
        device it could not leave entirely (a sleeping engine's CUDA context)."""
        raise TypeError(f"{type(self).__name__} has no host tier (can_offload is False)")

    async def restore(self, placement: Placement) -> None:
        """Bring an offloaded model back onto ``placement``'s device."""
        raise TypeError(f"{type(self).__name__} has no host tier (can_offload is False)")

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Called by the manager once the model is loaded. A model that can break for good later
        (an engine process that dies) calls ``on_failure(reason)`` on the event loop; the manager
        then unloads it and reports it unavailable with that reason. The default never calls it."""


class Runtime(ABC):
    """A framework plugin. Stateless; one instance serves every model of its framework."""

    name: str = ""
    priority: int = 0  # detection order when several runtimes recognise a folder: higher first
    supports_gpu: bool = False  # whether ``load`` accepts a ``cuda:N`` placement

    @abstractmethod
    def matches(self, path: Path) -> bool:
        """Whether a model folder holds files this runtime can load. Never imports the framework."""

    @abstractmethod
    def estimate(self, spec: ModelSpec, placement: Placement) -> dict[str, int]:
        """Predicted bytes per device if the model is loaded onto ``placement``."""

    @abstractmethod
    async def load(self, spec: ModelSpec, placement: Placement) -> LoadedModel:
        """Load the model; raise on broken files."""

    def generates_text(self, spec: ModelSpec) -> bool:
        """Whether the model would serve the text generation routes (``mmserver.generation``),
        told from its files without loading it. Must be cheap."""
        return False

    def embeds_text(self, spec: ModelSpec) -> bool:
        """Whether the model would serve the embeddings route (``mmserver.embedding``), told from
        its files without loading it. Must be cheap."""
        return False

    def collect_metrics(self) -> Iterable[Any]:
        """Prometheus metric families of this runtime's engines (vLLM's own), exported with the
        server's metrics at scrape time."""
        return ()

    def prepare_device(self, placement: Placement) -> None:
        """Ready the framework on ``placement``'s GPU before a model's size is measured there as
        the growth of the device's memory: create what the first model would otherwise be
        charged with (torch's CUDA context, a few hundred MiB, made once per device). Called on a
        worker thread, under the memory lock. The default prepares nothing."""

    def release_cached_memory(self, device: str) -> None:
        """Give back to ``device`` the memory the framework keeps cached for reuse (torch's
        caching allocator). The manager calls it, on a worker thread, when memory evicted from
        ``device`` has not come back on its own. The default holds no cache."""


def files_with_suffix(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files directly in ``folder`` whose suffix is one of ``suffixes``, ``model.*`` first."""
    if folder.is_file():
        return [folder] if folder.suffix in suffixes else []
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes]
    return sorted(found, key=lambda p: (p.stem != "model", p.name))


def find_model_file(spec: ModelSpec, suffixes: tuple[str, ...]) -> Path:
    """The file to load: the config's ``uri`` when it names a file, else the model file in the folder."""
    target = spec.artifact
    if target.is_file():
        return target
    if not target.exists():
        raise ModelLoadError(f"{target} does not exist")
    candidates = files_with_suffix(target, suffixes)
    if not candidates:
        raise ModelLoadError(f"no {' / '.join(suffixes)} file in {target}")
    if len(candidates) > 1 and candidates[0].stem != "model":
        names = ", ".join(p.name for p in candidates)
        raise ModelLoadError(f"several model files in {target} ({names}); set 'uri' in model.yaml")
    return candidates[0]


IMPORT_LOCK_WAIT_S = 60.0


class _ImportLock:
    """Held by runtimes while they import their framework or unpickle a model (which imports the
    modules it names). Python's per-module import locks deadlock or expose half-initialised
    modules when two threads first import scikit-learn at the same time.

    A load that hangs while holding it (an unpickle that never returns) must not stall every
    other load: after ``IMPORT_LOCK_WAIT_S`` a waiter goes on without it and says so.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = threading.local()

    def __enter__(self) -> None:
        self._held.value = self._lock.acquire(timeout=IMPORT_LOCK_WAIT_S)
        if not self._held.value:
            log.warning("another model's load has held the import lock for %.0f s (hung?); "
                        "loading without it", IMPORT_LOCK_WAIT_S)

    def __exit__(self, *exc: object) -> None:
        if self._held.value:
            self._lock.release()


IMPORT_LOCK = _ImportLock()


async def run_sync(func: Callable[..., T], *args: Any) -> T:
    """Run blocking framework code on the server's thread pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


#: an inline call's wall time counts as this many times less than its CPU time (see AdaptiveExecutor)
INLINE_WALL_SHARE = 10


class AdaptiveExecutor:
    """Runs one model's synchronous compute inline while it is measured cheap, else on the pool.

    A thread-pool hop costs two context switches and a GIL hand-over per batch, which is more
    than a small scikit-learn or XGBoost model needs to compute (measured on 2 cores: 223 µs of
    server CPU per request through the pool vs 107 µs inline). So a model whose code is known to
    be bounded by its input (``inline_allowed``: library estimators, never arbitrary user code
    that could hang) runs inline while the recent cost per call stays under ``budget_s``. The cost
    estimate jumps to any slow call at once and decays by 10% per call, so one slow batch sends
    the next ones back to the pool until they are cheap again.

    The cost is the CPU time of the call on its thread. Wall time would also count what is not
    the model's: on the pool, the waits for the GIL that the busy event loop holds (up to the
    5 ms switch interval each), and inline, the moments the OS gives the core to another
    process; a cheap model would then look expensive and stay on the pool. An inline call that
    blocks without using CPU still counts: at a tenth of its wall time.
    """

    def __init__(self, inline_allowed: bool, budget_s: float = 0.0005) -> None:
        self.inline_allowed = inline_allowed
        self.budget_s = budget_s
        self.recent_cost_s = float("inf")  # unknown until the first call has been timed

    @property
    def inline(self) -> bool:
        return self.inline_allowed and self.recent_cost_s < self.budget_s

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        if not self.inline:
            return await run_sync(self._timed, False, func, *args)
        return self._timed(True, func, *args)

    def _timed(self, inline: bool, func: Callable[..., T], *args: Any) -> T:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return func(*args)
        finally:
            cost = time.thread_time() - cpu
            if inline:
                cost = max(cost, (time.perf_counter() - wall) / INLINE_WALL_SHARE)
            decayed = self.recent_cost_s * 0.9 if self.recent_cost_s != float("inf") else cost
            self.recent_cost_s = max(cost, decayed)


class RuntimeRegistry:
    """The installed runtimes by name, plus those whose plugin failed to import (with the reason)."""

    def __init__(self, runtimes: dict[str, Runtime], broken: dict[str, str] | None = None) -> None:
        self.runtimes = runtimes
        self.broken = broken or {}

    @classmethod
    def discover(cls) -> RuntimeRegistry:
        """Load every plugin registered under the ``mmserver.runtimes`` entry-point group."""
        runtimes: dict[str, Runtime] = {}
        broken: dict[str, str] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                runtime = ep.load()()
            except Exception as exc:  # a broken plugin must not take the server down
                broken[ep.name] = f"runtime plugin '{ep.name}' failed to import: {exc}"
                log.error(broken[ep.name])
                continue
            runtimes[ep.name] = runtime
        log.info("runtimes: %s", ", ".join(sorted(runtimes)) or "none installed")
        return cls(runtimes, broken)

    def get(self, name: str) -> Runtime:
        """The runtime called ``name``; raises ``LookupError`` with a reason a user can act on."""
        runtime = self.runtimes.get(name)
        if runtime is not None:
            return runtime
        if name in self.broken:
            raise LookupError(self.broken[name])
        raise LookupError(
            f"runtime '{name}' is not installed (installed: {', '.join(sorted(self.runtimes)) or 'none'});"
            f" install its plugin, e.g. runtimes/{name}"
        )

    def release_cached_memory(self, device: str) -> None:
        """Ask every GPU runtime to give its cached memory on ``device`` back (see ``Runtime``)."""
        for name, runtime in self.runtimes.items():
            if runtime.supports_gpu:
                try:
                    runtime.release_cached_memory(device)
                except Exception:  # a failing plugin must not stop the eviction
                    log.exception("runtime %s failed to release cached memory on %s", name, device)

    def detect(self, path: Path) -> str | None:
        """The name of the first installed runtime that recognises the folder."""
        ranked = sorted(self.runtimes.items(), key=lambda item: -item[1].priority)
        for name, runtime in ranked:
            if runtime.matches(path):
                return name
        return None
