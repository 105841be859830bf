"""AdaptiveExecutor: a cheap model's compute runs inline on the event loop, an expensive one on
the thread pool, judged by the CPU its calls take rather than by how long they wait."""

from __future__ import annotations

import asyncio
import threading
import time

from mmserver.runtime import AdaptiveExecutor

BUDGET_S = 0.005  # ten times the server's: a busy CI machine's hiccups stay below it


def _spin(seconds: float) -> str:
    """Use the CPU for ``seconds`` and say which thread did it."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass
    return threading.current_thread().name


def _cheap() -> str:
    return threading.current_thread().name


async def test_a_cheap_call_runs_inline_once_it_has_been_measured():
    executor = AdaptiveExecutor(inline_allowed=True, budget_s=BUDGET_S)
    loop_thread = threading.current_thread().name
    assert await executor.run(_cheap) != loop_thread  # unknown cost: the pool
    assert [await executor.run(_cheap) for _ in range(5)] == [loop_thread] * 5


async def test_waiting_on_the_pool_is_not_counted_as_cost():
    """A worker that waits (as it waits for the GIL while the event loop is busy) but computes
    little is still cheap: its next call runs inline."""
    executor = AdaptiveExecutor(inline_allowed=True, budget_s=BUDGET_S)
    gate = threading.Event()

    def waits_then_computes() -> str:
        gate.wait(5)
        return _spin(0.001)

    call = asyncio.ensure_future(executor.run(waits_then_computes))
    await asyncio.sleep(0.2)  # the worker has been waiting 200 ms, forty times the budget
    gate.set()
    assert await call != threading.current_thread().name
    assert executor.recent_cost_s < BUDGET_S
    assert await executor.run(_cheap) == threading.current_thread().name


async def test_an_expensive_call_sends_the_next_ones_to_the_pool_until_they_are_cheap_again():
    executor = AdaptiveExecutor(inline_allowed=True, budget_s=BUDGET_S)
    loop_thread = threading.current_thread().name
    await executor.run(_cheap)
    assert await executor.run(_spin, 0.05) == loop_thread  # still judged cheap when it started
    threads = [await executor.run(_cheap) for _ in range(40)]
    assert threads[0] != loop_thread  # ten times the budget: the pool...
    assert threads[-1] == loop_thread  # ...until the estimate has decayed below it
    first_inline = threads.index(loop_thread)
    assert all(name == loop_thread for name in threads[first_inline:])


async def test_an_inline_call_that_blocks_without_computing_still_counts():
    executor = AdaptiveExecutor(inline_allowed=True, budget_s=BUDGET_S)
    await executor.run(_cheap)
    await executor.run(time.sleep, 0.2)  # inline: 200 ms of the loop's time, almost no CPU
    assert executor.recent_cost_s >= 0.2 / 10
    assert await executor.run(_cheap) != threading.current_thread().name


async def test_code_not_known_to_be_bounded_always_runs_on_the_pool():
    executor = AdaptiveExecutor(inline_allowed=False, budget_s=BUDGET_S)
    loop_thread = threading.current_thread().name
    assert all([await executor.run(_cheap) != loop_thread for _ in range(5)])
