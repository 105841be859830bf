#!/usr/bin/env python3
"""Model swapping under a memory budget: swap-in times and a Zipf request stream over more models
than fit, measured through a real mmserver.

Builds ``--models`` copies of a random Llama of about ``--model-mib`` MiB (fp16 weights on a GPU,
fp32 on the CPU) with a locally trained tokenizer, serves them with a budget that holds a third
of them, and reports:

1. swap-in: the first request to a model evicted to the host tier (GPU only: pinned host RAM
   -> GPU) and to a model evicted to disk (reloaded), each against the same model's warm
   request, and a bare ``safetensors`` load of the same file onto the device as the baseline
   (targets on the lent H100: host tier <= 50 ms for ~1 GB, disk within 1.5x of the bare load);
2. a Zipf-distributed stream over all models for ``--minutes``: requests sent, failed (target 0),
   evictions, and the device memory sampled every 100 ms against the budget (NVML on a GPU;
   the ledger's figure from /metrics on the CPU) (target: never above the budget);
3. after unloading everything: device memory back at its baseline (target +-64 MiB on a GPU).

    python benchmarks/memory_swap.py --device cuda --model-mib 1024 --models 9 --minutes 3
    python benchmarks/memory_swap.py --device cpu --model-mib 64 --models 6 --minutes 0.5   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serving import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_models(repo: Path, count: int, mib: int, device: str) -> int:
    """``count`` model folders sharing one random checkpoint (hard links); returns its bytes."""
    import torch
    from tiny_hf import byte_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_bpe_tokenizer()
    dtype = torch.float16 if device == "cuda" else torch.float32
    hidden = 1024
    per_layer = 12 * hidden * hidden * dtype.itemsize  # attention (4h^2) + MLP (8h^2, intermediate 2.67h x3)
    layers = max(1, (mib * 2**20) // per_layer)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(2.67 * hidden), num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=tokenizer.vocab_size,
                         max_position_embeddings=256, torch_dtype=str(dtype).split(".")[1],
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    first = repo / "m0" / "1"
    LlamaForCausalLM(config).to(dtype).save_pretrained(first)
    tokenizer.save_pretrained(first)
    yaml = f"runtime: transformers\nload: lazy\ndevice: {device}\nparameters: {{max_new_tokens: 1}}\n"
    (repo / "m0" / "model.yaml").write_text(yaml)
    for index in range(1, count):
        folder = repo / f"m{index}" / "1"
        folder.mkdir(parents=True)
        for file in first.iterdir():
            os.link(file, folder / file.name)
        (repo / f"m{index}" / "model.yaml").write_text(yaml)
    return sum(f.stat().st_size for f in first.glob("*.safetensors"))


def bare_load_seconds(folder: Path, device: str) -> float:
    """Load the safetensors weights straight onto the device (the baseline for a disk reload)."""
    import torch
    from safetensors.torch import load_file

    started = time.perf_counter()
    tensors = load_file(str(next(folder.glob("*.safetensors"))), device="cuda:0" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - started
    del tensors
    return took


def post(url: str, model: str, timeout: float = 300) -> tuple[int, float]:
    body = json.dumps({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", body.encode(), method="POST")
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


class DeviceSampler:
    """Samples device memory in use every 100 ms: NVML on a GPU, the ledger on the CPU."""

    def __init__(self, device: str, url: str) -> None:
        self.device, self.url, self.samples = device, url, []
        self._stop = threading.Event()
        if device == "cuda":
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        if self.device == "cuda":
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        return int(metric(self.url, "mmserver_memory_reserved_bytes"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.used())
            time.sleep(0.1)

    def __enter__(self) -> DeviceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model-mib", type=int, default=1024)
    parser.add_argument("--models", type=int, default=9)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--zipf", type=float, default=1.1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        weights = build_models(repo, args.models, args.model_mib, args.device)
        fitting = max(1, args.models // 3)
        # admission needs the runtime's prediction (weights + activation allowance) free; a loaded
        # model then holds about its weights: this budget holds `fitting` models at once
        from mmserver_transformers.estimate import estimate_memory

        device_name = "cuda:0" if args.device == "cuda" else "cpu"
        predicted = estimate_memory(repo / "m0" / "1", device_name, {})[device_name]
        budget = int(predicted + (fitting - 1) * weights * 1.1)
        flag = "--gpu-memory-budget" if args.device == "cuda" else "--host-memory-budget"
        server, url = start_server(repo, Path(tmp) / "server.log", [flag, str(budget), "--log-level", "info"],
                                   timeout_s=120)
        try:
            sampler = DeviceSampler(args.device, url)
            baseline = sampler.used()
            print(f"{args.models} models of {weights / 2**20:.0f} MiB weights on {args.device}; "
                  f"budget {budget / 2**20:.0f} MiB ({fitting} fit)")

            # 1. swap-in times
            post(url, "m0")
            warm = min(post(url, "m0")[1] for _ in range(3))
            for index in range(1, fitting + 1):  # pushes m0 out (to the host tier on a GPU)
                post(url, f"m{index}")
            _, swapped_in = post(url, "m0")
            bare = bare_load_seconds(repo / "m0" / "1", args.device)
            tier = "host tier" if args.device == "cuda" else "disk"
            print(f"swap-in from the {tier}: {1000 * (swapped_in - warm):.1f} ms "
                  f"(first request {1000 * swapped_in:.1f} ms, warm {1000 * warm:.1f} ms); "
                  f"bare safetensors load {1000 * bare:.1f} ms; ratio to bare {(swapped_in - warm) / bare:.2f}x")

            # 2. Zipf stream
            weights_by_rank = [1 / (rank + 1) ** args.zipf for rank in range(args.models)]
            rng = random.Random(0)
            sent = failed = 0
            evictions_before = metric(url, "mmserver_model_evictions_total")
            deadline = time.monotonic() + 60 * args.minutes
            with sampler:
                while time.monotonic() < deadline:
                    model = f"m{rng.choices(range(args.models), weights_by_rank)[0]}"
                    status, _ = post(url, model)
                    sent += 1
                    failed += status != 200
            peak = max(sampler.samples) - (baseline if args.device == "cuda" else 0)
            evictions = metric(url, "mmserver_model_evictions_total") - evictions_before
            print(f"zipf({args.zipf}) stream for {args.minutes:g} min: {sent} requests, {failed} failed, "
                  f"{evictions:.0f} evictions; peak memory above baseline {peak / 2**20:.0f} MiB of a "
                  f"{budget / 2**20:.0f} MiB budget ({'within' if peak <= budget else 'OVER'})")

            # 3. back to baseline
            for index in range(args.models):
                urllib.request.urlopen(urllib.request.Request(
                    f"{url}/v2/repository/models/m{index}/unload", b"", method="POST"), timeout=120).read()
            time.sleep(1.0)
            left = sampler.used() - baseline
            print(f"after unloading every model: {left / 2**20:+.0f} MiB against the baseline (target +-64 MiB)")
            return 0 if failed == 0 and peak <= budget and abs(left) <= 64 * 2**20 else 1
        finally:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
