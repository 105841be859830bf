"""Watches the model repository folder and asks the manager to catch up once changes settle.

Change events come from the operating system through watchfiles (or by polling, for file
systems without events such as some network mounts). A folder being copied in must not be read
half-written, so after events arrive the watcher waits until no file in the touched model
folders (nor in any other model folder: the rescan reads them all) has changed size or
modification time for ``settle_s`` seconds, then rescans.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from .repository import FileSignature, files_of

log = logging.getLogger(__name__)


def folder_signature(root: Path, names: set[str]) -> FileSignature:
    """(path, size, mtime) of every file under the named top-level folders of ``root``."""
    return frozenset().union(*(files_of(root / name) for name in names))


class RepositoryWatcher:
    """Runs until cancelled, calling ``on_change`` after every settled batch of changes."""

    def __init__(
        self, root: Path, on_change: Callable[[], Awaitable[None]], settle_s: float, poll: bool
    ) -> None:
        self.root = root.resolve()
        self.on_change = on_change
        self.settle_s = settle_s
        self.poll = poll

    async def run(self) -> None:
        log.info("watching %s for model changes (%s, settle %.1f s)", self.root,
                 "polling" if self.poll else "file system events", self.settle_s)
        async for changes in watchfiles.awatch(
            self.root, watch_filter=None, force_polling=self.poll, debounce=1000, step=100,
            poll_delay_ms=300,
        ):
            touched = {self._top_level(Path(path)) for _, path in changes} - {None}
            if not touched:
                continue
            try:
                await self._settle(touched)  # type: ignore[arg-type]
                log.info("repository changed (%s): rescanning", ", ".join(sorted(touched)))  # type: ignore[arg-type]
                await self.on_change()
            except Exception:  # a bad rescan must not stop the watching
                log.exception("rescanning the repository failed")

    def _top_level(self, path: Path) -> str | None:
        """The model folder a changed path is in; a folder that links out of the repository
        counts too (the rescan then says why it is refused)."""
        for candidate in (path, path.resolve()):
            if candidate.is_relative_to(self.root):
                relative = candidate.relative_to(self.root)
                return relative.parts[0] if relative.parts else None
        return None

    async def _settle(self, names: set[str]) -> None:
        """Wait until the touched folders stop changing, and every other model folder too: the
        rescan reads them all, and one being copied in meanwhile (its events not seen yet, as
        they come in a later batch) must not be read half-written."""
        before = folder_signature(self.root, names | self._model_folders())
        while True:
            await asyncio.sleep(self.settle_s)
            now = folder_signature(self.root, names | self._model_folders())
            if now == before:
                return
            before = now

    def _model_folders(self) -> set[str]:
        """The names in the repository the rescan reads (hidden ones, such as a staging folder,
        are not read)."""
        try:
            with os.scandir(self.root) as entries:
                return {entry.name for entry in entries if not entry.name.startswith(".")}
        except OSError:
            return set()
