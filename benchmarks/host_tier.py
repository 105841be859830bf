#!/usr/bin/env python3
"""The transformers runtime's host tier, timed on its own: a model's tensors moved into host
memory and back as ``TransformersModel`` offloads and restores them, in one process.

- offload: ``park``: one host buffer of the exact size (page-locked with ``cudaHostRegister`` on
  a GPU), the tensors copied in;
- restore: ``unpark``, one allocation and one transfer back, against a copy (and an allocation)
  per tensor, as ``module.to`` does it and as the runtime did before;
- release: unlocking and freeing the buffer (on a background thread in the server).

The tensors have the shapes of a Llama (width 1024, whole layers) of about ``--mib`` MiB, fp16
on a GPU and fp32 on the CPU; every round starts from an empty allocator cache, as a restore
after an eviction does. Prints the median of ``--rounds`` for each phase, GB/s, and for the
restore per tensor / one transfer.

    python benchmarks/host_tier.py --device cuda --mib 1024
    python benchmarks/host_tier.py --device cpu --mib 1024
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from mmserver_transformers.host_copy import HostCopy, park, unpark

HIDDEN, INTERMEDIATE, VOCAB = 1024, 3072, 32000


def llama_tensors(mib: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random tensors shaped like a Llama's of about ``mib`` MiB (embedding, whole layers, head)."""
    layer = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE), (HIDDEN,), (HIDDEN,)]
    width = torch.finfo(dtype).bits // 8
    per_layer = sum(torch.Size(shape).numel() for shape in layer) * width
    fixed = 2 * VOCAB * HIDDEN * width
    layers = max(1, (mib * 2**20 - fixed) // per_layer)
    shapes = [(VOCAB, HIDDEN), *layer * layers, (HIDDEN,), (VOCAB, HIDDEN)]
    return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes]


def unpark_per_tensor(tensors: list[torch.Tensor], host: HostCopy, device: torch.device) -> None:
    """The way back before: a copy into its own allocation per tensor."""
    moved = [tensor.data.to(device, non_blocking=True, copy=True) for tensor in tensors]
    synchronize(device)
    for tensor, target in zip(tensors, moved, strict=True):
        tensor.data = target


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_trip(tensors: list[torch.Tensor], device: torch.device, per_tensor: bool) -> dict[str, float]:
    """Seconds to offload ``tensors``, restore them (a tensor at a time or in one transfer) and
    release the host copy."""
    times = {}
    started = time.perf_counter()
    host = park(tensors, page_lock=device.type == "cuda")
    times["offload"] = time.perf_counter() - started
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # as the server does after an offload
    started = time.perf_counter()
    (unpark_per_tensor if per_tensor else unpark)(tensors, host, device)
    times["restore"] = time.perf_counter() - started
    started = time.perf_counter()
    host.release()
    times["release"] = time.perf_counter() - started
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tensors = llama_tensors(args.mib, device, dtype)
    size = sum(t.numel() * t.element_size() for t in tensors)
    expected = [t.clone() for t in tensors[:3]]
    print(f"{len(tensors)} tensors, {size / 2**20:.0f} MiB of {dtype} on {device}, median of {args.rounds} rounds")
    round_trip(tensors, device, per_tensor=False)  # warm-up: CUDA context, first allocations
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.rounds):  # interleaved: drift hits both alike
        for per_tensor in (True, False):
            runs[per_tensor].append(round_trip(tensors, device, per_tensor))
    assert all(torch.equal(a, b) for a, b in zip(expected, tensors, strict=False)), "the round trip changed the data"

    def median(per_tensor: bool, phase: str) -> float:
        return statistics.median(run[phase] for run in runs[per_tensor])

    for phase in ("offload", "release"):
        seconds = statistics.median(run[phase] for run in runs[True] + runs[False])
        print(f"{phase:8s} {1000 * seconds:8.1f} ms  {size / seconds / 1e9:6.1f} GB/s")
    then, now = median(True, "restore"), median(False, "restore")
    print(f"restore  {1000 * now:8.1f} ms  {size / now / 1e9:6.1f} GB/s in one transfer; a tensor at a time "
          f"{1000 * then:.1f} ms ({size / then / 1e9:.1f} GB/s): per tensor / one transfer {then / now:.2f}x")


if __name__ == "__main__":
    main()
