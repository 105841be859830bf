"""Wire format <-> numpy: V2 JSON bodies, the binary tensor data extension, and row batching helpers.

Decoding validates everything a client can get wrong and raises ``InvalidInput`` naming the
tensor and the problem; nothing is allocated from a client's claimed size before the claim is
checked against the bytes actually received.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from .errors import InferenceError, InvalidInput
from .types import InferInput, InferRequest, InferResponse, RequestedOutput

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
MAX_DIMS = 32
BINARY_HEADER = "inference-header-content-length"

_BY_NUMPY: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items() if name != "BYTES"}
_LENGTH_PREFIX = struct.Struct("<I")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
#: ``check(name, datatype)`` raises ``InvalidInput`` for an input the model cannot take
InputCheck = Callable[[str, str], None]


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name for a numpy array's dtype."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    name = _BY_NUMPY.get(array.dtype)
    if name is None:
        raise InferenceError(f"the model produced dtype {array.dtype}, which V2 cannot carry")
    return name


# ----------------------------------------------------------------------------- decoding


def decode_request(body: bytes, header_length: str | None = None, check: InputCheck | None = None) -> InferRequest:
    """Decode a V2 inference request body (JSON, optionally followed by binary tensor data);
    ``check`` sees each input's name and datatype before its data is decoded."""
    json_part, binary = _split_binary(body, header_length)
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    reader = _BinaryReader(binary)
    # numpy reads a JSON boolean among numbers as 0 or 1: look for one only if the body has any
    bools = json_part.find(b"true") >= 0 or json_part.find(b"false") >= 0  # find: faster than "in"
    inputs: list[InferInput] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_inputs):
        tensor = _decode_input(raw, index, reader, bools, check)
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        seen.add(tensor.name)
        inputs.append(tensor)
    reader.finish()

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = _parameters(doc.get("parameters"), "request")
    _check_flag(parameters, "binary_data_output", "the request")
    return InferRequest(
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs")),
        id=request_id,
        parameters=parameters,
    )


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):  # int() would also take "1_0", "+5" and "-1"
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, not {header_length!r}")
    length = int(text)
    if length > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes"
        )
    return body[:length], body[length:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'parameters' of the {where} must be an object")
    return value


def _check_flag(parameters: dict[str, Any], key: str, where: str) -> None:
    """A boolean parameter must be a JSON boolean (as Triton's AsBool has it): "false" is not."""
    if key in parameters and type(parameters[key]) is not bool:
        raise InvalidInput(f"parameter '{key}' of {where} must be true or false")


def _decode_outputs(value: Any) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for raw in value:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput("every entry of 'outputs' must be an object with a string 'name'")
        name = raw["name"]
        if name in seen:
            raise InvalidInput(f"output '{name}' is requested more than once")
        seen.add(name)
        parameters = _parameters(raw.get("parameters"), f"output '{name}'")
        _check_flag(parameters, "binary_data", f"output '{name}'")
        outputs.append(RequestedOutput(name, parameters))
    return outputs


def _decode_shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_DIMS:
        raise InvalidInput(f"input '{name}': shape has {len(raw)} dimensions, at most {MAX_DIMS}")
    for dim in raw:
        if type(dim) is not int:
            raise InvalidInput(f"input '{name}': shape {raw} must hold integers only")
        if dim < 0:
            raise InvalidInput(f"input '{name}': shape {raw} has a negative dimension")
    return tuple(raw)


def _decode_input(raw: Any, index: int, reader: _BinaryReader, bools: bool, check: InputCheck | None) -> InferInput:
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a non-empty string 'name'")
    datatype = raw.get("datatype")
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(
            f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}"
        )
    shape = _decode_shape(raw.get("shape"), name)
    if check is not None:
        check(name, datatype)
    count = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), f"input '{name}'")
    binary_size = parameters.get("binary_data_size")

    if binary_size is not None:
        if "data" in raw:
            raise InvalidInput(f"input '{name}' has both 'data' and binary_data_size")
        if type(binary_size) is not int or binary_size < 0:
            raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
        chunk = reader.take(binary_size, name)
        array = _from_binary(chunk, datatype, dtype, count, name)
    else:
        if "data" not in raw:
            raise InvalidInput(f"input '{name}' has no 'data'")
        array = _from_json(raw["data"], datatype, dtype, count, name, bools)
    try:
        shaped = array.reshape(shape)
    except ValueError:
        raise InvalidInput(f"input '{name}': shape {list(shape)} is too large") from None
    return InferInput(name, datatype, shaped, parameters)


def _from_json(data: Any, datatype: str, dtype: np.dtype, count: int, name: str, bools: bool) -> np.ndarray:
    """``bools``: whether the body may hold a JSON boolean at all."""
    if datatype == "BYTES":
        return _bytes_from_json(data, count, name)
    try:
        parsed = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input '{name}': 'data' is ragged or not a list of numbers") from None
    if parsed.size != count:
        raise InvalidInput(
            f"input '{name}': shape holds {count} elements but 'data' has {parsed.size}"
        )
    if bools and datatype != "BOOL" and parsed.dtype.kind in "iuf" and _holds_bool(data):
        expected = "integers" if dtype.kind in "iu" else "numbers"
        raise InvalidInput(f"input '{name}': {datatype} data must be {expected}, not true/false")
    if datatype == "UINT64" and parsed.dtype.kind == "f":
        parsed = _exact_integers(data, name)
    return _cast(parsed, datatype, dtype, name)


def _holds_bool(data: Any) -> bool:
    """Whether JSON ``data`` (nested lists or a scalar) holds a boolean."""
    if type(data) is not list:
        return type(data) is bool
    types = set(map(type, data))
    return bool in types or (list in types and any(_holds_bool(item) for item in data if type(item) is list))


def _exact_integers(data: Any, name: str) -> np.ndarray:
    """numpy parses integers >= 2**63 mixed with smaller ones as float64; keep them exact."""
    values = np.array(data, dtype=object).reshape(-1)
    if not all(type(v) is int for v in values):
        if any(type(v) is float and not 0 <= v < 2.0**64 for v in values):
            raise InvalidInput(f"input '{name}': a value is out of range for UINT64")
        raise InvalidInput(f"input '{name}': UINT64 data must be integers")
    if values.size and (min(values) < 0 or max(values) >= 2**64):
        raise InvalidInput(f"input '{name}': a value is out of range for UINT64")
    return np.array(values.tolist(), dtype=np.uint64)


def _cast(parsed: np.ndarray, datatype: str, dtype: np.dtype, name: str) -> np.ndarray:
    """Cast JSON-parsed values to the declared datatype, refusing lossy or out-of-range values."""
    kind = parsed.dtype.kind
    if parsed.size == 0:
        return parsed.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input '{name}': BOOL data must be true/false")
        return parsed
    if dtype.kind in "iu":
        if kind not in "iu":
            if kind == "f" and _beyond_integer_range(parsed, dtype):
                # the JSON parser yields integers beyond 64 bits as floats
                raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
            raise InvalidInput(f"input '{name}': {datatype} data must be integers")
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
        return parsed.astype(dtype)
    if kind not in "iuf":
        raise InvalidInput(f"input '{name}': {datatype} data must be numbers")
    with np.errstate(over="ignore"):
        cast = parsed.astype(dtype)
    if not np.isfinite(cast).all():
        raise InvalidInput(f"input '{name}': a value is out of range for {datatype}")
    return cast


def _beyond_integer_range(parsed: np.ndarray, dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return bool(parsed.min() < float(info.min) or parsed.max() >= float(info.max) + 1)


def _bytes_from_json(data: Any, count: int, name: str) -> np.ndarray:
    try:  # numpy walks the nesting in C; strings stay whole (they are not sequences to it)
        nested = np.array(data, dtype=object)
    except ValueError:
        raise InvalidInput(f"input '{name}': 'data' is ragged") from None
    if nested.ndim > MAX_DIMS:
        raise InvalidInput(f"input '{name}': 'data' is nested deeper than {MAX_DIMS} levels")
    flat = nested.reshape(-1).tolist()
    try:
        encoded = [item.encode("utf-8", "surrogatepass") for item in flat]
    except AttributeError:  # a leaf that is no string, or a list left where the nesting is ragged
        problem = "'data' is ragged" if list in set(map(type, flat)) else "BYTES data must be strings"
        raise InvalidInput(f"input '{name}': {problem}") from None
    if len(encoded) != count:
        raise InvalidInput(f"input '{name}': shape holds {count} elements but 'data' has {len(encoded)}")
    array = np.empty(count, dtype=object)
    array[:] = encoded
    return array


def _from_binary(chunk: bytes, datatype: str, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_binary(chunk, count, name)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInput(
            f"input '{name}': binary_data_size is {len(chunk)} bytes but shape and {datatype} "
            f"need {expected}"
        )
    array = np.frombuffer(chunk, dtype=dtype)
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise InvalidInput(f"input '{name}': BOOL bytes must be 0 or 1")
    return array


def _bytes_from_binary(chunk: bytes, count: int, name: str) -> np.ndarray:
    """Length-prefixed elements; the loop does as little per element as it can (millions of
    short strings are a plausible request) and the checks follow it."""
    items: list[bytes] = []
    append, unpack = items.append, _LENGTH_PREFIX.unpack_from
    offset, end = 0, len(chunk)
    try:
        for _ in range(min(count, end // 4)):  # every element takes at least its 4-byte prefix
            (length,) = unpack(chunk, offset)
            offset += 4 + length
            append(chunk[offset - length : offset])
    except struct.error:  # a prefix past the end (after an element that ran past it) or cut short
        if offset < end:
            raise InvalidInput(f"input '{name}': binary BYTES data does not match its shape") from None
    if offset > end:
        raise InvalidInput(f"input '{name}': a binary BYTES element runs past its data")
    if offset < end:
        raise InvalidInput(f"input '{name}': binary BYTES data does not match its shape")
    if len(items) != count:
        raise InvalidInput(
            f"input '{name}': shape holds {count} elements but the binary data has {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


class _BinaryReader:
    """Hands out consecutive slices of the binary tail of a request."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def take(self, size: int, name: str) -> bytes:
        if self._offset + size > len(self._data):
            raise InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the request body"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk.tobytes()

    def finish(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise InvalidInput(f"the request body has {left} bytes of binary data no input claims")


# ----------------------------------------------------------------------------- encoding


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, str | None]:
    """Encode a response; returns the body and the JSON header length when binary data follows."""
    wants_binary = _binary_choices(request)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in response.outputs:
        array = out.data
        datatype = out.datatype or datatype_of(array)
        entry: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": array.shape}
        parameters = dict(out.parameters)
        if wants_binary(out.name):
            blob = _to_binary(array, datatype)
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = _to_json_data(array, datatype)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), str(len(header))


def _binary_choices(request: InferRequest):
    default = bool(request.parameters.get("binary_data_output", False))
    per_output = {
        out.name: bool(out.parameters["binary_data"])
        for out in request.outputs
        if "binary_data" in out.parameters
    }
    if not per_output:
        return lambda _name: default
    return lambda name: per_output.get(name, default)


def _to_json_data(array: np.ndarray, datatype: str) -> Any:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [_text(item) for item in flat.tolist()]
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    return flat


def _text(item: Any) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8", "replace")
    return str(item)


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1).tolist():
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH_PREFIX.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def encode_json(doc: Any) -> bytes:
    """Encode any JSON document the API returns (numpy arrays allowed)."""
    return orjson.dumps(doc, option=_JSON_OPTS)


# ----------------------------------------------------------------------------- batching


def concat_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack several requests' tensors along the first (batch) dimension."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays, axis=0)


def split_rows(array: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Split a batched result back into per-request slices of ``counts`` rows each."""
    rows = array.shape[0] if array.ndim else 1
    if rows != sum(counts):
        raise InferenceError(f"the model returned {rows} rows for a batch of {sum(counts)}")
    if len(counts) == 1:
        return [array]
    parts = []
    start = 0
    for count in counts:  # plain slices: np.split costs ~10 µs for a batch of 8
        parts.append(array[start:start + count])
        start += count
    return parts
