#!/usr/bin/env python3
"""Model swapping under a memory budget: swap-in times and a Zipf request stream over more models
than fit, measured through a real mmserver.

Builds ``--models`` copies of a random Llama of about ``--model-mib`` MiB (fp16 weights on a GPU,
fp32 on the CPU) with a locally trained tokenizer, serves them with a budget that holds a third
of them, and reports:

1. swap-in: the first request's extra latency over a warm request to the same model, room made
   beforehand so that no eviction is timed with it: from the host tier (GPU only: pinned host
   RAM -> GPU) against copies of the same bytes from pinned host memory, in one transfer (the
   link's limit) and a tensor at a time (what ``module.to`` does), and from disk (on a GPU: the repository
   API's load after an unload) against a bare ``safetensors`` load of the same file onto the
   device, both baselines measured in a child process before the server starts (targets on the
   lent H100: host tier <= 50 ms for ~1 GB, disk within 1.5x of the bare load);
2. a Zipf-distributed stream over all models for ``--minutes``: requests sent, failed (target 0),
   evictions, and the device memory sampled against the budget (NVML every 10 ms on a GPU, above
   its reading before the server started; the ledger's figure from /metrics every 100 ms on the CPU)
   (target: never above the budget, which includes the measured CUDA context); on a GPU also
   the runtime's offload and restore times during the stream, as the server logged them;
3. after unloading everything: device memory back at the idle footprint it had with every
   model unloaded after step 1 (the CUDA context and what else the runtime keeps: target +-64 MiB
   on a GPU); that footprint is printed beside the overhead the ledger charges for it.

    python benchmarks/memory_swap.py --device cuda --model-mib 1024 --models 9 --minutes 3
    python benchmarks/memory_swap.py --device cpu --model-mib 64 --models 6 --minutes 0.5   # dry run
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_models(repo: Path, count: int, mib: int, device: str) -> int:
    """``count`` model folders sharing one random checkpoint (hard links); returns its bytes."""
    from tiny_hf import build_sized_llama, link_model

    first = repo / "m0" / "1"
    weights = build_sized_llama(first, mib, "float16" if device == "cuda" else "float32")
    yaml = f"runtime: transformers\nload: lazy\ndevice: {device}\nparameters: {{max_new_tokens: 1}}\n"
    (repo / "m0" / "model.yaml").write_text(yaml)
    for index in range(1, count):
        link_model(first, repo / f"m{index}" / "1")
        (repo / f"m{index}" / "model.yaml").write_text(yaml)
    return weights


def bare_load_seconds(folder: Path, device: str) -> dict[str, float]:
    """Baselines, measured in a child process that exits before the server starts (so none of
    its memory stays on the GPU): the safetensors file loaded straight onto the device and, on a
    GPU, the same bytes copied from pinned host memory: in one transfer into one allocation (the
    link's speed) and a tensor at a time, each into its own allocation. Each copy starts with an
    empty allocator cache, as a restore after an eviction does."""
    script = f"""
import json, time, torch
from safetensors.torch import load_file
device = {device!r}
def timed(work):
    started = time.perf_counter(); result = work()
    if device == "cuda": torch.cuda.synchronize()
    return result, time.perf_counter() - started
timed(lambda: torch.zeros(1, device=device))  # the CUDA context, outside the figures
tensors, disk = timed(lambda: load_file({str(next(folder.glob("*.safetensors")))!r}, device=device))
times = {{"disk": disk}}
if device == "cuda":
    pinned = [t.to("cpu").pin_memory() for t in tensors.values()]
    whole = torch.cat([t.flatten().view(torch.uint8) for t in pinned]).pin_memory()
    del tensors
    torch.cuda.empty_cache()
    _, times["pinned"] = timed(lambda: whole.to(device, non_blocking=True))
    torch.cuda.empty_cache()
    _, times["pinned_per_tensor"] = timed(lambda: [t.to(device, non_blocking=True) for t in pinned])
print(json.dumps(times))
"""
    return json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                     text=True).stdout)


def post(url: str, model: str, timeout: float = 300) -> tuple[int, float]:
    """One generation request; its status and seconds."""
    body = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
    return call(f"{url}/v2/models/{model}/infer", body.encode(), timeout)


def repository(url: str, model: str, action: str) -> float:
    """The repository API's load or unload of a model; its seconds."""
    status, took = call(f"{url}/v2/repository/models/{model}/{action}", b"", 300)
    if status != 200:
        raise RuntimeError(f"{action} of {model} answered {status}")
    return took


def call(url: str, body: bytes, timeout: float) -> tuple[int, float]:
    request = urllib.request.Request(url, body, method="POST")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            response.read()
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def host_tier_timings(log: str) -> str:
    """The transformers runtime's offload and restore times, as the server logged them."""
    offloads = [(m[1], float(m[2])) for m in re.finditer(r"offloaded to (\S+) host memory \(.*?\) in ([\d.]+) s", log)]
    restores = [float(m[1]) for m in re.finditer(r"restored onto \S+ in ([\d.]+) s", log)]
    if not offloads or not restores:
        return "host tier: no offload and restore logged"
    kinds = ", ".join(sorted({kind for kind, _ in offloads}))
    offload_ms = sorted(1000 * t for _, t in offloads)
    restore_ms = sorted(1000 * t for t in restores)
    return (f"host tier in the server: {len(offload_ms)} offloads ({kinds}) median {statistics.median(offload_ms):.1f} ms, "
            f"max {offload_ms[-1]:.1f} ms; {len(restore_ms)} restores median {statistics.median(restore_ms):.1f} ms, "
            f"max {restore_ms[-1]:.1f} ms")


def zipf_stream(url: str, models: int, exponent: float, seconds: float, clients: int) -> tuple[int, int]:
    """``clients`` callers each sending requests back to back for ``seconds``, to models ``m0``..
    drawn Zipf-distributed (``m0`` the most often); requests sent and failed."""
    weights_by_rank = [1 / (rank + 1) ** exponent for rank in range(models)]
    deadline = time.monotonic() + seconds

    def client(seed: int) -> tuple[int, int]:
        rng = random.Random(seed)
        sent = failed = 0
        while time.monotonic() < deadline:
            status, _ = post(url, f"m{rng.choices(range(models), weights_by_rank)[0]}")
            sent += 1
            failed += status != 200
        return sent, failed

    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(client, range(clients)))
    return sum(sent for sent, _ in counts), sum(failed for _, failed in counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--models", type=int, default=9)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--clients", type=int, default=1, help="concurrent callers in the Zipf stream")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here (default: a temporary folder)")
    args = parser.parse_args()
    from memory_judge import DeviceSampler, NvmlReader, cuda_context_bytes, ledger_bytes
    from mmserver_transformers.estimate import estimate_memory

    on_gpu = args.device == "cuda"
    device = "cuda:0" if on_gpu else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        weights = build_models(repo, args.models, args.model_mib, args.device)
        fitting = max(1, args.models // 3)
        # admission needs the runtime's prediction free; a loaded model then holds its weights (on
        # a GPU also the activation allowance of the prediction); on a GPU the CUDA context counts
        predicted = estimate_memory(repo / "m0" / "1", device, {})[device]
        loaded = predicted if on_gpu else weights
        overhead = cuda_context_bytes() if on_gpu else 0
        budget = int(overhead + predicted + (fitting - 1) * loaded * 1.1)
        bare = bare_load_seconds(repo / "m0" / "1", args.device)
        baseline = NvmlReader()() if on_gpu else 0
        flag = "--gpu-memory-budget" if on_gpu else "--host-memory-budget"
        log = args.server_log or Path(tmp) / "server.log"
        server, url = start_server(repo, log, [flag, str(budget), "--log-level", "info"], timeout_s=120)
        try:
            print(f"{args.models} models of {weights / 2**20:.0f} MiB weights on {args.device}; budget "
                  f"{budget / 2**20:.0f} MiB ({fitting} fit; CUDA context {overhead / 2**20:.0f} MiB)")

            # 1. swap-in times: the first request's extra latency over a warm one, room made first
            post(url, "m0")
            warm = min(post(url, "m0")[1] for _ in range(3))
            for index in range(1, fitting + 1):  # pushes m0 out (to the host tier on a GPU)
                post(url, f"m{index}")
            spare = f"m{fitting}"
            repository(url, spare, "unload")  # room for m0, so no eviction is timed with it
            if on_gpu:
                _, restored = post(url, "m0")
                print(f"swap-in from the host tier: {1000 * (restored - warm):.1f} ms (first request "
                      f"{1000 * restored:.1f} ms, warm {1000 * warm:.1f} ms); the weights copied from pinned "
                      f"memory in one transfer {1000 * bare['pinned']:.1f} ms, a tensor at a time "
                      f"{1000 * bare['pinned_per_tensor']:.1f} ms (target <= 50 ms for ~1 GB)")
                repository(url, "m0", "unload")  # gone from the host tier too: it comes from disk
                from_disk = repository(url, "m0", "load") + post(url, "m0")[1] - warm
            else:
                from_disk = post(url, "m0")[1] - warm
            print(f"swap-in from disk: {1000 * from_disk:.1f} ms; bare safetensors load onto {args.device} "
                  f"{1000 * bare['disk']:.1f} ms; ratio {from_disk / bare['disk']:.2f}x (target <= 1.5x)")

            def idle_footprint() -> tuple[int, int]:
                """Every model unloaded: the device's use above its baseline (the ledger's on the
                CPU), and what the ledger keeps as the runtimes' overhead (the CUDA context)."""
                for index in range(args.models):
                    repository(url, f"m{index}", "unload")
                time.sleep(1.0)
                kept = ledger_bytes(url, device)
                return (NvmlReader()() - baseline if on_gpu else kept), kept

            # what stays once every code path (load, offload, restore, unload) has run once
            first_idle, kept = idle_footprint()
            print(f"idle, every model unloaded: {first_idle / 2**20:.0f} MiB above the baseline, of which "
                  f"the ledger's overhead {kept / 2**20:.0f} MiB")
            for index in range(args.models):  # an operator's unload is undone only by a load
                repository(url, f"m{index}", "load")

            # 2. Zipf stream
            evictions_before = metric(url, "mmserver_model_evictions_total")
            with DeviceSampler(device, url, baseline) as sampler:
                sent, failed = zipf_stream(url, args.models, args.zipf, 60 * args.minutes, args.clients)
            evictions = metric(url, "mmserver_model_evictions_total") - evictions_before
            print(f"zipf({args.zipf}) stream for {args.minutes:g} min from {args.clients} clients: "
                  f"{sent} requests, {failed} failed, "
                  f"{evictions:.0f} evictions; peak memory above baseline {sampler.peak / 2**20:.0f} MiB of a "
                  f"{budget / 2**20:.0f} MiB budget ({'within' if sampler.peak <= budget else 'OVER'})")
            if on_gpu:
                print(host_tier_timings(log.read_text()))

            # 3. back where it was before the stream, once every model is unloaded again
            left = idle_footprint()[0] - first_idle
            print(f"after the stream and unloading every model: {left / 2**20:+.0f} MiB against the idle "
                  f"footprint before it (target +-64 MiB)")
            return 0 if failed == 0 and sampler.peak <= budget and abs(left) <= 64 * 2**20 else 1
        finally:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
