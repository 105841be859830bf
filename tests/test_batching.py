"""Unit tests of the per-model queue and dynamic batcher.

``RowEcho`` is a fake: it stands in for a runtime's LoadedModel so the tests can see exactly
which requests were merged into which ``infer`` call, and make calls fail or stall on demand.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mmserver.batching import Batcher, BatchPolicy
from mmserver.codec import concat_rows, split_rows
from mmserver.errors import ClientDisconnected, InferenceError, InferenceTimeout, ModelNotReady, Overloaded
from mmserver.runtime import BatchingMode, LoadedModel
from mmserver.types import InferInput, InferOutput, InferRequest, InferResponse, ModelMetadata


class RowEcho(LoadedModel):
    """Fake model (stands in for a runtime): returns each row's first value times 10."""

    def __init__(self, batching: BatchingMode = BatchingMode.DYNAMIC, delay: float = 0.0) -> None:
        self.batching = batching
        self.delay = delay
        self.calls: list[list[str | None]] = []
        self.gate: asyncio.Event | None = None

    def metadata(self) -> ModelMetadata:
        return ModelMetadata("fake", [], [])

    async def infer(self, requests: list[InferRequest]) -> list[InferResponse]:
        self.calls.append([r.id for r in requests])
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if any(r.parameters.get("fail") for r in requests):
            raise ValueError("asked to fail")
        merged = concat_rows([r.inputs[0].data for r in requests])
        out = merged[:, 0] * 10
        counts = [r.inputs[0].data.shape[0] for r in requests]
        return [InferResponse([InferOutput("out", part)]) for part in split_rows(out, counts)]

    async def unload(self) -> None:
        pass

    def memory(self) -> dict[str, int]:
        return {}


def request(rid: str, rows: list[float], datatype: str = "FP32", **params) -> InferRequest:
    data = np.array(rows, dtype=np.float32 if datatype == "FP32" else np.float64).reshape(-1, 1)
    return InferRequest([InferInput("x", datatype, data)], id=rid, parameters=params)


def values(response: InferResponse) -> list[float]:
    return response.outputs[0].data.tolist()


async def blocked(batcher: Batcher, model: RowEcho) -> asyncio.Task:
    """Occupy the batcher with one stalled batch so later requests pile up in the queue."""
    model.gate = asyncio.Event()
    first = asyncio.create_task(batcher.submit(request("first", [0.0])))
    while not model.calls:
        await asyncio.sleep(0)
    return first


async def test_queued_requests_merge_into_one_call_and_keep_their_rows():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=16), "m:1")
    first = await blocked(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [i, i + 0.5][: 1 + i % 2]))) for i in range(6)]
    await asyncio.sleep(0)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    await first
    assert model.calls == [["first"], ["r0", "r1", "r2", "r3", "r4", "r5"]]
    for i, response in enumerate(results):
        expected = [i * 10.0, (i + 0.5) * 10][: 1 + i % 2]
        assert values(response) == expected


async def test_batches_never_exceed_max_batch_size_rows():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=4), "m:1")
    first = await blocked(batcher, model)
    sizes = [3, 2, 1, 2, 4]
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)] * n))) for i, n in enumerate(sizes)]
    await asyncio.sleep(0)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    await first
    # r0(3) + r2(1) fill 4; r1(2) + r3(2) fill 4; r4(4) alone
    assert model.calls[1:] == [["r0", "r2"], ["r1", "r3"], ["r4"]]
    assert [len(values(r)) for r in results] == sizes


async def test_requests_with_different_datatypes_are_not_merged():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=16), "m:1")
    first = await blocked(batcher, model)
    tasks = [
        asyncio.create_task(batcher.submit(request("a", [1.0], "FP32"))),
        asyncio.create_task(batcher.submit(request("b", [2.0], "FP64"))),
        asyncio.create_task(batcher.submit(request("c", [3.0], "FP32"))),
    ]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(*tasks, first)
    assert model.calls[1:] == [["a", "c"], ["b"]]


async def test_a_failing_request_fails_alone_not_its_batch_mates():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=16), "m:1")
    first = await blocked(batcher, model)
    before = asyncio.create_task(batcher.submit(request("before", [1.0])))
    bad = asyncio.create_task(batcher.submit(request("bad", [2.0], fail=True)))
    after = asyncio.create_task(batcher.submit(request("after", [3.0])))
    await asyncio.sleep(0)
    model.gate.set()
    await first
    with pytest.raises(InferenceError, match="asked to fail"):
        await bad
    assert values(await before) == [10.0]
    assert values(await after) == [30.0]
    # the merged batch failed, then each of its requests ran alone
    assert model.calls[1:] == [["before", "bad", "after"], ["before"], ["bad"], ["after"]]
    # and the model keeps serving
    assert values(await batcher.submit(request("next", [4.0]))) == [40.0]


async def test_full_queue_answers_overloaded_at_once_with_retry_after():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=1, max_queue=2), "m:1")
    first = await blocked(batcher, model)
    queued = [asyncio.create_task(batcher.submit(request(f"q{i}", [1.0]))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await batcher.submit(request("over", [1.0]))
    assert info.value.retry_after == 1.0
    model.gate.set()
    assert [values(r) for r in await asyncio.gather(*queued)] == [[10.0], [10.0]]
    await first


async def test_max_delay_waits_for_a_fuller_batch_but_not_longer():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=4, max_delay_s=0.05), "m:1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    lone = await batcher.submit(request("lone", [1.0]))
    waited = loop.time() - started
    assert values(lone) == [10.0]
    assert 0.04 <= waited < 0.5
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)]))) for i in range(4)]
    await asyncio.gather(*tasks)
    assert model.calls[-1] == ["r0", "r1", "r2", "r3"]


async def test_timeout_answers_504_and_the_stale_request_never_runs():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=1, timeout_s=0.05), "m:1")
    model.gate = asyncio.Event()
    first = asyncio.create_task(batcher.submit(request("first", [1.0])))
    late = asyncio.create_task(batcher.submit(request("late", [2.0])))
    with pytest.raises(InferenceTimeout):
        await late
    with pytest.raises(InferenceTimeout):
        await first
    model.gate.set()
    assert values(await batcher.submit(request("next", [3.0]))) == [30.0]
    assert "late" not in [rid for call in model.calls for rid in call]


async def test_drain_answers_every_accepted_request_then_refuses_new_ones():
    model = RowEcho(delay=0.01)
    batcher = Batcher(model, BatchPolicy(max_batch_size=2), "m:1")
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)]))) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.drain()
    assert all(t.done() for t in tasks)
    assert sorted(values(t.result())[0] for t in tasks) == [i * 10.0 for i in range(7)]
    with pytest.raises(ModelNotReady):
        await batcher.submit(request("after", [1.0]))


async def test_internal_batching_bypasses_the_queue_with_a_concurrency_cap():
    model = RowEcho(batching=BatchingMode.INTERNAL)
    batcher = Batcher(model, BatchPolicy(max_queue=2), "m:1")
    model.gate = asyncio.Event()
    running = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)]))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await batcher.submit(request("over", [1.0]))
    assert batcher.pending == 2  # the engine queues them itself: in flight is what is pending
    model.gate.set()
    assert [values(r) for r in await asyncio.gather(*running)] == [[0.0], [10.0]]
    assert model.calls == [["r0"], ["r1"]]
    assert batcher.pending == 0


async def _cancelled_when(batcher: Batcher, model: RowEcho, **submit) -> BaseException:
    """Submit one request to a model that never answers; the error the caller gets, after
    checking that the model's call was cancelled (which is what aborts it in an engine)."""
    model.gate = asyncio.Event()
    cancelled = asyncio.Event()
    infer = model.infer

    async def recording_infer(requests):
        try:
            return await infer(requests)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    model.infer = recording_infer
    started = time.monotonic()
    with pytest.raises((ClientDisconnected, InferenceTimeout)) as caught:
        await batcher.submit(request("r", [1.0]), **submit)
    assert time.monotonic() - started < 1.0
    assert cancelled.is_set() and not batcher.busy
    return caught.value


async def test_internal_batching_aborts_the_call_of_a_client_that_left():
    model = RowEcho(batching=BatchingMode.INTERNAL)
    batcher = Batcher(model, BatchPolicy(), "m:1")
    gone_at = time.monotonic() + 0.25
    error = await _cancelled_when(batcher, model, is_gone=lambda: time.monotonic() > gone_at)
    assert isinstance(error, ClientDisconnected)


async def test_internal_batching_aborts_the_call_past_its_deadline():
    model = RowEcho(batching=BatchingMode.INTERNAL)
    batcher = Batcher(model, BatchPolicy(), "m:1")
    error = await _cancelled_when(batcher, model, deadline=time.monotonic() + 0.2)
    assert isinstance(error, InferenceTimeout)


async def test_batching_none_sends_one_request_per_call():
    model = RowEcho(batching=BatchingMode.NONE)
    batcher = Batcher(model, BatchPolicy(max_batch_size=8), "m:1")
    first = await blocked(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)]))) for i in range(3)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(*tasks, first)
    assert model.calls[1:] == [["r0"], ["r1"], ["r2"]]


async def test_wrong_number_of_responses_fails_the_batch():
    class Short(RowEcho):
        """Fake model (stands in for a broken runtime) that drops the last response."""

        async def infer(self, requests):
            return (await super().infer(requests))[:-1]

    model = Short()
    batcher = Batcher(model, BatchPolicy(max_batch_size=1), "m:1")
    with pytest.raises(InferenceError, match="returned 0 responses for 1 requests"):
        await batcher.submit(request("r", [1.0]))


async def test_adaptive_fill_waits_for_the_callers_of_the_previous_batch():
    model = RowEcho(delay=0.5)  # a slow model: the fill window is the 100 ms cap
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, adaptive_fill_cap_s=0.1), "m:1")
    first = await blocked(batcher, model)
    previous = [asyncio.create_task(batcher.submit(request(f"p{i}", [float(i)]))) for i in range(3)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *previous)
    assert model.calls[-1] == ["p0", "p1", "p2"]
    # the three callers come back a little apart: they still share one batch
    returning = [asyncio.create_task(batcher.submit(request("r0", [1.0])))]
    for i in (1, 2):
        await asyncio.sleep(0.002)
        returning.append(asyncio.create_task(batcher.submit(request(f"r{i}", [1.0]))))
    await asyncio.gather(*returning)
    assert model.calls[-1] == ["r0", "r1", "r2"]
    # if only one comes back, it runs once the window has passed
    assert values(await batcher.submit(request("alone", [2.0]))) == [20.0]
    assert model.calls[-1] == ["alone"]


async def test_explicit_zero_delay_without_adaptive_fill_never_waits():
    model = RowEcho(delay=0.05)
    batcher = Batcher(model, BatchPolicy(max_batch_size=8, adaptive_fill=False), "m:1")
    first = await blocked(batcher, model)
    previous = [asyncio.create_task(batcher.submit(request(f"p{i}", [float(i)]))) for i in range(3)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *previous)
    early = asyncio.create_task(batcher.submit(request("r0", [1.0])))
    await asyncio.sleep(0.002)
    late = asyncio.create_task(batcher.submit(request("r1", [1.0])))
    await asyncio.gather(early, late)
    assert model.calls[-2:] == [["r0"], ["r1"]]


async def test_preferred_batch_sizes_trim_a_batch_to_the_largest_that_fits():
    model = RowEcho()
    policy = BatchPolicy(max_batch_size=16, preferred_batch_sizes=(4, 8))
    batcher = Batcher(model, policy, "m:1")
    first = await blocked(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [float(i)]))) for i in range(11)]
    await asyncio.sleep(0)
    model.gate.set()
    results = await asyncio.gather(*tasks)
    await first
    # 11 queued rows: a batch of 8, then 3 (no preferred size fits 3, so all of them)
    assert [len(call) for call in model.calls[1:]] == [8, 3]
    assert [values(r) for r in results] == [[i * 10.0] for i in range(11)]


async def test_requests_given_back_by_a_preferred_size_do_not_overtake_older_ones():
    model = RowEcho()
    policy = BatchPolicy(max_batch_size=16, preferred_batch_sizes=(2,), adaptive_fill=False)
    batcher = Batcher(model, policy, "m:1")
    first = await blocked(batcher, model)
    kinds = [("a1", "FP32"), ("b1", "FP64"), ("a2", "FP32"), ("a3", "FP32"), ("a4", "FP32")]
    tasks = [asyncio.create_task(batcher.submit(request(rid, [1.0], datatype))) for rid, datatype in kinds]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    assert model.calls[1:] == [["a1", "a2"], ["b1"], ["a3", "a4"]]  # b1 came before a3 and a4


async def test_a_cancelled_caller_with_a_deadline_gives_its_place_up_and_never_runs():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=1, max_queue=1), "m:1")
    first = await blocked(batcher, model)
    waiting = asyncio.create_task(batcher.submit(request("gone", [1.0]), deadline=time.monotonic() + 30))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    fresh = asyncio.create_task(batcher.submit(request("fresh", [2.0])))  # the one place is free again
    await asyncio.sleep(0.01)
    model.gate.set()
    assert values(await fresh) == [20.0]
    await first
    assert model.calls == [["first"], ["fresh"]]


async def test_a_model_whose_call_raises_cancelled_error_fails_that_request_only():
    class CancelsItself(RowEcho):  # e.g. a runtime whose executor future was cancelled
        async def infer(self, requests):
            if any(r.parameters.get("cancel") for r in requests):
                raise asyncio.CancelledError()
            return await super().infer(requests)

    batcher = Batcher(CancelsItself(), BatchPolicy(max_batch_size=4), "m:1")
    with pytest.raises(InferenceError, match="cancelled its own call"):
        await asyncio.wait_for(batcher.submit(request("bad", [1.0], cancel=True)), 2)
    assert values(await asyncio.wait_for(batcher.submit(request("ok", [2.0])), 2)) == [20.0]


async def test_batch_metrics_count_rows_batches_and_queue_waits():
    from prometheus_client.parser import text_string_to_metric_families

    from mmserver.metrics import Metrics

    metrics = Metrics()
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=16), "m:1", metrics.for_model("m", "1"))
    first = await blocked(batcher, model)
    tasks = [asyncio.create_task(batcher.submit(request(f"r{i}", [1.0] * (i + 1)))) for i in range(3)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    samples = {
        (s.name, s.labels.get("model_name")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("mmserver_inference_batches_total", "m")] == 2
    assert samples[("mmserver_inference_items_total", "m")] == 1 + 6
    assert samples[("mmserver_inference_batch_size_sum", "m")] == 7
    assert samples[("mmserver_inference_queue_duration_seconds_count", "m")] == 4


async def test_expired_requests_free_their_places_in_a_full_queue():
    model = RowEcho()
    batcher = Batcher(model, BatchPolicy(max_batch_size=1, max_queue=2), "m:1")
    first = await blocked(batcher, model)
    stale = [asyncio.create_task(batcher.submit(request(f"s{i}", [1.0]), deadline=time.monotonic() + 0.01))
             for i in range(2)]
    for task in stale:
        with pytest.raises(InferenceTimeout):
            await task
    fresh = asyncio.create_task(batcher.submit(request("fresh", [2.0])))  # not Overloaded
    await asyncio.sleep(0)
    model.gate.set()
    assert values(await fresh) == [20.0]
    await first
    assert model.calls == [["first"], ["fresh"]]


async def test_an_internally_batching_model_whose_call_cancels_itself_fails_that_request_only():
    class CancelsItself(RowEcho):  # e.g. an engine call whose executor future was cancelled
        async def infer(self, requests):
            if any(r.parameters.get("cancel") for r in requests):
                raise asyncio.CancelledError()
            return await super().infer(requests)

    batcher = Batcher(CancelsItself(batching=BatchingMode.INTERNAL), BatchPolicy(), "m:1")
    for submit in ({}, {"deadline": time.monotonic() + 30}, {"is_gone": lambda: False}):
        with pytest.raises(InferenceError, match="cancelled its own call"):
            await asyncio.wait_for(batcher.submit(request("bad", [1.0], cancel=True), **submit), 2)
        assert values(await asyncio.wait_for(batcher.submit(request("ok", [2.0]), **submit), 2)) == [20.0]


async def test_a_failed_batch_does_not_rerun_the_requests_whose_client_left_or_deadline_passed_meanwhile():
    class SlowBatches(RowEcho):  # a merged batch takes 0.2 s, a request alone no time
        async def infer(self, requests):
            if len(requests) > 1:
                await asyncio.sleep(0.2)
            return await super().infer(requests)

    model = SlowBatches()
    batcher = Batcher(model, BatchPolicy(max_batch_size=16), "m:1")
    first = await blocked(batcher, model)
    left = False
    gone = asyncio.create_task(batcher.submit(request("gone", [1.0]), is_gone=lambda: left))
    stale = asyncio.create_task(batcher.submit(request("stale", [2.0]), deadline=time.monotonic() + 0.1))
    bad = asyncio.create_task(batcher.submit(request("bad", [3.0], fail=True)))
    ok = asyncio.create_task(batcher.submit(request("ok", [4.0])))
    await asyncio.sleep(0)
    model.gate.set()
    await first
    left = True  # while the merged batch runs, a client leaves and a deadline passes
    with pytest.raises(InferenceError, match="asked to fail"):
        await bad
    assert values(await ok) == [40.0]
    with pytest.raises(ClientDisconnected):
        await gone
    with pytest.raises(InferenceTimeout):
        await stale
    # the merged batch failed; only the requests still wanted ran again, alone
    assert model.calls[1:] == [["gone", "stale", "bad", "ok"], ["bad"], ["ok"]]
