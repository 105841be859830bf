"""Per-model request queue and dynamic batcher, with backpressure.

Each model has one ``Batcher``. Requests wait in a bounded queue; one worker task takes the
oldest request plus every queued request that may share its batch (same ``batch_key``) up to
``max_batch_size`` rows, waits at most ``max_delay`` for the batch to fill, and runs it as one
``LoadedModel.infer`` call. A request whose deadline passed or whose client went away is
dropped before it runs, never from a running batch. Models that batch by themselves bypass the
queue behind a concurrency cap.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .errors import (
    ClientDisconnected,
    InferenceError,
    InferenceTimeout,
    MMServerError,
    ModelNotReady,
    Overloaded,
)
from .metrics import ModelMetrics, NoMetrics
from .runtime import BatchingMode, LoadedModel
from .types import InferRequest, InferResponse

log = logging.getLogger(__name__)


# Adaptive fill: after a batch of k requests, up to k callers are about to send their next
# request. With no explicit max_delay, the worker waits for that many, but never longer than this
# multiple of the model's recent batch time (nor this cap), so batches fill up while a lone
# client (k = 1) never waits. Twice the batch time covers a client's round trip for small models
# (XGBoost at concurrency 8 on 2 cores: 0.2x gave batches of ~4 and 7,000 req/s, p99 1.8 ms; 2x
# gives ~10,000 req/s, p99 1.3 ms), and a request that waits for it loses at most two batches.
ADAPTIVE_FILL_SHARE = 2.0
ADAPTIVE_FILL_MAX_S = 0.005
#: how often a request running alone in an engine checks whether its client is still there
GONE_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's requests are queued and merged."""

    max_batch_size: int = 32
    max_delay_s: float = 0.0
    max_queue: int = 1024
    preferred_batch_sizes: tuple[int, ...] = ()
    timeout_s: float | None = None
    adaptive_fill: bool = True
    adaptive_fill_cap_s: float = ADAPTIVE_FILL_MAX_S


@dataclass(slots=True)
class _Pending:
    request: InferRequest
    future: asyncio.Future[InferResponse]
    key: Hashable
    rows: int
    enqueued: float
    deadline: float | None
    is_gone: Callable[[], bool] | None

    def dropped(self, now: float) -> bool:
        """Whether the request must not run: answered already, expired, or its client left."""
        if self.future.done():
            return True
        if self.deadline is not None and now >= self.deadline:
            self.future.set_exception(InferenceTimeout("the request's deadline passed while it was queued"))
            return True
        if self.is_gone is not None and self.is_gone():
            self.future.set_exception(ClientDisconnected("the client disconnected"))
            return True
        return False


class Batcher:
    """The queue and worker of one loaded model."""

    def __init__(
        self, model: LoadedModel, policy: BatchPolicy, label: str, metrics: ModelMetrics | None = None
    ) -> None:
        self.model = model
        self.policy = policy
        self.label = label
        self.metrics = metrics or NoMetrics()
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._running = 0
        self._holds = 0  # of the running, work held open with hold() (streams)
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        internal = model.batching is BatchingMode.INTERNAL
        self._direct = asyncio.Semaphore(policy.max_queue) if internal else None
        self._worker = None if internal else asyncio.create_task(self._work(), name=f"batcher {label}")
        self._max_rows = 1 if model.batching is BatchingMode.NONE else policy.max_batch_size
        self._last_batch = 0  # requests in the previous batch
        self._batch_cost_s = 0.0  # moving average of one batch's run time

    @property
    def max_rows(self) -> int:
        """The most rows one call of the model is given (a request with more runs alone)."""
        return self._max_rows

    @property
    def pending(self) -> int:
        """Requests waiting in the queue; for a model that batches internally (no queue here: its
        engine queues them), the requests and streams in flight."""
        return self._running if self._direct is not None else len(self._queue)

    @property
    def streaming(self) -> bool:
        """Whether work held with ``hold`` (a text generation, which may last long) is running."""
        return self._holds > 0

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._queue) or self._running > 0

    async def submit(
        self,
        request: InferRequest,
        deadline: float | None = None,
        is_gone: Callable[[], bool] | None = None,
    ) -> InferResponse:
        """Queue a request and wait for its response.

        ``deadline`` (``time.monotonic()`` seconds) and the model's ``timeout_s``, whichever is
        sooner, bound the wait: past it the caller gets ``InferenceTimeout``. ``is_gone`` tells
        whether the client has disconnected. Raises ``Overloaded`` when the queue is full.
        """
        if self._closed:
            raise ModelNotReady(f"model {self.label} is unloading")
        if self.policy.timeout_s is not None:
            model_deadline = time.monotonic() + self.policy.timeout_s
            deadline = model_deadline if deadline is None else min(deadline, model_deadline)
        if self._direct is not None:
            return await self._submit_direct(request, deadline, is_gone)
        if len(self._queue) >= self.policy.max_queue:
            self._purge()  # requests that expired or whose client left free their places
        if len(self._queue) >= self.policy.max_queue:
            raise Overloaded(
                f"model {self.label} has {len(self._queue)} requests queued (max_queue "
                f"{self.policy.max_queue}); retry later",
                retry_after=1.0,
            )
        future = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._queue.append(_Pending(
            request, future, self.model.batch_key(request), self.model.rows(request), now, deadline, is_gone
        ))
        self._idle.clear()
        self._wakeup.set()
        if deadline is None:
            return await future
        return await _before(future, deadline, self.label)

    async def _submit_direct(
        self, request: InferRequest, deadline: float | None, is_gone: Callable[[], bool] | None
    ) -> InferResponse:
        assert self._direct is not None
        if self._direct.locked():
            raise Overloaded(f"model {self.label} is at its concurrency cap", retry_after=1.0)
        async with self._direct:
            self._running += 1
            self._idle.clear()
            try:
                responses = await _own_call(self.model.infer([request]), deadline, is_gone, self.label)
                return _one_for_one([request], responses)[0]
            finally:
                self._running -= 1
                if not self._running:
                    self._idle.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[LoadedModel]:
        """Count work that runs outside ``submit`` (a streamed generation, which calls the model
        directly) as running for as long as the context lasts: the model is busy, so it is not
        evicted, and ``drain`` waits for it; models that batch internally count it against their
        concurrency cap. Raises ``ModelNotReady`` once draining, ``Overloaded`` at the cap."""
        if self._closed:
            raise ModelNotReady(f"model {self.label} is unloading")
        if self._direct is not None and self._direct.locked():
            raise Overloaded(f"model {self.label} is at its concurrency cap", retry_after=1.0)
        self._running += 1
        self._holds += 1
        self._idle.clear()
        try:
            if self._direct is None:
                yield self.model
            else:
                async with self._direct:
                    yield self.model
        finally:
            self._running -= 1
            self._holds -= 1
            if not self._running and not self._queue:
                self._idle.set()

    async def drain(self) -> None:
        """Stop accepting requests and wait until every accepted one has been answered."""
        self._closed = True
        await self._idle.wait()
        if self._worker is not None:
            self._worker.cancel()

    # ----------------------------------------------------------------- worker

    async def _work(self) -> None:
        while True:
            if not self._queue:
                if not self._running:  # nothing held (see hold)
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if self.policy.max_delay_s > 0:
                await self._wait_to_fill(head.enqueued + self.policy.max_delay_s, self._max_rows)
            elif self.policy.adaptive_fill and self._last_batch > 1:
                wait = min(ADAPTIVE_FILL_SHARE * self._batch_cost_s, self.policy.adaptive_fill_cap_s)
                await self._wait_to_fill(head.enqueued + wait, self._last_batch)
            batch = self._take_batch()
            if batch:
                self._last_batch = len(batch)
                started = time.perf_counter()
                await self._run(batch)
                cost = time.perf_counter() - started
                self._batch_cost_s = cost if not self._batch_cost_s else 0.8 * self._batch_cost_s + 0.2 * cost

    async def _wait_to_fill(self, deadline: float, enough: int) -> None:
        """Wait until the head request's batch holds ``enough`` requests (or the batch's full
        rows), or ``deadline`` passes."""
        head = self._queue[0]
        while True:
            count, rows = self._queued_for(head.key)
            if count >= enough or rows >= self._max_rows:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _queued_for(self, key: Hashable) -> tuple[int, int]:
        """Requests and rows waiting that could join a batch with ``key``."""
        count = rows = 0
        for pending in self._queue:
            if pending.key == key:
                count += 1
                rows += pending.rows
        return count, rows

    def _purge(self) -> None:
        now = time.monotonic()
        self._queue = deque(p for p in self._queue if not p.dropped(now))

    def _take_batch(self) -> list[_Pending]:
        """Remove and return the head request and the queued requests that can join it,
        trimmed to a preferred batch size when one fits."""
        now = time.monotonic()
        head = self._queue.popleft()
        if head.dropped(now):
            return []
        batch, rows = [head], head.rows
        if rows < self._max_rows and self._queue:
            keep: deque[_Pending] = deque()
            while self._queue:
                item = self._queue.popleft()
                if item.dropped(now):
                    continue
                if item.key == head.key and rows + item.rows <= self._max_rows:
                    batch.append(item)
                    rows += item.rows
                    if rows == self._max_rows:
                        break
                else:
                    keep.append(item)
            keep.extend(self._queue)
            self._queue = keep
        if self.policy.preferred_batch_sizes:
            self._trim_to_preferred(batch, rows)
        return batch

    def _trim_to_preferred(self, batch: list[_Pending], rows: int) -> None:
        """Give back the newest requests until the batch has the largest preferred size that
        fits (when one does); they go back to the queue in arrival order."""
        fitting = [size for size in self.policy.preferred_batch_sizes if size <= rows]
        if not fitting:
            return
        target = max(fitting)
        returned: list[_Pending] = []
        while rows > target and len(batch) > 1:
            item = batch.pop()
            rows -= item.rows
            returned.insert(0, item)
        if returned:  # back in arrival order: not ahead of older requests of another kind
            self._queue = deque(heapq.merge(returned, self._queue, key=lambda p: p.enqueued))

    async def _run(self, batch: list[_Pending]) -> None:
        self._running += 1
        try:
            await self._run_batch(batch)
        finally:
            self._running -= 1

    async def _run_batch(self, batch: list[_Pending]) -> None:
        """Run one batch; if it fails, rerun its requests one by one so that only the
        request that caused the failure gets the error."""
        requests = [p.request for p in batch]
        started = time.monotonic()
        try:
            try:
                responses = _one_for_one(requests, await self.model.infer(requests))
            except asyncio.CancelledError as cancelled:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # the batcher stops
                    raise
                raise InferenceError(f"model {self.label} cancelled its own call") from cancelled
            self.metrics.batch(
                sum(p.rows for p in batch), [started - p.enqueued for p in batch], time.monotonic() - started
            )
        except Exception as exc:
            if len(batch) > 1:
                for pending in batch:  # one expired or abandoned meanwhile is dropped, not rerun
                    if not pending.dropped(time.monotonic()):
                        await self._run_batch([pending])
                return
            if not isinstance(exc, MMServerError):
                log.error("model %s failed request %s: %s: %s", self.label,
                          requests[0].id or "(no id)", type(exc).__name__, exc)
                exc = InferenceError(f"model {self.label} failed: {type(exc).__name__}: {exc}")
            _fail(batch, exc)
        else:
            for pending, response in zip(batch, responses):
                if not pending.future.done():
                    pending.future.set_result(response)


async def _before(waitable: asyncio.Future[InferResponse], deadline: float, label: str) -> InferResponse:
    """Await a result until ``deadline``; past it the caller gets ``InferenceTimeout`` while the
    work itself goes on undisturbed (a running batch is never cut)."""
    try:
        return await asyncio.wait_for(asyncio.shield(waitable), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        if not waitable.done():
            waitable.add_done_callback(_consume_result)
        raise InferenceTimeout(f"model {label} did not answer before the request's deadline") from None
    except asyncio.CancelledError:  # the caller went: a queued request gives its place up, unrun
        waitable.cancel()
        raise


async def _own_call(
    call: Awaitable[list[InferResponse]], deadline: float | None, is_gone: Callable[[], bool] | None, label: str
) -> list[InferResponse]:
    """Run a call that serves one request alone (a model that batches internally). Unlike a shared
    batch it is cancelled, which aborts it in the engine, once the request's deadline passes or its
    client has gone (polled every ``GONE_POLL_S``: ASGI reports a disconnect to no one waiting)."""
    work = asyncio.ensure_future(call)
    try:
        while True:
            wait = GONE_POLL_S if is_gone is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise InferenceTimeout(f"model {label} did not answer before the request's deadline")
                wait = left if wait is None else min(wait, left)
            done, _ = await asyncio.wait({work}, timeout=wait)
            if done:
                if work.cancelled():  # not by us (that is in finally): the model cancelled its own call
                    raise InferenceError(f"model {label} cancelled its own call")
                return work.result()
            if is_gone is not None and is_gone():
                raise ClientDisconnected("the client disconnected; its request was aborted")
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


def _consume_result(future: asyncio.Future[InferResponse]) -> None:
    """Retrieve a late result nobody waits for, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _one_for_one(requests: list[InferRequest], responses: list[InferResponse]) -> list[InferResponse]:
    if len(responses) != len(requests):
        raise InferenceError(
            f"the model returned {len(responses)} responses for {len(requests)} requests"
        )
    return responses


def _fail(batch: list[_Pending], error: MMServerError) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
