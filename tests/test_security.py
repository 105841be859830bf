"""Access control and transport security on real servers: bearer tokens, TLS, CORS.

- A token given by flag, by ``MMSERVER_AUTH_TOKEN`` or by a token file: every documented route
  but ``/v2/health/*`` (and ``/metrics`` unless ``--auth-metrics``), and unknown routes too, answer
  401 with ``WWW-Authenticate: Bearer`` and a JSON error without it or with a wrong one, and work
  with it. ``tritonclient`` passes the header through and works. The token never reaches the log.
- TLS: a CA and a server certificate made here (``trustme``); the server speaks HTTPS, a client
  that trusts that CA gets correct answers, one that does not is refused, plain HTTP gets nothing.
- CORS: off by default (no ``Access-Control-Allow-Origin``); with ``--cors-origins`` the listed
  origins get it, others do not, and preflight requests work without a token; a refused one
  gets the JSON error body.
- Connection upgrades (WebSocket): served as plain HTTP, the token checked as ever.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import trustme

from mmserver.api import openapi

from hardening_support import IRIS_ROWS, build_small_repo, infer_body, predicted
from hardening_support import connect, http, read_response, request_bytes  # raw HTTP
from v2_helpers import LOCAL

TOKEN = "s3cret-token-Zq8"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def sec_repo(tmp_path_factory):
    return build_small_repo(tmp_path_factory.mktemp("security") / "repo")


@pytest.fixture(scope="module")
def flag_server(sec_repo, start_server, tmp_path_factory) -> Iterator:
    log_path = tmp_path_factory.mktemp("sec-flag") / "server.log"
    with start_server(sec_repo.path, log_path, "--auth-token", TOKEN, "--model-control-mode", "explicit") as server:
        yield server


@pytest.fixture(scope="module")
def env_cors_server(sec_repo, start_server, tmp_path_factory) -> Iterator:
    """Token from the environment, /metrics protected too, CORS for one origin."""
    log_path = tmp_path_factory.mktemp("sec-env") / "server.log"
    with start_server(sec_repo.path, log_path, "--auth-metrics", "--cors-origins", f"{ORIGIN}, https://other.example",
                      env={"MMSERVER_AUTH_TOKEN": TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA, a certificate for 127.0.0.1 signed by it, and a client context trusting the CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = folder / "server.pem", folder / "server.key"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return certfile, keyfile, context


@pytest.fixture(scope="module")
def tls_file_server(sec_repo, start_server, tls, tmp_path_factory) -> Iterator:
    """HTTPS, with the token read from a file."""
    certfile, keyfile, context = tls
    folder = tmp_path_factory.mktemp("sec-tls")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    with start_server(sec_repo.path, folder / "server.log", "--tls-certfile", str(certfile), "--tls-keyfile",
                      str(keyfile), "--auth-token-file", str(token_file), scheme="https", verify=context) as server:
        yield server


def documented_requests() -> list[tuple[str, str]]:
    """One concrete request per documented operation (model names filled in)."""
    requests = []
    for path, item in openapi.document()["paths"].items():
        name = "spare" if path.startswith("/v2/repository/models/") else "iris"  # unloads spare only
        concrete = path.replace("{name}", name).replace("{version}", "1")
        for method in item:
            requests.append((method.upper(), concrete))
    return requests


#: routes that must answer 200 to an authorized request (others, e.g. ones added for other
#: protocols, must only not answer 401)
V2_OK = {("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/v2/models/iris"),
         ("GET", "/v2/models/iris/versions/1"), ("GET", "/v2/models/iris/ready"),
         ("GET", "/v2/models/iris/versions/1/ready"), ("POST", "/v2/models/iris/infer"),
         ("POST", "/v2/models/iris/versions/1/infer"), ("POST", "/v2/repository/index"),
         ("GET", "/v2/repository/index"), ("POST", "/v2/repository/models/spare/load"),
         ("POST", "/v2/repository/models/spare/unload"), ("GET", "/metrics"), ("GET", "/openapi.json")}


def call(url: str, method: str, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    body = infer_body() if path.endswith("/infer") else None
    return LOCAL.request(method, f"{url}{path}", json=body, headers=headers or {}, timeout=20, **kwargs)


def assert_401(response: httpx.Response, where) -> None:
    assert response.status_code == 401, (where, response.status_code, response.text[:200])
    assert response.headers["www-authenticate"].startswith("Bearer"), where
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    if response.request.url.path.startswith(("/v1/", "/openai/v1/")):  # OpenAI's error body there
        assert error["type"] == "authentication_error", where
        error = error["message"]
    assert "bearer" in error.lower(), where


# ----------------------------------------------------------------------------- bearer tokens


def test_every_route_but_health_and_metrics_needs_the_token(flag_server, sec_repo):
    url = flag_server.url
    requests = documented_requests() + [("GET", "/no/such/route"), ("POST", "/v2/models/iris"),
                                        ("DELETE", "/v2/models/iris")]
    for method, path in requests:
        open_route = path.startswith("/v2/health/") or path == "/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                        {"Authorization": f"Bearer{TOKEN}"}, {"X-Api-Key": TOKEN}):
            response = call(url, method, path, headers)
            if open_route:
                assert response.status_code == 200, (method, path, response.status_code)
            else:
                assert_401(response, (method, path, headers))
        # the scheme is case-insensitive and may be followed by several spaces (RFC 9110)
        for good in (GOOD, {"Authorization": f"bearer {TOKEN}"}, {"Authorization": f"BEARER  {TOKEN}"}):
            assert call(url, method, path, good).status_code != 401, (method, path, good)
        response = call(url, method, path, GOOD)
        if (method, path) in V2_OK:
            assert response.status_code == 200, (method, path, response.text[:200])
    assert V2_OK <= set(requests)
    assert call(url, "POST", "/v2/repository/models/spare/load", GOOD).status_code == 200
    response = call(url, "POST", "/v2/models/xgb/infer", GOOD)
    assert predicted(response.json()) == sec_repo.expected["xgb"]
    assert TOKEN not in flag_server.log()


def test_tritonclient_with_the_authorization_header(flag_server, sec_repo):
    tritonhttp = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    client = tritonhttp.InferenceServerClient(flag_server.url.removeprefix("http://"), network_timeout=30.0)
    try:
        assert client.is_server_live() is True  # health stays open
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("iris")
        assert client.get_model_metadata("iris", headers=dict(GOOD))["name"] == "iris"
        assert client.is_model_ready("iris", headers=dict(GOOD)) is True
        tensor = tritonhttp.InferInput("input-0", list(IRIS_ROWS.shape), "FP64")
        tensor.set_data_from_numpy(IRIS_ROWS.astype(np.float64), binary_data=True)
        outputs = [tritonhttp.InferRequestedOutput("predict", binary_data=True)]
        with pytest.raises(InferenceServerException, match="Bearer"):
            client.infer("iris", [tensor], outputs=outputs)
        result = client.infer("iris", [tensor], outputs=outputs, headers=dict(GOOD))
        assert result.as_numpy("predict").tolist() == sec_repo.expected["iris"]
    finally:
        client.close()


def test_the_token_from_the_environment_and_auth_metrics(env_cors_server, sec_repo):
    url = env_cors_server.url
    assert_401(call(url, "POST", "/v2/models/iris/infer"), "env token")
    response = call(url, "POST", "/v2/models/iris/infer", GOOD)
    assert response.status_code == 200 and predicted(response.json()) == sec_repo.expected["iris"]
    assert_401(call(url, "GET", "/metrics"), "--auth-metrics")
    assert call(url, "GET", "/metrics", GOOD).status_code == 200
    assert call(url, "GET", "/v2/health/ready").status_code == 200
    assert TOKEN not in env_cors_server.log()


# ----------------------------------------------------------------------------- TLS


def test_https_with_a_certificate_made_here_and_the_token_from_a_file(tls_file_server, tls, sec_repo):
    _, _, context = tls
    url = tls_file_server.url
    assert url.startswith("https://")
    assert httpx.get(f"{url}/v2/health/ready", verify=context).status_code == 200
    assert_401(httpx.post(f"{url}/v2/models/iris/infer", json=infer_body(), verify=context), "token file")
    response = httpx.post(f"{url}/v2/models/iris/infer", json=infer_body(), headers=GOOD, verify=context)
    assert response.status_code == 200 and predicted(response.json()) == sec_repo.expected["iris"]
    assert response.http_version == "HTTP/1.1"
    # a client that does not trust the CA is refused; plain HTTP gets no answer
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/ready", verify=ssl.create_default_context())
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https://", "http://") + "/v2/health/ready", timeout=5)
    assert httpx.get(f"{url}/v2/health/ready", verify=context).status_code == 200
    assert TOKEN not in tls_file_server.log()


# ----------------------------------------------------------------------------- CORS


def test_cors_is_off_by_default(server):
    response = httpx.post(f"{server.url}/v2/models/iris/infer", json=infer_body(), headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(key.startswith("access-control-") for key in response.headers)
    preflight = httpx.options(f"{server.url}/v2/models/iris/infer", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405


def test_cors_for_the_configured_origins_with_preflight_needing_no_token(env_cors_server):
    url = env_cors_server.url
    preflight = httpx.options(f"{url}/v2/models/iris/infer", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # the real request, with the token: the browser may read the answer and the binary header
    response = call(url, "POST", "/v2/models/iris/infer", {**GOOD, "Origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "inference-header-content-length" in response.headers["access-control-expose-headers"].lower()
    # without it: 401, readable by the page (so it can ask for credentials)
    response = call(url, "POST", "/v2/models/iris/infer", {"Origin": ORIGIN})
    assert response.status_code == 401 and response.headers["access-control-allow-origin"] == ORIGIN
    # an origin not listed gets no CORS headers and no preflight
    response = call(url, "POST", "/v2/models/iris/infer", {**GOOD, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(f"{url}/v2/models/iris/infer", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("origin, method, refused", [
    ("https://evil.example", "POST", "origin"), (ORIGIN, "DELETE", "method"),
    ("https://evil.example", "PUT", "origin, method"),
])
def test_a_refused_preflight_gets_the_json_error_body(env_cors_server, origin, method, refused):
    for path in ("/v2/models/iris/infer", "/v1/completions"):
        preflight = httpx.options(f"{env_cors_server.url}{path}", headers={
            "Origin": origin, "Access-Control-Request-Method": method})
        assert preflight.status_code == 400 and preflight.headers["content-type"] == "application/json"
        error = preflight.json()["error"]
        if path.startswith("/v1/"):  # OpenAI's error body there
            assert error["type"] == "invalid_request_error"
            error = error["message"]
        assert error == f"CORS preflight refused: disallowed {refused}"
        assert "GET, POST" in preflight.headers["access-control-allow-methods"]  # the CORS headers stay
        assert ("access-control-allow-origin" in preflight.headers) == (origin == ORIGIN)


# ----------------------------------------------------------------------------- connection upgrades

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_a_websocket_upgrade_is_served_as_plain_http_with_the_token_checked(flag_server):
    """No route speaks WebSocket: an upgrade request is an HTTP request like any other (not
    uvicorn's empty 403), and one with a body (which httptools would not read) gets a 400."""
    url = flag_server.url
    response = http(url, "GET", "/v2", headers=UPGRADE)
    assert response.status == 401 and "bearer" in response.error().lower()
    with connect(url) as sock:  # the connection stays usable
        for _ in range(2):
            sock.sendall(request_bytes("GET", "/v2", headers={**UPGRADE, **GOOD}))
            response = read_response(sock)
            assert response.status == 200 and response.json()["name"] == "mmserver"
    with connect(url) as sock:
        sock.sendall(request_bytes("POST", "/v2/models/iris/infer", json.dumps(infer_body()).encode(),
                                   {**UPGRADE, **GOOD, "Content-Type": "application/json"}))
        response = read_response(sock)
        assert response.status == 400 and "Upgrade" in response.error()
        assert response.headers["connection"] == "close" and sock.recv(65536) == b""
    assert "Unsupported upgrade request" not in flag_server.log()
