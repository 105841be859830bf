"""The memory ledger: bytes reserved per model per device, checked against per-device budgets.

Pure bookkeeping with no framework or NVML imports, so its rules are testable on any machine.
A load reserves its predicted size first; once loaded, the measured size replaces the prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from .errors import InsufficientMemory

log = logging.getLogger(__name__)


def format_bytes(size: int) -> str:
    """Human-readable size, e.g. ``1.5 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class MemoryLedger:
    """Who holds how many bytes on which device, and whether a new reservation fits."""

    def __init__(self, budgets: dict[str, int] | None = None) -> None:
        self.budgets: dict[str, int] = dict(budgets or {})
        self._held: dict[Hashable, dict[str, int]] = {}

    def used(self, device: str) -> int:
        """Bytes reserved on a device by every model together."""
        return sum(sizes.get(device, 0) for sizes in self._held.values())

    def held(self, owner: Hashable) -> dict[str, int]:
        """Bytes per device held by one model."""
        return dict(self._held.get(owner, {}))

    def free(self, device: str) -> int | None:
        """Bytes still available on a device, or ``None`` where no budget is set."""
        budget = self.budgets.get(device)
        return None if budget is None else budget - self.used(device)

    def reserve(self, owner: Hashable, sizes: dict[str, int]) -> None:
        """Reserve predicted sizes for a model about to load, or raise ``InsufficientMemory``."""
        for device, size in sizes.items():
            free = self.free(device)
            already = self._held.get(owner, {}).get(device, 0)
            if free is not None and size - already > free:
                raise InsufficientMemory(
                    f"{owner} needs {format_bytes(size - already)} more on {device} but only "
                    f"{format_bytes(free)} of the {format_bytes(self.budgets[device])} budget is free"
                )
        self._held[owner] = dict(sizes)

    def commit(self, owner: Hashable, measured: dict[str, int]) -> None:
        """Replace a model's prediction with its measured size; logs the prediction error."""
        predicted = self._held.get(owner, {})
        for device, size in measured.items():
            guess = predicted.get(device)
            if guess:
                log.debug("%s on %s: predicted %s, measured %s (%+.0f%%)", owner, device,
                          format_bytes(guess), format_bytes(size), 100.0 * (size - guess) / guess)
        self._held[owner] = dict(measured)

    def release(self, owner: Hashable) -> None:
        """Forget everything a model held."""
        self._held.pop(owner, None)
