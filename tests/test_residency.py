"""The memory manager's rules (budgets, placement, LRU eviction, the host tier, pinned and busy
models, NVML-verified release, idle unloads) against a simulated GPU.

Fakes, each standing in for something this machine lacks:
- ``FakeGpu`` stands in for an NVML-measured GPU: a byte counter that models raise and lower.
- ``GpuRuntime`` / ``GpuModel`` stand in for a torch runtime and a model holding GPU memory: they
  add their size to the fake GPU on load, move it to host RAM on offload, and give it back on
  unload, so the manager's bookkeeping can be checked against the "device" reading.
- ``HostRuntime`` / ``HostModel`` stand in for a CPU runtime whose size prediction is larger than
  what its models then hold (the transformers runtime's activation allowance), with slow loads.
The manager, ledger, residency and batcher under test are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from mmserver.devices import Device, MemoryReading
from mmserver.errors import InsufficientMemory, ModelNotReady
from mmserver import manager as manager_module
from mmserver.manager import ModelManager
from mmserver.memory import Candidate, choose_victims, resolve_budget
from mmserver.runtime import HOST, LoadedModel, Placement, Runtime, RuntimeRegistry
from mmserver.settings import Settings
from mmserver.types import InferInput, InferOutput, InferRequest, InferResponse, ModelMetadata, ModelState

MiB = 1024**2
GPU_TOTAL = 1000 * MiB


class FakeGpu(Device):
    """Stands in for an NVML GPU: ``used`` is whatever the fake models put there."""

    def __init__(self, name: str = "cuda:0", others: int = 0, per_process: bool = True) -> None:
        self.name = name
        self.uuid = f"GPU-fake-{name}"
        self.others = others
        self.ours = 0
        self.left_behind = 0  # bytes models left in use after they went (a leak or a cache)
        # False: like NVML in a container with its own PID namespace, this process's use cannot
        # be told apart from the others' (the reading's ``ours`` is 0)
        self.per_process = per_process

    def read(self) -> MemoryReading:
        return MemoryReading(GPU_TOTAL, self.others + self.ours, self.ours if self.per_process else 0)


class FakeHost(Device):
    """Stands in for host RAM with a fixed size, so budgets do not depend on this machine."""

    name = HOST
    uuid = HOST

    def __init__(self, total: int) -> None:
        self.total = total

    def read(self) -> MemoryReading:
        return MemoryReading(self.total, 0, 0)


class GpuModel(LoadedModel):
    """Stands in for a torch model on a GPU (see module docstring)."""

    def __init__(self, gpu: FakeGpu, size: int, leak: int = 0, workspace: int = 0, kept: int = 0) -> None:
        self.gpu, self.size, self.leak = gpu, size, leak
        self.workspace = workspace  # reported on the GPU beyond what it allocates (room for batches)
        self.kept = kept  # left on the GPU while in host memory (like a sleeping engine's context)
        self.where = "gpu"
        self.gate: asyncio.Event | None = None  # holds infer() until set
        self.delay = 0.0  # seconds each infer() call takes
        self.offload_gate: asyncio.Event | None = None  # holds offload() until set
        self.offload_error: Exception | None = None  # raised by offload(), the model left on the GPU
        gpu.ours += size

    def metadata(self) -> ModelMetadata:
        return ModelMetadata("fake", [], [])

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        assert self.where == "gpu", "a model computed while it was not on its device"
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        assert self.where == "gpu", "a model was moved out while it computed"
        return [InferResponse([InferOutput("out", r.inputs[0].data)]) for r in requests]

    async def unload(self) -> None:
        if self.where == "gpu":
            self.gpu.ours -= self.size - self.leak
            self.gpu.left_behind += self.leak
        elif self.where == "host":
            self.gpu.ours -= self.kept
        self.where = "gone"

    def memory(self) -> dict[str, int]:
        if self.where == "gpu":
            return {self.gpu.name: self.size + self.workspace}
        return {HOST: self.size, **({self.gpu.name: self.kept} if self.kept else {})}

    @property
    def can_offload(self) -> bool:
        return True

    async def offload(self) -> None:
        if self.offload_gate is not None:
            await self.offload_gate.wait()
        if self.offload_error is not None:
            raise self.offload_error
        self.gpu.ours -= self.size - self.leak - self.kept
        self.gpu.left_behind += self.leak
        self.where = "host"

    async def restore(self, placement: Placement) -> None:
        self.gpu.ours += self.size - self.kept
        self.where = "gpu"


class GpuRuntime(Runtime):
    """Stands in for a GPU runtime: model folders hold a ``size_mib`` file."""

    name = "fakegpu"
    supports_gpu = True

    def __init__(self, gpus: dict[str, FakeGpu], leak: int = 0, cached: bool = False, context: int = 0,
                 **model_options: int) -> None:
        self.gpus, self.leak = gpus, leak
        self.model_options = model_options  # GpuModel's workspace and kept
        self.cached = cached  # what models leave behind is an allocator cache the runtime can empty
        self.context = context  # bytes the first use of a device costs (a CUDA context)
        self.contexts: set[str] = set()
        self.loaded: list[str] = []
        self.releases: list[str] = []

    def prepare_device(self, placement: Placement) -> None:
        if self.context and placement.device not in self.contexts:
            self.contexts.add(placement.device)
            self.gpus[placement.device].ours += self.context

    def release_cached_memory(self, device: str) -> None:
        self.releases.append(device)
        if self.cached:
            gpu = self.gpus[device]
            gpu.ours -= gpu.left_behind
            gpu.left_behind = 0

    def matches(self, path: Path) -> bool:
        return (path / "size_mib").is_file()

    def estimate(self, spec, placement: Placement) -> dict[str, int]:
        return {placement.device: int((spec.artifact / "size_mib").read_text()) * MiB}

    async def load(self, spec, placement: Placement) -> GpuModel:
        self.prepare_device(placement)  # like torch: the first use of a device makes its context
        self.loaded.append(spec.name)
        size = int((spec.artifact / "size_mib").read_text()) * MiB
        return GpuModel(self.gpus[placement.device], size, self.leak, **self.model_options)


class HostModel(LoadedModel):
    """Stands in for a model in host RAM (see module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def metadata(self) -> ModelMetadata:
        return ModelMetadata("fake", [], [])

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        return [InferResponse([InferOutput("out", r.inputs[0].data)]) for r in requests]

    async def unload(self) -> None:
        pass

    def memory(self) -> dict[str, int]:
        return {HOST: self.size}


class HostRuntime(Runtime):
    """Stands in for a CPU runtime (see module docstring): predicts 4x what its models hold."""

    name = "fakehost"

    def matches(self, path: Path) -> bool:
        return (path / "size_mib").is_file()

    def estimate(self, spec, placement: Placement) -> dict[str, int]:
        return {HOST: 4 * int((spec.artifact / "size_mib").read_text()) * MiB}

    async def load(self, spec, placement: Placement) -> HostModel:
        await asyncio.sleep(0.05)
        return HostModel(int((spec.artifact / "size_mib").read_text()) * MiB)


def write_model(repo: Path, name: str, size_mib: int, yaml_text: str = "") -> None:
    folder = repo / name
    folder.mkdir(parents=True)
    (folder / "size_mib").write_text(str(size_mib))
    (folder / "model.yaml").write_text(f"runtime: fakegpu\n{yaml_text}")


def request() -> InferRequest:
    return InferRequest([InferInput("x", "FP32", np.zeros((1, 1), np.float32))])


def make_manager(repo: Path, gpu_budget: str = "300MiB", host: int = 10_000 * MiB, leak: int = 0,
                 cached: bool = False, context: int = 0, per_process: bool = True, workspace: int = 0,
                 kept: int = 0, **settings):
    gpu = FakeGpu(per_process=per_process)
    runtime = GpuRuntime({"cuda:0": gpu}, leak, cached, context, workspace=workspace, kept=kept)
    manager = ModelManager(
        Settings(model_repository=repo, gpu_memory_budget=gpu_budget, host_memory_budget=host,
                 memory_margin=0, **settings),
        RuntimeRegistry({"fakegpu": runtime}),
        devices={HOST: FakeHost(host), "cuda:0": gpu},
    )
    return manager, gpu, runtime


@asynccontextmanager
async def serving(manager: ModelManager) -> AsyncIterator[ModelManager]:
    """The manager started for the block, stopped (every model unloaded) after it."""
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()


def states(manager: ModelManager) -> dict[str, str]:
    return {row["name"]: row["state"] for row in manager.index()}


# ----------------------------------------------------------------------------- pure rules


def test_budget_is_the_cap_but_never_more_than_others_leave():
    assert resolve_budget(None, 1000, 100, 50) == 850
    assert resolve_budget(400, 1000, 100, 50) == 400
    assert resolve_budget(0.5, 1000, 100, 50) == 500
    assert resolve_budget(0.95, 1000, 100, 50) == 850
    assert resolve_budget(None, 100, 200, 0) == 0


def test_victims_are_least_recently_used_and_as_few_as_needed():
    a, b, c = Candidate("a", 100, 3.0), Candidate("b", 100, 1.0), Candidate("c", 300, 2.0)
    assert choose_victims([a, b, c], 50) == [b]
    assert choose_victims([a, b, c], 150) == [c]  # b was taken first, but c alone suffices
    assert choose_victims([a, b, c], 350) == [b, c]
    assert choose_victims([a, b, c], 450) == [b, c, a]
    d = Candidate("d", 50, 0.5)
    assert choose_victims([a, b, c, d], 120) == [d, b]  # the oldest that suffice, not c
    assert choose_victims([a, b, c], 0) == []
    assert choose_victims([a, b], 500) is None


# ----------------------------------------------------------------------------- the manager


async def test_models_beyond_the_budget_evict_the_least_recently_used_to_host_memory(tmp_path):
    for name in ("a", "b"):
        write_model(tmp_path, name, 100)
    write_model(tmp_path, "c", 150, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        assert states(manager) == {"a": "READY", "b": "READY", "c": "UNAVAILABLE"}
        assert gpu.ours == 200 * MiB
        await manager.infer(manager.entry("a"), request())  # b is now the least recently used
        await manager.infer(manager.entry("c"), request())  # needs 150: 100 free, so b must go
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE", "c": "READY"}
        assert manager.entry("b").reason == "in host memory, restores on the next request"
        assert manager.ledger.held(manager.entry("b")) == {HOST: 100 * MiB}
        assert gpu.ours == 250 * MiB <= manager.ledger.budgets["cuda:0"]
        # b comes back from host memory (not from disk), pushing out the LRU (a)
        await manager.infer(manager.entry("b"), request())
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY", "c": "READY"}
        assert runtime.loaded == ["a", "b", "c"]  # restored, never reloaded
        assert gpu.ours == 250 * MiB
        assert manager.ledger.used("cuda:0") == gpu.ours
        assert manager.entry("a").metrics.evictions == 0  # metrics are off in this manager
    assert gpu.ours == 0


async def test_pinned_models_stay_and_a_model_that_cannot_fit_gets_a_clear_error(tmp_path):
    write_model(tmp_path, "p", 200, "pinned: true\n")
    write_model(tmp_path, "q", 50)
    write_model(tmp_path, "big", 200, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        with pytest.raises(InsufficientMemory) as info:
            await manager.infer(manager.entry("big"), request())
        message = info.value.message
        assert "needs 200.0 MiB on cuda:0" in message
        assert "evicting every idle model would free 50.0 MiB more" in message
        assert "pinned: p:1" in message
        assert states(manager) == {"p": "READY", "q": "READY", "big": "UNAVAILABLE"}
        assert gpu.ours == 250 * MiB


async def test_insufficient_memory_is_its_own_error_type(tmp_path):
    write_model(tmp_path, "huge", 400)
    manager, _, _ = make_manager(tmp_path)
    async with serving(manager):
        entry = manager.entry("huge")
        assert entry.state is ModelState.UNAVAILABLE
        assert entry.reason.startswith("load failed: model huge:1 needs 400.0 MiB on cuda:0")
        with pytest.raises(InsufficientMemory):
            manager.residency.victims(entry, {"cuda:0": 400 * MiB}, [])


async def test_a_model_with_requests_in_flight_is_never_evicted(tmp_path):
    write_model(tmp_path, "busy", 150)
    write_model(tmp_path, "idle", 100)
    write_model(tmp_path, "new", 100, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        await manager.infer(manager.entry("idle"), request())  # busy is now the LRU...
        model = manager.entry("busy").model
        model.gate = asyncio.Event()
        running = asyncio.create_task(manager.infer(manager.entry("busy"), request()))
        await asyncio.sleep(0.01)
        await manager.infer(manager.entry("new"), request())  # ...but it is busy: idle goes
        assert states(manager) == {"busy": "READY", "idle": "UNAVAILABLE", "new": "READY"}
        model.gate.set()
        await running


async def test_without_host_room_an_evicted_model_is_unloaded_and_reloaded(tmp_path):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path, host=100 * MiB)  # the host tier cannot take 200
    async with serving(manager):
        await manager.infer(manager.entry("b"), request())
        assert manager.entry("a").reason == "evicted, reloads on the next request"
        assert manager.ledger.held(manager.entry("a")) == {}
        await manager.infer(manager.entry("a"), request())
        assert runtime.loaded == ["a", "b", "a"]  # reloaded from disk
        assert gpu.ours == 200 * MiB


async def test_a_model_that_cannot_move_to_host_memory_is_unloaded_instead(tmp_path, caplog):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        manager.entry("a").model.offload_error = MemoryError("no host memory for the copy")
        await manager.infer(manager.entry("b"), request())
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY"}
        assert manager.entry("a").reason == "evicted, reloads on the next request"
        assert manager.ledger.held(manager.entry("a")) == {} and gpu.ours == 200 * MiB
        assert "a:1 could not move to host memory (MemoryError: no host memory for the copy)" in caplog.text
        await manager.infer(manager.entry("a"), request())
        assert runtime.loaded == ["a", "b", "a"]  # reloaded from disk
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE"}


# ----------------------------------------------------------------------------- requests meeting an unload


async def test_a_request_during_an_operators_unload_does_not_bring_the_model_back(tmp_path):
    write_model(tmp_path, "a", 100, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        entry = manager.entry("a")
        await manager.infer(entry, request())
        entry.model.gate = asyncio.Event()
        running = asyncio.create_task(manager.infer(entry, request()))
        await asyncio.sleep(0.01)
        unloading = asyncio.create_task(manager.unload("a"))  # drains: waits for the running request
        await asyncio.sleep(0.01)
        late = asyncio.create_task(manager.infer(entry, request()))
        await asyncio.sleep(0.01)
        entry.model.gate.set()
        await asyncio.gather(running, unloading)
        with pytest.raises(ModelNotReady, match="unloaded by request"):
            await late
        assert runtime.loaded == ["a"] and gpu.ours == 0
        assert states(manager) == {"a": "UNAVAILABLE"} and manager.ledger.held(manager.entry("a")) == {}


async def test_a_request_during_an_eviction_waits_for_it_and_restores_the_same_model(tmp_path):
    write_model(tmp_path, "a", 200, "idle_unload_s: 0.2\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        entry = manager.entry("a")
        first = entry.model
        first.offload_gate = asyncio.Event()
        deadline = time.monotonic() + 5
        while entry.state is not ModelState.UNLOADING:  # the idle sweep moves it to host memory...
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        back = asyncio.create_task(manager.infer(entry, request()))  # ...while a request comes
        await asyncio.sleep(0.05)
        first.offload_gate.set()
        await back
        assert runtime.loaded == ["a"]  # it came back from host memory, not a second copy from disk
        assert entry.model is first and first.where == "gpu"
        assert states(manager) == {"a": "READY"}
        assert gpu.ours == 200 * MiB and manager.ledger.used("cuda:0") == 200 * MiB


async def test_the_first_model_on_a_gpu_is_not_charged_with_the_cuda_context(tmp_path):
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "b", 100)
    manager, gpu, _ = make_manager(tmp_path, gpu_budget="1GiB", context=300 * MiB)
    async with serving(manager):
        assert gpu.ours == 500 * MiB  # the context and two models...
        assert manager.ledger.held(manager.entry("a")) == manager.ledger.held(manager.entry("b")) == {"cuda:0": 100 * MiB}  # ...charged apart
        assert manager.ledger.held(("overhead", "fakegpu", "cuda:0")) == {"cuda:0": 300 * MiB}


@pytest.mark.parametrize("per_process", [True, False])
async def test_the_cuda_context_counts_against_the_budget(tmp_path, per_process):
    """Also where NVML cannot say which memory is this process's (``per_process=False``, as in
    a container with its own PID namespace), the context is in the ledger: models evict each
    other before the device holds more than the budget."""
    for name in ("a", "b", "c"):
        write_model(tmp_path, name, 100, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path, gpu_budget="500MiB", context=300 * MiB, per_process=per_process)
    async with serving(manager):
        for name in ("a", "b", "c", "a"):
            await manager.infer(manager.entry(name), request())
            assert gpu.read().used <= 500 * MiB
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE", "c": "READY"}
        assert manager.ledger.used("cuda:0") == gpu.ours == 500 * MiB


async def test_a_load_waits_for_loads_in_flight_to_measure_what_they_take(tmp_path):
    """Start-up models whose predictions do not fit side by side, but whose measured sizes do:
    each load waits for the one ahead of it to measure, instead of failing with 507."""
    for name in ("a", "b", "c"):
        write_model(tmp_path, name, 50)
        (tmp_path / name / "model.yaml").write_text("runtime: fakehost\n")
    manager = ModelManager(
        Settings(model_repository=tmp_path, host_memory_budget=300 * MiB, memory_margin=0, load_concurrency=3),
        RuntimeRegistry({"fakehost": HostRuntime()}), devices={HOST: FakeHost(10_000 * MiB)},
    )
    async with serving(manager):
        assert states(manager) == {"a": "READY", "b": "READY", "c": "READY"}
        assert manager.ledger.used(HOST) == 150 * MiB


async def test_a_long_load_logs_that_it_is_still_going(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(manager_module, "LOAD_PROGRESS_S", 0.05)
    write_model(tmp_path, "a", 100, "load: lazy\n")
    manager, _, runtime = make_manager(tmp_path)
    load = runtime.load

    async def slow_load(spec, placement):
        await asyncio.sleep(0.3)
        return await load(spec, placement)

    runtime.load = slow_load
    async with serving(manager):
        with caplog.at_level(logging.INFO, logger="mmserver.manager"):
            await manager.infer(manager.entry("a"), request())
            await asyncio.sleep(0.2)  # no progress lines once it is loaded
        lines = [r.getMessage() for r in caplog.records if "still loading" in r.getMessage()]
        assert lines and all(line.startswith("model a:1 still loading onto cuda:0 (") for line in lines)
        assert len(lines) <= 0.3 / 0.05 + 1


async def test_memory_that_does_not_come_back_is_reported(tmp_path, caplog):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path, leak=150 * MiB)
    async with serving(manager):
        with caplog.at_level(logging.WARNING, logger="mmserver.residency"):
            with pytest.raises(InsufficientMemory) as info:  # the 150 MiB a leaked leave no room for b
                await manager.infer(manager.entry("b"), request())
        assert runtime.releases == ["cuda:0"]  # the caches were asked first: it is no cache
        assert "possible leak" in caplog.text
        assert "model b:1 needs 200.0 MiB on cuda:0; 150.0 MiB is free" in info.value.message
        assert gpu.ours == 150 * MiB <= manager.ledger.budgets["cuda:0"]


async def test_memory_held_in_an_allocator_cache_is_asked_back_before_it_counts_as_a_leak(tmp_path, caplog):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path, leak=150 * MiB, cached=True)
    async with serving(manager):
        with caplog.at_level(logging.INFO, logger="mmserver.residency"):
            await manager.infer(manager.entry("b"), request())  # a leaves, its cache is emptied
        assert runtime.releases == ["cuda:0"]
        assert "150.0 MiB of 200.0 MiB evicted is still in use" in caplog.text
        assert "possible leak" not in caplog.text
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY"}
        assert gpu.ours == 200 * MiB


async def test_an_eviction_waits_for_what_the_model_took_not_for_its_reserved_room(tmp_path, caplog):
    """A model reserves more than it allocates (room for its batches): evicting it waits for what
    the GPU grew by when it came, so it neither escalates nor reports a leak."""
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "b", 100, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path, gpu_budget="250MiB", workspace=100 * MiB)
    async with serving(manager):
        assert manager.ledger.held(manager.entry("a")) == {"cuda:0": 200 * MiB} and gpu.ours == 100 * MiB
        with caplog.at_level(logging.INFO, logger="mmserver.residency"):
            started = time.monotonic()
            await manager.infer(manager.entry("b"), request())  # a leaves for host memory
            took = time.monotonic() - started
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY"}
        assert runtime.releases == [] and "evicted" not in caplog.text, caplog.text
        assert took < 0.4
        await manager.infer(manager.entry("a"), request())  # restored; b leaves the same way
        assert runtime.releases == [] and gpu.ours == 100 * MiB


async def test_what_a_parked_model_keeps_on_the_gpu_stays_in_the_ledger_until_it_is_unloaded(tmp_path, caplog):
    """A model that cannot take everything off the GPU when it parks (a sleeping vLLM engine keeps
    its CUDA context) still holds that in the ledger; a load that needs it unloads the parked
    model (it then comes back from disk)."""
    for name in ("a", "b", "c"):
        write_model(tmp_path, name, 100, "" if name == "a" else "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path, gpu_budget="250MiB", kept=40 * MiB)
    async with serving(manager):
        with caplog.at_level(logging.INFO, logger="mmserver.residency"):
            await manager.infer(manager.entry("b"), request())  # 150 free: b fits beside a
            await manager.infer(manager.entry("c"), request())  # 50 free: the LRU (a) parks, keeping 40
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY", "c": "READY"}
        assert manager.ledger.held(manager.entry("a")) == {HOST: 100 * MiB, "cuda:0": 40 * MiB}
        assert gpu.ours == 240 * MiB == manager.ledger.used("cuda:0")
        assert runtime.releases == [] and "evicted" not in caplog.text, caplog.text  # 60 came back, as due
        # b goes to make room for a's return; a's 40 count toward what it needs
        await manager.infer(manager.entry("a"), request())
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE", "c": "READY"}
        assert gpu.ours == 240 * MiB == manager.ledger.used("cuda:0")
        # a load that needs what the parked b keeps unloads it from the host tier
        write_model(tmp_path, "d", 150, "load: lazy\n")
        await manager.rescan()
        await manager.infer(manager.entry("d"), request())
        assert states(manager)["b"] == "UNAVAILABLE" and manager.ledger.held(manager.entry("b")) == {}
        assert manager.entry("b").reason == "evicted, reloads on the next request"
        assert gpu.ours == manager.ledger.used("cuda:0") <= 250 * MiB


async def test_a_parked_model_leaves_the_host_tier_for_a_model_that_needs_host_memory(tmp_path):
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "b", 100, "load: lazy\n")
    write_model(tmp_path, "h", 25, "load: lazy\n")
    (tmp_path / "h" / "model.yaml").write_text("runtime: fakehost\nload: lazy\n")
    gpu = FakeGpu()
    manager = ModelManager(
        Settings(model_repository=tmp_path, gpu_memory_budget=100 * MiB, host_memory_budget=150 * MiB,
                 memory_margin=0),
        RuntimeRegistry({"fakegpu": GpuRuntime({"cuda:0": gpu}), "fakehost": HostRuntime()}),
        devices={HOST: FakeHost(10_000 * MiB), "cuda:0": gpu},
    )
    async with serving(manager):
        await manager.infer(manager.entry("b"), request())  # a parks in host memory (100 of 150)
        assert manager.ledger.held(manager.entry("a")) == {HOST: 100 * MiB}
        await manager.infer(manager.entry("h"), request())  # predicts 100: a leaves the host tier
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY", "h": "READY"}
        assert manager.ledger.held(manager.entry("a")) == {} and manager.ledger.used(HOST) == 25 * MiB
        await manager.infer(manager.entry("a"), request())  # back from disk, b parks
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE", "h": "READY"}


async def test_idle_models_are_evicted_after_their_timeout(tmp_path):
    write_model(tmp_path, "short", 100, "idle_unload_s: 0.2\n")
    write_model(tmp_path, "pinned", 100, "idle_unload_s: 0.2\npinned: true\n")
    write_model(tmp_path, "forever", 100)
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        await asyncio.sleep(1.5)
        assert states(manager) == {"short": "UNAVAILABLE", "pinned": "READY", "forever": "READY"}
        assert manager.entry("short").evicted
        await manager.infer(manager.entry("short"), request())  # and it comes back on demand
        assert states(manager)["short"] == "READY"


async def test_a_model_loaded_later_is_evicted_after_its_own_timeout_not_the_sweeps_last_interval(tmp_path):
    # the sweeper slept a quarter of the only timeout there was (40 s, capped at 30 s) when a
    # folder with a short one was dropped in
    write_model(tmp_path, "slow", 100, "idle_unload_s: 160\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        await asyncio.sleep(0.1)
        write_model(tmp_path, "late", 100, "idle_unload_s: 0.2\nload: lazy\n")
        await manager.rescan()
        await manager.infer(manager.entry("late"), request())
        await asyncio.sleep(1.5)
        assert states(manager) == {"slow": "READY", "late": "UNAVAILABLE"}


async def test_the_ledger_keeps_the_growth_the_device_measured(tmp_path):
    class Growing(GpuRuntime):
        async def load(self, spec, placement):
            model = await super().load(spec, placement)
            self.gpus[placement.device].ours += 30 * MiB  # workspace the model does not report
            return model

    write_model(tmp_path, "a", 100)
    gpu = FakeGpu()
    manager = ModelManager(
        Settings(model_repository=tmp_path, gpu_memory_budget="300MiB", memory_margin=0),
        RuntimeRegistry({"fakegpu": Growing({"cuda:0": gpu})}),
        devices={HOST: FakeHost(10_000 * MiB), "cuda:0": gpu},
    )
    async with serving(manager):
        assert manager.ledger.held(manager.entry("a")) == {"cuda:0": 130 * MiB}


async def test_placement_honours_the_device_setting(tmp_path):
    write_model(tmp_path, "g", 10)
    write_model(tmp_path, "x", 10, "device: cuda:3\n")
    manager, _, _ = make_manager(tmp_path)
    async with serving(manager):
        assert manager.ledger.held(manager.entry("g")) == {"cuda:0": 10 * MiB}
        assert manager.entry("x").reason == "load failed: device 'cuda:3' does not exist (GPUs: cuda:0)"


async def test_budget_leaves_room_for_other_processes(tmp_path):
    write_model(tmp_path, "a", 10)
    gpu = FakeGpu(others=900 * MiB)
    manager = ModelManager(
        Settings(model_repository=tmp_path, memory_margin=0),
        RuntimeRegistry({"fakegpu": GpuRuntime({"cuda:0": gpu})}),
        devices={HOST: FakeHost(10_000 * MiB), "cuda:0": gpu},
    )
    async with serving(manager):
        assert manager.ledger.budgets["cuda:0"] == 100 * MiB
        gpu.others += 95 * MiB  # another process grows after start: the measured free memory wins
        assert manager.residency.free("cuda:0") == 100 * MiB - 10 * MiB - 95 * MiB
