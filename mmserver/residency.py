"""Where models live, and how room is made for them.

Each device (host RAM, every GPU) has a budget: the configured cap, but never more than other
processes leave (measured through ``devices``) minus a margin. A model is placed on a device,
its size predicted by its runtime (or given in ``model.yaml``), and admitted only if the ledger
and the device's measured free memory both have room; otherwise least-recently-used idle models
that are not pinned are chosen to leave (the manager moves them to host RAM or unloads them).
After an eviction on a GPU, the memory must show as free in NVML before the next load starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Hashable

from .devices import Device
from .entry import ModelEntry
from .errors import InsufficientMemory, ModelLoadError
from .memory import Candidate, MemoryLedger, choose_victims, format_bytes, resolve_budget
from .runtime import HOST, LoadedModel, Placement, Runtime, run_sync
from .settings import Settings
from .spec import ModelSpec

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0
RELEASE_ESCALATE_S = 0.5  # after this long, framework caches are asked to give memory back
RELEASE_TOLERANCE = 64 * 1024**2  # NVML's view may differ from the ledger's by allocator slack


class Residency:
    """Budgets, placement and admission for every device."""

    def __init__(self, settings: Settings, devices: dict[str, Device], ledger: MemoryLedger) -> None:
        self.settings = settings
        self.devices = devices
        self.ledger = ledger
        self.margin = int(settings.memory_margin)
        # Serialises admissions (room-making and reservations) on every device, and whole loads
        # and evictions on GPUs: engines like vLLM size themselves from the free memory they see
        # while starting, and the measured size of a load is a before/after difference.
        self.lock = asyncio.Lock()
        self._prepared: set[tuple[str, str]] = set()  # (runtime, GPU) pairs whose device is ready

    @property
    def gpus(self) -> list[str]:
        return [name for name in self.devices if name != HOST]

    def set_budgets(self) -> None:
        """Compute every device's budget from a fresh reading (call before any model loads)."""
        for name, device in self.devices.items():
            reading = device.read()
            setting = self.settings.host_memory_budget if name == HOST else self.settings.gpu_memory_budget
            budget = resolve_budget(setting, reading.total, reading.others, self.margin)
            self.ledger.budgets[name] = budget
            log.info("memory budget on %s: %s of %s (others use %s, margin %s)", name,
                     format_bytes(budget), format_bytes(reading.total), format_bytes(reading.others),
                     format_bytes(self.margin))

    # ------------------------------------------------------------------ placement

    def placement(self, spec: ModelSpec, runtime: Runtime) -> Placement:
        """The device for a model: its ``device`` setting, or for ``auto`` the GPU with the most
        room when the runtime can use one, else the host."""
        wanted = spec.config.device
        if wanted == HOST or (wanted == "auto" and not (runtime.supports_gpu and self.gpus)):
            return Placement(HOST)
        if not runtime.supports_gpu:
            raise ModelLoadError(f"device '{wanted}' asked for, but runtime '{runtime.name}' runs on the CPU only")
        if not self.gpus:
            raise ModelLoadError(f"device '{wanted}' asked for, but this server has no GPU it can measure")
        if wanted.startswith("cuda:"):
            if wanted not in self.devices:
                raise ModelLoadError(f"device '{wanted}' does not exist (GPUs: {', '.join(self.gpus)})")
            return Placement(wanted)
        return Placement(max(self.gpus, key=self.free))

    def predicted(self, spec: ModelSpec, runtime: Runtime, placement: Placement) -> dict[str, int]:
        """The size to reserve: ``memory`` from model.yaml, else the runtime's estimate."""
        if spec.config.memory:
            return {placement.device: int(spec.config.memory)}
        return runtime.estimate(spec, placement)

    # ------------------------------------------------------------------ room

    def free(self, device: str) -> int:
        """Bytes a new model may take on a device now, the least of: the ledger's room in the
        budget; the budget less what the device says this process uses (allocator caches, CUDA
        context, leaks), where it can say; and the device's measured free memory (other
        processes may have grown) less the margin."""
        limits = [v for v in (self.ledger.free(device),) if v is not None]
        if device in self.devices:
            reading = self.devices[device].read()
            limits.append(reading.free - self.margin)
            budget = self.ledger.budgets.get(device)
            if device != HOST and budget is not None and reading.ours:
                limits.append(budget - reading.ours)
        return min(limits) if limits else 0

    def shortfall(self, owner: Hashable, sizes: dict[str, int]) -> dict[str, int]:
        """Bytes missing per device before ``owner`` can hold ``sizes``."""
        held = self.ledger.held(owner)
        missing = {}
        for device, size in sizes.items():
            lacking = size - held.get(device, 0) - self.free(device)
            if lacking > 0:
                missing[device] = lacking
        return missing

    def victims(self, entry: ModelEntry, sizes: dict[str, int], others: list[ModelEntry],
                assume_idle: Collection[ModelEntry] = ()) -> list[ModelEntry]:
        """The models to move out so ``entry`` fits; raises ``InsufficientMemory`` when even every
        evictable model together would not make enough room. ``assume_idle``: models to count
        as evictable although busy (would they make room once idle?)."""
        chosen: list[ModelEntry] = []
        for device, lacking in self.shortfall(entry, sizes).items():
            pool = [e for e in others
                    if e is not entry and e not in chosen and (e.evictable or e in assume_idle)]
            candidates = [Candidate(e, self.ledger.held(e).get(device, 0), e.last_used) for e in pool]
            picked = choose_victims([c for c in candidates if c.size > 0], lacking)
            if picked is None:
                raise InsufficientMemory(self._no_room(entry, device, sizes[device], others))
            chosen.extend(c.owner for c in picked)  # type: ignore[misc]
        return chosen

    def _no_room(self, entry: ModelEntry, device: str, size: int, others: list[ModelEntry]) -> str:
        holders = [e for e in others if e is not entry and self.ledger.held(e).get(device)]
        pinned = [e.key for e in holders if e.pinned]
        busy = [e.key for e in holders if not e.pinned and not e.evictable]
        evictable = sum(self.ledger.held(e).get(device, 0) for e in holders if e.evictable)
        parts = [f"model {entry.key} needs {format_bytes(size)} on {device}",
                 f"{format_bytes(max(0, self.free(device)))} is free of a {format_bytes(self.ledger.budgets.get(device, 0))} budget",
                 f"evicting every idle model would free {format_bytes(evictable)} more"]
        if pinned:
            parts.append(f"pinned: {', '.join(pinned)}")
        if busy:
            parts.append(f"busy or loading: {', '.join(busy)}")
        return "; ".join(parts)

    def host_room_for(self, size: int) -> bool:
        """Whether the host tier can take ``size`` more bytes without evicting anything."""
        return self.free(HOST) >= size

    def overheads(self) -> dict[str, int]:
        """Bytes charged to the runtimes' overheads (``prepare``) per GPU."""
        totals: dict[str, int] = {}
        for runtime, device in self._prepared:
            for name, size in self.ledger.held(("overhead", runtime, device)).items():
                totals[name] = totals.get(name, 0) + size
        return totals

    # ------------------------------------------------------------------ measurement

    async def prepare(self, runtime: Runtime, placement: Placement) -> None:
        """Ready ``runtime`` on a GPU (``Runtime.prepare_device``) before room is made there.
        The first time, what the device grew by (the CUDA context) is charged to the ledger as
        the runtime's overhead on that GPU, for good: it then counts against the budget also
        where NVML cannot tell this process's use apart (PID namespaces of containers).
        Called with ``lock`` held."""
        key = (runtime.name, placement.device)
        first = key not in self._prepared
        before = self.used(placement.device) if first else None
        await run_sync(runtime.prepare_device, placement)
        if before is None:
            return
        self._prepared.add(key)
        grown = (self.used(placement.device) or 0) - before
        if grown > 0:
            self.ledger.commit(("overhead", *key), {placement.device: grown})
            log.info("%s: runtime %s made ready, %s charged to its overhead", placement.device,
                     runtime.name, format_bytes(grown))

    def used(self, device: str) -> int | None:
        """Device memory in use now, as the device measures it (None for the host's shared RAM)."""
        return self.devices[device].read().used if device != HOST and device in self.devices else None

    def growth(self, device: str, used_before: int | None) -> int | None:
        """How much a device's measured use rose since ``used_before`` (None where it cannot say)."""
        used = self.used(device)
        return None if used is None or used_before is None else used - used_before

    def measured(
        self, spec: ModelSpec, model: LoadedModel, placement: Placement, grown: int | None
    ) -> dict[str, int]:
        """A loaded model's size: what it reports, at least what its GPU grew by (``grown``), and
        at least the ``memory`` its model.yaml declares (the operator knows best)."""
        sizes = dict(model.memory())
        floor = max(int(spec.config.memory or 0), grown or 0)
        if floor:
            sizes[placement.device] = max(sizes.get(placement.device, 0), floor)
        return sizes

    async def wait_released(
        self, device: str, used_before: int, size: int, release_cached: Callable[[], Awaitable[None]]
    ) -> None:
        """After an eviction on a GPU, wait until NVML shows ``size`` bytes of it back (within a
        tolerance).
        Memory still missing after ``RELEASE_ESCALATE_S`` escalates: ``release_cached`` asks the
        frameworks to empty their allocator caches; what is still missing at ``RELEASE_TIMEOUT_S``
        is reported as a possible leak."""
        if device == HOST or device not in self.devices:
            return
        target = used_before - size + RELEASE_TOLERANCE
        started = time.monotonic()
        escalated = False
        while (now := self.used(device) or 0) > target:
            waited = time.monotonic() - started
            if waited > RELEASE_TIMEOUT_S:
                log.warning("%s: %s of %s evicted was not given back to the device (possible leak)",
                            device, format_bytes(now - (used_before - size)), format_bytes(size))
                return
            if waited > RELEASE_ESCALATE_S and not escalated:
                escalated = True
                log.info("%s: %s of %s evicted is still in use after %.1f s; emptying allocator caches",
                         device, format_bytes(now - (used_before - size)), format_bytes(size), waited)
                await release_cached()
            await asyncio.sleep(0.005)
