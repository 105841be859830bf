"""Giving a GPU's cached memory back to the driver, so that the memory of a model that leaves
shows up as free in NVML (which is what the memory manager measures).

Takes the ``torch`` module as an argument: the runtime's package imports torch only once a
model loads."""

from __future__ import annotations

from types import ModuleType


def empty_gpu_caches(torch: ModuleType) -> None:
    """Free the caching allocator's unused blocks on the current device, and first the cuBLAS
    and cuBLASLt workspaces torch keeps for every thread and stream that ran a matrix product
    (32 MiB each on Hopper), which ``empty_cache`` alone leaves allocated."""
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # noqa: SLF001
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
