"""The inference route as a raw ASGI handler, in front of the Starlette application.

``POST /v2/models/{m}[/versions/{v}]/infer`` is the request path that carries the load, and
Starlette's routing, middleware stack and Request/Response objects cost about as much as the
whole of a small model's work. This handler reads the scope directly; every other path goes
on to the Starlette application.

A body larger than ``INLINE_DECODE_BYTES``, or a compressed one, is decompressed and decoded on
the worker pool: walking millions of elements would otherwise hold up every other request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..codec import BINARY_HEADER, InputCheck, decode_request, encode_json, encode_response
from ..errors import ClientDisconnected, MethodNotAllowed, MMServerError
from ..metrics import outcome_of
from ..runtime import run_sync
from ..types import InferRequest
from .http import (
    INLINE_DECODE_BYTES,
    JSON,
    TIMEOUT_HEADER,
    content_coding,
    decompress,
    error_parts,
    read_body,
    request_deadline,
)

log = logging.getLogger(__name__)

_BINARY_HEADER = BINARY_HEADER.encode()
_TIMEOUT_HEADER = TIMEOUT_HEADER.encode()
_ENCODING_HEADER = b"content-encoding"
_JSON_HEADERS = [(b"content-type", JSON.encode())]


#: the paths this handler answers (documented in api/openapi.py)
PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


def infer_target(path: str) -> tuple[str, str | None] | None:
    """``(model, version)`` for an inference path, else None."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v2", "models"] and parts[4] == "infer" and parts[3]:
        return parts[3], None
    if (
        len(parts) == 7
        and parts[:3] == ["", "v2", "models"]
        and parts[4] == "versions"
        and parts[6] == "infer"
        and parts[3]
        and parts[5]
    ):
        return parts[3], parts[5]
    return None


class InferenceRoute:
    """ASGI wrapper: answers inference paths itself, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state  # the Starlette app's state: settings and, once started, the manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = infer_target(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        entry = None
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']}; use POST", "POST")
            entry = self.state.manager.entry(*target)
            headers, body = await self._infer(entry, target[1] is None, scope, receive)
            status = 200
            entry.metrics.request("success", time.perf_counter() - started)
        except ClientDisconnected as exc:
            if entry is not None:
                entry.metrics.request(outcome_of(exc), time.perf_counter() - started)
            return  # nobody to answer
        except MMServerError as exc:
            if entry is not None:
                entry.metrics.request(outcome_of(exc), time.perf_counter() - started)
            status, header_map, body = error_parts(exc)
            headers = [(k.encode(), v.encode()) for k, v in header_map.items()]
        except Exception as exc:  # a bug must still answer, and never take the connection down
            log.exception("inference on %s failed", scope["path"])
            if entry is not None:
                entry.metrics.request("error", time.perf_counter() - started)
            status, headers = 500, _JSON_HEADERS
            body = encode_json({"error": f"internal server error: {type(exc).__name__}: {exc}"})
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, entry: Any, by_default: bool, scope: Scope,
                     receive: Receive) -> tuple[list[tuple[bytes, bytes]], bytes]:
        declared = binary_length = timeout_header = encoding = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value.decode("latin-1")
            elif key == _BINARY_HEADER:
                binary_length = value.decode("latin-1")
            elif key == _TIMEOUT_HEADER:
                timeout_header = value.decode("latin-1")
            elif key == _ENCODING_HEADER:
                encoding = value.decode("latin-1")
        coding = content_coding(encoding)
        limit = self.state.settings.max_request_bytes
        body = await read_body(receive, declared, limit)
        # a loaded model refuses an input it cannot take before its data is walked
        check: InputCheck | None = entry.model.check_input if entry.model is not None else None
        if coding is None and len(body) <= INLINE_DECODE_BYTES:
            request = decode_request(body, binary_length, check)
        else:
            request = await run_sync(_decode_body, body, coding, limit, binary_length, check)
        deadline = request_deadline(request.parameters.get("timeout"), timeout_header)
        if by_default and not entry.served:  # a rollover switched versions while the body arrived
            entry = self.state.manager.entry(entry.name)
        response = await self.state.manager.infer(entry, request, deadline, _disconnect_probe(receive))
        content, header_length = encode_response(response, request)
        if header_length is None:
            return _JSON_HEADERS, content
        return [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", header_length.encode()),
        ], content


def _decode_body(
    body: bytes, coding: str | None, limit: int, binary_length: str | None, check: InputCheck | None
) -> InferRequest:
    """Decompress (Inference-Header-Content-Length counts the decompressed body) and decode."""
    if coding is not None:
        body = decompress(body, coding, limit)
    return decode_request(body, binary_length, check)


def _disconnect_probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap check of whether the client has gone. ASGI only reports a disconnect to a pending
    ``receive()``; uvicorn's receive is a method of the request cycle, whose ``disconnected``
    flag says it without waiting. Other servers get no probe (queued requests then run anyway)."""
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not hasattr(cycle, "disconnected"):
        return None
    return lambda: cycle.disconnected
