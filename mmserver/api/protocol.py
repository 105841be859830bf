"""uvicorn's HTTP protocol with a deadline on every request, and responses sent in one write.

uvicorn arms its keep-alive timer only once a response is complete, and cancels it on any byte
that arrives: a connection that never sends a request, or sends its head or body a byte at a
time (slowloris), is held for ever, and under ``--max-connections`` a handful of such sockets
lock every other client out with 503. This protocol closes a fresh connection that sends
nothing for ``keep_alive_s`` (uvicorn's own idle limit covers the time between requests) and
gives every request ``request_read_timeout_s`` from its first byte to its last: past it, the
client gets 408 and the connection is closed.

The deadline costs nothing for the usual request, whose head and body arrive in one read: a
timer is armed only when a read ends with a request still incomplete.

The server never upgrades a connection (uvicorn runs with ``ws="none"``: no WebSocket, no h2c), so
a request asking for one is served as plain HTTP. httptools skips the body of such a request (its
bytes would then be read as the next request), so one that announces a body gets 400 instead.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..codec import encode_json

log = logging.getLogger(__name__)
#: the server's health probes, answered also beyond the connection cap
PROBE_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: a scope key marking a request the protocol refuses before the application sees it
_UPGRADE_WITH_BODY = "mmserver.upgrade_with_body"


class RequestDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose connections must deliver each request in time."""

    request_timeout_s: float = 30.0  # set per server by ``http_protocol``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._began: float | None = None  # loop time of the first byte of a request still arriving
        self._head_done = False
        self._timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.timeout_keep_alive, self._idle_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._timer is None and not self.transport.is_closing():
            if self._began is not None:
                self._timer = self.loop.call_at(self._began + self.request_timeout_s, self._request_timed_out)
            elif self.cycle is None or self.cycle.response_complete:
                # bytes that start no request (blank lines) stopped uvicorn's keep-alive timer
                self._timer = self.loop.call_later(self.timeout_keep_alive, self._idle_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._disarm()
        self._began = self.loop.time()
        self._head_done = False

    def on_headers_complete(self) -> None:
        self._head_done = True
        if self.parser.should_upgrade() and _announces_body(self.headers):
            self.scope[_UPGRADE_WITH_BODY] = True  # type: ignore[typeddict-unknown-key]
            self.flow.pause_reading()  # its body must not be parsed as the next request
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._began = None
        self._disarm()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _request_timed_out(self) -> None:
        self._timer = None
        if self._began is None or self.transport.is_closing():
            return
        if self._head_done and self.cycle is not None and self.cycle.response_started:
            # answered before its body arrived (a 404, a 413): no second response, just the close
            # (before its head is done, ``self.cycle`` is the previous request's)
            self.transport.close()
            return
        part = "body" if self._head_done else "head"
        self._answer_and_close(
            b"408 Request Timeout", f"the request {part} did not arrive within {self.request_timeout_s:g} s"
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (bad framing, invalid characters), as
        the JSON error body every other bad request gets."""
        self._answer_and_close(b"400 Bad Request", f"malformed HTTP request: {msg}")

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn warns of every request asking to upgrade (and of a missing WebSocket library):
        here they are plain HTTP requests."""
        log.debug("served a request asking to upgrade the connection as plain HTTP")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        """Every response's head leaves with its body (``HeadWithBody``); uvicorn's answer at
        the connection cap (``--max-connections``) and an upgrade request with a body get JSON
        errors. The server's health probes pass the cap: a busy server is alive and ready, and
        a liveness probe refused there would restart it."""
        cycle.transport = HeadWithBody(cycle.transport, self.loop)
        if app is service_unavailable:
            app = self.app if _is_probe(cycle.scope) else _over_the_connection_cap
        elif _UPGRADE_WITH_BODY in cycle.scope:
            app = _upgrade_with_a_body
        super()._start_asgi_task(cycle, app)

    def _answer_and_close(self, status: bytes, message: str) -> None:
        body = encode_json({"error": message})
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


class HeadWithBody:
    """The connection's transport as one request cycle sees it, sending the response head with
    the body's first bytes.

    uvicorn writes a response's head and its body in two ``write`` calls: two sends on the socket,
    two segments, and a client that wakes for the head only to wait for the body. This holds the
    cycle's first write (the head) until its next one and sends both in one system call; a head
    with no body in the same loop turn (a stream whose first event is not ready, a HEAD request)
    is sent at the end of that turn.
    """

    __slots__ = ("_transport", "_loop", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
        elif self._held is not None:
            head, self._held = self._held, None
            self._transport.writelines((head, data))
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send the held head, if it is still held."""
        if self._held is not None:
            head, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)


def _is_probe(scope: Scope) -> bool:
    """Whether a request is one of the server's health probes (cheap: no model work)."""
    return scope["method"] in ("GET", "HEAD") and scope["path"] in PROBE_PATHS


def _announces_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request head announces a body (a non-zero Content-Length, or Transfer-Encoding)."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0"))
               for name, value in headers)


def _refusal(status: int, message: str, *headers: tuple[bytes, bytes]) -> ASGIApp:
    """An ASGI application answering any request with this JSON error, closing the connection."""
    body = encode_json({"error": message})

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *headers, (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})
    return refuse


_over_the_connection_cap = _refusal(
    503, "the server is at its connection cap (max_connections); retry later", (b"retry-after", b"1"))
_upgrade_with_a_body = _refusal(
    400, "this server does not upgrade connections (no WebSocket, no h2c), and a request asking to cannot "
    "carry a body: send it without the Upgrade header")


def http_protocol(request_timeout_s: float) -> type[RequestDeadlineProtocol]:
    """The protocol class for one server, with its request deadline (``request_read_timeout_s``)."""
    return type("RequestDeadlineProtocol", (RequestDeadlineProtocol,), {"request_timeout_s": request_timeout_s})
