"""The transformers runtime's host tier buffer: one exact-size allocation holding every tensor."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from mmserver_transformers.host_copy import ALIGNMENT, HostCopy, release_later  # noqa: E402

SHAPES = [((3, 5), torch.float32), ((7,), torch.float16), ((0, 4), torch.int64), ((2, 2), torch.bfloat16),
          ((1,), torch.int8), ((4, 3), torch.float64)]


def tensors(device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    made = []
    for shape, dtype in SHAPES:
        values = torch.randint(-100, 100, shape, generator=generator) if not dtype.is_floating_point \
            else torch.randn(shape, generator=generator)
        made.append(values.to(dtype).to(device))
    return made


def test_every_tensor_gets_an_aligned_view_of_its_shape_in_one_exact_size_buffer():
    sources = tensors()
    host = HostCopy(sources, page_lock=False)
    sizes = [t.numel() * t.element_size() for t in sources]
    base = host.views[0].data_ptr()
    starts = [view.data_ptr() - base for view, size in zip(host.views, sizes, strict=True) if size]
    assert all(start % ALIGNMENT == 0 for start in starts)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    last = max(start for start in starts)
    assert host.nbytes == last + sizes[-1]  # the last tensor has bytes: the buffer ends with it
    assert host.nbytes < sum(sizes) + ALIGNMENT * len(sizes)  # no rounding beyond the alignment
    for view, source in zip(host.views, sources, strict=True):
        assert view.shape == source.shape and view.dtype == source.dtype and view.is_contiguous()
        view.copy_(source)
        assert torch.equal(view, source)
    for view, source in zip(host.views, sources, strict=True):  # no view overlaps another
        assert torch.equal(view, source)


def test_where_the_buffer_cannot_be_page_locked_it_stays_pageable(caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA page-locks it")
    host = HostCopy(tensors(), page_lock=True)  # this torch has no CUDA: the driver call fails
    assert not host.locked and len(host.views) == len(SHAPES)
    assert "this copy stays in pageable memory" in caplog.text
    host.release()


def test_release_drops_the_buffer_once():
    host = HostCopy(tensors(), page_lock=False)
    host.release()
    assert host.views == []
    host.release()
    assert HostCopy([], page_lock=False).nbytes == 0


def test_a_copy_released_later_is_gone_before_the_next_one_is_made(monkeypatch):
    import threading

    first = HostCopy(tensors(), page_lock=False)
    gate, order = threading.Event(), []
    release = first.release

    def slow_release() -> None:  # a release still running when the next copy is asked for
        gate.wait(5)
        release()
        order.append("released")

    monkeypatch.setattr(first, "release", slow_release)
    release_later(first)
    threading.Timer(0.2, gate.set).start()
    HostCopy(tensors(), page_lock=False)
    order.append("made")
    assert order == ["released", "made"] and first.views == []


@pytest.mark.gpu
def test_on_a_gpu_the_buffer_is_page_locked_until_released():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sources = tensors("cuda:0")
    host = HostCopy(sources, page_lock=True)
    assert host.locked and all(view.is_pinned() for view in host.views if view.numel())
    for view, source in zip(host.views, sources, strict=True):
        view.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    back = [view.to("cuda:0", non_blocking=True) for view in host.views]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(back, sources, strict=True))
    host.release()
    assert host.views == []
