#!/usr/bin/env python3
"""Soak: mixed traffic against one server for a set time, counting every request's fate and
sampling the server's resident memory.

Trains a small repository (scikit-learn LogisticRegression and RandomForest, XGBoost, a spare
model for load/unload cycles, a small-queue model for overload bursts, and one deliberately
failing model built from ``tests/faulty_estimators.py``), starts ``python -m mmserver serve`` on
it and runs, all at once:

- good requests to several models, each answer checked against the in-process prediction;
- malformed requests (each must get a 4xx);
- requests to the failing model, a quarter of which make it raise (those must get 500);
- repository unloads and loads of the spare model, with requests to it in between;
- overload bursts of several times the burst model's queue (``max_queue``) at once;
- RSS of the server process, sampled every second (and the GPU memory in use, where NVML sees one).

Prints: requests sent, answered, shed with 429/503, lost (no answer at all: must be 0), 5xx other
than the failing model's and the shedding 503s (must be 0), wrong answers (must be 0), and RSS at
start (after warm-up), middle and end (flat within 10%). Exit status 1 when a must is broken.

    python benchmarks/soak.py [--duration 600] [--warmup 30] [--json result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving import start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
BURST_QUEUE = 8  # max_queue of the burst model
BURST_FACTOR = 5  # each burst sends this many times its queue at once
RAISE = 666.0  # faulty_estimators.RAISE: the failing model raises on it


@dataclass
class Result:
    duration_s: float = 0.0
    sent: int = 0
    answered: int = 0
    shed_429: int = 0
    shed_503: int = 0
    lost: int = 0
    unexpected_5xx: int = 0
    failing_model_500: int = 0
    wrong_answers: int = 0
    bad_not_4xx: int = 0
    loads: int = 0
    unloads: int = 0
    bursts: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    rss_start: int = 0
    rss_middle: int = 0
    rss_end: int = 0
    rss_max: int = 0
    gpu_used: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rss_drift(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start if self.rss_start else 0.0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.unexpected_5xx == 0 and self.wrong_answers == 0
                and self.bad_not_4xx == 0 and self.answered == self.sent)


# ----------------------------------------------------------------------------- the repository


def build_repo(root: Path) -> dict[str, tuple[list[list[float]], list]]:
    """Write the models; returns, per model, rows and what the model predicts for them."""
    sys.path.insert(0, str(TESTS))
    import joblib
    import xgboost as xgb
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    import faulty_estimators

    x, y = load_iris(return_X_y=True)
    rows = x[::10]
    expected = {}

    def sklearn_model(name: str, estimator, yaml: str = "") -> None:
        (root / name).mkdir(parents=True)
        (root / name / "model.yaml").write_text("runtime: sklearn\n" + yaml)
        joblib.dump(estimator, root / name / "model.joblib")
        expected[name] = (rows.tolist(), estimator.predict(rows).tolist())

    sklearn_model("iris", LogisticRegression(max_iter=500).fit(x, y))
    sklearn_model("forest", RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0).fit(x, y))
    sklearn_model("spare", LogisticRegression(C=0.3, max_iter=500).fit(x, y))
    sklearn_model("burst", RandomForestClassifier(n_estimators=60, random_state=1).fit(x, y),
                  f"batching:\n  max_batch_size: 1\n  max_queue: {BURST_QUEUE}\n")
    failing = faulty_estimators.FaultyClassifier().fit(x, (y > 0).astype(int))
    sklearn_model("failing", failing)
    booster = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1, random_state=0).fit(x, y)
    (root / "xgb").mkdir()
    booster.save_model(root / "xgb" / "model.json")
    expected["xgb"] = (rows.tolist(), booster.predict(rows).tolist())
    return expected


# ----------------------------------------------------------------------------- the server


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def gpu_used_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles) or None
    except Exception:  # no NVML, no GPU
        return None


# ----------------------------------------------------------------------------- the traffic


def body(rows: list[list[float]]) -> dict:
    return {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [len(rows), len(rows[0])],
                        "data": [v for row in rows for v in row]}], "outputs": [{"name": "predict"}]}


BAD_BODIES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"inputs": [', {}),
    (b'{"inputs": []}', {}),
    (b"[" * 5000, {}),
    (b'{"inputs":[{"name":"input-0","datatype":"FP64","shape":[1000000,1000000],"data":[1]}]}', {}),
    (b'{"inputs":[{"name":"input-0","datatype":"FP64","shape":[1,4],"data":[NaN,1,2,3]}]}', {}),
    (b'{"inputs":[{"name":"input-0","datatype":"INT8","shape":[1,4],"data":[1,2,3,300]}]}', {}),
    (b'{"inputs":[{"name":"input-0","datatype":"FP64","shape":[1,3],"data":[1,2,3]}]}', {}),
    (b'{"inputs":[{"name":"input-0","datatype":"FP64","shape":[1,4],"parameters":{"binary_data_size":64}}]}'
     + b"\0" * 32, {"Inference-Header-Content-Length": "84"}),
    (b'{"inputs":[{"name":"a\xff","datatype":"FP64","shape":[1,4],"data":[1,2,3,4]}]}', {}),
]


class Soak:
    def __init__(self, url: str, pid: int, expected: dict, duration: float, warmup: float, seed: int) -> None:
        self.url = url
        self.pid = pid
        self.expected = expected
        self.duration = duration
        self.warmup = warmup
        self.random = random.Random(seed)
        self.result = Result()
        self.statuses: Counter[str] = Counter()
        self.stop_at = 0.0
        self.rss: list[tuple[float, int]] = []

    def note(self, problem: str) -> None:
        if len(self.result.problems) < 20:
            self.result.problems.append(problem)

    async def send(self, client, model: str, payload, headers: dict | None = None, kind: str = "good"):
        """One request; returns the response, or None when it got no answer (lost)."""
        import httpx

        self.result.sent += 1
        try:
            if isinstance(payload, bytes):
                response = await client.post(f"{self.url}/v2/models/{model}/infer", content=payload,
                                             headers={"Content-Type": "application/json", **(headers or {})})
            else:
                response = await client.post(f"{self.url}/v2/models/{model}/infer", json=payload)
        except httpx.HTTPError as exc:
            self.result.lost += 1
            self.note(f"lost: {kind} request to {model}: {type(exc).__name__}: {exc}")
            return None
        self.result.answered += 1
        status = response.status_code
        self.statuses[str(status)] += 1
        if status == 429:
            self.result.shed_429 += 1
        elif status == 503:
            self.result.shed_503 += 1
        elif status >= 500:
            if model == "failing" and status == 500 and kind == "fault":
                self.result.failing_model_500 += 1
            else:
                self.result.unexpected_5xx += 1
                self.note(f"{status} from {model} ({kind}): {response.text[:200]}")
        return response

    def check_answer(self, model: str, response, rows_expected: list) -> None:
        if response is None or response.status_code != 200:
            return
        outputs = response.json()["outputs"]
        labels = next(o["data"] for o in outputs if o["name"] == "predict")
        if labels != rows_expected:
            self.result.wrong_answers += 1
            self.note(f"wrong answer from {model}: {labels} != {rows_expected}")

    async def good_client(self, client) -> None:
        models = ["iris", "forest", "xgb"]
        while time.monotonic() < self.stop_at:
            model = self.random.choice(models)
            rows, labels = self.expected[model]
            take = self.random.randint(1, len(rows))
            response = await self.send(client, model, body(rows[:take]))
            if response is not None and response.status_code not in (200, 429, 503):
                self.note(f"good request to {model} got {response.status_code}: {response.text[:200]}")
            self.check_answer(model, response, labels[:take])

    async def bad_client(self, client) -> None:
        while time.monotonic() < self.stop_at:
            payload, headers = self.random.choice(BAD_BODIES)
            response = await self.send(client, self.random.choice(["iris", "xgb", "forest"]), payload, headers, "bad")
            if response is not None and not 400 <= response.status_code < 500:
                self.result.bad_not_4xx += 1
                self.note(f"bad request got {response.status_code}: {payload[:60]!r}")
            await asyncio.sleep(0.002)

    async def failing_client(self, client) -> None:
        rows, _ = self.expected["failing"]
        while time.monotonic() < self.stop_at:
            fault = self.random.random() < 0.25
            sample = [list(r) for r in rows[:3]]
            if fault:
                sample[1][2] = RAISE
            response = await self.send(client, "failing", body(sample), kind="fault" if fault else "good")
            if response is not None and not fault and response.status_code != 200:
                self.note(f"a normal request to the failing model got {response.status_code}")
            await asyncio.sleep(0.005)

    async def repository_client(self, client) -> None:
        import httpx

        rows, labels = self.expected["spare"]
        while time.monotonic() < self.stop_at:
            for action in ("unload", "load"):
                try:
                    response = await client.post(f"{self.url}/v2/repository/models/spare/{action}")
                    if response.status_code != 200:
                        self.note(f"{action} of spare got {response.status_code}: {response.text[:200]}")
                    setattr(self.result, action + "s", getattr(self.result, action + "s") + 1)
                except httpx.HTTPError as exc:
                    self.note(f"{action} of spare got no answer: {exc}")
                for _ in range(5):  # 503 between an unload and a load; 200 after the load
                    response = await self.send(client, "spare", body(rows), kind="spare")
                    if response is not None and action == "load" and response.status_code != 200:
                        self.note(f"spare after its load got {response.status_code}")
                    self.check_answer("spare", response, labels)
                await client.post(f"{self.url}/v2/repository/index")
                await asyncio.sleep(0.3)

    async def bursts(self, client) -> None:
        rows, labels = self.expected["burst"]
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(1.5)
            self.result.bursts += 1
            responses = await asyncio.gather(*(self.send(client, "burst", body(rows[:1]), kind="burst")
                                               for _ in range(BURST_QUEUE * BURST_FACTOR)))
            for response in responses:
                self.check_answer("burst", response, labels[:1])

    async def sample_memory(self) -> None:
        started = time.monotonic()
        while time.monotonic() < self.stop_at:
            self.rss.append((time.monotonic() - started, rss_bytes(self.pid)))
            gpu = gpu_used_bytes()
            if gpu is not None:
                self.result.gpu_used.append(gpu)
            await asyncio.sleep(1.0)
        self.rss.append((time.monotonic() - started, rss_bytes(self.pid)))

    async def run(self, good_clients: int = 6) -> Result:
        import httpx

        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for model in ("iris", "forest", "xgb", "burst", "failing"):  # warm every path once
                await client.post(f"{self.url}/v2/models/{model}/infer", json=body(self.expected[model][0][:2]))
            started = time.monotonic()
            self.stop_at = started + self.duration
            tasks = [self.good_client(client) for _ in range(good_clients)]
            tasks += [self.bad_client(client), self.failing_client(client), self.repository_client(client),
                      self.bursts(client), self.sample_memory()]
            await asyncio.gather(*tasks)
            self.result.duration_s = time.monotonic() - started
        self.summarise_memory()
        self.result.statuses = dict(sorted(self.statuses.items()))
        return self.result

    def summarise_memory(self) -> None:
        after = [rss for t, rss in self.rss if t >= self.warmup] or [self.rss[-1][1]]
        self.result.rss_start = after[0]
        self.result.rss_middle = after[len(after) // 2]
        self.result.rss_end = after[-1]
        self.result.rss_max = max(rss for _, rss in self.rss)


def run(duration: float, warmup: float, workdir: Path, seed: int = 0, server_args: list[str] | None = None) -> Result:
    """Build the repository under ``workdir``, start a server, soak it, stop it."""
    repo = workdir / "repo"
    expected = build_repo(repo)
    process, url = start_server(repo, workdir / "server.log", ["--model-control-mode", "explicit", *(server_args or [])],
                                env={"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"})
    try:
        result = asyncio.run(Soak(url, process.pid, expected, duration, warmup, seed).run())
        if process.poll() is not None:
            result.problems.append(f"the server exited with {process.returncode}")
            result.lost += 1
    finally:
        stop_server(process)
    log = (workdir / "server.log").read_text(errors="replace")
    if "Traceback" in log:
        result.problems.append("the server log has a traceback")
    return result


def report(result: Result) -> str:
    mib = 1024 * 1024
    lines = [
        f"duration            {result.duration_s:.0f} s",
        f"requests sent       {result.sent}",
        f"answered            {result.answered}",
        f"shed (429 / 503)    {result.shed_429} / {result.shed_503}",
        f"lost                {result.lost}   (must be 0)",
        f"5xx, unexpected     {result.unexpected_5xx}   (must be 0)",
        f"500, failing model  {result.failing_model_500}   (deliberate)",
        f"wrong answers       {result.wrong_answers}   (must be 0)",
        f"bad requests not 4xx {result.bad_not_4xx}   (must be 0)",
        f"loads / unloads     {result.loads} / {result.unloads};  bursts {result.bursts} x {BURST_QUEUE * BURST_FACTOR}",
        f"statuses            {result.statuses}",
        f"RSS start/mid/end   {result.rss_start / mib:.1f} / {result.rss_middle / mib:.1f} / "
        f"{result.rss_end / mib:.1f} MiB  (drift {result.rss_drift:+.1%}, max {result.rss_max / mib:.1f} MiB)",
    ]
    if result.gpu_used:
        lines.append(f"GPU memory used     {result.gpu_used[0] / mib:.0f} -> {result.gpu_used[-1] / mib:.0f} MiB")
    lines += [f"problem: {p}" for p in result.problems]
    lines.append("OK" if result.ok and abs(result.rss_drift) <= 0.10 else "NOT OK")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the RSS baseline (default: 10%% of the duration, at most 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 10)
    with tempfile.TemporaryDirectory(prefix="mmserver-soak-") as folder:
        result = run(args.duration, warmup, Path(folder), args.seed)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "rss_drift": result.rss_drift}, indent=2))
    return 0 if result.ok and abs(result.rss_drift) <= 0.10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
