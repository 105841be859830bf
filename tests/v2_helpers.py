"""Small helpers shared by the end-to-end tests: V2 request bodies, /metrics scraping, and how
long the health probe waits while a heavy request runs."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

#: one client for the many plain-HTTP calls to servers under test: ``httpx.get`` and friends
#: build a new client per call, and with it a TLS context (~50 ms here)
LOCAL = httpx.Client(timeout=30.0)


def body(rows: np.ndarray, **parameters) -> dict:
    """A JSON V2 request with one FP64 ``input-0`` tensor."""
    doc = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(rows.shape),
                       "data": rows.ravel().tolist()}]}
    if parameters:
        doc["parameters"] = parameters
    return doc


def binary_request(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 request with ``rows`` as binary FP64 data (decodes at once, however large)."""
    data = np.ascontiguousarray(rows, dtype="<f8")
    header = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(data.shape),
                                     "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    return header + data.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(LOCAL.get(f"{url}/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def live_while(url: str, request: threading.Thread) -> float:
    """The longest ``/v2/health/live`` took while ``request`` (started here) was in progress."""
    request.start()
    worst = 0.0
    with httpx.Client(timeout=60.0) as client:
        while request.is_alive():
            started = time.perf_counter()
            assert client.get(f"{url}/v2/health/live").status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.01)
    request.join()
    return worst
