"""HTTP plumbing shared by the Starlette routes and the raw ASGI inference path: reading a
bounded body, and the one mapping from errors to status, headers and JSON body (V2's
``{"error": message}``, or OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under
the OpenAI prefixes), and decompressing a ``Content-Encoding: gzip`` or ``deflate`` body."""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request

from ..codec import encode_json
from ..errors import (
    ClientDisconnected,
    InvalidInput,
    MethodNotAllowed,
    MMServerError,
    ModelNotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    http_status,
)
from ..runtime import run_sync

JSON = "application/json"
#: a request's own deadline in seconds (as KServe and Triton read it)
TIMEOUT_HEADER = "request-timeout"
Receive = Callable[[], Awaitable[dict[str, Any]]]
#: where the OpenAI-compatible routes live (``/openai/v1`` is KServe's)
OPENAI_PREFIXES = ("/v1", "/openai/v1")
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                      429: "rate_limit_error"}
_OPENAI_SERVER_CODES = {503: "model_not_ready", 504: "timeout", 507: "insufficient_memory"}
#: bodies up to this size are decoded on the event loop: the worker pool's round trip costs
#: 50-150 µs, and 1 MiB decodes in 10 ms (JSON numbers) to 100 ms (empty binary BYTES elements)
INLINE_DECODE_BYTES = 1 << 20
#: zlib's window bits for each content coding it decodes (gzip's header, or deflate's zlib one)
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def error_parts(error: MMServerError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and V2's ``{"error": message}`` body for an error."""
    return http_status(error), _headers(error), encode_json({"error": error.message})


def openai_error_parts(error: MMServerError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and OpenAI's error body for an error."""
    status = http_status(error)
    code = "model_not_found" if isinstance(error, ModelNotFound) else _OPENAI_SERVER_CODES.get(status)
    body = {"error": {
        "message": error.message,
        "type": OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": getattr(error, "param", None),
        "code": code,
    }}
    return status, _headers(error), encode_json(body)


def error_parts_for(path: str, error: MMServerError) -> tuple[int, dict[str, str], bytes]:
    """The error in the shape the API at ``path`` speaks: OpenAI's under its prefixes, else V2's."""
    if is_openai_path(path):
        return openai_error_parts(error)
    return error_parts(error)


def is_openai_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PREFIXES)


def _headers(error: MMServerError) -> dict[str, str]:
    headers = {"content-type": JSON}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    if isinstance(error, MethodNotAllowed):
        headers["allow"] = error.allow
    return headers


async def read_body(receive: Receive, declared_length: str | None, limit: int) -> bytes:
    """The request body, refusing with 413 as soon as it is known to exceed ``limit`` bytes
    (before reading it when Content-Length says so). A body that does not arrive in time is
    the HTTP protocol's to answer (408, ``api/protocol.py``)."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise PayloadTooLarge(f"request body of {declared_length} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its request")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json_body(request: Request, limit: int, what: str = "the request body") -> Any:
    """A Starlette request's JSON body, decompressed as its ``Content-Encoding`` says (both
    capped at ``limit`` bytes), decompressed and parsed on the worker pool when large; 400 when
    it is not JSON, and None for an empty body."""
    coding = content_coding(request.headers.get("content-encoding"))
    body = await read_body(request.receive, request.headers.get("content-length"), limit)
    if coding is None and len(body) <= INLINE_DECODE_BYTES:
        return _parse_json(body, what)
    return await run_sync(_decompressed_json, body, coding, limit, what)


def _decompressed_json(body: bytes, coding: str | None, limit: int, what: str) -> Any:
    return _parse_json(body if coding is None else decompress(body, coding, limit), what)


def _parse_json(body: bytes, what: str) -> Any:
    if not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def request_deadline(timeout_us: Any, timeout_header: str | None) -> float | None:
    """The request's own deadline (``time.monotonic()``), from now: the ``timeout`` request
    parameter in microseconds (as Triton's clients send it) or the ``Request-Timeout`` header in
    seconds, whichever is sooner; None without either. 400 for a value that is neither."""
    limits: list[float] = []
    if timeout_us is not None:
        if type(timeout_us) not in (int, float) or timeout_us < 0:
            raise InvalidInput("parameter 'timeout' must be a non-negative number of microseconds")
        if timeout_us > 0:  # Triton's convention: 0 means no timeout
            limits.append(timeout_us / 1e6)
    if timeout_header is not None:
        try:
            seconds = float(timeout_header)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < float("inf"):
            raise InvalidInput("header Request-Timeout must be a positive number of seconds")
        limits.append(seconds)
    return time.monotonic() + min(limits) if limits else None


def content_coding(header: str | None) -> str | None:
    """The body's compression from its ``Content-Encoding`` header: "gzip", "deflate", or None
    (no header, or identity); any other coding is refused with 415, as Triton does."""
    if header is None:
        return None
    coding = header.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in _WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {header!r} is not supported; use gzip, deflate or identity"
        )
    return coding


def decompress(body: bytes, coding: str, limit: int) -> bytes:
    """A gzip or deflate body, decompressed. The output is capped while it is produced: past
    ``limit`` bytes, 413 (a small body may inflate a thousandfold)."""
    parts: list[bytes] = []
    size = 0
    while True:  # a gzip body may hold several members, one after the other
        inflater = zlib.decompressobj(_WBITS[coding])
        try:
            part = inflater.decompress(body, limit - size + 1)
        except zlib.error as exc:
            raise InvalidInput(f"the request body is not valid {coding} data: {exc}") from None
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit once decompressed")
        if not inflater.eof:
            raise InvalidInput(f"the {coding} request body is cut short")
        parts.append(part)
        body = inflater.unused_data
        if not body:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if coding != "gzip":
            raise InvalidInput(f"the request body has {len(body)} bytes after its {coding} data")
