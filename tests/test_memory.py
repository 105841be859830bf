"""Tests of mmserver.memory: the per-device memory ledger and format_bytes."""

from __future__ import annotations

import pytest

from mmserver.errors import InsufficientMemory
from mmserver.memory import MemoryLedger, format_bytes

MiB = 1024**2
GiB = 1024**3


@pytest.mark.parametrize(
    "size, text",
    [
        (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
        (MiB - 1, "1024.0 KiB"), (MiB, "1.0 MiB"), (int(2.25 * MiB), "2.2 MiB"),
        (GiB, "1.0 GiB"), (int(1.5 * GiB), "1.5 GiB"), (1024 * GiB, "1024.0 GiB"),
        (-2048, "-2.0 KiB"), (-5, "-5 B"),
    ],
)
def test_format_bytes(size, text):
    assert format_bytes(size) == text


def test_empty_ledger():
    ledger = MemoryLedger()
    assert ledger.budgets == {}
    assert ledger.used("cpu") == 0
    assert ledger.free("cpu") is None
    assert ledger.held("m") == {}


def test_without_budget_everything_fits():
    ledger = MemoryLedger()
    ledger.reserve("a", {"cpu": 10**15})
    ledger.reserve("b", {"cpu": 10**15, "cuda:0": 10**12})
    assert ledger.used("cpu") == 2 * 10**15
    assert ledger.used("cuda:0") == 10**12
    assert ledger.free("cpu") is None
    assert ledger.free("cuda:0") is None


def test_reserve_used_free_held_with_budget():
    ledger = MemoryLedger({"cpu": 100, "cuda:0": 50})
    ledger.reserve("a", {"cpu": 30})
    ledger.reserve("b", {"cpu": 20, "cuda:0": 40})
    assert ledger.used("cpu") == 50
    assert ledger.used("cuda:0") == 40
    assert ledger.free("cpu") == 50
    assert ledger.free("cuda:0") == 10
    assert ledger.held("a") == {"cpu": 30}
    assert ledger.held("b") == {"cpu": 20, "cuda:0": 40}
    assert ledger.used("cuda:1") == 0
    assert ledger.free("cuda:1") is None


def test_budget_dict_is_copied():
    budgets = {"cpu": 100}
    ledger = MemoryLedger(budgets)
    budgets["cpu"] = 1
    assert ledger.free("cpu") == 100


def test_held_returns_a_copy():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 30})
    ledger.held("a")["cpu"] = 99
    assert ledger.held("a") == {"cpu": 30}
    assert ledger.used("cpu") == 30


def test_reserve_exactly_the_free_bytes():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 60})
    ledger.reserve("b", {"cpu": 40})
    assert ledger.free("cpu") == 0


def test_insufficient_memory_message_gives_needed_and_free():
    ledger = MemoryLedger({"cuda:0": 4 * GiB})
    ledger.reserve("big", {"cuda:0": 3 * GiB})
    with pytest.raises(InsufficientMemory) as info:
        ledger.reserve("llm", {"cuda:0": int(1.5 * GiB)})
    assert info.value.message == (
        "llm needs 1.5 GiB more on cuda:0 but only 1.0 GiB of the 4.0 GiB budget is free"
    )


def test_failed_reserve_changes_nothing():
    ledger = MemoryLedger({"cpu": 100, "cuda:0": 10})
    ledger.reserve("a", {"cpu": 50})
    with pytest.raises(InsufficientMemory, match="on cuda:0"):
        ledger.reserve("b", {"cpu": 10, "cuda:0": 11})
    assert ledger.held("b") == {}
    assert ledger.used("cpu") == 50
    with pytest.raises(InsufficientMemory):
        ledger.reserve("a", {"cpu": 101})
    assert ledger.held("a") == {"cpu": 50}


def test_re_reserving_for_the_same_owner_counts_only_the_difference():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 70})
    ledger.reserve("b", {"cpu": 20})
    # a grows from 70 to 80: only 10 more, and 10 are free
    ledger.reserve("a", {"cpu": 80})
    assert ledger.held("a") == {"cpu": 80}
    assert ledger.used("cpu") == 100
    assert ledger.free("cpu") == 0
    # a shrinks: always fits
    ledger.reserve("a", {"cpu": 5})
    assert ledger.used("cpu") == 25
    # one byte more than held + free does not fit
    with pytest.raises(InsufficientMemory):
        ledger.reserve("a", {"cpu": 81})
    ledger.reserve("a", {"cpu": 80})
    assert ledger.free("cpu") == 0


def test_commit_replaces_the_prediction():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 60})
    ledger.commit("a", {"cpu": 35})
    assert ledger.held("a") == {"cpu": 35}
    assert ledger.used("cpu") == 35
    assert ledger.free("cpu") == 65


def test_commit_may_exceed_the_budget():
    # the measured size is a fact, not a request: it is recorded even past the budget
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 60})
    ledger.commit("a", {"cpu": 120})
    assert ledger.used("cpu") == 120
    assert ledger.free("cpu") == -20
    with pytest.raises(InsufficientMemory) as info:
        ledger.reserve("b", {"cpu": 1})
    assert info.value.message == "b needs 1 B more on cpu but only -20 B of the 100 B budget is free"


def test_commit_replaces_devices_too():
    ledger = MemoryLedger({"cpu": 100, "cuda:0": 100})
    ledger.reserve("a", {"cpu": 10, "cuda:0": 50})
    ledger.commit("a", {"cuda:0": 45})
    assert ledger.held("a") == {"cuda:0": 45}
    assert ledger.used("cpu") == 0


def test_commit_without_reservation():
    ledger = MemoryLedger()
    ledger.commit("a", {"cpu": 7})
    assert ledger.held("a") == {"cpu": 7}


def test_release():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve("a", {"cpu": 60})
    ledger.reserve("b", {"cpu": 40})
    ledger.release("a")
    assert ledger.held("a") == {}
    assert ledger.used("cpu") == 40
    assert ledger.free("cpu") == 60
    ledger.release("a")  # idempotent
    ledger.release("never-held")
    assert ledger.used("cpu") == 40
    ledger.reserve("c", {"cpu": 60})
    assert ledger.free("cpu") == 0


def test_owners_can_be_any_hashable():
    ledger = MemoryLedger({"cpu": 100})
    ledger.reserve(("iris", "1"), {"cpu": 10})
    ledger.reserve(("iris", "2"), {"cpu": 20})
    assert ledger.held(("iris", "1")) == {"cpu": 10}
    assert ledger.used("cpu") == 30
    with pytest.raises(InsufficientMemory) as info:
        ledger.reserve(("iris", "3"), {"cpu": 71})
    assert info.value.message.startswith("('iris', '3') needs 71 B more on cpu but only 70 B")
