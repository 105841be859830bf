"""Access control: an optional bearer token, checked in constant time before any route runs, and
CORS whose refused preflight requests get the JSON error body every other error gets."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InvalidInput, Unauthorized
from .http import error_parts_for

OPEN_PREFIX = "/v2/health/"  # probes must work without credentials
METRICS_PATH = "/metrics"


class BearerAuth:
    """ASGI middleware answering 401 with ``WWW-Authenticate: Bearer`` unless the request carries
    ``Authorization: Bearer <token>``. Health probes, and /metrics unless ``protect_metrics``,
    stay open."""

    def __init__(self, app: ASGIApp, token: str, protect_metrics: bool) -> None:
        self.app = app
        self._expected = token.encode()
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        has_header = any(key == b"authorization" for key, _ in scope["headers"])
        error = Unauthorized("a valid bearer token is required" if has_header else
                             "this server requires 'Authorization: Bearer <token>'")
        status, headers, body = error_parts_for(scope["path"], error)
        headers["www-authenticate"] = 'Bearer realm="mmserver"'
        headers["content-length"] = str(len(body))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})

    def _is_open(self, path: str) -> bool:
        return path.startswith(OPEN_PREFIX) or (path == METRICS_PATH and not self.protect_metrics)

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                # the scheme is case-insensitive (RFC 9110); the token is compared in constant time
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected)
        return False


class JSONErrorCORS(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight (an origin, method or header not
    allowed: 400) carries the JSON error body of the API at its path instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        what = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. "origin, method"
        return _RefusedPreflight(f"CORS preflight refused: disallowed {what}", response.headers)


class _RefusedPreflight(Response):
    """A refused preflight: Starlette's CORS headers with the error body for the request's path."""

    def __init__(self, reason: str, cors_headers: Headers) -> None:
        super().__init__(status_code=400)
        self.reason = reason
        self.cors_headers = {k: v for k, v in cors_headers.items() if k not in ("content-type", "content-length")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, headers, body = error_parts_for(scope["path"], InvalidInput(self.reason))
        await Response(body, status_code=status, headers={**self.cors_headers, **headers})(scope, receive, send)
