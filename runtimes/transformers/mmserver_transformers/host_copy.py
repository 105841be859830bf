"""A GPU model's host tier: its tensors in one exact-size, page-locked host buffer.

torch's pinned allocator (``pin_memory=True``) rounds every allocation up to a power of two and
keeps freed blocks for later ones: a model's host copy could take up to twice its size (an 86 MiB
Llama MLP matrix takes 128 MiB), and go on taking it after the model went back to its GPU, out
of sight of the host budget. ``HostCopy`` makes one ordinary host allocation of the tensors'
total size, each tensor at an aligned offset, page-locks it with ``cudaHostRegister`` while it
holds the copy (so copies run at the pinned speed), and unlocks and frees it on ``release``.
Where the driver refuses to page-lock it (some sandboxes), the copy stays in pageable memory:
the host tier still works, its copies at the pageable speed. Freeing takes time too (about 60 ms
a GiB on the development machine): a restore hands its copy to ``release_later`` rather than wait
for it.

``park`` and ``unpark`` move a module's tensors into such a copy and out of it again, keeping
tensors that share a storage (tied weights) sharing one. They work between any two devices, so
the CPU tests exercise the same code that moves a model between a GPU and host memory.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

log = logging.getLogger("mmserver_transformers")

#: each tensor starts at a multiple of this many bytes in the buffer
ALIGNMENT = 512
#: cudaHostRegisterPortable: pinned for every GPU, so a model may come back on another one
_PORTABLE = 1


class HostCopy:
    """Host room for ``tensors`` (their shapes and dtypes; nothing is copied here): ``views``
    holds one contiguous host tensor per given tensor, in order, inside one buffer of
    ``nbytes``; ``locked`` says whether it is page-locked."""

    def __init__(self, tensors: Sequence[torch.Tensor], page_lock: bool) -> None:
        _wait_for_releases()  # at most one host copy more than the ledger shows, and only briefly
        offsets, end = [], 0
        for tensor in tensors:
            start = -(-end // ALIGNMENT) * ALIGNMENT
            offsets.append(start)
            end = start + tensor.numel() * tensor.element_size()
        self.nbytes = end
        self._offsets = offsets
        self._buffer: torch.Tensor | None = torch.empty(end, dtype=torch.uint8, device="cpu")
        self.locked = bool(page_lock and end) and _page_lock(self._buffer)
        self.views = _views(self._buffer, offsets, tensors)

    def copy_to(self, device: torch.device) -> list[torch.Tensor]:
        """The views' contents on ``device``: one allocation with the same layout, filled by one
        transfer (asynchronous from page-locked memory: synchronize before using the result or
        releasing this copy). One large copy runs at the link's full speed, and one allocation
        costs one ``cudaMalloc`` where a tensor each could cost hundreds."""
        assert self._buffer is not None, "the host copy was released"
        target = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        target.copy_(self._buffer, non_blocking=True)
        return _views(target, self._offsets, self.views)

    def release(self) -> None:
        """Unlock and free the buffer; no copy into or out of it may still run, and nothing
        else may still use its views."""
        if self._buffer is None:
            return
        if self.locked:
            _check(torch.cuda.cudart().cudaHostUnregister(self._buffer.data_ptr()), "cudaHostUnregister")
            self.locked = False
        self.views = []
        self._buffer = None


def _views(buffer: torch.Tensor, offsets: Sequence[int], likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped like ``likes`` inside ``buffer`` (bytes), each at its offset."""
    views = []
    for offset, like in zip(offsets, likes, strict=True):
        size = like.numel() * like.element_size()
        if size == 0:
            views.append(torch.empty(like.shape, dtype=like.dtype, device=buffer.device))
        else:
            views.append(buffer[offset:offset + size].view(like.dtype).view(like.shape))
    return views


StorageKey = tuple[int, tuple[int, ...], torch.dtype]


def park(tensors: Sequence[torch.Tensor], page_lock: bool) -> HostCopy:
    """Copy ``tensors`` (a module's parameters and buffers, each once) into one ``HostCopy`` and
    point every tensor at its copy there; tensors viewing one storage alike share one copy. If a
    copy fails, the buffer is freed and every tensor stays where it was."""
    sources = _distinct(tensors)
    host = HostCopy(list(sources.values()), page_lock)
    try:
        for view, source in zip(host.views, sources.values(), strict=True):
            view.copy_(source.data, non_blocking=True)
        _synchronize(source.device for source in sources.values())
    except BaseException:
        host.release()
        raise
    views = dict(zip(sources, host.views, strict=True))
    for tensor in tensors:
        tensor.data = views[_storage_key(tensor)]
    return host


def unpark(tensors: Sequence[torch.Tensor], host: HostCopy, device: torch.device) -> None:
    """Copy ``tensors``, parked in ``host`` by ``park``, onto ``device`` (in one transfer, into
    one allocation) and point each at its new place, after which ``host`` may be released. If
    the copy fails (the device is full, say), every tensor stays in host memory."""
    targets = dict(zip(map(_storage_key, host.views), host.copy_to(device), strict=True))
    _synchronize([device])
    for tensor in tensors:
        tensor.data = targets[_storage_key(tensor)]


def _distinct(tensors: Sequence[torch.Tensor]) -> dict[StorageKey, torch.Tensor]:
    """One tensor per storage view: tensors tied to one storage move once."""
    distinct: dict[StorageKey, torch.Tensor] = {}
    for tensor in tensors:
        distinct.setdefault(_storage_key(tensor), tensor)
    return distinct


def _storage_key(tensor: torch.Tensor) -> StorageKey:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


def _synchronize(devices: Iterable[torch.device]) -> None:
    """Wait for the asynchronous copies on every GPU among ``devices`` (CPU copies are done)."""
    for device in {torch.device(d) for d in devices}:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


_releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host copy release")
_pending: list[Future[None]] = []
_pending_lock = threading.Lock()


def release_later(copy: HostCopy) -> None:
    """``copy.release()`` on a background thread; the next ``HostCopy`` waits for it."""
    with _pending_lock:
        _pending.append(_releaser.submit(copy.release))


def _wait_for_releases() -> None:
    with _pending_lock:
        pending = list(_pending)
        _pending.clear()
    for future in pending:
        future.result()


def _page_lock(buffer: torch.Tensor) -> bool:
    """Page-lock ``buffer`` for the GPUs; False (and a warning) where the driver refuses."""
    try:
        _check(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), _PORTABLE), "cudaHostRegister")
    except Exception as exc:  # noqa: BLE001 - a CUDA error, or a torch without CUDA or this call
        log.warning("host tier: %s; this copy stays in pageable memory (copies at pageable speed)", exc)
        return False
    return True


def _check(status: object, call: str) -> None:
    code = int(status)  # type: ignore[call-overload]
    if code != 0:
        _clear_last_cuda_error()
        raise RuntimeError(f"{call} failed with CUDA error {code}")


def _clear_last_cuda_error() -> None:
    """A failed CUDA runtime call also leaves its error as this thread's last error, which the
    check after torch's next kernel launch would raise for a kernel that did nothing wrong: read
    it off (``cudaGetLastError``, from the CUDA runtime torch loaded, found by its soname)."""
    major = (torch.version.cuda or "").split(".")[0]
    try:
        ctypes.CDLL(f"libcudart.so.{major}").cudaGetLastError()
    except (OSError, AttributeError):  # no such runtime loaded: nothing to clear
        pass
