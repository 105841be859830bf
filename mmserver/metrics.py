"""Every Prometheus metric the server exports, in its own registry (vLLM clears collectors in the
global one when an engine starts).

Requests are recorded on the event loop thread only (the inference route and each model's batch
worker run there), so the request path accumulates into plain per-model numbers, without the
locks of prometheus_client's metric objects (those cost a measurable share of a small model's
request). A collector turns the numbers into metric families when Prometheus scrapes, together
with the gauges read from the manager's snapshot (queue depth, model state, memory) and, when
enabled, the Triton-named aliases.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import (
    ClientDisconnected,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)

MODEL_LABELS = ["model_name", "model_version"]
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


class Distribution:
    """A histogram's numbers: count per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations <= bound), ending with +Inf."""
        buckets, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return buckets


class ModelMetrics:
    """The numbers of one model version. Call only from the event loop thread."""

    def __init__(self, name: str, version: str) -> None:
        self.labels = [name, version]
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.items = 0
        self.batches = 0
        self.evictions = 0
        self.request_duration = Distribution(LATENCY_BUCKETS)
        self.queue_duration = Distribution(LATENCY_BUCKETS)
        self.compute_duration = Distribution(LATENCY_BUCKETS)
        self.batch_size = Distribution(BATCH_BUCKETS)
        self.load_duration = Distribution(LOAD_BUCKETS)

    def request(self, outcome: str, seconds: float) -> None:
        """One request answered (``success`` requests also feed the latency histogram)."""
        self.requests[outcome] += 1
        if outcome == "success":
            self.request_duration.observe(seconds)

    def batch(self, rows: int, queue_waits: Iterable[float], compute_seconds: float) -> None:
        """One model call: its rows, how long each of its requests queued, how long it computed."""
        self.batches += 1
        self.items += rows
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_seconds)
        for wait in queue_waits:
            self.queue_duration.observe(wait)

    def loaded(self, seconds: float) -> None:
        self.load_duration.observe(seconds)

    def evicted(self) -> None:
        self.evictions += 1


class NoMetrics(ModelMetrics):
    """Stands in for ``ModelMetrics`` when metrics are turned off: records nothing."""

    def __init__(self) -> None:
        super().__init__("", "")

    def request(self, outcome: str, seconds: float) -> None:
        pass

    def batch(self, rows: int, queue_waits: Iterable[float], compute_seconds: float) -> None:
        pass

    def loaded(self, seconds: float) -> None:
        pass

    def evicted(self) -> None:
        pass


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
    overheads: dict[str, int] = field(default_factory=dict)  # device -> bytes held outside any model


class Metrics:
    """The per-model numbers and the registry that exposes them."""

    def __init__(self, enabled: bool = True, triton_aliases: bool = False) -> None:
        self.enabled = enabled
        self.models: dict[tuple[str, str], ModelMetrics] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot: Callable[[], ServerSnapshot] = lambda: ServerSnapshot([], {})
        self.registry.register(_ModelCollector(self))
        if triton_aliases:
            self.registry.register(_TritonAliases(self))

    def for_model(self, name: str, version: str) -> ModelMetrics:
        """The numbers of one model version (kept across reloads; a no-op recorder when off)."""
        if not self.enabled:
            return NoMetrics()
        key = (name, version)
        if key not in self.models:
            self.models[key] = ModelMetrics(name, version)
        return self.models[key]

    def keep_only(self, name: str, versions: Iterable[str]) -> None:
        """Stop exporting the versions of ``name`` not in ``versions`` (their folders are gone), so
        that series do not pile up as a repository publishes versions (a version that comes back
        starts from zero: a counter reset)."""
        kept = set(versions)
        for key in [k for k in self.models if k[0] == name and k[1] not in kept]:
            del self.models[key]

    def set_snapshot(self, snapshot: Callable[[], ServerSnapshot]) -> None:
        """Where the scrape-time gauges read the server's state."""
        self._snapshot = snapshot

    def snapshot(self) -> ServerSnapshot:
        return self._snapshot()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _counter(name: str, doc: str, values: Iterable[tuple[list[str], float]], labels=MODEL_LABELS) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def _histogram(name: str, doc: str, models: Iterable[ModelMetrics], pick: Callable[[ModelMetrics], Distribution]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=MODEL_LABELS)
    for model in models:
        dist = pick(model)
        family.add_metric(model.labels, dist.cumulative(), dist.sum)
    return family


class _ModelCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        models = list(self.metrics.models.values())
        yield _counter("mmserver_inference_requests", "Inference requests answered, by outcome.",
                       [([*m.labels, o], m.requests[o]) for m in models for o in OUTCOMES],
                       labels=[*MODEL_LABELS, "outcome"])
        yield _counter("mmserver_inference_items", "Rows (first-dimension items) computed.",
                       ((m.labels, m.items) for m in models))
        yield _counter("mmserver_inference_batches", "Model calls (batches) executed.",
                       ((m.labels, m.batches) for m in models))
        yield _counter("mmserver_model_evictions", "Models evicted to make room.",
                       ((m.labels, m.evictions) for m in models))
        yield _histogram("mmserver_inference_request_duration_seconds",
                         "Time from receiving a request to its response, successful requests.",
                         models, lambda m: m.request_duration)
        yield _histogram("mmserver_inference_queue_duration_seconds",
                         "Time a request waited in its model's queue.", models, lambda m: m.queue_duration)
        yield _histogram("mmserver_inference_compute_duration_seconds",
                         "Time of one model call (a whole batch).", models, lambda m: m.compute_duration)
        yield _histogram("mmserver_inference_batch_size", "Rows per model call.", models, lambda m: m.batch_size)
        yield _histogram("mmserver_model_load_duration_seconds", "Time to load a model.",
                         models, lambda m: m.load_duration)
        yield from _gauges(self.metrics.snapshot())


def _gauges(snap: ServerSnapshot) -> Iterator[Metric]:
    pending = GaugeMetricFamily(
        "mmserver_queue_pending_requests",
        "Requests waiting in the model's queue or for its load (in flight, for engines that batch themselves).",
        labels=MODEL_LABELS)
    state = GaugeMetricFamily(
        "mmserver_model_state", "1 for the model's current state, 0 for the others.",
        labels=[*MODEL_LABELS, "state"])
    reserved = GaugeMetricFamily(
        "mmserver_memory_reserved_bytes", "Bytes a model holds on a device.", labels=[*MODEL_LABELS, "device"])
    for model in snap.models:
        labels = [model.name, model.version]
        pending.add_metric(labels, model.pending)
        for name in STATES:
            state.add_metric([*labels, name], 1.0 if model.state == name else 0.0)
        for device, size in model.memory.items():
            reserved.add_metric([*labels, device], size)
    budget = GaugeMetricFamily("mmserver_memory_budget_bytes", "Memory budget per device.", labels=["device"])
    for device, size in snap.budgets.items():
        budget.add_metric([device], size)
    overhead = GaugeMetricFamily(
        "mmserver_memory_overhead_bytes", "Bytes the runtimes hold on a device outside any model (CUDA contexts).",
        labels=["device"])
    for device, size in snap.overheads.items():
        overhead.add_metric([device], size)
    yield from (pending, state, reserved, budget, overhead)


class _TritonAliases(Collector):
    """Triton's metric names, derived at scrape time, so Triton dashboards and HPA recipes work."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        models = list(self.metrics.models.values())
        counters: list[tuple[str, str, Callable[[ModelMetrics], float]]] = [
            ("nv_inference_request_success", "Successful requests.", lambda m: m.requests["success"]),
            ("nv_inference_request_failure", "Failed requests.",
             lambda m: sum(m.requests.values()) - m.requests["success"]),
            ("nv_inference_count", "Inferences performed (rows).", lambda m: m.items),
            ("nv_inference_exec_count", "Model executions (batches).", lambda m: m.batches),
            ("nv_inference_request_duration_us", "Cumulative request time, microseconds.",
             lambda m: m.request_duration.sum * 1e6),
            ("nv_inference_queue_duration_us", "Cumulative queue time, microseconds.",
             lambda m: m.queue_duration.sum * 1e6),
            ("nv_inference_compute_infer_duration_us", "Cumulative compute time, microseconds.",
             lambda m: m.compute_duration.sum * 1e6),
        ]
        for name, doc, pick in counters:
            # Triton's counters carry no _total suffix, which the client library adds to any
            # counter, so they are exposed untyped (rate() works alike).
            family = Metric(name, doc, "untyped")
            for model in models:
                family.add_sample(name, {"model": model.labels[0], "version": model.labels[1]}, pick(model))
            yield family
        snap = self.metrics.snapshot()
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count", "Pending requests.", labels=["model", "version"])
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
