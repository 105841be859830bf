"""The inference route as a raw ASGI handler, in front of the Starlette application.

``POST /v2/models/{m}[/versions/{v}]/infer`` is the request path that carries the load, and
Starlette's routing, middleware stack and Request/Response objects cost about as much as the
whole of a small model's work. This handler reads the scope directly; every other path goes
on to the Starlette application.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..codec import BINARY_HEADER, decode_request, encode_json, encode_response
from ..errors import MethodNotAllowed, MMServerError
from .http import JSON, ClientGone, error_parts, read_body

log = logging.getLogger(__name__)

_BINARY_HEADER = BINARY_HEADER.encode()
_JSON_HEADERS = [(b"content-type", JSON.encode())]


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
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']}; use POST")
            status, headers, body = 200, *await self._infer(target, scope, receive)
        except ClientGone:
            return
        except MMServerError as exc:
            status, header_map, body = error_parts(exc)
            headers = [(k.encode(), v.encode()) for k, v in header_map.items()]
        except Exception as exc:  # never let a bug in one request take the connection down silently
            log.exception("inference on %s failed", scope["path"])
            status, headers = 500, _JSON_HEADERS
            body = encode_json({"error": f"internal server error: {type(exc).__name__}: {exc}"})
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, target: tuple[str, str | None], scope: Scope, receive: Receive):
        declared = binary_length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value.decode("latin-1")
            elif key == _BINARY_HEADER:
                binary_length = value.decode("latin-1")
        body = await read_body(receive, declared, self.state.settings.max_request_bytes)
        request = decode_request(body, binary_length)
        response = await self.state.manager.infer(target[0], target[1], request)
        content, header_length = encode_response(response, request)
        if header_length is None:
            return _JSON_HEADERS, content
        return [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", header_length.encode()),
        ], content
