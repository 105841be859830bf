"""What the server holds for one model version: its spec, state, loaded model and queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .batching import Batcher
from .metrics import ModelMetrics, NoMetrics
from .runtime import LoadedModel
from .spec import ModelSpec
from .types import ModelState, RequestedOutput


@dataclass(slots=True, eq=False)
class ModelEntry:
    """One model version and everything the server holds for it."""

    name: str
    version: str
    spec: ModelSpec | None
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    loading: asyncio.Task[None] | None = None
    leaving: asyncio.Future[None] | None = None  # set while the model is unloaded or evicted
    served: bool = True
    # the entry that took over this version when a rollover retired this one: a request that
    # looked this entry up just before goes there, not to a 503
    successor: ModelEntry | None = None
    unloaded_by_operator: bool = False
    evicted: bool = False  # unloaded or parked to make room: comes back on the next request
    parked: dict[str, int] | None = None  # device bytes the model held before it moved to host RAM
    # bytes each GPU grew by when the model last came onto it: what its eviction must give back
    # (its ledger size may be more: room reserved for what its batches will take)
    arrived: dict[str, int] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    waiting: int = 0  # requests waiting for the model to finish loading
    # set while a load that needs this busy model's room waits for it to be idle: new requests
    # wait until it is set (they then find the model moved out, to load it back, or still here)
    yielding: asyncio.Event | None = None
    load_error: Exception | None = None  # why the last load failed
    # what a request that names no outputs gets: the outputs model.yaml declares (else every one)
    default_outputs: list[RequestedOutput] = field(default_factory=list)
    metrics: ModelMetrics = field(default_factory=NoMetrics)

    def current(self) -> ModelEntry:
        """The entry that serves this one's requests now: itself, or its successor's current
        entry once a rollover retired it."""
        entry = self
        while not entry.served and entry.successor is not None:
            entry = entry.successor
        return entry

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name

    def __str__(self) -> str:
        """The key: how the memory ledger names its owner (the entry itself, not its key, so a
        rollover's old and new entry of one version hold their memory apart)."""
        return self.key

    @property
    def pinned(self) -> bool:
        return self.spec is not None and self.spec.config.pinned

    @property
    def busy(self) -> bool:
        """Requests are queued, running, or waiting for a load."""
        return self.waiting > 0 or (self.batcher is not None and self.batcher.busy)

    @property
    def movable(self) -> bool:
        """Loaded (or parked in host RAM), neither loading nor leaving, and not pinned: may be
        moved out to make room once idle."""
        return (
            (self.state is ModelState.READY or (self.state is ModelState.UNAVAILABLE and self.parked is not None))
            and self.model is not None
            and self.loading is None
            and self.leaving is None
            and not self.pinned
        )

    @property
    def may_yield(self) -> bool:
        """Busy only with requests through its queue, which end soon (no work held open with
        ``Batcher.hold``, a generation say, which may last long), so that holding back new ones
        makes it idle: a load that needs its room may ask it to."""
        return self.movable and self.batcher is not None and not self.batcher.streaming

    def start_yield(self) -> bool:
        """Hold new requests back until ``end_yield``; False if it already yields."""
        if self.yielding is not None:
            return False
        self.yielding = asyncio.Event()
        return True

    def end_yield(self) -> None:
        """Let the requests held back by ``start_yield`` go on."""
        if self.yielding is not None:
            self.yielding.set()
            self.yielding = None

    @property
    def evictable(self) -> bool:
        """Movable and idle: may be moved out to make room now; a parked model then leaves the
        host tier (and whatever it still holds on a GPU)."""
        return self.movable and not self.busy

    def reloads_on_request(self) -> bool:
        """Whether a request may (re)load this model: lazy or evicted, and not unloaded on purpose."""
        if self.spec is None or not self.served or self.unloaded_by_operator:
            return False
        return self.evicted or self.spec.config.load == "lazy"
