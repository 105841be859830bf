"""The memory ledger: bytes reserved per model per device, checked against per-device budgets.

Pure bookkeeping with no framework or NVML imports, so its rules are testable on any machine.
A load reserves its predicted size first; once loaded, the measured size replaces the prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

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


def resolve_budget(setting: int | float | None, total: int, others: int, margin: int) -> int:
    """Bytes a device's budget allows: the configured cap (``int`` bytes, or ``float`` fraction
    of ``total``), but never more than what other processes leave, less a safety margin."""
    available = max(0, total - others - margin)
    if setting is None:
        return available
    cap = int(total * setting) if isinstance(setting, float) else setting
    return min(cap, available)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A loaded model that could make room on a device."""

    owner: Hashable
    size: int  # bytes it would free on the device
    last_used: float


def choose_victims(candidates: list[Candidate], need: int) -> list[Candidate] | None:
    """Models that free ``need`` bytes, least recently used first; None if all of them together
    cannot. Once enough are taken, those not needed after all (a small old one, where a larger
    one taken later suffices alone) are given back, the most recently used first."""
    if need <= 0:
        return []
    chosen: list[Candidate] = []
    freed = 0
    for candidate in sorted(candidates, key=lambda c: c.last_used):
        chosen.append(candidate)
        freed += candidate.size
        if freed >= need:
            break
    else:
        return None
    for candidate in reversed(chosen[:-1]):
        if freed - candidate.size >= need:
            chosen.remove(candidate)
            freed -= candidate.size
    return chosen
