"""The memory manager when things happen at once: a rollover of a loaded version, an unload
during an eviction, victims that change after they were chosen, an engine that dies while
another load holds the lock, idle sweeps racing requests, requests holding a retired entry,
and loads that fail half-way.

The fakes (a simulated GPU, GPU and host runtimes) are those of ``test_residency.py``, which
says what each stands in for; the manager, ledger, residency and batcher are the real ones.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from test_residency import (  # tests/ is on sys.path (rootdir conftest)
    MiB,
    FakeGpu,
    FakeHost,
    GpuModel,
    GpuRuntime,
    HostModel,
    HostRuntime,
    make_manager,
    request,
    serving,
    states,
    write_model,
)

from mmserver.entry import ModelEntry
from mmserver.errors import InferenceTimeout, InsufficientMemory, ModelNotReady
from mmserver.manager import BUSY_VICTIM_WAIT_S, BUSY_VICTIM_YIELD_S, ModelManager
from mmserver.metrics import Metrics
from mmserver.runtime import HOST, Placement, RuntimeRegistry
from mmserver.settings import Settings
from mmserver.types import ModelState


async def wait_for(condition, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def change_files(repo, name: str, yaml_text: str = "") -> None:
    """New files for a model's version (its spec changes, so a rescan rolls it over)."""
    (repo / name / "model.yaml").write_text(f"runtime: fakegpu\ntimeout_s: 30\n{yaml_text}")


class GatedRuntime(GpuRuntime):
    """A GPU runtime whose load of ``gated`` waits for ``gate``: it holds the residency lock
    (a GPU load holds it throughout) until the test opens it."""

    def __init__(self, gpus: dict[str, FakeGpu], gated: str = "b") -> None:
        super().__init__(gpus)
        self.gated, self.gate = gated, asyncio.Event()

    async def load(self, spec, placement):
        if spec.name == self.gated:
            await self.gate.wait()
        return await super().load(spec, placement)


def manager_for(repo, runtime_class: type[GpuRuntime] = GpuRuntime, host_runtime: HostRuntime | None = None):
    """A manager over a 300 MiB simulated GPU with ``runtime_class`` (and a host runtime)."""
    gpu = FakeGpu()
    runtime = runtime_class({"cuda:0": gpu})
    runtimes = {"fakegpu": runtime, **({"fakehost": host_runtime} if host_runtime else {})}
    manager = ModelManager(
        Settings(model_repository=repo, gpu_memory_budget=300 * MiB, host_memory_budget=1000 * MiB, memory_margin=0),
        RuntimeRegistry(runtimes),
        devices={HOST: FakeHost(10_000 * MiB), "cuda:0": gpu},
    )
    return manager, gpu, runtime


# ----------------------------------------------------------------------------- stopping


async def test_stop_cancels_a_first_load_still_running_and_leaves_nothing_loaded(tmp_path):
    # SIGTERM during startup: the lifespan cancels the startup scan, but the loads it started run
    # on (shielded) and their entries are not in the manager's models yet
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "b", 100)
    manager, gpu, runtime = manager_for(tmp_path, GatedRuntime)
    starting = asyncio.create_task(manager.start())
    await wait_for(lambda: any(e.name == "b" for e in manager._loads) and gpu.ours == 100 * MiB, "a loaded, b loading")
    starting.cancel()
    await asyncio.wait_for(manager.stop(), 5)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("load ")], "a load outlived stop"
    assert gpu.ours == 0 and manager.ledger.used("cuda:0") == 0


# ----------------------------------------------------------------------------- rollovers


async def test_a_rollover_holds_the_old_and_new_files_apart_in_the_ledger(tmp_path):
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "b", 150)
    manager, gpu, runtime = make_manager(tmp_path)  # 300 MiB: a rollover of a (2 x 100) needs b out
    peak = 0
    load = runtime.load

    async def watched(spec, placement):
        nonlocal peak
        model = await load(spec, placement)
        peak = max(peak, gpu.read().used)
        return model

    runtime.load = watched
    async with serving(manager):
        old = manager.entry("a")
        change_files(tmp_path, "a")
        await manager.rescan()
        new = manager.entry("a")
        assert new is not old and new.state is ModelState.READY and old.model is None
        assert manager.ledger.used("cuda:0") == gpu.ours  # nothing lost or counted twice
        assert manager.ledger.held(new) == {"cuda:0": 100 * MiB} and manager.ledger.held(old) == {}
        assert peak <= 300 * MiB  # b made room for the second copy of a
        write_model(tmp_path, "c", 150, "load: lazy\n")
        await manager.rescan()
        await manager.infer(manager.entry("c"), request())
        assert gpu.read().used <= 300 * MiB


async def test_a_failed_reload_of_new_files_keeps_the_serving_models_reservation(tmp_path):
    write_model(tmp_path, "a", 100)
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        old = manager.entry("a")
        (tmp_path / "a" / "size_mib").write_text("not a number")  # the new files cannot load
        change_files(tmp_path, "a")
        await manager.rescan()
        assert manager.entry("a") is old and old.state is ModelState.READY
        assert manager.ledger.held(old) == {"cuda:0": 100 * MiB} == {"cuda:0": gpu.ours}


def exported_versions(manager: ModelManager, name: str) -> set[str]:
    """The versions of ``name`` the metrics exposition has series of."""
    text = manager.metrics.render().decode()
    return {v for v in ("1", "2", "3") if f'model_name="{name}",model_version="{v}"' in text}


@pytest.mark.parametrize("then", ["other versions", "removed"])
async def test_a_versions_series_go_with_its_folder_also_after_the_folder_was_unreadable(tmp_path, then):
    # while a folder cannot be read and no version of it is loaded, its versions are unknown;
    # the series of those that are gone when it is read again (or removed) must go
    for version in ("1", "2"):
        write_host_model(tmp_path, "m", 10, "load: lazy\n", version=version)
    write_model(tmp_path, "other", 10, "load: lazy\n")
    runtimes = RuntimeRegistry({"fakehost": HostRuntime(), "fakegpu": GpuRuntime({"cuda:0": FakeGpu()})})
    manager = ModelManager(Settings(model_repository=tmp_path, memory_margin=0), runtimes,
                           metrics=Metrics(), devices={HOST: FakeHost(10_000 * MiB), "cuda:0": FakeGpu()})
    async with serving(manager):
        assert exported_versions(manager, "m") == {"1", "2"}
        (tmp_path / "m" / "model.yaml").write_text("runtime: [")  # unreadable
        await manager.rescan()
        assert manager.entry("m").reason
        if then == "removed":
            shutil.rmtree(tmp_path / "m")
        else:
            shutil.rmtree(tmp_path / "m" / "1")
            shutil.rmtree(tmp_path / "m" / "2")
            write_host_model(tmp_path, "m", 10, "load: lazy\n", version="3")
        await manager.rescan()
        assert exported_versions(manager, "m") == (set() if then == "removed" else {"3"})
        assert exported_versions(manager, "other") == {"1"}  # an unversioned folder is version 1


async def test_a_request_holding_a_retired_entry_is_answered_by_its_successor_and_loads_no_orphan(tmp_path):
    write_model(tmp_path, "a", 100, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        old = manager.entry("a")
        await manager.infer(old, request())
        change_files(tmp_path, "a", "load: lazy\n")  # looked up, then the files change under it
        await manager.rescan()
        new = manager.entry("a")
        assert new is not old and old.model is None
        response = await manager.infer(old, request())  # the V2 route looks the entry up before the body
        assert response.model_version == "1" and new.state is ModelState.READY
        async with manager.holding(old) as model:  # (a stream, or embeddings)
            assert model is new.model
        assert old.model is None and runtime.loaded == ["a", "a"]  # the first load and the new files'
        shutil.rmtree(tmp_path / "a")
        await manager.rescan()  # the folder is gone: nothing takes over
        with pytest.raises(ModelNotReady, match="its folder was removed"):
            await manager.infer(old, request())
        assert runtime.loaded == ["a", "a"]
    assert gpu.ours == 0


# ----------------------------------------------------------------------------- evictions


async def test_an_unload_during_an_eviction_waits_for_it_and_leaves_nothing_held(tmp_path):
    write_model(tmp_path, "a", 200, "idle_unload_s: 0.2\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        a = manager.entry("a")
        a.model.offload_gate = asyncio.Event()
        await wait_for(lambda: a.state is ModelState.UNLOADING, "the idle sweep parking a")
        unloading = asyncio.create_task(manager.unload("a"))
        await asyncio.sleep(0.05)
        assert not unloading.done()  # it waits for the move to host memory to end
        a.model.offload_gate.set()
        await asyncio.wait_for(unloading, 5)
        assert a.model is None and a.parked is None and manager.ledger.held(a) == {} and gpu.ours == 0
        assert "unloaded by request" in a.reason


def two_victims(tmp_path):
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "v", 100)
    write_model(tmp_path, "b", 250, "load: lazy\n")  # 300 MiB: a and v must both leave
    return make_manager(tmp_path)


async def test_a_victim_unloaded_after_it_was_chosen_does_not_fail_the_load(tmp_path):
    manager, gpu, _ = two_victims(tmp_path)
    async with serving(manager):
        a = manager.entry("a")
        a.model.offload_gate = asyncio.Event()
        load = asyncio.create_task(manager.infer(manager.entry("b"), request()))
        await wait_for(lambda: a.state is ModelState.UNLOADING, "a parking")
        await manager.unload("v")  # the second victim goes another way meanwhile
        a.model.offload_gate.set()
        await asyncio.wait_for(load, 5)
        assert manager.entry("b").state is ModelState.READY and gpu.ours == 250 * MiB


async def test_a_victim_that_got_a_request_after_it_was_chosen_is_not_evicted(tmp_path, monkeypatch):
    monkeypatch.setattr("mmserver.manager.BUSY_VICTIM_WAIT_S", 0.2)  # (v stays busy: the load gives up)
    manager, gpu, _ = two_victims(tmp_path)
    async with serving(manager):
        a, v = manager.entry("a"), manager.entry("v")
        a.model.offload_gate = asyncio.Event()
        load = asyncio.create_task(manager.infer(manager.entry("b"), request()))
        await wait_for(lambda: a.state is ModelState.UNLOADING, "a parking")
        async with manager.holding(v):  # a stream starts on v while a parks
            a.model.offload_gate.set()
            with pytest.raises(InsufficientMemory, match="busy or loading: v:1"):
                await asyncio.wait_for(load, 5)
            assert v.state is ModelState.READY and v.model.where == "gpu"


async def test_a_load_that_cannot_fit_on_a_gpu_does_not_wait_for_a_load_on_the_host(tmp_path):
    gate = asyncio.Event()

    class GatedHost(HostRuntime):  # a CPU load that ends only when the test says so
        async def load(self, spec, placement):
            await gate.wait()
            return HostModel(10 * MiB)

    write_model(tmp_path, "p", 200, "pinned: true\n")
    write_model(tmp_path, "big", 200, "load: lazy\n")
    write_model(tmp_path, "h", 10)
    (tmp_path / "h" / "model.yaml").write_text("runtime: fakehost\nload: lazy\n")
    manager, gpu, _ = manager_for(tmp_path, host_runtime=GatedHost())
    async with serving(manager):
        host_load = asyncio.create_task(manager.infer(manager.entry("h"), request()))
        await wait_for(lambda: manager.entry("h").state is ModelState.LOADING, "the host load")
        with pytest.raises(InsufficientMemory, match="pinned: p:1"):
            await asyncio.wait_for(manager.infer(manager.entry("big"), request()), 2)
        gate.set()
        await host_load


# ----------------------------------------------------------------------------- failures


async def test_an_engine_that_dies_while_another_load_holds_the_lock_deadlocks_nothing(tmp_path):
    """f's engine dies while b's load holds the lock and parks f; a request for f then starts
    its restore, which waits for the lock behind the failure's cleanup: neither waits for the
    other."""
    write_model(tmp_path, "a", 100)
    write_model(tmp_path, "f", 100)
    write_model(tmp_path, "b", 250, "load: lazy\n")
    manager, gpu, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        a, f, b = manager.entry("a"), manager.entry("f"), manager.entry("b")
        a.model.offload_gate = asyncio.Event()
        load_b = asyncio.create_task(manager.infer(b, request()))  # parks a, then f
        await wait_for(lambda: a.state is ModelState.UNLOADING, "a parking")
        manager._on_failure(f, f.model, "engine process died")  # its cleanup waits for the lock
        a.model.offload_gate.set()
        await wait_for(lambda: b.state is ModelState.LOADING and f.parked is not None, "f parked, b loading")
        request_f = asyncio.create_task(manager.infer(f, request()))  # its restore waits for the lock
        await wait_for(lambda: f.loading is not None, "f's restore")
        runtime.gate.set()
        await asyncio.wait_for(load_b, 5)
        (answer,) = await asyncio.wait_for(asyncio.gather(request_f, return_exceptions=True), 5)  # not a hang
        # b was still busy with its own request when f's restore asked for room
        assert not isinstance(answer, BaseException) or isinstance(answer, InsufficientMemory), answer
        await manager.infer(f, request())  # and f serves again
        assert f.state is ModelState.READY and gpu.ours <= 300 * MiB
    assert gpu.ours == 0


async def test_a_model_that_cannot_be_restored_is_unloaded_and_comes_back_from_disk(tmp_path):
    class Unrestorable(GpuModel):
        async def restore(self, placement: Placement) -> None:
            raise RuntimeError("the engine is gone")

    class Runtime(GpuRuntime):
        async def load(self, spec, placement):
            self.loaded.append(spec.name)
            size = int((spec.artifact / "size_mib").read_text()) * MiB
            model_class = Unrestorable if self.loaded.count(spec.name) == 1 else GpuModel
            return model_class(self.gpus[placement.device], size)

    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = manager_for(tmp_path, Runtime)
    async with serving(manager):
        a = manager.entry("a")
        await manager.infer(manager.entry("b"), request())  # a parks in host memory
        assert a.parked is not None
        with pytest.raises(ModelNotReady, match="the engine is gone"):
            await manager.infer(a, request())  # (b parks, then a's restore fails)
        assert a.model is None and manager.ledger.held(a) == {}  # unloaded, its host copy freed
        await manager.infer(a, request())  # the next request loads it from disk
        assert a.state is ModelState.READY and runtime.loaded.count("a") == 2


async def test_a_load_that_fails_after_the_runtime_loaded_unloads_what_it_loaded(tmp_path):
    class Unwatchable(GpuModel):
        def watch(self, on_failure) -> None:
            raise RuntimeError("cannot watch the engine")

    class Runtime(GpuRuntime):
        async def load(self, spec, placement):
            self.loaded.append(spec.name)
            model_class = Unwatchable if len(self.loaded) == 1 else GpuModel
            return model_class(self.gpus[placement.device], 100 * MiB)

    write_model(tmp_path, "a", 100, "load: lazy\n")
    manager, gpu, _ = manager_for(tmp_path, Runtime)
    async with serving(manager):
        a = manager.entry("a")
        with pytest.raises(ModelNotReady, match="cannot watch"):
            await manager.infer(a, request())
        assert a.model is None and manager.ledger.held(a) == {} and gpu.ours == 0
        await manager.infer(a, request())
        assert gpu.ours == 100 * MiB == manager.ledger.used("cuda:0")


# ----------------------------------------------------------------------------- idle unloads


async def test_a_model_used_while_the_idle_sweep_waited_for_the_lock_stays(tmp_path):
    write_model(tmp_path, "a", 100, "idle_unload_s: 1.0\n")
    write_model(tmp_path, "b", 100, "load: lazy\n")
    manager, gpu, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        a = manager.entry("a")
        load_b = asyncio.create_task(manager.infer(manager.entry("b"), request()))
        await wait_for(manager.residency.lock.locked, "b's load holding the lock")
        await asyncio.sleep(1.6)  # a is idle past its timeout: a sweep (every 0.5 s) waits for the lock
        assert a.state is ModelState.READY
        await manager.infer(a, request())  # used meanwhile
        runtime.gate.set()
        await load_b
        await asyncio.sleep(0.05)  # the sweep has the lock now
        assert a.state is ModelState.READY, a.reason


async def test_idle_time_counts_from_the_end_of_the_last_request(tmp_path):
    write_model(tmp_path, "a", 100)
    manager, _, _ = make_manager(tmp_path)
    async with serving(manager):
        a = manager.entry("a")
        a.model.gate = asyncio.Event()
        running = asyncio.create_task(manager.infer(a, request()))
        await asyncio.sleep(0.1)
        ending = time.monotonic()
        a.model.gate.set()
        await running
        assert a.last_used >= ending


# ----------------------------------------------------------------------------- deadlines


async def test_a_requests_deadline_bounds_its_wait_for_a_lazy_load(tmp_path):
    write_model(tmp_path, "b", 100, "load: lazy\n")
    manager, _, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        b = manager.entry("b")
        started = time.monotonic()
        with pytest.raises(InferenceTimeout, match="still loading"):
            await manager.infer(b, request(), deadline=time.monotonic() + 0.2)
        assert time.monotonic() - started < 1.0 and b.state is ModelState.LOADING and b.waiting == 0
        runtime.gate.set()  # the load went on: the next request finds the model ready
        await manager.infer(b, request(), deadline=time.monotonic() + 5)
        assert b.state is ModelState.READY


async def test_requests_waiting_for_a_load_count_as_pending(tmp_path):
    # the autoscaling gauge: requests held up by a lazy load are demand too
    write_model(tmp_path, "b", 100, "load: lazy\n")
    manager, _, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        waiting = [asyncio.create_task(manager.infer(manager.entry("b"), request())) for _ in range(3)]
        await wait_for(lambda: manager.entry("b").waiting == 3, "three requests waiting")
        assert {m.name: m.pending for m in manager.snapshot().models} == {"b": 3}
        runtime.gate.set()
        await asyncio.gather(*waiting)
        assert {m.name: m.pending for m in manager.snapshot().models} == {"b": 0}


class ExactHostRuntime(HostRuntime):
    """The host runtime predicting exactly what its models take; its load of a version in
    ``gated`` waits for ``gate`` (host loads run outside the residency lock)."""

    def __init__(self, gated: tuple[str, ...] = ()) -> None:
        self.gated, self.gate = gated, asyncio.Event()

    def estimate(self, spec, placement: Placement) -> dict[str, int]:
        return {HOST: int((spec.artifact / "size_mib").read_text()) * MiB}

    async def load(self, spec, placement: Placement) -> HostModel:
        if spec.version in self.gated:
            await self.gate.wait()
        return await super().load(spec, placement)


def host_manager(repo, runtime: ExactHostRuntime) -> ModelManager:
    """A manager whose host budget is 300 MiB (host models named ``fakehost`` in model.yaml)."""
    return ModelManager(
        Settings(model_repository=repo, host_memory_budget=300 * MiB, memory_margin=0),
        RuntimeRegistry({"fakehost": runtime}), devices={HOST: FakeHost(10_000 * MiB)},
    )


def write_host_model(repo, name: str, size_mib: int, yaml_text: str = "", version: str = "") -> None:
    folder = repo / name
    (folder / version).mkdir(parents=True, exist_ok=True)
    (folder / version / "size_mib").write_text(str(size_mib))
    (folder / "model.yaml").write_text(f"runtime: fakehost\n{yaml_text}")


@pytest.mark.parametrize("deadline_s", [None, 10.0])
async def test_a_model_that_loaded_for_a_request_is_not_evicted_before_the_request_is_queued(tmp_path, deadline_s):
    # Two lazy models that do not fit together, asked for at once: b's load waits for a's to
    # measure what it takes, then evicts a once a's request is answered; never in between its
    # load and its request's turn (a 500), and not with a 507 because a was busy a moment.
    write_host_model(tmp_path, "a", 200, "load: lazy\n")
    write_host_model(tmp_path, "b", 200, "load: lazy\n")
    manager = host_manager(tmp_path, ExactHostRuntime())
    async with serving(manager):
        def deadline() -> float | None:
            return None if deadline_s is None else time.monotonic() + deadline_s
        first = asyncio.create_task(manager.infer(manager.entry("a"), request(), deadline()))
        await asyncio.sleep(0)  # a's load starts first
        second = asyncio.create_task(manager.infer(manager.entry("b"), request(), deadline()))
        answers = await asyncio.gather(first, second, return_exceptions=True)
        assert [type(a).__name__ for a in answers] == ["InferResponse", "InferResponse"], answers
        assert manager.ledger.used(HOST) == 200 * MiB


async def busy_request(manager: ModelManager, name: str) -> tuple[ModelEntry, asyncio.Task]:
    """A request to ``name`` that runs until its model's gate is set, once it is running."""
    entry = manager.entry(name)
    entry.model.gate = asyncio.Event()
    running = asyncio.create_task(manager.infer(entry, request()))
    await wait_for(lambda: entry.busy, f"{name} busy")
    return entry, running


async def test_a_load_waits_a_moment_for_a_busy_model_to_be_idle_before_it_fails(tmp_path, monkeypatch):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        a, running = await busy_request(manager, "a")
        asyncio.get_running_loop().call_later(0.1, a.model.gate.set)  # a's request ends soon
        await manager.infer(manager.entry("b"), request())
        await running
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY"} and a.parked is not None
        monkeypatch.setattr("mmserver.manager.BUSY_VICTIM_WAIT_S", 0.2)
        async with manager.holding(manager.entry("b")):  # a stream holds b longer than that
            started = time.monotonic()
            with pytest.raises(InsufficientMemory, match="busy or loading: b:1"):
                await manager.infer(a, request())
            assert 0.2 <= time.monotonic() - started < 1.0


async def test_a_load_waiting_for_a_busy_model_does_not_hold_up_a_load_that_fits(tmp_path):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    write_model(tmp_path, "c", 50, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        a, running = await busy_request(manager, "a")
        b_first = asyncio.create_task(manager.infer(manager.entry("b"), request()))  # needs a's room
        await asyncio.sleep(0.05)
        assert not b_first.done()
        started = time.monotonic()
        await manager.infer(manager.entry("c"), request())  # fits beside a: it need not wait for b
        assert time.monotonic() - started < 0.5 and not b_first.done()
        a.model.gate.set()
        await asyncio.gather(running, b_first)
        assert states(manager) == {"a": "UNAVAILABLE", "b": "READY", "c": "READY"}
        assert gpu.ours == manager.ledger.used("cuda:0") == 250 * MiB


async def steady_traffic(manager: ModelManager, name: str, clients: int, stop: asyncio.Event,
                         peak: list[int], gpu) -> list[int]:
    """``clients`` callers sending requests to ``name`` back to back until ``stop``; the requests
    each served, and the most GPU memory seen after any of them (in ``peak``)."""
    async def client() -> int:
        served = 0
        while not stop.is_set():
            await manager.infer(manager.entry(name), request())
            served += 1
            peak[0] = max(peak[0], gpu.ours)
        return served
    return list(await asyncio.gather(*(client() for _ in range(clients))))


async def test_a_load_that_needs_the_room_of_a_model_with_steady_traffic_gets_its_turn(tmp_path):
    write_model(tmp_path, "a", 200, "batching: {max_batch_size: 1}\n")  # 3 callers: never idle
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, _ = make_manager(tmp_path)
    async with serving(manager):
        a = manager.entry("a")
        a.model.delay = 0.005
        stop, peak = asyncio.Event(), [0]
        traffic = asyncio.create_task(steady_traffic(manager, "a", 3, stop, peak, gpu))
        await wait_for(lambda: a.batcher.pending >= 2, "a's queue filling")
        started = time.monotonic()
        await manager.infer(manager.entry("b"), request())  # without a turn: 507 after 5 s
        took = time.monotonic() - started
        assert BUSY_VICTIM_YIELD_S <= took < BUSY_VICTIM_WAIT_S / 2
        await wait_for(lambda: a.state is ModelState.READY and a.yielding is None, "a back, taking requests")
        await asyncio.sleep(0.1)
        stop.set()
        served = await traffic
        assert all(served), served  # every caller of a was served, before and after its turn
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE"}  # b, idle, made room for a again
        assert peak[0] <= 300 * MiB and gpu.ours == manager.ledger.used("cuda:0") == 200 * MiB


async def test_a_model_holding_a_stream_open_is_not_asked_to_yield_its_room(tmp_path, monkeypatch):
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, _, _ = make_manager(tmp_path)
    monkeypatch.setattr("mmserver.manager.BUSY_VICTIM_WAIT_S", 0.8)
    async with serving(manager):
        a = manager.entry("a")
        async with manager.holding(a):  # a stream that outlasts the wait
            loading_b = asyncio.create_task(manager.infer(manager.entry("b"), request()))
            await asyncio.sleep(BUSY_VICTIM_YIELD_S + 0.1)
            assert a.yielding is None
            started = time.monotonic()
            await manager.infer(a, request())  # a's other requests go on meanwhile
            assert time.monotonic() - started < 0.1
            with pytest.raises(InsufficientMemory, match="busy or loading: a"):
                await loading_b
        assert states(manager) == {"a": "READY", "b": "UNAVAILABLE"}


async def test_a_load_asked_for_while_an_unload_drains_waits_for_it_and_loads_one_copy(tmp_path):
    write_model(tmp_path, "a", 100)
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        entry = manager.entry("a")
        old = entry.model
        old.gate = asyncio.Event()
        running = asyncio.create_task(manager.infer(entry, request()))
        await wait_for(lambda: entry.busy, "a request running")
        unloading = asyncio.create_task(manager.unload("a"))
        await wait_for(lambda: entry.state is ModelState.UNLOADING, "the unload draining")
        loading = asyncio.create_task(manager.load("a"))  # the operator changes their mind
        await asyncio.sleep(0.05)
        assert gpu.ours == 100 * MiB and not loading.done()  # no second copy beside the draining one
        old.gate.set()
        await asyncio.gather(running, unloading, loading)
        assert entry.state is ModelState.READY and entry.model is not old
        assert gpu.ours == manager.ledger.used("cuda:0") == 100 * MiB
        await manager.infer(manager.entry("a"), request())


async def test_startup_models_that_do_not_fit_together_take_turns_and_the_server_is_ready(tmp_path):
    # a:1 loads while a:2 still loads, so model a is not registered yet when b needs a:1's room
    write_host_model(tmp_path, "a", 200, "versions: all\n", version="1")
    write_host_model(tmp_path, "a", 10, "versions: all\n", version="2")
    write_host_model(tmp_path, "b", 200)
    runtime = ExactHostRuntime(gated=("2",))
    manager = host_manager(tmp_path, runtime)
    starting = asyncio.create_task(manager.start())
    await wait_for(lambda: any(e.name == "b" and e.state is not ModelState.LOADING and e.loading is None
                               for e in manager._holders()), "b loaded", timeout=5)
    runtime.gate.set()
    await starting
    try:
        assert manager.unready_reason() is None
        assert states(manager) == {"a": "READY", "b": "READY"}  # (the index shows a:2 last)
        for name, version in (("a", "1"), ("b", ""), ("a", "1")):  # the one left out comes back on its request
            entry = manager.entry(name, version or None)
            await manager.infer(entry, request())
            assert entry.state is ModelState.READY
        assert manager.ledger.used(HOST) <= 300 * MiB
    finally:
        await manager.stop()


async def test_a_rescan_leaves_an_evicted_model_for_its_next_request(tmp_path):
    # a startup model evicted for a lazy one: an unrelated change of the repository must neither
    # bring it back (throwing out the model in use) nor, while that one is busy, fail it for good
    write_model(tmp_path, "a", 200)
    write_model(tmp_path, "b", 200, "load: lazy\n")
    manager, gpu, runtime = make_manager(tmp_path)
    async with serving(manager):
        await manager.infer(manager.entry("b"), request())
        a, b = manager.entry("a"), manager.entry("b")
        assert a.evicted and b.state is ModelState.READY
        b.model.gate = asyncio.Event()
        busy = asyncio.create_task(manager.infer(b, request()))
        await wait_for(lambda: b.busy, "b busy")
        write_model(tmp_path, "c", 10, "load: lazy\n")
        await manager.rescan()
        assert b.state is ModelState.READY and a.evicted and a.served and runtime.loaded.count("a") == 1
        b.model.gate.set()
        await busy
        await manager.infer(manager.entry("a"), request())
        assert manager.entry("a").state is ModelState.READY


async def hold_briefly(manager: ModelManager, entry, deadline: float | None = None) -> None:
    async with manager.holding(entry, deadline):  # (a stream, or embeddings)
        pass


@pytest.mark.parametrize("use", [
    pytest.param(lambda manager, entry: manager.infer(entry, request()), id="infer"),
    pytest.param(hold_briefly, id="holding"),
])
async def test_a_models_timeout_bounds_the_wait_for_its_lazy_load(tmp_path, use):
    write_model(tmp_path, "b", 100, "load: lazy\ntimeout_s: 0.2\n")
    manager, _, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        started = time.monotonic()
        with pytest.raises(InferenceTimeout, match="still loading"):
            await use(manager, manager.entry("b"))  # no deadline of its own
        assert time.monotonic() - started < 1.0
        runtime.gate.set()
        await use(manager, manager.entry("b"))


async def test_a_models_timeout_counts_from_the_request_not_from_the_end_of_its_lazy_load(tmp_path):
    # timeout_s 0.6: a load of 0.35 s leaves 0.25 s of it, too little for a 0.5 s answer
    write_model(tmp_path, "b", 100, "load: lazy\ntimeout_s: 0.6\n")
    class SlowAnswers(GatedRuntime):
        async def load(self, spec, placement):
            model = await super().load(spec, placement)
            model.delay = 0.5  # each infer() takes this long
            return model

    manager, _, runtime = manager_for(tmp_path, SlowAnswers)
    async with serving(manager):
        asyncio.get_running_loop().call_later(0.35, runtime.gate.set)
        started = time.monotonic()
        with pytest.raises(InferenceTimeout):
            await manager.infer(manager.entry("b"), request())
        assert time.monotonic() - started < 0.75


async def test_a_holders_own_deadline_shortens_the_wait_for_a_lazy_load(tmp_path):
    write_model(tmp_path, "b", 100, "load: lazy\n")
    manager, _, runtime = manager_for(tmp_path, GatedRuntime)
    async with serving(manager):
        started = time.monotonic()
        with pytest.raises(InferenceTimeout, match="still loading"):
            await hold_briefly(manager, manager.entry("b"), time.monotonic() + 0.2)
        assert time.monotonic() - started < 1.0
        runtime.gate.set()
        await hold_briefly(manager, manager.entry("b"), time.monotonic() + 5)
        assert manager.entry("b").state is ModelState.READY
