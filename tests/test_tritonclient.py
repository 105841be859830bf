"""The shared server driven by a real third-party V2 client: NVIDIA's ``tritonclient.http``.

Results must equal what the frameworks computed in-process (see ``conftest.build_model_repo``).
"""

from __future__ import annotations

from importlib.metadata import version as installed_version

import httpx
import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(server):
    client = tritonhttp.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=10.0,
                                              network_timeout=30.0)
    yield client
    client.close()


def make_input(name: str, rows: np.ndarray, datatype: str, binary: bool = True):
    tensor = tritonhttp.InferInput(name, list(rows.shape), datatype)
    numpy_type = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}[datatype]
    tensor.set_data_from_numpy(rows.astype(numpy_type), binary_data=binary)
    return tensor


def requested(*names: str, binary: bool = True):
    return [tritonhttp.InferRequestedOutput(name, binary_data=binary) for name in names]


def assert_labels(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype.kind in "US":  # string labels come back as str (JSON) or bytes (binary)
        assert [a.decode() if isinstance(a, bytes) else a for a in actual.tolist()] == expected.tolist()
    else:
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, expected)


def test_server_live_and_ready(triton):
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True


def test_model_ready(triton, model_repo):
    for model, version in model_repo.default_versions.items():
        assert triton.is_model_ready(model) is True
        assert triton.is_model_ready(model, version) is True
    assert triton.is_model_ready("iris", "1") is True
    for model in model_repo.broken:
        assert triton.is_model_ready(model) is False
    assert triton.is_model_ready("no-such-model") is False


def test_server_metadata(triton):
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "mmserver"
    assert metadata["version"] == installed_version("mmserver")
    assert {"binary_tensor_data", "model_repository"} <= set(metadata["extensions"])


def test_model_metadata(triton):
    assert triton.get_model_metadata("xgb-20", "v1") == {
        "name": "xgb-20",
        "versions": ["v1"],
        "platform": "xgboost",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 20]}],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]},
                    {"name": "predict_proba", "datatype": "FP32", "shape": [-1, 2]}],
    }
    iris = triton.get_model_metadata("iris", "1")
    assert (iris["name"], iris["versions"], iris["platform"]) == ("iris", ["1", "2"], "sklearn")
    assert iris["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert triton.get_model_metadata("iris") == iris


@pytest.mark.parametrize(("model", "datatype"), [("rf-20", "FP32"), ("xgb-20", "FP32"), ("xgb-20", "FP64"),
                                                 ("strings", "FP64"), ("iris", "FP64")])
def test_infer_binary_inputs_and_outputs(triton, model_repo, model, datatype):
    ref = model_repo.refs["iris@2" if model == "iris" else model]
    result = triton.infer(model, [make_input("input-0", ref.x, datatype)],
                          outputs=requested("predict", "predict_proba"))
    response = result.get_response()
    assert response["model_name"] == model
    assert response["model_version"] == model_repo.default_versions[model]
    for out in response["outputs"]:
        assert "data" not in out and out["parameters"]["binary_data_size"] > 0
    assert_labels(result.as_numpy("predict"), ref.predict)
    proba = result.as_numpy("predict_proba")
    assert proba.shape == ref.proba.shape
    np.testing.assert_allclose(proba, ref.proba, rtol=1e-6 if proba.dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_infer_with_request_compression(triton, model_repo, algorithm, binary):
    """The client compresses the body and counts its Inference-Header-Content-Length before that."""
    ref = model_repo.refs["iris@2"]
    result = triton.infer("iris", [make_input("input-0", ref.x, "FP64", binary=binary)],
                          outputs=requested("predict", "predict_proba", binary=binary),
                          request_compression_algorithm=algorithm)
    assert_labels(result.as_numpy("predict"), ref.predict)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), ref.proba, rtol=1e-12)


def test_infer_json_inputs_and_outputs(triton, model_repo):
    ref = model_repo.refs["strings"]
    result = triton.infer("strings", [make_input("input-0", ref.x, "FP64", binary=False)],
                          outputs=requested("predict", "predict_proba", binary=False))
    for out in result.get_response()["outputs"]:
        assert "data" in out and "parameters" not in out
    assert_labels(result.as_numpy("predict"), ref.predict)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), ref.proba, rtol=1e-12)


def test_infer_regressor_default_outputs(triton, model_repo):
    """No outputs named: the client asks for every output in binary."""
    ref = model_repo.refs["xgb-reg"]
    result = triton.infer("xgb-reg", [make_input("input-0", ref.x, "FP32")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict"]
    predict = result.as_numpy("predict")
    assert predict.dtype == np.float32
    np.testing.assert_allclose(predict, ref.predict, rtol=1e-6)


def test_infer_requested_output_only(triton, model_repo):
    ref = model_repo.refs["rf-20"]
    result = triton.infer("rf-20", [make_input("input-0", ref.x, "FP32")], outputs=requested("predict_proba"))
    assert result.as_numpy("predict") is None
    np.testing.assert_allclose(result.as_numpy("predict_proba"), ref.proba, rtol=1e-12)


def test_infer_per_column_inputs(triton, model_repo):
    ref = model_repo.refs["xgb-20"]
    inputs = [make_input(f"f{j}", ref.x[:, j], "FP32") for j in range(ref.x.shape[1])]
    result = triton.infer("xgb-20", inputs, outputs=requested("predict"))
    assert_labels(result.as_numpy("predict"), ref.predict)


def test_infer_request_id_and_model_version(triton, model_repo):
    for version in ("1", "2"):
        ref = model_repo.refs[f"iris@{version}"]
        result = triton.infer("iris", [make_input("input-0", ref.x, "FP64")], model_version=version,
                              request_id=f"tc-{version}", outputs=requested("predict", binary=False))
        response = result.get_response()
        assert (response["id"], response["model_version"]) == (f"tc-{version}", version)
        assert_labels(result.as_numpy("predict"), ref.predict)


def test_unknown_model_raises_with_the_server_message(triton, server):
    rows = np.ones((1, 4))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("no-such-model", [make_input("input-0", rows, "FP64", binary=False)])
    body = httpx.post(f"{server.url}/v2/models/no-such-model/infer", json={
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [1, 1, 1, 1]}]}).json()
    assert caught.value.message() == body["error"]
    assert "no-such-model" in caught.value.message()
    assert caught.value.status() == "404"


def test_bad_request_and_broken_model_raise_with_the_server_message(triton, model_repo):
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("iris", [make_input("input-0", np.ones((1, 3)), "FP64")])
    assert caught.value.status() == "400"
    assert "expects 4" in caught.value.message()

    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("broken")
    assert caught.value.status() == "503"
    assert "broken" in caught.value.message() and "load failed" in caught.value.message()
