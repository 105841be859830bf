"""Unit tests of the metrics module: outcome labels, the off switch, scrape-time gauges and the
Triton-named aliases."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mmserver.errors import (
    ClientDisconnected,
    InferenceError,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
)
from mmserver.metrics import Metrics, ModelSnapshot, NoMetrics, ServerSnapshot, outcome_of


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_outcome_labels():
    assert outcome_of(InvalidInput("x")) == "invalid"
    assert outcome_of(PayloadTooLarge("x")) == "invalid"
    assert outcome_of(Overloaded("x")) == "rejected"
    assert outcome_of(ModelNotReady("x")) == "unavailable"
    assert outcome_of(InferenceTimeout("x")) == "timeout"
    assert outcome_of(ClientDisconnected("x")) == "cancelled"
    assert outcome_of(InferenceError("x")) == "error"
    assert outcome_of(ValueError("x")) == "error"


def test_disabled_metrics_record_nothing():
    metrics = Metrics(enabled=False)
    recorder = metrics.for_model("m", "1")
    assert isinstance(recorder, NoMetrics)
    recorder.request("success", 0.1)
    recorder.batch(4, [0.1], 0.2)
    assert not any(name.startswith("mmserver_inference") for name, _ in samples(metrics))


def test_scrape_time_gauges_read_the_snapshot():
    metrics = Metrics()
    metrics.set_snapshot(lambda: ServerSnapshot(
        [ModelSnapshot("a", "1", "READY", 3, {"cpu": 100}), ModelSnapshot("b", "2", "LOADING", 0)],
        {"cpu": 1000}, overheads={"cuda:0": 500},
    ))
    got = samples(metrics)
    a = (("model_name", "a"), ("model_version", "1"))
    assert got[("mmserver_queue_pending_requests", a)] == 3
    assert got[("mmserver_model_state", (*a, ("state", "READY")))] == 1
    assert got[("mmserver_model_state", (*a, ("state", "LOADING")))] == 0
    assert got[("mmserver_model_state", (("model_name", "b"), ("model_version", "2"), ("state", "LOADING")))] == 1
    assert got[("mmserver_memory_reserved_bytes", (("device", "cpu"), *a))] == 100
    assert got[("mmserver_memory_budget_bytes", (("device", "cpu"),))] == 1000
    assert got[("mmserver_memory_overhead_bytes", (("device", "cuda:0"),))] == 500


def test_triton_aliases_follow_our_counters():
    metrics = Metrics(triton_aliases=True)
    metrics.set_snapshot(lambda: ServerSnapshot([ModelSnapshot("a", "1", "READY", 2)], {},
                                                {"GPU-1": 80}, {"GPU-1": 30}))
    recorder = metrics.for_model("a", "1")
    for outcome in ("success", "success", "invalid", "error"):
        recorder.request(outcome, 0.002)
    recorder.batch(5, [0.001, 0.003], 0.004)
    got = samples(metrics)
    triton = (("model", "a"), ("version", "1"))
    assert got[("nv_inference_request_success", triton)] == 2
    assert got[("nv_inference_request_failure", triton)] == 2
    assert got[("nv_inference_count", triton)] == 5
    assert got[("nv_inference_exec_count", triton)] == 1
    assert round(got[("nv_inference_request_duration_us", triton)]) == 4000
    assert round(got[("nv_inference_queue_duration_us", triton)]) == 4000
    assert round(got[("nv_inference_compute_infer_duration_us", triton)]) == 4000
    assert got[("nv_inference_pending_request_count", triton)] == 2
    assert got[("nv_gpu_memory_total_bytes", (("gpu_uuid", "GPU-1"),))] == 80
    assert got[("nv_gpu_memory_used_bytes", (("gpu_uuid", "GPU-1"),))] == 30
