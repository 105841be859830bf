"""A raw-socket fuzz of the inference routes, and path safety of every route that takes a name.

Requests are bytes written to a socket and answers are parsed by hand (``hardening_support``), so
the server sees exactly what a hostile client can send: truncated and absurdly nested JSON,
NaN/Infinity, numbers beyond each datatype, wrong Content-Types, invalid UTF-8, binary-extension
lengths that lie, a shape of 10^12 elements, duplicate or missing inputs, chunked bodies, bodies
over the limit. Every one must get its 4xx with a JSON ``{"error": ...}`` that names the problem,
and the server's resident memory must stay flat across the whole fuzz.

Names in URLs (``..``, encoded slashes and dots, absolute paths, backslashes, NUL, huge names)
never reach outside the repository: 400 or 404, never 5xx, and a pickle planted outside the
repository (which creates a marker file if anything ever unpickles it) is never loaded, neither
through a symlinked model folder nor through a Triton-style load request carrying files.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib
import pytest

from hardening_support import (
    IRIS_ROWS,
    RawResponse,
    build_small_repo,
    connect,
    http,
    infer_body,
    predicted,
    read_response,
    request_bytes,
    rss_bytes,
    send,
)

MAX_REQUEST_BYTES = 1024 * 1024
READ_TIMEOUT_S = 5
INFER_PATHS = ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer")
#: resident memory may grow this much across the whole fuzz (allocator slack, caches)
RSS_BOUND = 24 * 1024 * 1024
FUZZ_ROUNDS = 3


class TouchOnLoad:
    """Pickles into a call of ``open(path, "w")``: whoever unpickles it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class Planted:
    marker: Path
    pickle_bytes: bytes


@pytest.fixture(scope="module")
def fuzz_repo(tmp_path_factory) -> tuple[object, Planted]:
    base = tmp_path_factory.mktemp("fuzz")
    repo = build_small_repo(base / "repo")
    marker = base / "UNPICKLED-OUTSIDE-THE-REPOSITORY"
    secret = base / "outside" / "secret"
    secret.mkdir(parents=True)
    joblib.dump(TouchOnLoad(marker), secret / "model.joblib")
    os.symlink(secret, repo.path / "escape", target_is_directory=True)
    return repo, Planted(marker, (secret / "model.joblib").read_bytes())


@pytest.fixture(scope="module")
def fuzz_server(fuzz_repo, start_server, tmp_path_factory) -> Iterator:
    repo, _ = fuzz_repo
    log_path = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    with start_server(repo.path, log_path, "--model-control-mode", "explicit",
                      "--max-request-bytes", str(MAX_REQUEST_BYTES),
                      "--request-read-timeout-s", str(READ_TIMEOUT_S)) as server:
        yield server


# ----------------------------------------------------------------------------- the cases


@dataclass
class Fuzz:
    label: str
    body: bytes
    says: str  # the error must contain this (case-insensitive)
    status: int = 400
    headers: dict[str, str] | None = None
    raw: bytes | None = None  # the whole request, when the framing itself is the fuzz


def tensor(datatype: str = "FP64", shape=(1, 4), data=None, name: str = "input-0", **extra) -> dict:
    doc = {"name": name, "datatype": datatype, "shape": list(shape)}
    if data is not None:
        doc["data"] = data
    return {**doc, **extra}


def doc(*inputs, **top) -> bytes:
    return json.dumps({"inputs": list(inputs), **top}).encode()


def raw_doc(datatype: str, literal: bytes) -> bytes:
    """A one-input request whose data is a JSON literal no encoder would write."""
    return (b'{"inputs":[{"name":"input-0","datatype":"' + datatype.encode() + b'","shape":[1],"data":['
            + literal + b"]}]}")


def binary(inputs: list[dict], blob: bytes, header_length: str | None = None) -> dict:
    """``body`` and ``headers`` of a binary-extension request (JSON header, then ``blob``)."""
    header = json.dumps({"inputs": inputs}).encode()
    length = str(len(header)) if header_length is None else header_length
    return {"body": header + blob, "headers": {"Inference-Header-Content-Length": length}}


GOOD = json.dumps(infer_body()).encode()
ROW = struct.pack("<4d", *IRIS_ROWS[0])

# numbers beyond each datatype (JSON literals), and what the error must say
OUT_OF_RANGE = [
    ("UINT8", b"256"), ("UINT8", b"-1"), ("UINT16", b"65536"), ("UINT32", b"4294967296"),
    ("UINT64", b"18446744073709551616"), ("UINT64", b"-1"), ("INT8", b"128"), ("INT8", b"-129"),
    ("INT16", b"32768"), ("INT32", b"2147483648"), ("INT64", b"9223372036854775808"),
    ("INT64", b"1180591620717411303424"), ("INT64", b"-18446744073709551616"),
    ("FP16", b"65520"), ("FP16", b"-1e10"), ("FP32", b"3.5e38"), ("FP32", b"-1e39"),
]


def fuzz_cases() -> list[Fuzz]:
    cases: list[Fuzz] = []
    add = cases.append
    # --- truncated and malformed JSON
    for cut in range(0, len(GOOD) - 1, 9):
        add(Fuzz(f"truncated at {cut}", GOOD[:cut], "not valid JSON"))
    add(Fuzz("100k nested arrays", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"))
    add(Fuzz("100k nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON"))
    add(Fuzz("100k unclosed brackets", b"[" * 100_000, "not valid JSON"))
    add(Fuzz("1000-deep data", raw_doc("FP64", b"[" * 999 + b"1" + b"]" * 999), "input-0"))
    # (BYTES to this numeric model is refused from the input's header, before its data is read;
    # test_codec.py covers what the decoder says of such data itself)
    add(Fuzz("40-deep BYTES data", doc(tensor("BYTES", [1], json.loads("[" * 40 + '"a"' + "]" * 40))), "BYTES"))
    add(Fuzz("body is a list", b"[1, 2]", "JSON object"))
    add(Fuzz("body is a string", b'"inputs"', "JSON object"))
    add(Fuzz("body is null", b"null", "JSON object"))
    add(Fuzz("empty body", b"", "not valid JSON"))
    add(Fuzz("trailing garbage", GOOD + b"}}}", "not valid JSON"))
    # --- NaN and Infinity literals, and numbers that overflow double
    for literal in (b"NaN", b"nan", b"Infinity", b"-Infinity", b"inf"):
        add(Fuzz(f"literal {literal.decode()}", raw_doc("FP64", literal), "not valid JSON"))
    add(Fuzz("1e400", raw_doc("FP64", b"1e400"), "infinity"))
    add(Fuzz("NaN in binary FP64", **binary([tensor(shape=[1, 4], parameters={"binary_data_size": 32})],
                                           struct.pack("<4d", 1.0, float("nan"), 1.0, 1.0)), says="NaN"))
    add(Fuzz("inf in binary FP64", **binary([tensor(shape=[1, 4], parameters={"binary_data_size": 32})],
                                           struct.pack("<4d", 1.0, float("inf"), 1.0, 1.0)), says="infinity"))
    # --- numbers out of each datatype's range
    for datatype, literal in OUT_OF_RANGE:
        add(Fuzz(f"{datatype} {literal.decode()}", raw_doc(datatype, literal), f"out of range for {datatype}"))
    add(Fuzz("BOOL 2", raw_doc("BOOL", b"2"), "true/false"))
    add(Fuzz("INT32 1.5", raw_doc("INT32", b"1.5"), "must be integers"))
    add(Fuzz("binary BOOL 2", **binary([tensor("BOOL", [1], parameters={"binary_data_size": 1})], b"\x02"),
             says="0 or 1"))
    # --- wrong Content-Type (the body decides: JSON or binary; anything else is refused)
    add(Fuzz("form body", b"inputs=1&shape=2", "not valid JSON",
             headers={"Content-Type": "application/x-www-form-urlencoded"}))
    add(Fuzz("multipart body", b'--b\r\nContent-Disposition: form-data; name="inputs"\r\n\r\n1\r\n--b--\r\n',
             "not valid JSON", headers={"Content-Type": "multipart/form-data; boundary=b"}))
    add(Fuzz("XML body", b"<inputs><x>1</x></inputs>", "not valid JSON", headers={"Content-Type": "application/xml"}))
    add(Fuzz("octet-stream without the binary header", ROW * 4, "not valid JSON",
             headers={"Content-Type": "application/octet-stream"}))
    # --- invalid UTF-8
    add(Fuzz("invalid UTF-8 in a name", GOOD.replace(b"input-0", b"input-\xff\xfe"), "UTF-8"))
    add(Fuzz("invalid UTF-8 in BYTES data", b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["\xc3\x28"]}]}',
             "UTF-8"))
    add(Fuzz("overlong UTF-8 slash", b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["\xc0\xaf"]}]}',
             "UTF-8"))
    add(Fuzz("lone surrogate escape", b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}',
             "surrogate"))
    add(Fuzz("invalid UTF-8 in binary BYTES", **binary([tensor("BYTES", [1], parameters={"binary_data_size": 6})],
                                                      b"\x02\x00\x00\x00\xff\xfe"), says="BYTES"))
    # --- the binary extension's lengths lie
    inputs = [tensor(shape=[1, 4], parameters={"binary_data_size": 32})]
    header_len = len(json.dumps({"inputs": inputs}))
    for label, length, says in [
        ("longer than the body", str(header_len + 33), "Inference-Header-Content-Length"),
        ("far longer than the body", str(10**30), "Inference-Header-Content-Length"),
        ("negative", "-1", "Inference-Header-Content-Length"),
        ("non-numeric", "thirty", "Inference-Header-Content-Length"),
        ("a float", "12.5", "Inference-Header-Content-Length"),
        ("empty", "", "Inference-Header-Content-Length"),
        ("shorter than the JSON", str(header_len - 5), "not valid JSON"),
        ("zero", "0", "not valid JSON"),
    ]:
        add(Fuzz(f"header length {label}", **binary(inputs, ROW, length), says=says))
    for label, size, blob, says in [
        ("size past the body", 64, ROW, "runs past the end"),
        ("size below the shape", 16, ROW, "binary_data_size is 16 bytes"),
        ("size above the shape", 40, ROW + b"\0" * 8, "binary_data_size is 40 bytes"),
        ("size negative", -32, ROW, "non-negative integer"),
        ("size a string", "32", ROW, "non-negative integer"),
        ("size a float", 32.0, ROW, "non-negative integer"),
        ("unclaimed trailing bytes", 32, ROW + b"junk", "no input claims"),
    ]:
        add(Fuzz(f"binary_data_size: {label}",
                 **binary([tensor(shape=[1, 4], parameters={"binary_data_size": size})], blob), says=says))
    add(Fuzz("both data and binary_data_size",
             **binary([tensor(shape=[1, 4], data=[1, 2, 3, 4], parameters={"binary_data_size": 32})], ROW),
             says="both 'data' and binary_data_size"))
    add(Fuzz("BYTES element length past its data",
             **binary([tensor("BYTES", [1], parameters={"binary_data_size": 5})], b"\xff\xff\xff\x7fa"), says="BYTES"))
    # --- a shape whose product is 10^12 (refused before anything is allocated)
    add(Fuzz("10^12 elements, JSON", doc(tensor(shape=[10**6, 10**6], data=[1.0])), "1000000000000"))
    add(Fuzz("10^12 elements, binary", **binary([tensor("FP32", [10**6, 10**6], parameters={"binary_data_size": 4})],
                                               b"\0" * 4), says="4000000000000"))
    add(Fuzz("10^12 elements, BYTES", doc(tensor("BYTES", [10**12], ["a"])), "BYTES"))
    add(Fuzz("10^12 elements, binary BYTES",
             **binary([tensor("BYTES", [10**6, 10**6], parameters={"binary_data_size": 5})], b"\x01\x00\x00\x00a"),
             says="BYTES"))
    add(Fuzz("0 x 10^12 elements", doc(tensor(shape=[0, 10**12], data=[])), "features"))
    add(Fuzz("2^62 x 2^62 x 0", doc(tensor(shape=[2**62, 2**62, 0], data=[])), "too large"))
    add(Fuzz("negative dimension", doc(tensor(shape=[-1, 4], data=[1, 2, 3, 4])), "negative"))
    add(Fuzz("33 dimensions", doc(tensor(shape=[1] * 33, data=[1])), "at most 32"))
    # --- input lists
    add(Fuzz("duplicate input names", doc(tensor(data=[1, 2, 3, 4]), tensor(data=[1, 2, 3, 4])), "more than once"))
    add(Fuzz("duplicate output names", doc(tensor(data=[1, 2, 3, 4]), outputs=[{"name": "predict"}] * 2),
             "more than once"))
    add(Fuzz("empty inputs", doc(), "non-empty"))
    add(Fuzz("no inputs", b'{"id": "x"}', "non-empty"))
    add(Fuzz("inputs is an object", b'{"inputs": {"name": "input-0"}}', "non-empty"))
    add(Fuzz("input is a number", b'{"inputs": [1]}', "inputs[0]"))
    add(Fuzz("empty input name", doc(tensor(name="", data=[1, 2, 3, 4])), "non-empty string 'name'"))
    add(Fuzz("lowercase datatype", doc(tensor("fp32", data=[1, 2, 3, 4])), "unknown datatype"))
    add(Fuzz("no data", doc(tensor()), "has no 'data'"))
    add(Fuzz("ragged data", doc(tensor(shape=[2, 2], data=[[1, 2], [3]])), "ragged"))
    add(Fuzz("strings in FP64", doc(tensor(shape=[1, 4], data=["a", "b", "c", "d"])), "must be numbers"))
    add(Fuzz("BYTES to a numeric model", doc(tensor("BYTES", [1, 4], ["a", "b", "c", "d"])), "BYTES"))
    add(Fuzz("wrong feature count", doc(tensor(shape=[1, 3], data=[1, 2, 3])), "features"))
    add(Fuzz("unknown output", doc(tensor(data=[1, 2, 3, 4]), outputs=[{"name": "secret"}]), "unknown output"))
    add(Fuzz("id not a string", doc(tensor(data=[1, 2, 3, 4]), id=7), "'id'"))
    add(Fuzz("bad timeout parameter", doc(tensor(data=[1, 2, 3, 4]), parameters={"timeout": "soon"}), "timeout"))
    add(Fuzz("bad Request-Timeout header", GOOD, "Request-Timeout", headers={"Request-Timeout": "nan"}))
    # --- framing: chunked bodies, lying Content-Length, bodies over the limit
    add(Fuzz("chunked truncated JSON", b"", "not valid JSON", raw=chunked(GOOD[:40], 7)))
    add(Fuzz("chunked over the limit", b"", "limit", status=413,
             raw=chunked(b"[" * (MAX_REQUEST_BYTES + 10), 256 * 1024)))
    add(Fuzz("body just over the limit", b"[" * (MAX_REQUEST_BYTES + 1), "limit", status=413))
    return cases


def chunked(body: bytes, size: int) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    head = request_bytes("POST", "{path}", headers={"Transfer-Encoding": "chunked"}, content_length=False)
    return head + b"".join(parts) + b"0\r\n\r\n"


CASES = fuzz_cases()


def run_case(url: str, case: Fuzz, path: str) -> RawResponse:
    if case.raw is not None:
        raw = case.raw.replace(b"{path}", path.encode(), 1)
    else:
        raw = request_bytes("POST", path, case.body, {"Content-Type": "application/json", **(case.headers or {})})
    return send(url, raw, timeout=20)


def check(case: Fuzz, response: RawResponse, path: str) -> None:
    where = f"{case.label} on {path}"
    assert response.status == case.status, (where, response.status, response.body[:300])
    error = response.error()
    assert case.says.lower() in error.lower(), (where, error)


# ----------------------------------------------------------------------------- the tests

RSS: dict[str, int] = {}


def test_warm_up_then_take_the_memory_baseline(fuzz_server, fuzz_repo):
    """First use allocates (imports, caches, code paths): one round of everything, then measure."""
    repo, _ = fuzz_repo
    for path in INFER_PATHS:
        response = http(fuzz_server.url, "POST", path, infer_body())
        assert response.status == 200, response.body
        assert predicted(response.json()) == repo.expected["iris"]
        for case in CASES:
            run_case(fuzz_server.url, case, path)
    time.sleep(0.5)
    RSS["start"] = rss_bytes(fuzz_server.process.pid)


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
@pytest.mark.parametrize("path", INFER_PATHS, ids=["infer", "versioned"])
def test_each_hostile_request_gets_a_4xx_naming_the_problem(fuzz_server, case, path):
    check(case, run_case(fuzz_server.url, case, path), path)


def test_the_fuzz_rounds_leave_memory_flat(fuzz_server):
    """Everything again, several times over: memory must not follow."""
    for _ in range(FUZZ_ROUNDS):
        for path in INFER_PATHS:
            for case in CASES:
                check(case, run_case(fuzz_server.url, case, path), path)
    time.sleep(0.5)
    RSS["end"] = rss_bytes(fuzz_server.process.pid)
    grown = RSS["end"] - RSS["start"]
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB across the fuzz ({RSS})"


def test_a_body_over_the_limit_is_refused_before_it_is_sent(fuzz_server):
    """Only the headers go out, announcing 10^12 bytes: the 413 must come back at once."""
    started = time.monotonic()
    with connect(fuzz_server.url, timeout=5) as sock:
        sock.sendall(request_bytes("POST", INFER_PATHS[0], headers={
            "Content-Type": "application/json", "Content-Length": str(10**12)}))
        response = read_response(sock)
    assert response.status == 413
    assert "exceeds the" in response.error() and str(10**12) in response.error()
    assert time.monotonic() - started < 3


def test_chunked_bodies_are_read(fuzz_server, fuzz_repo):
    repo, _ = fuzz_repo
    for path in INFER_PATHS:
        raw = chunked(GOOD, 5).replace(b"{path}", path.encode(), 1)
        response = send(fuzz_server.url, raw)
        assert response.status == 200, response.body
        assert predicted(response.json()) == repo.expected["iris"]


def test_broken_http_framing_is_refused_by_the_http_layer(fuzz_server):
    """Malformed HTTP never reaches the application: the HTTP layer answers 400 with a JSON
    error (or closes the connection) and the server carries on."""
    for raw in [
        request_bytes("POST", INFER_PATHS[0], headers={"Transfer-Encoding": "chunked"}, content_length=False)
        + b"zz\r\nabc\r\n0\r\n\r\n",
        # the bytes past a short Content-Length are parsed as the next request: not HTTP
        request_bytes("POST", INFER_PATHS[0], GOOD, {"Content-Length": str(len(GOOD) - 10)}),
        request_bytes("POST", INFER_PATHS[0], GOOD, {"Content-Length": "-5"}),
        request_bytes("POST", INFER_PATHS[0], GOOD, {"Content-Length": "12abc"}),
        b"POST /v2/models/iris\x00/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS hello to plain HTTP
        request_bytes("GET", "/v2/models/" + "n" * 100_000),  # a URL beyond the parser's limit
    ]:
        try:
            response = send(fuzz_server.url, raw)
        except ConnectionError:
            continue  # closing the connection is an answer too
        assert 400 <= response.status < 500, (raw[:60], response.status, response.body)
        assert "malformed HTTP request" in response.error()
    assert http(fuzz_server.url, "POST", INFER_PATHS[0], infer_body()).status == 200


def test_get_on_an_infer_route_is_405_json(fuzz_server):
    for path in INFER_PATHS:
        response = send(fuzz_server.url, request_bytes("GET", path))
        assert response.status == 405
        assert "POST" in response.error()


# ----------------------------------------------------------------------------- path safety

#: model names as they go on the wire (percent-encoded where a client would encode them)
HOSTILE_NAMES = [
    "..", ".", "...", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e",
    "..%2F..%2Fetc%2Fpasswd", "..%2f..%2foutside%2fsecret", "%2e%2e%2f%2e%2e%2foutside%2fsecret",
    "%2Fetc%2Fpasswd", "%2ftmp", "iris%2F1", "iris%2F..%2F..%2Foutside",
    "..%5C..%5Cetc", "..\\..\\etc", "C:%5CWindows", "%5C%5Cserver%5Cshare",
    "%00", "iris%00", "iris%00.joblib", "%00..%2F", "secret", "outside",
    "~root", "%7Eroot", "iris%20", "%20iris", "iris%0A", "iris%0D%0AX-Injected:%201",
    "a" * 200, "b" * 10_000, "c" * 60_000,
]
NAME_ROUTES = [
    ("POST", "/v2/models/{n}/infer"),
    ("POST", "/v2/models/{n}/versions/1/infer"),
    ("POST", "/v2/models/iris/versions/{n}/infer"),
    ("GET", "/v2/models/{n}"),
    ("GET", "/v2/models/{n}/versions/1"),
    ("GET", "/v2/models/iris/versions/{n}"),
    ("GET", "/v2/models/{n}/ready"),
    ("GET", "/v2/models/iris/versions/{n}/ready"),
    ("POST", "/v2/repository/models/{n}/load"),
    ("POST", "/v2/repository/models/{n}/unload"),
]
#: paths with real (unencoded) traversal on the wire
RAW_PATHS = [
    ("POST", "/v2/models/../../outside/secret/infer"),
    ("POST", "/v2/models/iris/../../../outside/secret/infer"),
    ("GET", "/v2/models//etc/passwd"),
    ("GET", "/v2/models/../repository/index"),
    ("POST", "/v2/repository/models/../../outside/secret/load"),
    ("POST", "/v2/repository/models//tmp/load"),
    ("POST", "/v2/repository/models/./spare/../escape/load"),
    ("GET", "/../../../../etc/passwd"),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
]


def _assert_refused(url: str, method: str, path: str) -> None:
    body = json.dumps(infer_body()).encode() if method == "POST" else b""
    response = send(url, request_bytes(method, path, body, {"Content-Type": "application/json"}), timeout=20)
    assert response.status in (400, 404), (method, path[:120], response.status, response.body[:300])
    response.error()
    assert b"root:" not in response.body  # nothing of /etc/passwd, whatever the route


def test_hostile_model_names_are_refused_on_every_route(fuzz_server, fuzz_repo):
    _, planted = fuzz_repo
    for name in HOSTILE_NAMES:
        for method, template in NAME_ROUTES:
            _assert_refused(fuzz_server.url, method, template.replace("{n}", name))
    for method, path in RAW_PATHS:
        _assert_refused(fuzz_server.url, method, path)
    assert not planted.marker.exists(), "a file outside the repository was unpickled"


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(fuzz_server):
    """Starlette's default answered ``GET /v2/models/iris/`` with a 307 to
    ``http://<Host header>/v2/models/iris``: an open redirect."""
    for method, path in [("GET", "/v2/models/iris/"), ("GET", "/v2/models/iris/ready/"), ("GET", "/v2/"),
                         ("POST", "/v2/repository/index/"), ("GET", "/v2/models/%00..%2F")]:
        response = send(fuzz_server.url, request_bytes(method, path, headers={"Host": "evil.example"}))
        assert response.status == 404, (path, response.status, response.headers)
        assert "location" not in response.headers
        assert "no route" in response.error()


def test_the_repository_api_cannot_be_pointed_at_a_path(fuzz_server, fuzz_repo):
    """Triton's load request may carry a config and files (``file:<path>`` parameters); ours takes
    a name only: a body naming paths or carrying a pickle is ignored, and the planted pickle
    never runs."""
    repo, planted = fuzz_repo
    payload = base64.b64encode(planted.pickle_bytes).decode()
    for body in [
        {"parameters": {"config": json.dumps({"uri": str(planted.marker.parent / "outside" / "secret")}),
                        "file:1/model.joblib": payload, "file:model.joblib": payload}},
        {"uri": "/etc", "model_repository": "/", "path": "../outside/secret"},
    ]:
        response = http(fuzz_server.url, "POST", "/v2/repository/models/spare/load", body)
        assert response.status == 200, response.body
        assert response.json() == {"name": "spare", "loaded": True}
    response = http(fuzz_server.url, "POST", "/v2/models/spare/infer", infer_body())
    assert predicted(response.json()) == repo.expected["spare"]
    assert not planted.marker.exists(), "a pickle sent with a load request was unpickled"


def test_a_symlinked_model_folder_pointing_outside_is_never_loaded(fuzz_server, fuzz_repo):
    _, planted = fuzz_repo
    index = {row["name"]: row for row in http(fuzz_server.url, "POST", "/v2/repository/index").json()}
    assert "escape" not in index and "secret" not in index  # refused outright, not a model here
    assert "escape/ points outside the model repository: ignored" in fuzz_server.log()
    assert not planted.marker.exists(), "the symlinked folder's pickle was unpickled"


def test_a_symlinked_model_folder_pointing_outside_is_refused_with_a_4xx(fuzz_server):
    for method, path in [("POST", "/v2/models/escape/infer"), ("GET", "/v2/models/escape"),
                         ("GET", "/v2/models/escape/ready"), ("POST", "/v2/repository/models/escape/load")]:
        _assert_refused(fuzz_server.url, method, path)


def test_the_server_is_unharmed(fuzz_server, fuzz_repo):
    repo, planted = fuzz_repo
    assert http(fuzz_server.url, "GET", "/v2/health/ready").status == 200
    for name in ("iris", "xgb", "spare"):
        response = http(fuzz_server.url, "POST", f"/v2/models/{name}/infer", infer_body())
        assert response.status == 200, response.body
        assert predicted(response.json()) == repo.expected[name]
    assert fuzz_server.process.poll() is None
    assert not planted.marker.exists()
    log = fuzz_server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
