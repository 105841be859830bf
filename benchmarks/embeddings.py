"""What OpenAI's ``/v1/embeddings`` costs over V2 infer, on the same embedding model and texts.

    python benchmarks/embeddings.py [--model FOLDER] [--texts 8] [--concurrency 1 8] [--duration 5] [--rounds 3]

Without ``--model`` it builds the tests' tiny random BERT embedder (hidden 32, 2 layers); any
Hugging Face encoder folder works. One server serves it (``task: embedding``); closed-loop clients
send the same ``--texts`` texts per request through three routes, alternating rounds so that
other load on the machine falls on all of them alike:

- ``v2``: ``POST /v2/models/bench/infer`` with a BYTES ``text`` input (the baseline);
- ``float``: ``POST /v1/embeddings`` with ``encoding_format: float``;
- ``base64``: ``POST /v1/embeddings`` as the official client sends it (``base64``).

Each figure is the median over ``--rounds`` rounds of requests per second; the ratios are each
OpenAI variant over V2 (the route's own work: holding the model while it splits the inputs into
V2 requests, and shaping the answer). The target is at least 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from serving import bench_model, start_server, stop_server, tiny_builder

WORDS = "the quick dog ran along the river with seven bright stones and a light green queue".split()


def texts(count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 5)) for i in range(count)]


def senders(client, batch: list[str]) -> dict[str, Callable[[], Awaitable[None]]]:
    v2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(batch)], "data": batch}]}

    def post(path: str, body: dict) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            response = await client.post(path, json=body)
            response.raise_for_status()
        return send

    return {
        "v2": post("/v2/models/bench/infer", v2),
        "float": post("/v1/embeddings", {"model": "bench", "input": batch, "encoding_format": "float"}),
        "base64": post("/v1/embeddings", {"model": "bench", "input": batch, "encoding_format": "base64"}),
    }


async def rate(send: Callable[[], Awaitable[None]], concurrency: int, duration: float) -> float:
    """Requests per second from ``concurrency`` closed-loop clients over ``duration`` seconds."""
    done = 0
    end = time.perf_counter() + duration

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await send()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def measure(url: str, batch: list[str], levels: list[int], duration: float,
                  rounds: int) -> dict[str, dict[int, float]]:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results: dict[str, dict[int, float]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        routes = senders(client, batch)
        for send in routes.values():  # warm-up
            await rate(send, 1, 0.5)
        for n in levels:
            samples: dict[str, list[float]] = {name: [] for name in routes}
            for _ in range(rounds):
                for name, send in routes.items():
                    samples[name].append(await rate(send, n, duration))
            for name, values in samples.items():
                results.setdefault(name, {})[n] = statistics.median(values)
                print(f"c={n:<3} {name:>6}: " + ", ".join(f"{v:.0f}" for v in values) + " req/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face encoder folder (default: the tiny test BERT)")
    parser.add_argument("--texts", type=int, default=8, help="texts per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round and route")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        model = bench_model(repo, args.model, tiny_builder("build_embedder"))
        (model / "model.yaml").write_text("parameters: {task: embedding}\n")
        print(f"model {args.model or 'tiny random BERT'}; {args.texts} texts per request; "
              f"median of {args.rounds} rounds of {args.duration:g} s", flush=True)
        process, url = start_server(repo, Path(tmp) / "server.log", ready_path="/v2/models/bench/ready")
        try:
            results = asyncio.run(measure(url, texts(args.texts), args.concurrency, args.duration, args.rounds))
        finally:
            stop_server(process)

    print(f"\n{'c':>3}  {'v2 req/s':>9}  {'float':>8}  {'ratio':>6}  {'base64':>8}  {'ratio':>6}")
    worst = float("inf")
    for n in args.concurrency:
        base = results["v2"][n]
        ratios = [results[name][n] / base for name in ("float", "base64")]
        worst = min(worst, *ratios)
        print(f"{n:>3}  {base:>9.0f}  {results['float'][n]:>8.0f}  {ratios[0]:>6.2f}  "
              f"{results['base64'][n]:>8.0f}  {ratios[1]:>6.2f}")
    print(f"\nworst ratio {worst:.2f} (target: at least 0.90)")


if __name__ == "__main__":
    main()
