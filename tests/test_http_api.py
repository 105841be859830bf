"""End-to-end tests of the V2 REST API: the real server, real models, real HTTP (httpx).

Every inference result is compared with what the framework computed in-process on the same rows
(see ``conftest.build_model_repo``). Tests that change the server's state run against
``private_server``, a second server on its own copy of the repository.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

JSON_TYPE = "application/json"
NUMPY = {"INT64": np.int64, "FP32": np.float32, "FP64": np.float64}
FLOAT_RTOL = {"FP32": 1e-6, "FP64": 1e-12}


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


#: the exact V2 model metadata of every model that loads (name added per test)
METADATA: dict[str, dict[str, Any]] = {
    "iris": {
        "versions": ["1", "2"],
        "platform": "sklearn",
        "inputs": [tensor("input-0", "FP64", [-1, 4])],
        "outputs": [tensor("predict", "INT64", [-1]), tensor("predict_proba", "FP64", [-1, 3])],
    },
    "rf-20": {
        "versions": ["1"],
        "platform": "sklearn",
        "inputs": [tensor("input-0", "FP32", [-1, 20])],
        "outputs": [tensor("predict", "INT64", [-1]), tensor("predict_proba", "FP64", [-1, 2])],
    },
    "xgb-20": {
        "versions": ["v1"],
        "platform": "xgboost",
        "inputs": [tensor("input-0", "FP32", [-1, 20])],
        "outputs": [tensor("predict", "INT64", [-1]), tensor("predict_proba", "FP32", [-1, 2])],
    },
    "xgb-reg": {
        "versions": ["1"],
        "platform": "xgboost",
        "inputs": [tensor("input-0", "FP32", [-1, 8])],
        "outputs": [tensor("predict", "FP32", [-1])],
    },
    "strings": {
        "versions": ["1"],
        "platform": "sklearn",
        "inputs": [tensor("input-0", "FP64", [-1, 5])],
        "outputs": [tensor("predict", "BYTES", [-1]), tensor("predict_proba", "FP64", [-1, 2])],
    },
}
#: which reference each model's default version answers with
DEFAULT_REF = {"iris": "iris@2", "rf-20": "rf-20", "xgb-20": "xgb-20", "xgb-reg": "xgb-reg",
               "strings": "strings"}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def infer_url(model: str, version: str | None = None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def v2_input(x: np.ndarray, datatype: str = "FP64", name: str = "input-0") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}


def infer(client: httpx.Client, model: str, body: dict[str, Any], version: str | None = None) -> dict:
    response = client.post(infer_url(model, version), json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == JSON_TYPE
    return response.json()


def output_datatype(model: str, output: str) -> str:
    return next(t["datatype"] for t in METADATA[model]["outputs"] if t["name"] == output)


def expected_of(ref, output: str) -> np.ndarray:
    return ref.predict if output == "predict" else ref.proba


def assert_output(out: dict[str, Any], name: str, datatype: str, expected: np.ndarray) -> None:
    """One JSON output tensor equals the in-process result (exactly for labels)."""
    assert out["name"] == name
    assert out["datatype"] == datatype
    assert out["shape"] == list(expected.shape)
    data = out["data"]
    if datatype == "BYTES":
        assert data == [str(v) for v in expected.reshape(-1)]
    elif datatype == "INT64":
        assert data == expected.reshape(-1).astype(np.int64).tolist()
    else:
        assert len(data) == expected.size
        np.testing.assert_allclose(np.asarray(data, dtype=np.float64), expected.reshape(-1),
                                   rtol=FLOAT_RTOL[datatype], atol=1e-9)


def assert_all_outputs(body: dict[str, Any], model: str, ref, names: list[str] | None = None) -> None:
    names = names or [t["name"] for t in METADATA[model]["outputs"]]
    assert [o["name"] for o in body["outputs"]] == names
    for out, name in zip(body["outputs"], names):
        assert_output(out, name, output_datatype(model, name), expected_of(ref, name))


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """The response is ``status`` with exactly ``{"error": message}``; returns the message."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"] == JSON_TYPE
    body = response.json()
    assert list(body) == ["error"], body
    message = body["error"]
    assert isinstance(message, str) and message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def binary_body(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def parse_binary_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON header and every output's values, binary ones decoded with their datatype."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    content = response.content
    doc = json.loads(content[:length])
    values: dict[str, Any] = {}
    offset = length
    for out in doc["outputs"]:
        if "data" in out:
            values[out["name"]] = out["data"]
            continue
        size = out["parameters"]["binary_data_size"]
        chunk = content[offset : offset + size]
        assert len(chunk) == size
        offset += size
        if out["datatype"] == "BYTES":
            items, i = [], 0
            while i < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, i)
                items.append(chunk[i + 4 : i + 4 + n].decode())
                i += 4 + n
            values[out["name"]] = items
        else:
            values[out["name"]] = np.frombuffer(chunk, dtype=NUMPY[out["datatype"]]).reshape(out["shape"])
    assert offset == len(content), "bytes left after the last binary output"
    return doc, values


def index_rows(client: httpx.Client) -> dict[tuple[str, str], dict[str, Any]]:
    response = client.post("/v2/repository/index")
    assert response.status_code == 200, response.text
    return {(row["name"], row["version"]): row for row in response.json()}


STATE_LINE = re.compile(
    r"model (?P<key>\S+) (?P<state>LOADING|READY|UNLOADING|UNAVAILABLE)(?: in [0-9.]+s)? "
    r"\((?P<memory>[^)]*)\)(?:: (?P<reason>.*))?$"
)
MEMORY_FIGURE = re.compile(r"^cpu [0-9]+(\.[0-9])? (B|KiB|MiB|GiB)$")


def state_lines(log: str, key: str) -> list[re.Match[str]]:
    """The state-change log lines of one model version (``name:version``), in order."""
    found = []
    for line in log.splitlines():
        match = STATE_LINE.search(line)
        if match and match["key"] == key:
            found.append(match)
    return found


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# ----------------------------------------------------------------------------- health & metadata


def test_health_live(client):
    response = client.get("/v2/health/live")
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_TYPE
    assert response.json() == {"live": True}


def test_health_ready(client):
    response = client.get("/v2/health/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True}


def test_server_metadata(client):
    response = client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "mmserver"
    assert body["version"] == installed_version("mmserver")
    assert {"binary_tensor_data", "model_repository"} <= set(body["extensions"])


@pytest.mark.parametrize("model", sorted(METADATA))
def test_model_metadata_default_version(client, model):
    response = client.get(f"/v2/models/{model}")
    assert response.status_code == 200, response.text
    assert response.json() == {"name": model, **METADATA[model]}


@pytest.mark.parametrize(("model", "version"), [("iris", "1"), ("iris", "2"), ("xgb-20", "v1"), ("rf-20", "1")])
def test_model_metadata_explicit_version(client, model, version):
    response = client.get(f"/v2/models/{model}/versions/{version}")
    assert response.status_code == 200, response.text
    assert response.json() == {"name": model, **METADATA[model]}


def test_model_metadata_unknown_version_and_model(client):
    assert_error(client.get("/v2/models/iris/versions/7"), 404, "iris", "'7'")
    assert_error(client.get("/v2/models/xgb-20/versions/1"), 404, "xgb-20", "'1'")
    assert_error(client.get("/v2/models/no-such-model"), 404, "no-such-model")


def test_model_ready(client, model_repo):
    for model in model_repo.default_versions:
        response = client.get(f"/v2/models/{model}/ready")
        assert response.status_code == 200, response.text
        assert response.json() == {"name": model, "ready": True}
    for version in ("1", "2"):
        response = client.get(f"/v2/models/iris/versions/{version}/ready")
        assert (response.status_code, response.json()) == (200, {"name": "iris", "ready": True})
    for model in model_repo.broken:
        response = client.get(f"/v2/models/{model}/ready")
        assert (response.status_code, response.json()) == (503, {"name": model, "ready": False})
    assert_error(client.get("/v2/models/iris/versions/3/ready"), 404, "iris", "'3'")
    assert_error(client.get("/v2/models/no-such-model/ready"), 404, "no-such-model")


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("model", sorted(METADATA))
def test_infer_every_model_matches_in_process(client, model_repo, model):
    ref = model_repo.refs[DEFAULT_REF[model]]
    datatype = METADATA[model]["inputs"][0]["datatype"]
    body = infer(client, model, {"inputs": [v2_input(ref.x, datatype)]})
    assert body["model_name"] == model
    assert body["model_version"] == model_repo.default_versions[model]
    assert "id" not in body
    assert_all_outputs(body, model, ref)


def test_infer_echoes_request_id(client, model_repo):
    ref = model_repo.refs["iris@2"]
    body = infer(client, "iris", {"id": "request-42 ✓", "inputs": [v2_input(ref.x)]})
    assert body["id"] == "request-42 ✓"
    assert_all_outputs(body, "iris", ref)


@pytest.mark.parametrize("model", ["iris", "rf-20", "xgb-20", "strings"])
@pytest.mark.parametrize("names", [["predict"], ["predict_proba"], ["predict_proba", "predict"]])
def test_infer_requested_outputs(client, model_repo, model, names):
    ref = model_repo.refs[DEFAULT_REF[model]]
    body = infer(client, model, {
        "inputs": [v2_input(ref.x)],
        "outputs": [{"name": name} for name in names],
    })
    by_name = {out["name"]: out for out in body["outputs"]}
    assert sorted(by_name) == sorted(names)
    for name in names:
        assert_output(by_name[name], name, output_datatype(model, name), expected_of(ref, name))


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_infer_per_column_inputs(client, model_repo, shape):
    """20 tensors of shape [N] (or [N, 1]), one per feature, instead of one [N, 20] matrix."""
    ref = model_repo.refs["rf-20"]
    columns = []
    for j in range(ref.x.shape[1]):
        column = ref.x[:, j] if shape == "flat" else ref.x[:, j : j + 1]
        columns.append(v2_input(column, "FP32", name=f"f{j}"))
    body = infer(client, "rf-20", {"inputs": columns})
    assert_all_outputs(body, "rf-20", ref)


def test_infer_multi_row_equals_single_rows(client, model_repo):
    """Each row's result does not depend on the rows sent with it."""
    ref = model_repo.refs["xgb-20"]
    for i in (0, 5):
        body = infer(client, "xgb-20", {"inputs": [v2_input(ref.x[i : i + 1], "FP32")]})
        single = type(ref)(ref.x[i : i + 1], ref.predict[i : i + 1], ref.proba[i : i + 1])
        assert_all_outputs(body, "xgb-20", single)


@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_float32_model_accepts_fp64_and_fp32(client, model_repo, datatype):
    ref = model_repo.refs["rf-20"]
    body = infer(client, "rf-20", {"inputs": [v2_input(ref.x, datatype)]})
    assert_all_outputs(body, "rf-20", ref)


def test_float_model_accepts_int64(client, model_repo):
    ref = model_repo.refs["iris@2:int"]
    body = infer(client, "iris", {"inputs": [v2_input(ref.x, "INT64")]})
    assert_all_outputs(body, "iris", ref)


def test_float_model_accepts_int32_binary(client, model_repo):
    ref = model_repo.refs["iris@2:int"]
    rows = ref.x.astype("<i4")
    content, headers = binary_body(
        {"inputs": [{"name": "input-0", "datatype": "INT32", "shape": list(rows.shape),
                     "parameters": {"binary_data_size": rows.nbytes}}]},
        [rows.tobytes()],
    )
    response = client.post(infer_url("iris"), content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert_all_outputs(response.json(), "iris", ref)


def test_version_routing(client, model_repo):
    rows = v2_input(model_repo.refs["iris@1"].x)
    default = infer(client, "iris", {"inputs": [rows]})
    assert default["model_version"] == "2"
    assert_all_outputs(default, "iris", model_repo.refs["iris@2"])

    explicit = infer(client, "iris", {"inputs": [rows]}, version="2")
    assert explicit["model_version"] == "2"
    assert explicit["outputs"] == default["outputs"]

    old = infer(client, "iris", {"inputs": [rows]}, version="1")
    assert old["model_version"] == "1"
    assert_all_outputs(old, "iris", model_repo.refs["iris@1"])

    named = infer(client, "xgb-20", {"inputs": [v2_input(model_repo.refs["xgb-20"].x)]}, version="v1")
    assert named["model_version"] == "v1"
    assert_all_outputs(named, "xgb-20", model_repo.refs["xgb-20"])

    assert_error(client.post(infer_url("iris", "3"), json={"inputs": [rows]}), 404, "iris", "'3'")
    assert_error(client.post(infer_url("xgb-20", "1"), json={"inputs": [rows]}), 404, "xgb-20", "'1'")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_infer_body_without_json_content_type(client, model_repo, content_type):
    """What ``curl -d @body.json`` sends (form content type) or no content type at all."""
    ref = model_repo.refs["strings"]
    content = json.dumps({"inputs": [v2_input(ref.x)]}).encode()
    request = client.build_request("POST", infer_url("strings"), content=content)
    if content_type is None:
        request.headers.pop("content-type", None)
    else:
        request.headers["content-type"] = content_type
    assert request.headers.get("content-type") == content_type
    response = client.send(request)
    assert response.status_code == 200, response.text
    assert_all_outputs(response.json(), "strings", ref)


def test_concurrent_requests_get_their_own_rows(client, model_repo):
    """Concurrent single-row requests are batched together and split back to the right caller."""
    jobs = []
    for i in range(48):
        model = ("rf-20", "iris", "xgb-20")[i % 3]
        ref = model_repo.refs[DEFAULT_REF[model]]
        jobs.append((model, ref, i % len(ref.x)))

    def run(job):
        model, ref, row = job
        return infer(client, model, {"id": f"r{row}", "inputs": [v2_input(ref.x[row : row + 1])]})

    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(run, jobs))
    for (model, ref, row), body in zip(jobs, bodies):
        assert body["id"] == f"r{row}"
        single = type(ref)(ref.x[row : row + 1], ref.predict[row : row + 1], ref.proba[row : row + 1])
        assert_all_outputs(body, model, single)


# ----------------------------------------------------------------------------- binary tensor data


def test_binary_inputs_json_outputs(client, model_repo):
    ref = model_repo.refs["rf-20"]
    rows = ref.x.astype("<f4")
    content, headers = binary_body(
        {"id": "bin-1", "inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(rows.shape),
                                    "parameters": {"binary_data_size": rows.nbytes}}]},
        [rows.tobytes()],
    )
    response = client.post(infer_url("rf-20"), content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == JSON_TYPE
    assert "inference-header-content-length" not in response.headers
    body = response.json()
    assert body["id"] == "bin-1"
    assert_all_outputs(body, "rf-20", ref)


def test_binary_per_column_inputs_and_binary_outputs(client, model_repo):
    """Several binary inputs one after another; outputs chosen per output as binary or JSON."""
    ref = model_repo.refs["xgb-20"]
    columns = [np.ascontiguousarray(ref.x[:, j], dtype="<f8") for j in range(ref.x.shape[1])]
    content, headers = binary_body(
        {
            "inputs": [{"name": f"c{j}", "datatype": "FP64", "shape": [len(col)],
                        "parameters": {"binary_data_size": col.nbytes}} for j, col in enumerate(columns)],
            "outputs": [{"name": "predict_proba", "parameters": {"binary_data": True}},
                        {"name": "predict", "parameters": {"binary_data": False}}],
        },
        [col.tobytes() for col in columns],
    )
    response = client.post(infer_url("xgb-20"), content=content, headers=headers)
    doc, values = parse_binary_response(response)
    proba = next(o for o in doc["outputs"] if o["name"] == "predict_proba")
    assert proba["datatype"] == "FP32"
    assert proba["shape"] == list(ref.proba.shape)
    assert proba["parameters"]["binary_data_size"] == ref.proba.size * 4
    assert "data" not in proba
    np.testing.assert_allclose(values["predict_proba"], ref.proba, rtol=1e-6)
    assert values["predict"] == ref.predict.tolist()


def test_binary_output_for_every_output(client, model_repo):
    """``binary_data_output`` at request level; BYTES outputs are length-prefixed strings."""
    ref = model_repo.refs["strings"]
    response = client.post(infer_url("strings"), json={
        "inputs": [v2_input(ref.x)], "parameters": {"binary_data_output": True},
    })
    doc, values = parse_binary_response(response)
    assert doc["model_name"] == "strings"
    assert [o["name"] for o in doc["outputs"]] == ["predict", "predict_proba"]
    assert doc["outputs"][0]["datatype"] == "BYTES"
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == sum(4 + len(s) for s in ref.predict)
    assert values["predict"] == ref.predict.tolist()
    assert values["predict_proba"].dtype == np.float64
    np.testing.assert_allclose(values["predict_proba"], ref.proba, rtol=1e-12)


def test_binary_output_int64_labels(client, model_repo):
    ref = model_repo.refs["iris@1"]
    response = client.post(infer_url("iris", "1"), json={
        "inputs": [v2_input(ref.x)], "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
    })
    doc, values = parse_binary_response(response)
    assert doc["model_version"] == "1"
    assert [o["name"] for o in doc["outputs"]] == ["predict"]
    np.testing.assert_array_equal(values["predict"], ref.predict)


# ----------------------------------------------------------------------------- errors


ROW4 = [[5.1, 3.5, 1.4, 0.2]]


def one(**fields: Any) -> dict[str, Any]:
    """An iris request with one input whose fields are replaced (``None`` removes a field)."""
    tensor_ = {"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": ROW4}
    for key, value in fields.items():
        if value is None:
            tensor_.pop(key, None)
        else:
            tensor_[key] = value
    return {"inputs": [tensor_]}


def columns(*shapes: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": f"c{i}", "datatype": "FP64", "shape": shape, "data": [1.0] * int(np.prod(shape))}
                       for i, shape in enumerate(shapes)]}


_BIN_HEAD = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                    "parameters": {"binary_data_size": 32}}]}).encode()

# (id, model, body: dict (sent as JSON) or bytes, extra headers, status, fragments of the message)
BAD_REQUESTS: list[tuple[str, str, Any, dict[str, str], int, tuple[str, ...]]] = [
    ("malformed-json", "iris", b'{"inputs": [', {}, 400, ("not valid JSON",)),
    ("empty-body", "iris", b"", {}, 400, ("not valid JSON",)),
    ("not-utf8", "iris", b"\xff\xfe{}", {}, 400, ("not valid JSON",)),
    ("body-is-a-list", "iris", b"[]", {}, 400, ("JSON object",)),
    ("missing-inputs", "iris", {}, {}, 400, ("'inputs'",)),
    ("empty-inputs", "iris", {"inputs": []}, {}, 400, ("'inputs'",)),
    ("input-not-object", "iris", {"inputs": [3]}, {}, 400, ("inputs[0]",)),
    ("input-without-name", "iris", one(name=None), {}, 400, ("inputs[0]", "'name'")),
    ("unknown-datatype", "iris", one(datatype="FP99"), {}, 400, ("input-0", "unknown datatype", "FP99")),
    ("missing-datatype", "iris", one(datatype=None), {}, 400, ("input-0", "datatype")),
    ("missing-shape", "iris", one(shape=None), {}, 400, ("input-0", "'shape'")),
    ("non-integer-shape", "iris", one(shape=[1.0, 4]), {}, 400, ("input-0", "integers")),
    ("shape-data-mismatch", "iris", one(shape=[2, 4]), {}, 400, ("input-0", "8 elements", "has 4")),
    ("negative-dims", "iris", one(shape=[-1, 4]), {}, 400, ("input-0", "negative")),
    ("huge-shape", "iris", one(shape=[2**62, 2**62]), {}, 400, ("input-0", "'data' has 4")),
    ("missing-data", "iris", one(data=None), {}, 400, ("input-0", "'data'")),
    ("ragged-data", "iris", one(data=[[1, 2, 3], [4]]), {}, 400, ("input-0", "ragged")),
    ("strings-as-fp64", "iris", one(data=[["a", "b", "c", "d"]]), {}, 400, ("input-0", "numbers")),
    ("floats-as-int64", "iris", one(datatype="INT64"), {}, 400, ("input-0", "integers")),
    ("out-of-range-uint8", "iris", one(datatype="UINT8", data=[[1, 2, 3, 256]]), {}, 400, ("input-0", "range")),
    ("out-of-range-fp16", "iris", one(datatype="FP16", data=[[1, 2, 3, 1e6]]), {}, 400, ("input-0", "range")),
    ("wrong-feature-count", "iris", one(shape=[1, 3], data=[[1, 2, 3]]), {}, 400, ("3 features", "expects 4")),
    ("wrong-feature-count-rf", "rf-20", one(), {}, 400, ("4 features", "expects 20")),
    ("one-dimensional-matrix", "iris", one(shape=[4], data=ROW4[0]), {}, 400, ("input-0", "[rows, features]")),
    ("three-dimensional", "iris", one(shape=[1, 4, 1]), {}, 400, ("input-0", "[rows, features]")),
    ("bytes-to-numeric-model", "iris", one(datatype="BYTES", data=["1", "2", "3", "4"]), {}, 400,
     ("input-0", "BYTES")),
    ("bytes-to-string-label-model", "strings",
     one(datatype="BYTES", shape=[1, 5], data=["1", "2", "3", "4", "5"]), {}, 400, ("input-0", "BYTES")),
    ("unknown-output", "iris", {**one(), "outputs": [{"name": "nope"}]}, {}, 400,
     ("unknown output 'nope'", "predict", "predict_proba")),
    ("proba-of-regressor", "xgb-reg", {**one(shape=[1, 8], data=[list(range(8))]),
                                        "outputs": [{"name": "predict_proba"}]}, {}, 400,
     ("unknown output 'predict_proba'",)),
    ("outputs-not-a-list", "iris", {**one(), "outputs": "predict"}, {}, 400, ("'outputs'",)),
    ("duplicate-output", "iris", {**one(), "outputs": [{"name": "predict"}, {"name": "predict"}]}, {}, 400,
     ("predict", "more than once")),
    ("duplicate-input", "iris", {"inputs": one()["inputs"] * 2}, {}, 400, ("input-0", "more than once")),
    ("id-not-a-string", "iris", {**one(), "id": 7}, {}, 400, ("'id'",)),
    ("parameters-not-an-object", "iris", {**one(), "parameters": [1]}, {}, 400, ("'parameters'",)),
    ("per-column-rows-differ", "iris", columns([2], [3], [2], [2]), {}, 400, ("c1", "per-column")),
    ("per-column-scalar", "iris", columns([], [2], [2], [2]), {}, 400, ("'c0' has shape []", "[rows] or [rows, 1]")),
    ("per-column-count", "iris", columns([2], [2], [2]), {}, 400, ("3 features", "expects 4")),
    ("binary-size-vs-shape", "iris", _BIN_HEAD.replace(b"32", b"24") + bytes(24),
     {"Inference-Header-Content-Length": str(len(_BIN_HEAD))}, 400, ("input-0", "24", "32")),
    ("binary-runs-past-body", "iris", _BIN_HEAD + bytes(16),
     {"Inference-Header-Content-Length": str(len(_BIN_HEAD))}, 400, ("input-0", "past the end")),
    ("binary-extra-bytes", "iris", _BIN_HEAD + bytes(40),
     {"Inference-Header-Content-Length": str(len(_BIN_HEAD))}, 400, ("8 bytes",)),
    ("binary-without-header", "iris", _BIN_HEAD + bytes(32), {}, 400, ("not valid JSON",)),
    ("header-length-beyond-body", "iris", _BIN_HEAD + bytes(32),
     {"Inference-Header-Content-Length": "100000"}, 400, ("Inference-Header-Content-Length", "100000")),
    ("header-length-not-integer", "iris", _BIN_HEAD + bytes(32),
     {"Inference-Header-Content-Length": "abc"}, 400, ("Inference-Header-Content-Length",)),
    ("header-length-negative", "iris", _BIN_HEAD + bytes(32),
     {"Inference-Header-Content-Length": "-1"}, 400, ("Inference-Header-Content-Length",)),
    ("binary-and-data", "iris", one(parameters={"binary_data_size": 32}), {}, 400, ("input-0", "both")),
    ("unknown-model", "no-such-model", one(), {}, 404, ("no-such-model",)),
]


def send(client: httpx.Client, model: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(infer_url(model), content=body, headers=headers)
    return client.post(infer_url(model), json=body, headers=headers)


@pytest.mark.parametrize(("model", "body", "headers", "status", "fragments"),
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(client, model, body, headers, status, fragments):
    assert_error(send(client, model, body, headers), status, *fragments)


@pytest.mark.parametrize("model", ["xgb-20", "xgb-reg", "iris", "rf-20", "strings"])
def test_zero_rows_is_not_a_server_error(client, model):
    """Zero rows: either empty outputs (as XGBoost models answer) or a 400, never a 500."""
    width = METADATA[model]["inputs"][0]["shape"][1]
    response = client.post(infer_url(model), json={
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [0, width], "data": []}]})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_error(response, 400, "input-0")
        return
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == [t["name"] for t in METADATA[model]["outputs"]]
    for out, spec in zip(outputs, METADATA[model]["outputs"]):
        assert out["datatype"] == spec["datatype"]
        assert out["shape"] == [0, *spec["shape"][1:]]
        assert out["data"] == []


def binary_rows(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    rows = np.ascontiguousarray(rows, dtype="<f8")
    return binary_body({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": list(rows.shape),
                                    "parameters": {"binary_data_size": rows.nbytes}}]}, [rows.tobytes()])


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_binary_input_is_a_client_error(client, value):
    rows = np.array([[5.1, 3.5, 1.4, 0.2]])
    rows[0, 2] = value
    content, headers = binary_rows(rows)
    assert_error(client.post(infer_url("iris"), content=content, headers=headers), 400, "input-0")


def test_failing_request_does_not_fail_the_others_in_its_batch(client, model_repo):
    ref = model_repo.refs["iris@2"]
    good = {"inputs": [v2_input(ref.x[:1])]}
    nan_rows = np.full((1, 4), np.nan)

    def run(i: int) -> tuple[str, httpx.Response]:
        if i % 4 == 0:
            content, headers = binary_rows(nan_rows)
            return "bad", client.post(infer_url("iris"), content=content, headers=headers)
        return "good", client.post(infer_url("iris"), json=good)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(240)))
    good_statuses = [r.status_code for kind, r in results if kind == "good"]
    assert good_statuses == [200] * len(good_statuses), (
        f"{good_statuses.count(200)} of {len(good_statuses)} good requests succeeded; others: "
        f"{next(r.text for kind, r in results if kind == 'good' and r.status_code != 200)}"
    )


@pytest.mark.parametrize(("method", "path", "status", "fragments"), [
    ("GET", "/v2/no/such/route", 404, ("/v2/no/such/route",)),
    ("GET", "/", 404, ()),
    ("POST", "/v2/models/iris/versions/2/extra", 404, ()),
    ("GET", "/v2/models/iris/infer", 405, ("GET", "/v2/models/iris/infer")),
    ("PUT", "/v2/models/iris/infer", 405, ("PUT",)),
    ("DELETE", "/v2/health/live", 405, ("DELETE",)),
    ("POST", "/v2/health/ready", 405, ("POST",)),
    ("POST", "/v2", 405, ("POST",)),
    ("GET", "/v2/repository/models/iris/load", 405, ("GET",)),
])
def test_route_errors_are_json(client, method, path, status, fragments):
    response = client.request(method, path)
    assert_error(response, status, *fragments)
    if status == 405:  # RFC 9110: a 405 names the methods the route takes
        assert response.headers["allow"], response.headers


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("POST", "/v1/audio/speech", 404, None),
    ("GET", "/v1/embeddings", 405, "POST"),
    ("GET", "/openai/v1/no/such/route", 404, None),
    ("GET", "/v1/completions", 405, "POST"),
    ("PUT", "/openai/v1/chat/completions", 405, "POST"),
    ("POST", "/v1/models", 405, "GET, HEAD"),
])
def test_route_errors_under_the_openai_prefixes_have_openai_error_bodies(client, method, path, status, allow):
    response = client.request(method, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert path in error["message"]
    allowed = response.headers.get("allow")
    assert (allowed and sorted(allowed.split(", "))) == (allow and allow.split(", "))  # (a set: any order)


@pytest.mark.parametrize(("model", "why"), [
    ("iris", "it neither generates nor embeds text"),
    ("broken", "it neither generates nor embeds text"),  # (told from its files: sklearn does neither)
    ("nort", "runtime 'nosuch' is not installed"),  # its runtime cannot tell
    ("no-such-model", "does not exist"),
])
def test_a_model_not_listed_in_v1_models_is_a_404_model_not_found(client, model, why):
    assert model not in [card["id"] for card in client.get("/v1/models").json()["data"]]
    response = client.get(f"/v1/models/{model}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert why in response.json()["error"]["message"]


def test_server_survives_every_bad_request(client, model_repo):
    for _, model, body, headers, status, _ in BAD_REQUESTS:
        assert send(client, model, body, headers).status_code == status
    client.post(infer_url("iris"), json={"inputs": [{"name": "input-0", "datatype": "FP64",
                                                     "shape": [0, 4], "data": []}]})
    content, headers = binary_rows(np.full((2, 4), np.nan))
    client.post(infer_url("iris"), content=content, headers=headers)
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for model in METADATA:
        ref = model_repo.refs[DEFAULT_REF[model]]
        assert_all_outputs(infer(client, model, {"inputs": [v2_input(ref.x)]}), model, ref)


# ----------------------------------------------------------------------------- broken models & repository


def test_repository_index(client, model_repo):
    rows = index_rows(client)
    ready = {key for key, row in rows.items() if row["state"] == "READY"}
    assert ready == {("iris", "1"), ("iris", "2"), ("rf-20", "1"), ("xgb-20", "v1"), ("xgb-reg", "1"),
                     ("strings", "1")}
    for key in ready:
        assert rows[key]["reason"] == ""
        assert rows[key]["memory_bytes"]["cpu"] > 0
    broken = rows[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE"
    assert broken["reason"].startswith("load failed: ")
    nort = rows[("nort", "1")]
    assert nort["state"] == "UNAVAILABLE"
    assert "runtime 'nosuch' is not installed" in nort["reason"]
    assert set(rows) == ready | {("broken", "1"), ("nort", "1")}
    assert client.get("/v2/repository/index").json() == client.post("/v2/repository/index").json()


@pytest.mark.parametrize("model", ["broken", "nort"])
def test_unloadable_model_gives_503_with_reason(client, model):
    reason = index_rows(client)[(model, "1")]["reason"]
    assert reason
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": ROW4}]}
    assert_error(client.post(infer_url(model), json=body), 503, model, reason)
    assert_error(client.post(infer_url(model, "1"), json=body), 503, model, reason)
    assert_error(client.get(f"/v2/models/{model}"), 503, model, reason)


def test_server_logs_each_state_change(server, client):
    log = server.log()
    rows = index_rows(client)
    for (name, version), row in rows.items():
        if row["state"] != "READY":
            continue
        lines = state_lines(log, f"{name}:{version}")
        assert [m["state"] for m in lines] == ["LOADING", "READY"], log
        for match in lines:
            assert MEMORY_FIGURE.match(match["memory"]), match.group(0)
        # the READY line reports the memory the index reports
        assert lines[1]["memory"] == f"cpu {format_bytes(row['memory_bytes']['cpu'])}"
    for model in ("broken", "nort"):
        lines = state_lines(log, f"{model}:1")
        assert lines and lines[-1]["state"] == "UNAVAILABLE", log
        assert lines[-1]["reason"] == rows[(model, "1")]["reason"]
        assert "READY" not in [m["state"] for m in lines]


# ----------------------------------------------------------------------------- repository extension (private server)


@pytest.fixture(scope="module")
def private_repo(model_repo, tmp_path_factory) -> Path:
    return model_repo.copy_to(tmp_path_factory.mktemp("private") / "model-repo")


@pytest.fixture(scope="module")
def private_server(private_repo, start_server, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("private-log") / "server.log"
    with start_server(private_repo, log_path, "--max-request-bytes", "64KiB") as s:
        yield s


@pytest.fixture(scope="module")
def private_client(private_server):
    with httpx.Client(base_url=private_server.url, timeout=30.0) as c:
        yield c


def test_unload_then_load_again(private_server, private_client, model_repo):
    c, ref = private_client, model_repo.refs["rf-20"]
    request = {"inputs": [v2_input(ref.x)]}
    assert_all_outputs(infer(c, "rf-20", request), "rf-20", ref)
    before = len(state_lines(private_server.log(), "rf-20:1"))

    response = c.post("/v2/repository/models/rf-20/unload")
    assert (response.status_code, response.json()) == (200, {"name": "rf-20", "unloaded": True})
    row = index_rows(c)[("rf-20", "1")]
    assert (row["state"], row["reason"]) == ("UNAVAILABLE", "unloaded by request")
    assert "memory_bytes" not in row
    assert_error(c.post(infer_url("rf-20"), json=request), 503, "rf-20", "unloaded by request")
    assert_error(c.get("/v2/models/rf-20"), 503, "rf-20")
    ready = c.get("/v2/models/rf-20/ready")
    assert (ready.status_code, ready.json()) == (503, {"name": "rf-20", "ready": False})
    # the other models are untouched
    assert_all_outputs(infer(c, "iris", {"inputs": [v2_input(model_repo.refs["iris@2"].x)]}),
                       "iris", model_repo.refs["iris@2"])

    response = c.post("/v2/repository/models/rf-20/load")
    assert (response.status_code, response.json()) == (200, {"name": "rf-20", "loaded": True})
    row = index_rows(c)[("rf-20", "1")]
    assert (row["state"], row["reason"]) == ("READY", "")
    assert_all_outputs(infer(c, "rf-20", request), "rf-20", ref)
    assert c.get("/v2/models/rf-20").json() == {"name": "rf-20", **METADATA["rf-20"]}

    lines = state_lines(private_server.log(), "rf-20:1")[before:]
    assert [m["state"] for m in lines] == ["UNLOADING", "UNAVAILABLE", "LOADING", "READY"]
    assert lines[1]["memory"] == "no memory"
    assert MEMORY_FIGURE.match(lines[3]["memory"])


def test_unload_and_load_under_traffic(private_client, model_repo):
    """While a model is unloaded and loaded again, each request gets its result or a 503."""
    ref = model_repo.refs["xgb-20"]
    request = {"inputs": [v2_input(ref.x)]}
    stop = threading.Event()

    def hammer() -> list[httpx.Response]:
        responses = []
        while not stop.is_set():
            responses.append(private_client.post(infer_url("xgb-20"), json=request))
        return responses

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        for _ in range(3):
            time.sleep(0.1)
            assert private_client.post("/v2/repository/models/xgb-20/unload").status_code == 200
            time.sleep(0.05)
            assert private_client.post("/v2/repository/models/xgb-20/load").status_code == 200
        time.sleep(0.1)
        stop.set()
        responses = [r for f in futures for r in f.result()]
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}, {r.status_code: r.text for r in responses if r.status_code not in (200, 503)}
    assert 200 in statuses
    for r in responses:
        if r.status_code == 200:
            assert_all_outputs(r.json(), "xgb-20", ref)
        else:
            assert_error(r, 503, "xgb-20")
    assert_all_outputs(infer(private_client, "xgb-20", request), "xgb-20", ref)


def test_load_and_unload_unknown_model(private_client):
    load = assert_error(private_client.post("/v2/repository/models/no-such-model/load"), 404, "no-such-model")
    unload = assert_error(private_client.post("/v2/repository/models/no-such-model/unload"), 404, "no-such-model")
    # as every other route says it: the server's folders are nobody's business
    assert load == unload == "model 'no-such-model' is not in the repository"


@pytest.mark.parametrize(("model", "fragment"), [("broken", "load failed"), ("nort", "runtime 'nosuch'")])
def test_load_of_unloadable_model_reports_reason(private_client, model, fragment):
    response = private_client.post(f"/v2/repository/models/{model}/load")
    message = assert_error(response, 500, model, fragment)  # ModelLoadError -> 500 (errors.HTTP_STATUS)
    row = index_rows(private_client)[(model, "1")]
    assert row["state"] == "UNAVAILABLE"
    assert row["reason"] in message
    assert private_client.get("/v2/health/ready").json() == {"ready": True}


def test_new_model_folder_is_loaded_on_request(private_repo, private_client, model_repo):
    shutil.copytree(private_repo / "xgb-reg", private_repo / "reg-copy")
    response = private_client.post("/v2/repository/models/reg-copy/load")
    assert (response.status_code, response.json()) == (200, {"name": "reg-copy", "loaded": True})
    assert index_rows(private_client)[("reg-copy", "1")]["state"] == "READY"
    ref = model_repo.refs["xgb-reg"]
    body = infer(private_client, "reg-copy", {"inputs": [v2_input(ref.x)]})
    assert (body["model_name"], body["model_version"]) == ("reg-copy", "1")
    assert_all_outputs(body, "xgb-reg", ref)


def test_new_version_folder_becomes_default(private_repo, private_client, model_repo):
    shutil.copytree(private_repo / "iris" / "1", private_repo / "iris" / "3")
    response = private_client.post("/v2/repository/models/iris/load")
    assert (response.status_code, response.json()) == (200, {"name": "iris", "loaded": True})
    assert private_client.get("/v2/models/iris").json()["versions"] == ["1", "2", "3"]
    rows = v2_input(model_repo.refs["iris@1"].x)
    newest = infer(private_client, "iris", {"inputs": [rows]})
    assert newest["model_version"] == "3"
    assert_all_outputs(newest, "iris", model_repo.refs["iris@1"])  # version 3 is a copy of 1
    still = infer(private_client, "iris", {"inputs": [rows]}, version="2")
    assert_all_outputs(still, "iris", model_repo.refs["iris@2"])


def test_request_over_size_limit_is_413(private_client):
    big = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [5000, 4],
                       "data": [[1.25, 2.5, 3.75, 4.0]] * 5000}]}
    content = json.dumps(big).encode()
    assert len(content) > 64 * 1024
    assert_error(private_client.post(infer_url("iris"), content=content), 413, "65536")
    assert private_client.get("/v2/health/ready").json() == {"ready": True}


# ----------------------------------------------------------------------------- concurrent loads (bug)


def _many_sklearn_families(root: Path) -> None:
    """Eight small iris classifiers, each from a different scikit-learn subpackage."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    estimators = {
        "lr": LogisticRegression(max_iter=500), "rf": RandomForestClassifier(n_estimators=5),
        "dt": DecisionTreeClassifier(), "knn": KNeighborsClassifier(), "nb": GaussianNB(),
        "lda": LinearDiscriminantAnalysis(), "svc": SVC(), "mlp": MLPClassifier(max_iter=20),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, estimator in estimators.items():
            (root / name).mkdir(parents=True)
            joblib.dump(estimator.fit(x, y), root / name / "model.joblib")


def test_concurrent_startup_loads_all_succeed(tmp_path, start_server):
    repo = tmp_path / "repo"
    _many_sklearn_families(repo)
    for attempt in range(3):
        with start_server(repo, tmp_path / f"server-{attempt}.log", "--load-concurrency", "8") as s:
            failed = {row["name"]: row["reason"] for row in httpx.post(f"{s.url}/v2/repository/index").json()
                      if row["state"] != "READY"}
        assert failed == {}


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(server):
    """Starlette's default answered ``GET /v2/models/iris/`` with a 307 to
    ``http://<Host header>/v2/models/iris``: an open redirect, and a hop instead of a 404."""
    for method, path in [("GET", "/v2/models/iris/"), ("GET", "/v2/models/iris/ready/"), ("GET", "/v2/"),
                         ("POST", "/v2/repository/index/")]:
        response = httpx.request(method, f"{server.url}{path}", headers={"Host": "evil.example"})
        assert response.status_code == 404, (path, response.status_code, response.headers)
        assert "location" not in response.headers
        assert response.json()["error"].startswith("no route for")
