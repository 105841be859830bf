"""Tokens/s through mmserver versus the same vLLM engine driven directly, at 1 and 16 streams.

    python benchmarks/vllm_throughput.py [--model FOLDER] [--tokens 256] [--streams 1 16] [--rounds 3]

Without ``--model`` it builds the tests' tiny random Llama (hidden 64, 2 layers, head size 32,
4096 positions); any Hugging Face folder vLLM serves works. Both sides run the engine with the
options the vllm runtime derives from an empty ``model.yaml`` (same KV cache, max_num_seqs,
dtype, eager mode), every request streams ``--tokens`` tokens (``ignore_eos``, greedy):

- direct: ``AsyncLLM.generate`` in this process, ``--streams`` concurrent requests;
- mmserver: ``python -m mmserver serve`` on a repository holding only that model, driven by
  ``--streams`` concurrent clients over HTTP: ``/v1/completions`` with ``stream: true`` (server-
  sent events) and without (one JSON body), token counts from the response's ``usage``.

The engine and the server run side by side; rounds alternate between direct, SSE and JSON (after
a warm-up round of each), so that other load on the machine falls on all three alike. Each
figure is the median over ``--rounds`` rounds of generated tokens divided by the round's wall
time. The ratio mmserver/direct should be at least 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from serving import bench_model, start_server, stop_server, tiny_builder

PROMPT = "the quick dog ran along the river with seven bright stones"


# ----------------------------------------------------------------------------- the two drivers


async def start_direct(model: Path) -> tuple[object, list[int]]:
    """The engine the vllm runtime would start for ``model`` (same arguments, on the device the
    server places it on: the first GPU if there is one), in this process."""
    from mmserver.spec import ModelConfig, ModelSpec
    from mmserver_vllm import engine as vllm_engine
    from mmserver_vllm.options import Options

    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # where the server places it too
    spec = ModelSpec("bench", "1", model, "vllm", ModelConfig(), "benchmark")
    args = vllm_engine._engine_args(spec, Options.parse(model, device, {}, None))
    engine = await asyncio.to_thread(lambda: vllm_engine.AsyncLLM.from_engine_args(args))
    return engine, engine.get_tokenizer().encode(PROMPT)


def direct_driver(engine, ids: list[int], tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    counter = 0

    async def one() -> int:
        nonlocal counter
        counter += 1
        count = 0
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"r{counter}"):
            count += sum(len(o.token_ids) for o in out.outputs)
        return count

    return one


def server_driver(client, tokens: int, stream: bool):
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})

    async def one() -> int:
        if not stream:
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]
        usage = None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        return usage["completion_tokens"]

    return one


async def tokens_per_second(one, streams: int) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(counts) / (time.perf_counter() - started)


async def measure(model: Path, url: str, streams: list[int], tokens: int, rounds: int) -> dict[str, dict[int, float]]:
    """Rounds alternate between the drivers, so that load from other processes on the machine
    falls on all of them alike; each figure is the median of its rounds."""
    import statistics

    import httpx

    engine, ids = await start_direct(model)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results: dict[str, dict[int, float]] = {"direct": {}, "sse": {}, "json": {}}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            drivers = {"direct": direct_driver(engine, ids, tokens), "sse": server_driver(client, tokens, True),
                       "json": server_driver(client, tokens, False)}
            for n in streams:
                samples: dict[str, list[float]] = {name: [] for name in drivers}
                for name, one in drivers.items():  # warm-up
                    await tokens_per_second(one, n)
                for _ in range(rounds):
                    for name, one in drivers.items():
                        samples[name].append(await tokens_per_second(one, n))
                for name in drivers:
                    results[name][n] = statistics.median(samples[name])
                    print(f"{n:>3} streams {name:>6}: " + ", ".join(f"{v:.0f}" for v in samples[name]), flush=True)
    finally:
        engine.shutdown()
    return results


# ----------------------------------------------------------------------------- through mmserver


def run(coroutine):
    """Drive the direct engine on uvloop, like the server (and vLLM's own API server)."""
    try:
        import uvloop

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face folder (default: the tiny test Llama)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16], help="concurrent requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-log", type=Path, help="keep the server's log here (default: a temporary folder)")
    args = parser.parse_args()
    for key, value in {"VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = bench_model(repo, args.model,
                            tiny_builder("build_generator", seed=2, max_positions=4096, chat_template=True))
        print(f"model {args.model or 'tiny random Llama'}; {args.tokens} tokens per request; "
              f"median of {args.rounds} rounds", flush=True)

        log = args.server_log or Path(tmp) / "server.log"
        process, url = start_server(repo, log, ready_path="/v2/models/bench/ready", timeout_s=300)
        try:
            results = run(measure(model, url, args.streams, args.tokens, args.rounds))
        finally:
            stop_server(process)
    direct, streamed, whole = results["direct"], results["sse"], results["json"]

    print(f"\n{'streams':>7}  {'direct tok/s':>12}  {'mmserver SSE':>12}  {'ratio':>6}  {'mmserver JSON':>13}  {'ratio':>6}")
    worst = float("inf")
    for n in args.streams:
        sse_ratio, json_ratio = streamed[n] / direct[n], whole[n] / direct[n]
        worst = min(worst, sse_ratio, json_ratio)
        print(f"{n:>7}  {direct[n]:>12.0f}  {streamed[n]:>12.0f}  {sse_ratio:>6.2f}  {whole[n]:>13.0f}  {json_ratio:>6.2f}")
    print(f"\nworst ratio {worst:.2f} (target: at least 0.90)")


if __name__ == "__main__":
    main()
