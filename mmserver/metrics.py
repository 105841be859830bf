"""Every Prometheus metric the server exports, in its own registry (vLLM clears collectors in the
global one when an engine starts).

Counters and histograms are updated on the request path through children bound once per model
version (``ModelMetrics``), so a request costs a few lock-protected increments. Gauges (queue
depth, model state, memory) and the optional Triton-named aliases are computed when Prometheus
scrapes, from a snapshot the manager provides, so they cost the request path nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import (
    ClientDisconnected,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)

MODEL_LABELS = ("model_name", "model_version")
OUTCOMES = ("success", "invalid", "rejected", "unavailable", "timeout", "cancelled", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATES = ("UNAVAILABLE", "LOADING", "READY", "UNLOADING")


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label for a request that ended with ``error``."""
    if isinstance(error, (InvalidInput, PayloadTooLarge)):
        return "invalid"
    if isinstance(error, Overloaded):
        return "rejected"
    if isinstance(error, ModelNotReady):
        return "unavailable"
    if isinstance(error, InferenceTimeout):
        return "timeout"
    if isinstance(error, ClientDisconnected):
        return "cancelled"
    return "error"


@dataclass(slots=True)
class ModelSnapshot:
    """What the scrape-time gauges need to know about one model version."""

    name: str
    version: str
    state: str
    pending: int
    memory: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ServerSnapshot:
    models: list[ModelSnapshot]
    budgets: dict[str, int]
    device_totals: dict[str, int] = field(default_factory=dict)
    device_used: dict[str, int] = field(default_factory=dict)


class ModelMetrics:
    """The metric children of one model version, bound once so the request path only increments."""

    def __init__(self, metrics: Metrics, name: str, version: str) -> None:
        labels = (name, version)
        self._requests = {o: metrics.requests.labels(*labels, o) for o in OUTCOMES}
        self._request_duration = metrics.request_duration.labels(*labels)
        self._queue_duration = metrics.queue_duration.labels(*labels)
        self._compute_duration = metrics.compute_duration.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._items = metrics.items.labels(*labels)
        self._batches = metrics.batches.labels(*labels)
        self._load_duration = metrics.load_duration.labels(*labels)
        self._evictions = metrics.evictions.labels(*labels)

    def request(self, outcome: str, seconds: float) -> None:
        """One request answered (``success`` requests also feed the latency histogram)."""
        self._requests[outcome].inc()
        if outcome == "success":
            self._request_duration.observe(seconds)

    def batch(self, rows: int, queue_waits: Iterable[float], compute_seconds: float) -> None:
        """One model call: its rows, how long each of its requests queued, how long it computed."""
        self._batches.inc()
        self._items.inc(rows)
        self._batch_size.observe(rows)
        self._compute_duration.observe(compute_seconds)
        for wait in queue_waits:
            self._queue_duration.observe(wait)

    def loaded(self, seconds: float) -> None:
        self._load_duration.observe(seconds)

    def evicted(self) -> None:
        self._evictions.inc()


class NoMetrics(ModelMetrics):
    """Stands in for ``ModelMetrics`` when metrics are turned off: records nothing."""

    def __init__(self) -> None:  # noqa: D107 - nothing to bind
        pass

    def request(self, outcome: str, seconds: float) -> None:
        pass

    def batch(self, rows: int, queue_waits: Iterable[float], compute_seconds: float) -> None:
        pass

    def loaded(self, seconds: float) -> None:
        pass

    def evicted(self) -> None:
        pass


class Metrics:
    """The server's metric families and its registry."""

    def __init__(self, enabled: bool = True, triton_aliases: bool = False) -> None:
        self.enabled = enabled
        disable_created_metrics()  # the *_created series only clutter every scrape
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.requests = Counter(
            "mmserver_inference_requests", "Inference requests answered, by outcome.",
            [*MODEL_LABELS, "outcome"], registry=reg)
        self.items = Counter(
            "mmserver_inference_items", "Rows (first-dimension items) computed.", MODEL_LABELS, registry=reg)
        self.batches = Counter(
            "mmserver_inference_batches", "Model calls (batches) executed.", MODEL_LABELS, registry=reg)
        self.request_duration = Histogram(
            "mmserver_inference_request_duration_seconds",
            "Time from receiving a request to its response, successful requests.",
            MODEL_LABELS, buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_duration = Histogram(
            "mmserver_inference_queue_duration_seconds", "Time a request waited in its model's queue.",
            MODEL_LABELS, buckets=LATENCY_BUCKETS, registry=reg)
        self.compute_duration = Histogram(
            "mmserver_inference_compute_duration_seconds", "Time of one model call (a whole batch).",
            MODEL_LABELS, buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram(
            "mmserver_inference_batch_size", "Rows per model call.", MODEL_LABELS,
            buckets=BATCH_BUCKETS, registry=reg)
        self.load_duration = Histogram(
            "mmserver_model_load_duration_seconds", "Time to load a model.", MODEL_LABELS,
            buckets=LOAD_BUCKETS, registry=reg)
        self.evictions = Counter(
            "mmserver_model_evictions", "Models evicted to make room.", MODEL_LABELS, registry=reg)
        self._snapshot: Callable[[], ServerSnapshot] = lambda: ServerSnapshot([], {})
        reg.register(_ScrapeTimeGauges(self))
        if triton_aliases:
            reg.register(_TritonAliases(self))

    def for_model(self, name: str, version: str) -> ModelMetrics:
        """Bound metrics for one model version (a recorder of nothing when metrics are off)."""
        return ModelMetrics(self, name, version) if self.enabled else NoMetrics()

    def set_snapshot(self, snapshot: Callable[[], ServerSnapshot]) -> None:
        """Where the scrape-time gauges read the server's state."""
        self._snapshot = snapshot

    def snapshot(self) -> ServerSnapshot:
        return self._snapshot()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _ScrapeTimeGauges(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot()
        pending = GaugeMetricFamily(
            "mmserver_queue_pending_requests", "Requests waiting in the model's queue.", labels=MODEL_LABELS)
        state = GaugeMetricFamily(
            "mmserver_model_state", "1 for the model's current state, 0 for the others.",
            labels=[*MODEL_LABELS, "state"])
        reserved = GaugeMetricFamily(
            "mmserver_memory_reserved_bytes", "Bytes a model holds on a device.",
            labels=[*MODEL_LABELS, "device"])
        for model in snap.models:
            labels = [model.name, model.version]
            pending.add_metric(labels, model.pending)
            for name in STATES:
                state.add_metric([*labels, name], 1.0 if model.state == name else 0.0)
            for device, size in model.memory.items():
                reserved.add_metric([*labels, device], size)
        budget = GaugeMetricFamily(
            "mmserver_memory_budget_bytes", "Memory budget per device.", labels=["device"])
        for device, size in snap.budgets.items():
            budget.add_metric([device], size)
        yield from (pending, state, reserved, budget)


class _TritonAliases(Collector):
    """Triton's metric names, derived at scrape time, so Triton dashboards and HPA recipes work."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        success = _TritonCounter("nv_inference_request_success", "Successful requests.")
        failure = _TritonCounter("nv_inference_request_failure", "Failed requests.")
        by_model: dict[tuple[str, str], list[float]] = {}
        for sample in _samples(self.metrics.requests, "_total"):
            key = (sample.labels["model_name"], sample.labels["model_version"])
            counts = by_model.setdefault(key, [0.0, 0.0])
            counts[0 if sample.labels["outcome"] == "success" else 1] += sample.value
        for key, (ok, failed) in by_model.items():
            success.add(key, ok)
            failure.add(key, failed)
        yield success
        yield failure
        yield _renamed(self.metrics.items, "_total", "nv_inference_count", "Inferences performed (rows).")
        yield _renamed(self.metrics.batches, "_total", "nv_inference_exec_count", "Model executions (batches).")
        for source, name in (
            (self.metrics.request_duration, "nv_inference_request_duration_us"),
            (self.metrics.queue_duration, "nv_inference_queue_duration_us"),
            (self.metrics.compute_duration, "nv_inference_compute_infer_duration_us"),
        ):
            yield _renamed(source, "_sum", name, "Cumulative microseconds.", scale=1e6)
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Pending requests.", labels=["model", "version"])
        snap = self.metrics.snapshot()
        for model in snap.models:
            pending.add_metric([model.name, model.version], model.pending)
        yield pending
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU memory.", labels=["gpu_uuid"])
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU memory used.", labels=["gpu_uuid"])
        for device, size in snap.device_totals.items():
            total.add_metric([device], size)
        for device, size in snap.device_used.items():
            used.add_metric([device], size)
        yield total
        yield used


class _TritonCounter(Metric):
    """A Triton counter under its exact name. Triton's counters carry no ``_total`` suffix, which
    the client library adds to any counter, so they are exposed untyped (rate() works alike)."""

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc, "untyped")
        self.exact_name = name

    def add(self, key: tuple[str, str], value: float) -> None:
        self.add_sample(self.exact_name, {"model": key[0], "version": key[1]}, value)


def _samples(metric: Counter | Histogram, suffix: str):
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


def _renamed(metric: Counter | Histogram, suffix: str, name: str, doc: str, scale: float = 1.0) -> Metric:
    family = _TritonCounter(name, doc)
    for sample in _samples(metric, suffix):
        family.add((sample.labels["model_name"], sample.labels["model_version"]), sample.value * scale)
    return family
