"""uvicorn's HTTP protocol with a deadline on request heads.

uvicorn arms its keep-alive timer only once a response is complete, and cancels it on any byte
that arrives: a connection that never sends a request, or sends its head a byte at a time
(slowloris), is held for ever, and under ``--max-connections`` a handful of such sockets lock
every other client out with 503. This protocol gives every connection a deadline for its next
request head: ``keep_alive_s`` of silence before a request starts (uvicorn's own idle limit,
which now also covers a fresh connection), then ``request_read_timeout_s`` for the request line
and headers once their first byte has come. Past it, a half-sent head gets 408 and the
connection is closed. Bodies are bounded by the application (``read_body``).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..codec import encode_json


class HeadDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose connections must deliver each request head in time."""

    head_timeout_s: float = 30.0  # set per server by ``http_protocol``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        super().connection_made(transport)
        self._arm(self.timeout_keep_alive, head_started=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.head_timeout_s, head_started=True)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request whose head is complete starts now
        super().on_response_complete()
        if not pipelined and self._head_timer is None and not self.transport.is_closing():
            # uvicorn's keep-alive timer stops at the first byte of the next request; this one
            # runs on until that request's head is complete
            self._arm(self.timeout_keep_alive, head_started=False)

    def _arm(self, seconds: float, head_started: bool) -> None:
        self._disarm()
        self._head_started = head_started
        self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (bad framing, invalid characters), as
        the JSON error body every other bad request gets."""
        self._answer_and_close(b"400 Bad Request", f"malformed HTTP request: {msg}")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        """uvicorn's answer at the connection cap (``--max-connections``) as a JSON error."""
        super()._start_asgi_task(cycle, _over_the_connection_cap if app is service_unavailable else app)

    def _answer_and_close(self, status: bytes, message: str) -> None:
        body = encode_json({"error": message})
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self._answer_and_close(
                b"408 Request Timeout", f"the request head did not arrive within {self.head_timeout_s:g} s"
            )
        else:
            self.transport.close()


async def _over_the_connection_cap(scope: Scope, receive: Receive, send: Send) -> None:
    body = encode_json({"error": "the server is at its connection cap (max_connections); retry later"})
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close"),
    ]})
    await send({"type": "http.response.body", "body": body})


def http_protocol(head_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for one server, with its head deadline (``request_read_timeout_s``)."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout_s": head_timeout_s})
