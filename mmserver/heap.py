"""Keeps loaded models out of the garbage collector's way, without stalling requests to free them.

With torch and transformers imported a server holds half a million objects. A full collection
over them stalls the event loop (~60 ms when one came on its own mid-traffic, ~240 ms when forced
after a load), so whatever is alive after a load is frozen (``gc.freeze``), once the garbage of
the requests in flight has been collected (cheap: collections skip frozen objects).

Frozen objects of a model that is later unloaded are still freed by reference counting, but
reference cycles among them only by a collection that thaws the frozen set. That full collection
runs when no request is in flight, or at the latest after ``FULL_AFTER_UNLOADS`` unloads or
``FULL_AFTER_S`` seconds with unloads waiting for it, so memory stays flat under constant traffic.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

FULL_AFTER_UNLOADS = 32
FULL_AFTER_S = 60.0


class HeapKeeper:
    """When to freeze and when to collect the frozen set; call from the event loop thread."""

    def __init__(self) -> None:
        self._unloads = 0
        self._first_unload = 0.0  # time.monotonic() of the oldest unload not yet collected

    @property
    def pending(self) -> bool:
        """Whether unloads left objects among the frozen ones that only a full collection frees."""
        return self._unloads > 0

    def freeze_survivors(self) -> None:
        """After a load: collect the garbage outside the frozen set, then freeze what lives."""
        gc.collect()
        gc.freeze()

    def unloaded(self) -> None:
        """A model was unloaded: its frozen reference cycles wait for a full collection."""
        if not self._unloads:
            self._first_unload = time.monotonic()
        self._unloads += 1

    def collect_frozen(self, idle: bool) -> bool:
        """Run the full collection if unloads are pending and the server is ``idle`` (or they have
        waited too long); returns whether it ran."""
        if not self._unloads:
            return False
        overdue = self._unloads >= FULL_AFTER_UNLOADS or time.monotonic() - self._first_unload >= FULL_AFTER_S
        if not (idle or overdue):
            return False
        self.full_collection()
        return True

    def full_collection(self) -> None:
        """Thaw everything, collect, freeze what lives (at startup, and after unloads)."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self._unloads = 0
        log.debug("full garbage collection: %d objects freed, %d frozen, %.3f s",
                  freed, gc.get_freeze_count(), time.perf_counter() - started)
