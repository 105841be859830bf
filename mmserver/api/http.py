"""HTTP plumbing shared by the Starlette routes and the raw ASGI inference path: reading a
bounded body, and the one mapping from errors to status, headers and JSON body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..codec import encode_json
from ..errors import ClientDisconnected, MMServerError, PayloadTooLarge, http_status

JSON = "application/json"
Receive = Callable[[], Awaitable[dict[str, Any]]]


def error_parts(error: MMServerError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and ``{"error": message}`` body for an error."""
    headers = {"content-type": JSON}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    return http_status(error), headers, encode_json({"error": error.message})


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
