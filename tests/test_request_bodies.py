"""Request bodies at the inference route: compressed bodies (Content-Encoding), large bodies that
must not hold up other requests while they are decoded, and the shapes a one-feature model takes."""

from __future__ import annotations

import gzip
import threading
import tracemalloc
import zlib

import httpx
import numpy as np
import orjson
import pytest
from v2_helpers import LOCAL, binary_request, body, live_while

from mmserver.api.http import decompress
from mmserver.codec import decode_request
from mmserver.errors import InvalidInput, PayloadTooLarge

MiB = 1024**2
DEFAULT_LIMIT = 64 * MiB  # the shared server's max_request_bytes
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}


def infer(server, content: bytes, **headers: str) -> httpx.Response:
    return LOCAL.post(f"{server.url}/v2/models/iris/infer", content=content,
                      headers={"Content-Type": "application/json", **headers})


# ----------------------------------------------------------------------------- Content-Encoding


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZip"])
def test_compressed_json_body_is_decompressed(server, model_repo, coding):
    ref = model_repo.refs["iris@2"]
    raw = orjson.dumps(body(ref.x))
    response = infer(server, COMPRESS[coding.lower()](raw), **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text
    (predict,) = [o for o in response.json()["outputs"] if o["name"] == "predict"]
    assert predict["data"] == ref.predict.tolist()


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_binary_body_counts_its_header_length_decompressed(server, model_repo, coding):
    ref = model_repo.refs["iris@2"]
    raw, headers = binary_request(ref.x)
    response = infer(server, COMPRESS[coding](raw), **headers, **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("coding", ["identity", "Identity"])
def test_identity_encoding_is_the_body_as_is(server, coding):
    response = infer(server, orjson.dumps(body(np.array([[5.1, 3.5, 1.4, 0.2]]))), **{"Content-Encoding": coding})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("coding", ["br", "compress", "gzip, br", "zstd"])
def test_other_encodings_are_refused_with_415(server, coding):
    response = infer(server, b"whatever", **{"Content-Encoding": coding})
    assert response.status_code == 415
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": f"Content-Encoding {coding!r} is not supported; use gzip, deflate or identity"
    }


@pytest.mark.parametrize(
    "coding, content, expected",
    [
        ("gzip", b"not gzip at all", "the request body is not valid gzip data"),
        ("deflate", gzip.compress(b"{}"), "the request body is not valid deflate data"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-12], "the gzip request body is cut short"),
        ("deflate", zlib.compress(b"{}") + b"junk", "the request body has 4 bytes after its deflate data"),
    ],
)
def test_broken_compressed_bodies_are_400(server, coding, content, expected):
    response = infer(server, content, **{"Content-Encoding": coding})
    assert response.status_code == 400
    assert response.json()["error"].startswith(expected)


def test_a_zip_bomb_is_refused_with_413(server):
    bomb = gzip.compress(b"\0" * (DEFAULT_LIMIT + MiB), compresslevel=9)
    assert len(bomb) < MiB
    response = infer(server, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json() == {"error": f"request body exceeds the {DEFAULT_LIMIT}-byte limit once decompressed"}


def test_decompression_stops_at_the_limit():
    """The cap holds while decompressing: memory stays near the limit, not the bomb's size."""
    bomb = zlib.compress(b"\0" * (64 * MiB), 9)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decompress(bomb, "deflate", MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


def test_decompress_takes_the_limit_exactly_and_several_gzip_members():
    assert decompress(zlib.compress(b"x" * 100), "deflate", 100) == b"x" * 100
    with pytest.raises(PayloadTooLarge):
        decompress(zlib.compress(b"x" * 101), "deflate", 100)
    assert decompress(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 4) == b"abcd"
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(b"ab") + gzip.compress(b"cde"), "gzip", 4)


# ----------------------------------------------------------------------------- large bodies


def test_the_server_answers_while_a_large_body_is_decoded(server):
    """32 MB of JSON UINT64 values, some beyond int64: seconds of decoding, on a worker thread."""
    rows = 700_000
    values = np.full(rows * 4, 2**64 - 1, dtype=np.uint64)
    values[::2] = 1
    content = orjson.dumps({"inputs": [{"name": "input-0", "datatype": "UINT64", "shape": [rows, 4],
                                        "data": values}]}, option=orjson.OPT_SERIALIZE_NUMPY)
    result = {}

    def big() -> None:
        response = httpx.post(f"{server.url}/v2/models/iris/infer", content=content, timeout=120.0)
        result["status"], result["text"] = response.status_code, response.text[:200]

    worst = live_while(server.url, threading.Thread(target=big))
    assert result["status"] == 200, result["text"]
    assert worst < 1.0, f"/v2/health/live took {worst:.1f} s while a 32 MB body was decoded"


def test_an_input_the_model_cannot_take_is_refused_before_its_data_is_walked(server):
    """6M binary BYTES elements to a numeric model: refused from the input's header."""
    n = 6_000_000
    header = orjson.dumps({"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [n],
                                       "parameters": {"binary_data_size": 4 * n}}]})
    result = {}

    def big() -> None:
        response = httpx.post(f"{server.url}/v2/models/iris/infer", content=header + b"\0" * (4 * n),
                              headers={"Inference-Header-Content-Length": str(len(header))}, timeout=120.0)
        result["status"], result["body"] = response.status_code, response.json()

    worst = live_while(server.url, threading.Thread(target=big))
    assert result == {"status": 400,
                      "body": {"error": "input 'input-0' is BYTES but this model takes numeric features"}}
    assert worst < 1.0, f"/v2/health/live took {worst:.1f} s while a 24 MB BYTES body was in progress"


def test_the_model_refuses_an_input_from_its_header(server):
    """Its data (ragged here) is not looked at: the refusal is the model's, not the decoder's."""
    doc = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [2], "data": [["a"], "b"]}]}
    response = infer(server, orjson.dumps(doc))
    assert response.json() == {"error": "input 'input-0' is BYTES but this model takes numeric features"}


# ----------------------------------------------------------------------------- request parameters


def test_binary_data_given_as_a_string_is_400(server):
    doc = body(np.array([[5.1, 3.5, 1.4, 0.2]]))
    doc["outputs"] = [{"name": "predict", "parameters": {"binary_data": "false"}}]
    response = infer(server, orjson.dumps(doc))
    assert response.status_code == 400
    assert response.json() == {"error": "parameter 'binary_data' of output 'predict' must be true or false"}


def test_a_json_boolean_among_numbers_is_400(server):
    doc = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [True, 3.5, 1.4, 0.2]}]}
    response = infer(server, orjson.dumps(doc))
    assert response.status_code == 400
    assert response.json() == {"error": "input 'input-0': FP64 data must be numbers, not true/false"}


# ----------------------------------------------------------------------------- one-feature models


def _fitted(features: int):
    from mmserver_sklearn import SKLearnModel
    from sklearn.linear_model import LinearRegression

    x = np.arange(20, dtype=float).reshape(-1, features)
    return SKLearnModel(LinearRegression().fit(x, x.sum(axis=1) * 2), 0)


def _request(*tensors: tuple[str, list]) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "datatype": "FP64", "shape": [len(data)], "data": data}
                                    for name, data in tensors]})


@pytest.mark.parametrize("shape", [[3], [3, 1]])
async def test_a_one_feature_model_takes_one_column(shape):
    model = _fitted(1)
    request = decode_request(orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP64", "shape": shape, "data": [1, 2, 3]}]}))
    model.validate(request)
    assert model.rows(request) == 3
    (response,) = await model.infer([request])
    np.testing.assert_allclose(response.outputs[0].data, [2.0, 4.0, 6.0])


def test_a_lone_column_is_not_a_row_for_a_model_of_more_features():
    model = _fitted(2)
    with pytest.raises(InvalidInput, match=r"has shape \[3\]; expected \[rows, features\] with 2 features"):
        model.validate(decode_request(_request(("x", [1, 2, 3]))))
    model.validate(decode_request(_request(("a", [1, 2, 3]), ("b", [4, 5, 6]))))
