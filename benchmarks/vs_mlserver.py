#!/usr/bin/env python3
"""mmserver vs Seldon MLServer on the same models, same machine, same run.

Runs ``../shared/bench/compare_mlserver.py`` (it trains iris-lr, rf-20, rf-20-batch and xgb-20 into
an MLServer-format repository, serves it with MLServer and then with mmserver, and drives both
with ``loadgen.py``), then checks the foundation's speed targets on its results: at concurrency
8 and 64, single-row requests to iris-lr, rf-20 and xgb-20 reach at least 5x MLServer's req/s
with at most a fifth of its p99 latency.

    python benchmarks/vs_mlserver.py [--duration 10] [--bench-dir ../shared/bench]

Prints the ratio table and one line per target; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MODELS = ("iris-lr", "rf-20", "xgb-20")
TARGET_CONCURRENCY = (8, 64)
MIN_THROUGHPUT_RATIO = 5.0
MIN_P99_RATIO = 5.0  # MLServer's p99 / ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench-dir", type=Path, default=ROOT.parent / "shared" / "bench")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--models", default="iris-lr,rf-20,rf-20-batch,xgb-20")
    parser.add_argument("--workdir", default=str(ROOT / ".bench"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        subprocess.run(
            [sys.executable, str(args.bench_dir / "compare_mlserver.py"),
             "--mmserver", f"{sys.executable} -m mmserver serve {{repo}} --port {{port}}",
             "--duration", str(args.duration), "--concurrency", args.concurrency,
             "--models", args.models, "--workdir", args.workdir, "--json", str(results)],
            check=True,
        )
        rows = [json.loads(line) for line in results.read_text().splitlines()]

    point = {(r["server"], r["model"], r["concurrency"]): r for r in rows}
    missed = 0
    for model in TARGET_MODELS:
        for conc in TARGET_CONCURRENCY:
            peer, ours = point.get(("mlserver", model, conc)), point.get(("mmserver", model, conc))
            if peer is None or ours is None:
                continue
            speed = ours["throughput_rps"] / max(peer["throughput_rps"], 1e-9)
            tail = peer["latency_ms"]["p99"] / max(ours["latency_ms"]["p99"], 1e-9)
            ok = speed >= MIN_THROUGHPUT_RATIO and tail >= MIN_P99_RATIO and not ours["errors"]
            missed += not ok
            print(f"{'PASS' if ok else 'MISS'} {model:8s} c={conc:<3d} req/s {speed:5.2f}x "
                  f"(target {MIN_THROUGHPUT_RATIO}x)  p99 {tail:5.2f}x lower (target {MIN_P99_RATIO}x)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
