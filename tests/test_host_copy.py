"""The transformers runtime's host tier buffer: one exact-size allocation holding every tensor."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from mmserver_transformers.host_copy import ALIGNMENT, HostCopy, park, release_later, unpark  # noqa: E402

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


class TiedModule(torch.nn.Module):
    """A small real module with what a language model's tensors hold: an embedding tied to the
    output head (one Parameter), a second Parameter viewing the embedding's storage, a norm, and
    a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight
        self.alias = torch.nn.Parameter(self.embed.weight.data)  # same storage, another Parameter
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)) * self.scale) + self.alias.sum()

    def tensors(self) -> list[torch.Tensor]:
        unique = {id(t): t for t in [*self.parameters(), *self.buffers()]}
        return list(unique.values())


def _inside(tensor: torch.Tensor, host: HostCopy, base: int) -> bool:
    return base <= tensor.data_ptr() < base + host.nbytes


def test_park_moves_every_tensor_into_one_copy_and_unpark_into_one_allocation_with_ties_kept():
    module = TiedModule()
    ids = torch.tensor([[1, 4, 9, 10]])
    expected = module(ids)
    tensors = module.tensors()
    assert len(tensors) == 5  # embed (= head), alias, norm weight and bias, scale

    host = park(tensors, page_lock=False)
    base = min(view.data_ptr() for view in host.views)
    assert len(host.views) == 4  # alias shares the embedding's copy
    assert all(_inside(tensor, host, base) for tensor in tensors)
    assert module.alias.data_ptr() == module.embed.weight.data_ptr() and module.head.weight is module.embed.weight
    assert host.nbytes < sum(t.numel() * t.element_size() for t in tensors[1:]) + 4 * ALIGNMENT
    assert torch.equal(module(ids), expected)

    parked_at = [tensor.data_ptr() - base for tensor in tensors]
    unpark(tensors, host, torch.device("cpu"))
    assert not any(_inside(tensor, host, base) for tensor in tensors)  # copied out, even CPU to CPU
    new_base = min(tensor.data_ptr() for tensor in tensors)  # into one allocation, laid out alike
    assert [tensor.data_ptr() - new_base for tensor in tensors] == [at - min(parked_at) for at in parked_at]
    assert module.alias.data_ptr() == module.embed.weight.data_ptr()
    host.release()
    assert torch.equal(module(ids), expected)
    module.embed.weight.data.add_(1)  # the storage is still one: the alias sees the change
    assert torch.equal(module.alias, module.embed.weight)


def test_a_park_whose_copy_fails_leaves_every_tensor_where_it_was(monkeypatch):
    module = TiedModule()
    tensors = module.tensors()
    before = [t.data_ptr() for t in tensors]
    made: list[HostCopy] = []
    real_init = HostCopy.__init__

    def broken_copy(self: HostCopy, sources, page_lock: bool) -> None:  # a copy that fails midway
        real_init(self, sources, page_lock)
        made.append(self)
        self.views = [*self.views[:-1], torch.empty(0)]

    monkeypatch.setattr(HostCopy, "__init__", broken_copy)
    with pytest.raises(RuntimeError):
        park(tensors, page_lock=False)
    assert [t.data_ptr() for t in tensors] == before and made[0].views == []


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


@pytest.mark.gpu
def test_on_a_gpu_a_module_parks_in_page_locked_memory_and_comes_back_with_ties_kept():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module = TiedModule().to("cuda:0")
    ids = torch.tensor([[1, 4, 9, 10]], device="cuda:0")
    expected = module(ids)
    tensors = module.tensors()
    host = park(tensors, page_lock=True)
    assert host.locked and all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
    unpark(tensors, host, torch.device("cuda:0"))
    host.release()
    assert all(t.device.type == "cuda" for t in tensors)
    assert module.alias.data_ptr() == module.embed.weight.data_ptr()
    assert torch.equal(module(ids), expected)


def test_emptying_the_gpu_caches_frees_the_cublas_workspaces_first():
    # stands in for torch: records the calls that give cached GPU memory back (no GPU here)
    from types import SimpleNamespace

    from mmserver_transformers.gpu_cache import empty_gpu_caches

    calls: list[str] = []
    stand_in = SimpleNamespace(_C=SimpleNamespace(_cuda_clearCublasWorkspaces=lambda: calls.append("workspaces")),
                               cuda=SimpleNamespace(empty_cache=lambda: calls.append("cache")))
    empty_gpu_caches(stand_in)
    assert calls == ["workspaces", "cache"]
    empty_gpu_caches(SimpleNamespace(_C=SimpleNamespace(), cuda=stand_in.cuda))  # a torch without the hook
    assert calls == ["workspaces", "cache", "cache"]
