"""Bounded cost per connection, below the ASGI app: what uvicorn does not bound by itself.

uvicorn's httptools protocol keeps every header it is sent (no size or count limit) and arms its idle timer only
after a response, so a connection that never finishes its headers (slowloris), or never sends a byte, stays
open for good. `GuardedHttpTools` adds, per connection:
- a header deadline: from the connection's start (or the first byte of a later request on it) to the end of
  the headers, else the connection is closed;
- a cap on the bytes of the request line and headers, and on the number of headers: 431, then close.
Idle kept-alive connections are closed by uvicorn's own timeout_keep_alive. The body limit is the Edge's.

It also sends each response's status line and headers in the same write as its body (`OneWrite`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferline.server.config import GatewaySettings


class GuardedHttpTools(HttpToolsProtocol):
    max_header_bytes = 16 * 1024
    max_headers = 100
    header_timeout_s = 10.0

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.in_headers = True     # the next bytes belong to a request line or headers
        self.header_bytes = 0
        self.header_count = 0
        self.header_size = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.in_headers:
            self._arm()
            self.header_bytes += len(data)
        super().data_received(data)
        # Still in the headers after all of this read was parsed: every byte counted was request line or headers.
        # This is what bounds one huge header, which httptools buffers whole before calling on_header.
        if self.in_headers and self.header_bytes > self.max_header_bytes:
            self._refuse(f"request line and headers are larger than {self.max_header_bytes} bytes "
                         "(gateway.max_header_bytes)", "max_header_bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers = True
        self.header_count = 0
        self.header_size = 0    # the parsed headers' bytes, as sent ("name: value\r\n")
        self.header_bytes = 0   # a kept-alive connection's earlier requests (and their bodies) are not this one's
        self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._check_size(len(self.url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.max_headers:
            self._refuse(f"request has more than {self.max_headers} headers (gateway.max_headers)", "max_headers")
            raise Refused   # aborts the parse: httptools re-raises it as a parser error, which uvicorn handles
        super().on_header(name, value)
        self.header_size += len(name) + len(value) + 4
        self._check_size(len(self.url) + self.header_size)

    def _check_size(self, size: int) -> None:
        if size > self.max_header_bytes:
            self._refuse(f"request line and headers are larger than {self.max_header_bytes} bytes "
                         f"(gateway.max_header_bytes)", "max_header_bytes")
            raise Refused

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._disarm()
        before = self.cycle
        super().on_headers_complete()   # makes the request's cycle; its task starts on the loop's next turn
        if self.cycle is not None and self.cycle is not before:
            self.cycle.transport = OneWrite(self.cycle, self.transport, self.loop)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        self.in_headers = True     # the timer is armed by the next request's first byte
        self.header_bytes = 0
        super().on_response_complete()

    def _refuse(self, message: str, limit: str) -> None:
        """431 with our TGI-style error body, then close: the parser state is past saving."""
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": message, "error_type": "validation", "field": limit})
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()
        self._disarm()


class OneWrite:
    """A response's transport that holds back its status line and headers until the first body write, and sends
    both as one write. uvicorn writes them apart: two send() calls and, with TCP_NODELAY, two packets, each of which
    wakes the client. It was the largest self time in the gateway's c=64 profile (`bench/profile_serving.py
    --profile`: 80 -> 41 µs per request, sampled). What is held is written at the end of the event loop's turn at
    the latest, so a streamed response's headers are never later than they were."""

    __slots__ = ("cycle", "transport", "loop", "head", "done")

    def __init__(self, cycle: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.cycle = cycle
        self.transport = transport
        self.loop = loop
        self.head = b""
        self.done = False   # the head was written: later writes go straight through

    def write(self, data: bytes) -> None:
        if not self.done:
            if self.head:
                data = self.head + data
                self.head = b""
                self.done = True
            elif self.cycle.response_started:   # the head (uvicorn sets this before writing it); 100-continue passes
                self.head = data
                self.loop.call_soon(self.flush)
                return
        self.transport.write(data)

    def flush(self) -> None:
        if self.head:
            head, self.head, self.done = self.head, b"", True
            if not self.transport.is_closing():
                self.transport.write(head)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()


class Refused(Exception):
    """Unwinds out of the parser callbacks once a request was refused (its 431 is already written)."""


def protocol_for(settings: GatewaySettings) -> type[asyncio.Protocol]:
    """The uvicorn `http=` protocol class with this gateway's limits."""
    return type("InferlineHttp", (GuardedHttpTools,), {"max_header_bytes": settings.max_header_bytes,
                                               "max_headers": settings.max_headers,
                                               "header_timeout_s": settings.header_timeout_s})
