"""The garbage-collection policy: loaded models are frozen; what unloads leave in the frozen set is
collected when the server is idle, or once it has waited too long."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from mmserver import heap
from mmserver.heap import HeapKeeper
from test_residency import make_manager, request, serving, write_model


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def thawed():
    yield
    gc.unfreeze()


def frozen_cycle(keeper: HeapKeeper) -> weakref.ref:
    """A cycle that lives through a load's freeze and is dropped afterwards (an unloaded model)."""
    node = Node()
    keeper.freeze_survivors()
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is not None, "a frozen cycle is beyond an ordinary collection"
    return ref


def test_garbage_of_requests_in_flight_is_collected_before_the_freeze():
    node = Node()
    ref = weakref.ref(node)
    del node  # garbage already, not yet collected
    HeapKeeper().freeze_survivors()
    assert ref() is None


def test_an_unloaded_models_frozen_cycles_are_freed_once_the_server_is_idle():
    keeper = HeapKeeper()
    ref = frozen_cycle(keeper)
    keeper.unloaded()
    assert keeper.pending
    assert not keeper.collect_frozen(idle=False)  # requests run: not now
    assert ref() is not None
    assert keeper.collect_frozen(idle=True)
    assert ref() is None and not keeper.pending


def test_a_server_never_idle_collects_after_enough_unloads(monkeypatch):
    keeper = HeapKeeper()
    ref = frozen_cycle(keeper)
    for _ in range(heap.FULL_AFTER_UNLOADS - 1):
        keeper.unloaded()
    assert not keeper.collect_frozen(idle=False)
    keeper.unloaded()
    assert keeper.collect_frozen(idle=False) and ref() is None


def test_a_server_never_idle_collects_after_a_while(monkeypatch):
    keeper = HeapKeeper()
    ref = frozen_cycle(keeper)
    keeper.unloaded()
    monkeypatch.setattr(heap, "FULL_AFTER_S", 0.0)
    assert keeper.collect_frozen(idle=False) and ref() is None


async def test_the_manager_collects_after_an_unload_when_nothing_runs(tmp_path):
    write_model(tmp_path, "a", 100)
    manager, _, _ = make_manager(tmp_path)
    async with serving(manager):
        await manager.infer(manager.entry("a"), request())
        await manager.unload("a")
        assert manager._heap.pending
        deadline = time.monotonic() + 5
        while manager._heap.pending:
            assert time.monotonic() < deadline, "the idle server never ran the pending collection"
            await asyncio.sleep(0.05)
