"""The HTTP protocol's response path: a response's head leaves in the same system call as its
body, and a head whose body is not ready (a stream) still leaves at once."""

from __future__ import annotations

import asyncio

from mmserver.api.protocol import HeadWithBody


class RecordingTransport:
    """Stands in for uvloop's socket transport: records each send (``write`` or
    ``writelines``, one system call each) instead of sending it."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, parts) -> None:
        self.sends.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_the_head_and_body_leave_in_one_send():
    transport = RecordingTransport()
    held = HeadWithBody(transport, asyncio.get_running_loop())
    held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.sends == []
    held.write(b"{}")
    assert transport.sends == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    held.write(b"more")  # later writes go straight through
    await asyncio.sleep(0)  # the end-of-turn flush finds nothing held
    assert transport.sends[1:] == [b"more"]


async def test_a_head_without_a_body_in_the_same_turn_leaves_at_the_end_of_it():
    transport = RecordingTransport()
    held = HeadWithBody(transport, asyncio.get_running_loop())
    held.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await asyncio.sleep(0)
    assert transport.sends == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    held.write(b"5\r\nhello\r\n")
    assert transport.sends[1:] == [b"5\r\nhello\r\n"]


async def test_closing_sends_what_is_held_first():
    transport = RecordingTransport()
    held = HeadWithBody(transport, asyncio.get_running_loop())
    held.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    held.close()
    assert transport.sends == [b"HTTP/1.1 204 No Content\r\n\r\n"] and transport.closed
    assert held.is_closing()
    assert held.get_extra_info("peername") == ("127.0.0.1", 1)

