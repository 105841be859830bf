"""Tests of mmserver.codec: V2 JSON / binary decoding, response encoding, row batching helpers."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import orjson
import pytest

from mmserver.codec import (
    DTYPES,
    concat_rows,
    datatype_of,
    decode_request,
    encode_response,
    split_rows,
)
from mmserver.errors import InferenceError, InvalidInput
from mmserver.types import InferOutput, InferRequest, InferResponse, RequestedOutput

NUMERIC = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]
NAME = "feat_A"  # a distinctive input name, so tests can check that errors name it


# ----------------------------------------------------------------------------- helpers


def tensor(datatype: str, shape: list, data=None, name: str = NAME, **extra) -> dict:
    doc = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        doc["data"] = data
    doc.update(extra)
    return doc


def request_body(*inputs: dict, **top) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **top})


def decode(*inputs: dict, **top) -> InferRequest:
    return decode_request(request_body(*inputs, **top))


def binary_body(doc: dict, *blobs: bytes) -> tuple[bytes, str]:
    """A binary-extension body: JSON header, then the blobs; returns (body, header length)."""
    header = orjson.dumps(doc)
    return header + b"".join(blobs), str(len(header))


def bytes_blob(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def by_name(request: InferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors' data by name."""
    return {t.name: t.data for t in request.inputs}


def invalid(body: bytes, header: str | None = None) -> str:
    """Decode a body that must be refused; returns the InvalidInput message."""
    with pytest.raises(InvalidInput) as info:
        decode_request(body, header)
    assert type(info.value) is InvalidInput
    return info.value.message


def invalid_input(*inputs: dict, **top) -> str:
    return invalid(request_body(*inputs, **top))


def int_bounds(datatype: str) -> list[int]:
    info = np.iinfo(DTYPES[datatype])
    # UINT64 values >= 2**63 mixed with small ones are covered by their own test below.
    high = np.iinfo(np.int64).max if datatype == "UINT64" else int(info.max)
    return [int(info.min), high, 0, 1]


SAMPLE_VALUES = {
    "BOOL": [True, False, False, True],
    **{dt: int_bounds(dt) for dt in NUMERIC if dt.startswith(("INT", "UINT"))},
    "FP16": [0.5, -2.0, 65504.0, 1.5],
    "FP32": [1.5, -2.25, 3.0e38, 0.0],
    "FP64": [1e308, -0.1, 5e-324, 2.0],
}


# ----------------------------------------------------------------------------- JSON decoding


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC])
def test_decode_flat_data_of_every_datatype(datatype):
    values = SAMPLE_VALUES[datatype]
    request = decode(tensor(datatype, [4], values))
    (tensor_in,) = request.inputs
    assert tensor_in.name == NAME
    assert tensor_in.datatype == datatype
    assert tensor_in.data.dtype == DTYPES[datatype]
    assert tensor_in.shape == (4,)
    np.testing.assert_array_equal(tensor_in.data, np.array(values, dtype=DTYPES[datatype]))


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC])
def test_decode_nested_data_of_every_datatype(datatype):
    values = SAMPLE_VALUES[datatype]
    nested = [values[:2], values[2:]]
    tensor_in = decode(tensor(datatype, [2, 2], nested)).inputs[0]
    assert tensor_in.data.dtype == DTYPES[datatype]
    assert tensor_in.shape == (2, 2)
    np.testing.assert_array_equal(tensor_in.data, np.array(nested, dtype=DTYPES[datatype]))


def test_decode_bytes_flat_and_nested():
    flat = decode(tensor("BYTES", [3], ["a", "héllo", ""])).inputs[0]
    assert flat.datatype == "BYTES"
    assert flat.data.dtype == object
    assert flat.data.tolist() == [b"a", "héllo".encode("utf-8"), b""]

    nested = decode(tensor("BYTES", [2, 2], [["a", "b"], ["c", "d"]])).inputs[0]
    assert nested.shape == (2, 2)
    assert nested.data.tolist() == [[b"a", b"b"], [b"c", b"d"]]


def test_flat_data_is_reshaped_row_major():
    tensor_in = decode(tensor("INT32", [2, 3], [1, 2, 3, 4, 5, 6])).inputs[0]
    assert tensor_in.data.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_nested_data_of_another_shape_is_reshaped_row_major():
    tensor_in = decode(tensor("FP64", [3, 2], [[1, 2, 3], [4, 5, 6]])).inputs[0]
    assert tensor_in.data.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def test_bytes_flat_data_is_reshaped_row_major():
    tensor_in = decode(tensor("BYTES", [2, 2], ["a", "b", "c", "d"])).inputs[0]
    assert tensor_in.data.tolist() == [[b"a", b"b"], [b"c", b"d"]]


def test_scalar_and_empty_shapes():
    scalar = decode(tensor("FP32", [], [7.5])).inputs[0]
    assert scalar.shape == ()
    assert scalar.data.dtype == np.float32
    assert float(scalar.data) == 7.5

    empty = decode(tensor("INT64", [2, 0], [])).inputs[0]
    assert empty.shape == (2, 0)
    assert empty.data.dtype == np.int64

    empty_bool = decode(tensor("BOOL", [0], [])).inputs[0]
    assert empty_bool.shape == (0,)
    assert empty_bool.data.dtype == np.bool_


def test_ints_are_accepted_for_float_datatypes():
    tensor_in = decode(tensor("FP32", [3], [1, 2, 3])).inputs[0]
    assert tensor_in.data.dtype == np.float32
    assert tensor_in.data.tolist() == [1.0, 2.0, 3.0]


def test_uint64_maximum_alone():
    tensor_in = decode(tensor("UINT64", [1], [2**64 - 1])).inputs[0]
    assert tensor_in.data.dtype == np.uint64
    assert int(tensor_in.data[0]) == 2**64 - 1


def test_uint64_large_values_mixed_with_small_ones():
    tensor_in = decode(tensor("UINT64", [3], [2**64 - 1, 0, 2**63])).inputs[0]
    assert tensor_in.data.dtype == np.uint64
    assert [int(v) for v in tensor_in.data] == [2**64 - 1, 0, 2**63]


def test_request_id_and_parameters():
    request = decode(
        tensor("FP32", [1], [1.0], parameters={"content_type": "np"}),
        id="req-42",
        parameters={"binary_data_output": False, "custom": {"k": [1, 2]}},
    )
    assert request.id == "req-42"
    assert request.parameters == {"binary_data_output": False, "custom": {"k": [1, 2]}}
    assert request.inputs[0].parameters == {"content_type": "np"}
    assert [t.name for t in request.inputs] == [NAME]


def test_request_without_id_parameters_or_outputs():
    request = decode(tensor("FP32", [1], [1.0]))
    assert request.id is None
    assert request.parameters == {}
    assert request.outputs == []
    assert request.output_names == ()
    assert request.inputs[0].parameters == {}


def test_several_inputs_keep_their_order():
    request = decode(tensor("FP32", [1], [1.0], name="b"), tensor("INT8", [2], [1, 2], name="a"))
    assert [t.name for t in request.inputs] == ["b", "a"]
    assert request.inputs[1].data.tolist() == [1, 2]


def test_outputs_are_parsed_with_their_parameters():
    request = decode(
        tensor("FP32", [1], [1.0]),
        outputs=[{"name": "predict_proba", "parameters": {"binary_data": True}}, {"name": "predict"}],
    )
    assert request.outputs == [
        RequestedOutput("predict_proba", {"binary_data": True}),
        RequestedOutput("predict", {}),
    ]
    assert request.output_names == ("predict_proba", "predict")


# ----------------------------------------------------------------------------- JSON errors


def test_malformed_json():
    assert "not valid JSON" in invalid(b'{"inputs": [')


@pytest.mark.parametrize("body", [b"[1, 2]", b'"inputs"', b"3", b"null"])
def test_body_that_is_not_an_object(body):
    assert "must be a JSON object" in invalid(body)


@pytest.mark.parametrize("doc", [{}, {"inputs": []}, {"inputs": None}, {"inputs": {"name": "x"}}])
def test_missing_or_empty_inputs(doc):
    assert "'inputs' must be a non-empty list" in invalid(orjson.dumps(doc))


def test_input_that_is_not_an_object():
    assert "inputs[0] must be an object" in invalid(orjson.dumps({"inputs": ["x"]}))


@pytest.mark.parametrize("name", [None, "", 5])
def test_missing_or_bad_name(name):
    doc = {"datatype": "FP32", "shape": [1], "data": [1.0]}
    if name is not None:
        doc["name"] = name
    good = tensor("FP32", [1], [1.0], name="first")
    assert "inputs[1] needs a non-empty string 'name'" in invalid(request_body(good, doc))


def test_missing_datatype():
    doc = {"name": NAME, "shape": [1], "data": [1.0]}
    message = invalid(request_body(doc))
    assert f"input '{NAME}'" in message
    assert "unknown datatype None" in message


@pytest.mark.parametrize("datatype", ["FP8", "fp32", "STRING", 3, ["FP32"]])
def test_unknown_datatype(datatype):
    message = invalid_input(tensor(datatype, [1], [1.0]))
    assert f"input '{NAME}': unknown datatype {datatype!r}" in message
    assert "FP32" in message  # lists the valid ones


def test_missing_shape():
    doc = {"name": NAME, "datatype": "FP32", "data": [1.0]}
    assert f"input '{NAME}': 'shape' must be a list" in invalid(request_body(doc))


def test_shape_not_a_list():
    assert f"input '{NAME}': 'shape' must be a list" in invalid_input(tensor("FP32", 3, [1, 2, 3]))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-1, 0]])
def test_negative_dims(shape):
    message = invalid_input(tensor("FP32", shape, [1.0, 2.0]))
    assert f"input '{NAME}'" in message
    assert "negative dimension" in message


@pytest.mark.parametrize("shape", [[2.0], ["2"], [True], [None], [[2]], [1.5, 2]])
def test_non_integer_dims(shape):
    message = invalid_input(tensor("FP32", shape, [1.0, 2.0]))
    assert f"input '{NAME}'" in message
    assert "integers only" in message


def test_too_many_dims():
    message = invalid_input(tensor("FP32", [1] * 33, [1.0]))
    assert message == f"input '{NAME}': shape has 33 dimensions, at most 32"


def test_missing_data():
    assert invalid_input(tensor("FP32", [1])) == f"input '{NAME}' has no 'data'"


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BOOL", "BYTES"])
def test_shape_data_count_mismatch(datatype):
    data = {"BOOL": [True] * 3, "BYTES": ["a", "b", "c"]}.get(datatype, [1, 2, 3])
    message = invalid_input(tensor(datatype, [2, 2], data))
    assert message == f"input '{NAME}': shape holds 4 elements but 'data' has 3"


@pytest.mark.parametrize("datatype", ["FP32", "UINT8", "BOOL", "BYTES"])
def test_huge_shape_with_tiny_data_is_refused_without_allocating(datatype):
    data = {"BOOL": [True], "BYTES": ["a"]}.get(datatype, [1])
    body = request_body(tensor(datatype, [10**6, 10**6], data))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as info:
            decode_request(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.message == (
        f"input '{NAME}': shape holds 1000000000000 elements but 'data' has 1"
    )
    assert peak < 1024**2


def test_zero_element_shape_with_huge_dimension():
    with pytest.raises(InvalidInput, match=NAME):
        decode(tensor("FP32", [2**62, 0], []))


@pytest.mark.parametrize(
    "datatype, data",
    [("FP32", [[1, 2], [3]]), ("INT32", [1, [2, 3]]), ("BOOL", [[True], [False, True]])],
)
def test_ragged_nested_data(datatype, data):
    message = invalid_input(tensor(datatype, [3], data))
    assert message == f"input '{NAME}': 'data' is ragged or not a list of numbers"


def test_ragged_nested_bytes_data():
    with pytest.raises(InvalidInput, match=NAME):
        decode(tensor("BYTES", [3], [["a", "b"], ["c"]]))


@pytest.mark.parametrize(
    "datatype, data, expected",
    [
        ("FP32", ["1.5"], "FP32 data must be numbers"),
        ("FP64", [1, "2"], "FP64 data must be numbers"),
        ("FP16", [None], "FP16 data must be numbers"),
        ("FP32", [{"v": 1}], "FP32 data must be numbers"),
        ("FP32", [True], "FP32 data must be numbers"),
        ("INT32", ["7"], "INT32 data must be integers"),
        ("UINT8", [None], "UINT8 data must be integers"),
    ],
)
def test_strings_and_other_values_in_numeric_data(datatype, data, expected):
    assert invalid_input(tensor(datatype, [len(data)], data)) == f"input '{NAME}': {expected}"


@pytest.mark.parametrize("data", [[1, 0], [0], ["true"], [True, 1], [None], [1.0]])
def test_non_bools_in_bool(data):
    message = invalid_input(tensor("BOOL", [len(data)], data))
    assert message == f"input '{NAME}': BOOL data must be true/false"


@pytest.mark.parametrize(
    "datatype, value",
    [
        ("UINT8", 300), ("UINT8", 256), ("UINT8", -1), ("UINT16", 65536), ("UINT32", -1),
        ("UINT32", 2**32), ("UINT64", -1), ("INT8", 128), ("INT8", -129), ("INT16", 40000),
        ("INT32", 2**31), ("INT32", -(2**31) - 1), ("INT64", 2**63),
    ],
)
def test_integers_out_of_range(datatype, value):
    message = invalid_input(tensor(datatype, [1], [value]))
    assert message == f"input '{NAME}': a value is out of range for {datatype}"


@pytest.mark.parametrize("datatype", ["INT8", "INT32", "INT64", "UINT8", "UINT64"])
@pytest.mark.parametrize("data", [[1.5], [1.0], [1, 2.5]])
def test_floats_for_int_datatypes(datatype, data):
    message = invalid_input(tensor(datatype, [len(data)], data))
    assert message == f"input '{NAME}': {datatype} data must be integers"


@pytest.mark.parametrize(
    "datatype, value", [("FP32", 1e39), ("FP32", -1e39), ("FP16", 70000.0), ("FP16", 1e10)]
)
def test_float_overflow(datatype, value):
    message = invalid_input(tensor(datatype, [2], [1.0, value]))
    assert message == f"input '{NAME}': a value is out of range for {datatype}"


def test_fp64_near_its_limit_is_accepted():
    assert decode(tensor("FP64", [1], [1.7e308])).inputs[0].data.tolist() == [1.7e308]


@pytest.mark.parametrize(
    "datatype, data, expected",
    [
        ("INT32", [True, 2], "INT32 data must be integers, not true/false"),
        ("UINT8", [False, 7], "UINT8 data must be integers, not true/false"),
        ("INT64", [[1, 2], [3, False]], "INT64 data must be integers, not true/false"),
        ("FP32", [True, 1.5], "FP32 data must be numbers, not true/false"),
        ("FP64", [[1.0], [True]], "FP64 data must be numbers, not true/false"),
        ("UINT64", [True, 18446744073709551615], "UINT64 data must be integers, not true/false"),
    ],
)
def test_json_booleans_among_numbers_are_refused(datatype, data, expected):
    """numpy reads them as 0 and 1; Triton refuses a JSON boolean in a numeric tensor."""
    shape = [len(data), len(data[0])] if isinstance(data[0], list) else [len(data)]
    assert invalid_input(tensor(datatype, shape, data)) == f"input '{NAME}': {expected}"


def test_numbers_in_a_body_that_mentions_true_elsewhere_are_accepted():
    request = decode(tensor("INT32", [2], [1, 0]), tensor("FP64", [1], [1.0], name="b"), id="true",
                     parameters={"binary_data_output": False})
    np.testing.assert_array_equal(by_name(request)[NAME], [1, 0])


@pytest.mark.parametrize(
    "data", [["a", ["b"]], [["a"], "b"], [["a"], [["b"]]], [[["a"]], ["b"]], [[], ["a"]]]
)
def test_ragged_bytes_data_of_lists_and_leaves(data):
    assert invalid_input(tensor("BYTES", [2], data)) == f"input '{NAME}': 'data' is ragged"


@pytest.mark.parametrize("data", [[1], [None], [["a"], [2]], [True]])
def test_non_strings_in_bytes(data):
    message = invalid_input(tensor("BYTES", [len(data)], data))
    assert message == f"input '{NAME}': BYTES data must be strings"


def test_duplicate_input_names():
    message = invalid_input(tensor("FP32", [1], [1.0]), tensor("INT32", [1], [1]))
    assert message == f"input '{NAME}' is given more than once"


def test_duplicate_output_names():
    message = invalid_input(
        tensor("FP32", [1], [1.0]),
        outputs=[{"name": "predict"}, {"name": "proba"}, {"name": "predict"}],
    )
    assert message == "output 'predict' is requested more than once"


@pytest.mark.parametrize("outputs", [{"name": "x"}, "predict", [["predict"]], [{"name": 3}], [{}]])
def test_malformed_outputs(outputs):
    message = invalid_input(tensor("FP32", [1], [1.0]), outputs=outputs)
    assert "'outputs'" in message


def test_output_parameters_must_be_an_object():
    message = invalid_input(tensor("FP32", [1], [1.0]), outputs=[{"name": "p", "parameters": 1}])
    assert message == "'parameters' of the output 'p' must be an object"


@pytest.mark.parametrize("request_id", [5, ["a"], {"id": "a"}])
def test_id_must_be_a_string(request_id):
    assert invalid_input(tensor("FP32", [1], [1.0]), id=request_id) == "'id' must be a string"


def test_request_parameters_must_be_an_object():
    message = invalid_input(tensor("FP32", [1], [1.0]), parameters=[1])
    assert message == "'parameters' of the request must be an object"


def test_input_parameters_must_be_an_object():
    message = invalid_input(tensor("FP32", [1], [1.0], parameters="binary"))
    assert message == f"'parameters' of the input '{NAME}' must be an object"


# ----------------------------------------------------------------------------- binary decoding


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC])
def test_binary_input_of_every_numeric_datatype(datatype):
    values = np.array(SAMPLE_VALUES[datatype], dtype=DTYPES[datatype]).reshape(2, 2)
    blob = values.tobytes()
    doc = {"inputs": [tensor(datatype, [2, 2], parameters={"binary_data_size": len(blob)})]}
    body, header = binary_body(doc, blob)
    tensor_in = decode_request(body, header).inputs[0]
    assert tensor_in.data.dtype == DTYPES[datatype]
    assert tensor_in.shape == (2, 2)
    np.testing.assert_array_equal(tensor_in.data, values)
    assert tensor_in.parameters == {"binary_data_size": len(blob)}


def test_binary_bytes_input_with_length_prefixes():
    items = [b"abc", b"", b"\xff\x00\x01", "é".encode()]
    blob = bytes_blob(*items)
    assert blob[:4] == b"\x03\x00\x00\x00"  # 4-byte little-endian length
    doc = {"inputs": [tensor("BYTES", [2, 2], parameters={"binary_data_size": len(blob)})]}
    body, header = binary_body(doc, blob)
    tensor_in = decode_request(body, header).inputs[0]
    assert tensor_in.data.dtype == object
    assert tensor_in.data.tolist() == [[b"abc", b""], [b"\xff\x00\x01", "é".encode()]]


def test_binary_and_json_inputs_mixed_in_order():
    first = np.arange(6, dtype=np.float32)
    second = np.array([-1, 2], dtype=np.int16)
    strings = bytes_blob(b"x", b"yz")
    doc = {
        "id": "mixed",
        "inputs": [
            tensor("FP32", [2, 3], name="a", parameters={"binary_data_size": first.nbytes}),
            tensor("INT64", [2], [7, 8], name="json"),
            tensor("BYTES", [2], name="s", parameters={"binary_data_size": len(strings)}),
            tensor("INT16", [2], name="b", parameters={"binary_data_size": second.nbytes}),
        ],
    }
    body, header = binary_body(doc, first.tobytes(), strings, second.tobytes())
    request = decode_request(body, header)
    assert request.id == "mixed"
    assert by_name(request)["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert by_name(request)["json"].tolist() == [7, 8]
    assert by_name(request)["s"].tolist() == [b"x", b"yz"]
    assert by_name(request)["b"].tolist() == [-1, 2]


def test_header_length_equal_to_body_means_no_binary_data():
    body = request_body(tensor("FP32", [1], [2.0]))
    assert decode_request(body, str(len(body))).inputs[0].data.tolist() == [2.0]


def test_zero_sized_binary_input():
    doc = {"inputs": [tensor("FP32", [0, 3], parameters={"binary_data_size": 0})]}
    body, header = binary_body(doc)
    assert decode_request(body, header).inputs[0].shape == (0, 3)


@pytest.mark.parametrize("extra", [1, 100])
def test_header_length_larger_than_body(extra):
    body = request_body(tensor("FP32", [1], [2.0]))
    message = invalid(body, str(len(body) + extra))
    assert message == (
        f"Inference-Header-Content-Length is {len(body) + extra} but the body has {len(body)} bytes"
    )


@pytest.mark.parametrize("header", ["abc", "1.5", "", "0x10", "-1", "1_0", "+5", "١٢"])
def test_header_length_not_a_non_negative_integer(header):
    body = request_body(tensor("FP32", [1], [2.0]))
    assert invalid(body, header) == f"Inference-Header-Content-Length must be a non-negative integer, not {header!r}"


def test_header_length_cutting_the_json():
    body = request_body(tensor("FP32", [1], [2.0]))
    assert "not valid JSON" in invalid(body, str(len(body) - 3))


def test_binary_size_running_past_the_body():
    doc = {"inputs": [tensor("FP32", [4], parameters={"binary_data_size": 16})]}
    body, header = binary_body(doc, np.zeros(3, np.float32).tobytes())
    message = invalid(body, header)
    assert message == f"input '{NAME}': binary_data_size 16 runs past the end of the request body"


def test_binary_size_without_any_binary_body():
    doc = {"inputs": [tensor("FP32", [1], parameters={"binary_data_size": 4})]}
    message = invalid(orjson.dumps(doc))
    assert message == f"input '{NAME}': binary_data_size 4 runs past the end of the request body"


def test_leftover_unclaimed_binary_bytes():
    doc = {"inputs": [tensor("FP32", [1], parameters={"binary_data_size": 4})]}
    body, header = binary_body(doc, np.ones(1, np.float32).tobytes(), b"xyz")
    assert invalid(body, header) == "the request body has 3 bytes of binary data no input claims"


def test_binary_tail_with_only_json_inputs():
    body, header = binary_body({"inputs": [tensor("FP32", [1], [1.0])]}, b"\x00" * 8)
    assert invalid(body, header) == "the request body has 8 bytes of binary data no input claims"


def test_both_data_and_binary_data_size():
    doc = {"inputs": [tensor("FP32", [1], [1.0], parameters={"binary_data_size": 4})]}
    body, header = binary_body(doc, b"\x00" * 4)
    assert invalid(body, header) == f"input '{NAME}' has both 'data' and binary_data_size"


@pytest.mark.parametrize("size", [-4, 4.0, "4", True])
def test_binary_data_size_must_be_a_non_negative_integer(size):
    doc = {"inputs": [tensor("FP32", [1], parameters={"binary_data_size": size})]}
    body, header = binary_body(doc, b"\x00" * 4)
    message = invalid(body, header)
    assert message == f"input '{NAME}': binary_data_size must be a non-negative integer"


def test_binary_size_not_matching_shape_and_datatype():
    doc = {"inputs": [tensor("FP32", [3], parameters={"binary_data_size": 8})]}
    body, header = binary_body(doc, b"\x00" * 8)
    assert invalid(body, header) == (
        f"input '{NAME}': binary_data_size is 8 bytes but shape and FP32 need 12"
    )


def test_binary_huge_shape_is_refused_without_allocating():
    doc = {"inputs": [tensor("FP64", [10**6, 10**6], parameters={"binary_data_size": 8})]}
    body, header = binary_body(doc, b"\x00" * 8)
    tracemalloc.start()
    try:
        message = invalid(body, header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == (
        f"input '{NAME}': binary_data_size is 8 bytes but shape and FP64 need 8000000000000"
    )
    assert peak < 1024**2


def test_binary_bool_bytes_must_be_0_or_1():
    doc = {"inputs": [tensor("BOOL", [3], parameters={"binary_data_size": 3})]}
    body, header = binary_body(doc, b"\x01\x00\x02")
    assert invalid(body, header) == f"input '{NAME}': BOOL bytes must be 0 or 1"


def bytes_error(blob: bytes, shape: list) -> str:
    doc = {"inputs": [tensor("BYTES", shape, parameters={"binary_data_size": len(blob)})]}
    body, header = binary_body(doc, blob)
    return invalid(body, header)


def test_binary_bytes_length_prefix_running_past_its_data():
    blob = struct.pack("<I", 10) + b"abc"
    assert bytes_error(blob, [1]) == f"input '{NAME}': a binary BYTES element runs past its data"


def test_binary_bytes_huge_length_prefix():
    blob = struct.pack("<I", 2**32 - 1) + b"abc"
    assert bytes_error(blob, [1]) == f"input '{NAME}': a binary BYTES element runs past its data"


def test_binary_bytes_fewer_elements_than_shape():
    assert bytes_error(bytes_blob(b"a", b"b"), [3]) == (
        f"input '{NAME}': shape holds 3 elements but the binary data has 2"
    )


def test_binary_bytes_more_elements_than_shape():
    message = bytes_error(bytes_blob(b"a", b"b", b"c"), [2])
    assert message == f"input '{NAME}': binary BYTES data does not match its shape"


def test_binary_bytes_truncated_length_prefix():
    message = bytes_error(bytes_blob(b"a") + b"\x01\x00", [2])
    assert message == f"input '{NAME}': binary BYTES data does not match its shape"


def test_binary_bytes_many_elements_of_mixed_lengths():
    items = [b"", b"a", b"\x00\x00", "é".encode(), b"x" * 300] * 2000
    doc = {"inputs": [tensor("BYTES", [len(items) // 5, 5],
                             parameters={"binary_data_size": len(bytes_blob(*items))})]}
    body, header = binary_body(doc, bytes_blob(*items))
    data = decode_request(body, header).inputs[0].data
    assert data.shape == (2000, 5) and data.dtype == object
    assert data.reshape(-1).tolist() == items


def test_binary_bytes_huge_shape_is_refused():
    message = bytes_error(bytes_blob(b"a"), [10**6, 10**6])
    assert message == f"input '{NAME}': shape holds 1000000000000 elements but the binary data has 1"


# ----------------------------------------------------------------------------- input check


def test_check_sees_every_input_before_its_data_is_decoded():
    seen = []

    def check(name: str, datatype: str) -> None:
        seen.append((name, datatype))
        if datatype == "BYTES":
            raise InvalidInput(f"input '{name}' is BYTES")

    request = decode_request(request_body(tensor("FP32", [1], [1.5], name="a")), None, check)
    assert seen == [("a", "FP32")] and request.inputs[0].name == "a"
    # the data is ragged and its binary part missing: neither is looked at
    body = request_body(tensor("FP32", [1], [1.5], name="b"),
                        tensor("BYTES", [2], [["x"], "y"]), tensor("BYTES", [9], name="c"))
    with pytest.raises(InvalidInput) as info:
        decode_request(body, None, check)
    assert info.value.message == f"input '{NAME}' is BYTES"
    assert seen[1:] == [("b", "FP32"), (NAME, "BYTES")]


# ----------------------------------------------------------------------------- encoding


def plain_request(**parameters) -> InferRequest:
    return InferRequest(inputs=[], parameters=parameters)


def test_encode_json_response():
    response = InferResponse(
        outputs=[
            InferOutput("predict", np.array([1, 0, 2], dtype=np.int64)),
            InferOutput("proba", np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32),
                        parameters={"note": "x"}),
        ],
        model_name="iris",
        model_version="3",
        id="req-1",
        parameters={"took_ms": 1.5},
    )
    body, header = encode_response(response, plain_request())
    assert header is None
    assert orjson.loads(body) == {
        "model_name": "iris",
        "model_version": "3",
        "id": "req-1",
        "parameters": {"took_ms": 1.5},
        "outputs": [
            {"name": "predict", "datatype": "INT64", "shape": [3], "data": [1, 0, 2]},
            {"name": "proba", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 1.0, 0.0],
             "parameters": {"note": "x"}},
        ],
    }


def test_encode_omits_missing_version_id_and_parameters():
    response = InferResponse(outputs=[InferOutput("y", np.array([1.5]))], model_name="m")
    body, header = encode_response(response, plain_request())
    assert header is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "outputs": [{"name": "y", "datatype": "FP64", "shape": [1], "data": [1.5]}],
    }


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC])
def test_encode_json_every_datatype(datatype):
    array = np.array(SAMPLE_VALUES[datatype], dtype=DTYPES[datatype]).reshape(2, 2)
    assert datatype_of(array) == datatype
    body, _ = encode_response(InferResponse([InferOutput("y", array)], "m"), plain_request())
    (out,) = orjson.loads(body)["outputs"]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 2]
    assert len(out["data"]) == 4
    # JSON floats are printed shortest-for-their-width (3e+38 for FP32): compare after the cast back
    np.testing.assert_array_equal(np.array(out["data"], dtype=DTYPES[datatype]), array.reshape(-1))


def test_encode_json_bytes_and_strings():
    raw = np.array([b"abc", "é".encode()], dtype=object)
    text = np.array(["x", "yz"])
    assert datatype_of(raw) == "BYTES"
    assert datatype_of(text) == "BYTES"
    body, _ = encode_response(
        InferResponse([InferOutput("raw", raw), InferOutput("text", text.reshape(2, 1))], "m"),
        plain_request(),
    )
    raw_out, text_out = orjson.loads(body)["outputs"]
    assert raw_out == {"name": "raw", "datatype": "BYTES", "shape": [2], "data": ["abc", "é"]}
    assert text_out == {"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["x", "yz"]}


def test_encode_non_contiguous_array_row_major():
    array = np.arange(6, dtype=np.int32).reshape(2, 3).T  # [[0,3],[1,4],[2,5]]
    body, _ = encode_response(InferResponse([InferOutput("y", array)], "m"), plain_request())
    out = orjson.loads(body)["outputs"][0]
    assert out["shape"] == [3, 2]
    assert out["data"] == [0, 3, 1, 4, 2, 5]


def test_datatype_of_unsupported_dtype():
    with pytest.raises(InferenceError, match="complex128"):
        datatype_of(np.array([1 + 2j]))


def split_binary_response(body: bytes, header: str | None) -> tuple[dict, bytes]:
    assert header is not None
    length = int(header)
    return orjson.loads(body[:length]), body[length:]


def test_binary_output_requested_per_output():
    proba = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int64)
    request = InferRequest(
        inputs=[],
        outputs=[RequestedOutput("proba", {"binary_data": True}), RequestedOutput("predict")],
    )
    response = InferResponse([InferOutput("predict", labels), InferOutput("proba", proba)], "m")
    body, header = encode_response(response, request)
    doc, tail = split_binary_response(body, header)
    assert header == str(len(body) - proba.nbytes)
    predict_out, proba_out = doc["outputs"]
    assert predict_out == {"name": "predict", "datatype": "INT64", "shape": [2], "data": [1, 0]}
    assert proba_out == {"name": "proba", "datatype": "FP32", "shape": [2, 2],
                         "parameters": {"binary_data_size": 16}}
    assert tail == proba.tobytes()


def test_binary_output_requested_for_the_whole_request():
    a = np.array([1.5, 2.5], dtype=np.float64)
    b = np.array([[True, False]], dtype=np.bool_)
    response = InferResponse([InferOutput("a", a), InferOutput("b", b)], "m")
    body, header = encode_response(response, plain_request(binary_data_output=True))
    doc, tail = split_binary_response(body, header)
    assert [o["parameters"] for o in doc["outputs"]] == [
        {"binary_data_size": 16}, {"binary_data_size": 2}
    ]
    assert all("data" not in o for o in doc["outputs"])
    assert tail == a.tobytes() + b"\x01\x00"


def test_per_output_binary_data_false_overrides_request_wide_choice():
    a = np.array([1, 2], dtype=np.int32)
    b = np.array([3, 4], dtype=np.int32)
    request = InferRequest(
        inputs=[],
        outputs=[RequestedOutput("a", {"binary_data": False})],
        parameters={"binary_data_output": True},
    )
    body, header = encode_response(InferResponse([InferOutput("a", a), InferOutput("b", b)], "m"),
                                   request)
    doc, tail = split_binary_response(body, header)
    assert doc["outputs"][0] == {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert tail == b.tobytes()


def test_binary_output_false_everywhere_gives_json_only():
    request = InferRequest(inputs=[], outputs=[RequestedOutput("a", {"binary_data": False})])
    body, header = encode_response(InferResponse([InferOutput("a", np.array([1]))], "m"), request)
    assert header is None
    assert orjson.loads(body)["outputs"][0]["data"] == [1]


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, {"no": 0}, []])
def test_binary_data_must_be_a_json_boolean(value):
    outputs = [{"name": "predict", "parameters": {"binary_data": value}}]
    message = invalid_input(tensor("FP32", [1], [1.0]), outputs=outputs)
    assert message == "parameter 'binary_data' of output 'predict' must be true or false"


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, {"no": 0}, []])
def test_binary_data_output_must_be_a_json_boolean(value):
    message = invalid_input(tensor("FP32", [1], [1.0]), parameters={"binary_data_output": value})
    assert message == "parameter 'binary_data_output' of the request must be true or false"


def test_binary_data_flags_decoded_and_encoded():
    outputs = [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}]
    request = decode(tensor("FP32", [1], [1.0]), outputs=outputs, parameters={"binary_data_output": True})
    response = InferResponse([InferOutput("a", np.array([1.0])), InferOutput("b", np.array([2.0]))], "m")
    doc, tail = split_binary_response(*encode_response(response, request))
    assert doc["outputs"][0]["data"] == [1.0]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert tail == np.array([2.0]).tobytes()


def test_binary_bytes_output_has_length_prefixes():
    array = np.array([b"ab", b"", "é".encode()], dtype=object)
    request = InferRequest(inputs=[], outputs=[RequestedOutput("s", {"binary_data": True})])
    body, header = encode_response(InferResponse([InferOutput("s", array)], "m"), request)
    doc, tail = split_binary_response(body, header)
    expected = b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    assert tail == expected
    assert doc["outputs"][0] == {"name": "s", "datatype": "BYTES", "shape": [3],
                                 "parameters": {"binary_data_size": len(expected)}}


def test_binary_output_of_declared_datatype_and_non_contiguous_array():
    array = np.arange(6, dtype=np.float64).reshape(2, 3).T
    out = InferOutput("y", array, datatype="FP32")
    body, header = encode_response(InferResponse([out], "m"), plain_request(binary_data_output=True))
    doc, tail = split_binary_response(body, header)
    assert doc["outputs"][0]["datatype"] == "FP32"
    assert doc["outputs"][0]["shape"] == [3, 2]
    assert tail == np.array([0, 3, 1, 4, 2, 5], dtype="<f4").tobytes()


@pytest.mark.parametrize("datatype", ["BOOL", *NUMERIC, "BYTES"])
def test_binary_response_round_trips_through_the_decoder(datatype):
    if datatype == "BYTES":
        array = np.array([[b"a", b"bc"], [b"", b"\xff"]], dtype=object)
    else:
        array = np.array(SAMPLE_VALUES[datatype], dtype=DTYPES[datatype]).reshape(2, 2)
    body, header = encode_response(
        InferResponse([InferOutput("y", array)], "m"), plain_request(binary_data_output=True)
    )
    doc, tail = split_binary_response(body, header)
    replay, replay_header = binary_body({"inputs": doc["outputs"]}, tail)
    decoded = decode_request(replay, replay_header).inputs[0]
    assert decoded.datatype == datatype
    assert decoded.data.dtype == array.dtype
    np.testing.assert_array_equal(decoded.data, array)


# ----------------------------------------------------------------------------- batching helpers


def test_concat_rows():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(6, 9, dtype=np.float32).reshape(1, 3)
    merged = concat_rows([a, b])
    assert merged.shape == (3, 3)
    assert merged.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_concat_rows_single_array_is_returned_as_is():
    a = np.arange(4).reshape(2, 2)
    assert concat_rows([a]) is a


def test_split_rows():
    array = np.arange(12).reshape(6, 2)
    parts = split_rows(array, [2, 1, 3])
    assert [p.tolist() for p in parts] == [
        [[0, 1], [2, 3]], [[4, 5]], [[6, 7], [8, 9], [10, 11]]
    ]


def test_split_rows_single_request_and_zero_rows():
    array = np.arange(3)
    assert split_rows(array, [3])[0] is array
    parts = split_rows(array, [0, 3])
    assert [p.tolist() for p in parts] == [[], [0, 1, 2]]


def test_split_rows_of_concat_rows_gives_back_the_inputs():
    a, b = np.array([[1, 2]]), np.array([[3, 4], [5, 6]])
    back = split_rows(concat_rows([a, b]), [1, 2])
    assert [x.tolist() for x in back] == [a.tolist(), b.tolist()]


@pytest.mark.parametrize("rows, counts", [(4, [2, 1]), (2, [2, 1]), (0, [1])])
def test_split_rows_wrong_row_count(rows, counts):
    with pytest.raises(InferenceError) as info:
        split_rows(np.zeros((rows, 2)), counts)
    assert info.value.message == f"the model returned {rows} rows for a batch of {sum(counts)}"


def test_split_rows_scalar_counts_as_one_row():
    scalar = np.array(5.0)
    assert split_rows(scalar, [1])[0] is scalar
    with pytest.raises(InferenceError, match="returned 1 rows for a batch of 2"):
        split_rows(scalar, [1, 1])


@pytest.mark.parametrize(
    "datatype, literal",
    [
        ("INT64", b"100000000000000000000000000"), ("INT64", b"-18446744073709551616"),
        ("INT32", b"18446744073709551616"), ("UINT8", b"1e30"), ("UINT64", b"18446744073709551616"),
        ("UINT64", b"[1, 18446744073709551616]"), ("UINT64", b"[18446744073709551615, 1e20]"),
    ],
)
def test_integers_beyond_64_bits_are_out_of_range_not_non_integers(datatype, literal):
    """JSON integers beyond 64 bits reach numpy as floats: the error must still say what is wrong."""
    data = literal if literal.startswith(b"[") else b"[" + literal + b"]"
    count = data.count(b",") + 1
    body = (b'{"inputs":[{"name":"' + NAME.encode() + b'","datatype":"' + datatype.encode()
            + b'","shape":[' + str(count).encode() + b'],"data":' + data + b"}]}")
    with pytest.raises(InvalidInput) as error:
        decode_request(body)
    assert error.value.message == f"input '{NAME}': a value is out of range for {datatype}"
