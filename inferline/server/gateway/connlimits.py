"""Bounded cost per connection, below the ASGI app: what uvicorn does not bound by itself.

uvicorn's httptools protocol keeps every header it is sent (no size or count limit), arms its idle timer only
after a response, waits for a request body as long as it takes, and bounds connections only in total, so one
client could hold them all. `GuardedHttpTools` adds, per connection:
- a share (fairshare.py): a client (peer address) holds at most gateway.max_connections_per_client connections, of
  which at most gateway.max_idle_connections_per_client idle, and all clients at most gateway.max_connections. A
  connection over the total or its client's share is answered 503 at once; one still without its headers
  IDLE_GRACE_S after it opened is idle, and answered 503 then if its client's idle share is full. Both are in the
  TGI-family shape (no request has been read: its route is unknown), then closed once what the client sent was
  drained (LINGER_S at most). A kept-alive connection over its client's idle share is closed after its response;
- a header deadline: from the connection's start (or the first byte of a later request on it) to the end of
  the headers, else the connection is closed;
- a cap on the bytes of the request line and headers, and on the number of headers: 431, then close;
- a body deadline: from the end of the headers to the body's last byte (gateway.body_timeout_s), else 408 in the
  route's family shape, then close (a body sent a byte a second no longer holds a connection for good).
Idle kept-alive connections are closed by uvicorn's own timeout_keep_alive. The body limit is the Edge's.

It also sends each response's status line and headers in the same write as its body (`OneWrite`).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferline.server.config import GatewaySettings
from inferline.server.errors import HeadersTooLarge, InferlineError, Overloaded, RequestTimeout
from inferline.server.gateway.errors import render
from inferline.server.gateway.fairshare import Shares, client_of
from inferline.server.gateway.record import sane_id
from inferline.server.ids import new_id

# A connection turned away is answered at once, then read (and the bytes dropped) until the client closes it, for
# this long at most: closing a socket with unread bytes sends a reset, which can reach the client before it read
# the 503 (and fail its write of the request). At most Shares.total such connections linger; past that, closed now.
LINGER_S = 1.0
# A new connection is not idle yet for this long: a burst's connections all send their headers well within it.
IDLE_GRACE_S = 1.0


class GuardedHttpTools(HttpToolsProtocol):
    max_header_bytes = 16 * 1024
    max_headers = 100
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    retry_after_s = 1
    shares = Shares(2048, 256, 32)   # protocol_for gives each server its own

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.in_headers = True     # the next bytes belong to a request line or headers
        self.header_bytes = 0
        self.header_count = 0
        self.header_size = 0
        self.in_body = False       # the headers are in, the body is not (yet)
        self.body_deadline = 0.0
        self.body_timer: asyncio.TimerHandle | None = None
        self.share = ""            # the client whose share this connection counts against
        self.admitted = False      # counted in self.shares
        self.idle = False          # counted idle in self.shares
        self.requests = 0          # requests whose headers are in and whose response is not complete
        self.turned_away = False   # answered 503 before a request: what it sends is dropped
        self.grace_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.share = client_of(self.client)
        refused = self.shares.admit(self.share)
        if refused is not None:
            self._turn_away(refused)
            return
        self.admitted = True
        self.grace_timer = self.loop.call_later(IDLE_GRACE_S, self._still_silent)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        self._end_grace()
        if self.admitted:
            self.shares.leave(self.share, self.idle)
            self.admitted = self.idle = False
        if self.turned_away:
            self.turned_away = False
            self.shares.lingering -= 1
        super().connection_lost(exc)

    def _end_grace(self) -> None:
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None

    def _still_silent(self) -> None:
        """IDLE_GRACE_S passed without a whole request head: the connection is idle, if its client's share allows."""
        self.grace_timer = None
        if self.requests or not self.admitted or self.transport.is_closing():
            return
        if self.shares.rest(self.share):
            self.idle = True
        else:
            self._turn_away("max_idle_connections_per_client")

    def _turn_away(self, limit: str) -> None:
        """503 before a request was read, then drain and close (see LINGER_S); it no longer counts in any share."""
        if self.admitted:
            self.shares.leave(self.share, self.idle)
            self.admitted = self.idle = False
        self._disarm()
        self.turned_away = True
        self.shares.lingering += 1
        if limit == "max_connections":
            message = f"the gateway has {self.shares.total} connections open, its limit (gateway.max_connections)"
        elif limit == "max_connections_per_client":
            message = (f"this client already has {self.shares.per_client} connections open, its share "
                       f"(gateway.max_connections_per_client)")
        else:
            message = (f"this client already has {self.shares.idle_per_client} idle connections open, its share "
                       f"(gateway.max_idle_connections_per_client): send requests on those, or close them")
        self._answer(Overloaded(message + "; retry later", field=limit), "/")
        if self.shares.lingering > self.shares.total:
            self.transport.close()
        else:
            self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

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
        if self.turned_away or self.transport.is_closing():
            return
        if self.in_headers:
            self._arm()
            self.header_bytes += len(data)
        super().data_received(data)
        # Armed only for a body still owed after this read: most bodies come in the headers' read, with no timer.
        if self.in_body and self.body_timer is None and not self.transport.is_closing():
            self.body_timer = self.loop.call_at(self.body_deadline, self._body_too_slow)
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
        if len(self.tasks) >= self.shares.total:   # uvicorn's limit_concurrency, answered in the route's shape
            self._answer(Overloaded(f"the gateway has {self.shares.total} requests in flight, its limit "
                                    f"(gateway.max_connections); retry later", field="max_connections"), self._path())
            self.transport.close()
            raise Refused
        self.requests += 1
        self._end_grace()
        if self.idle:
            self.idle = False
            self.shares.busy(self.share)
        self.in_body = True
        self.body_deadline = self.loop.time() + self.body_timeout_s
        before = self.cycle
        super().on_headers_complete()   # makes the request's cycle; its task starts on the loop's next turn
        if self.cycle is not None and self.cycle is not before:
            self.cycle.transport = OneWrite(self.cycle, self.transport, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self.in_body = False
        if self.requests == 0:     # answered before its body ended (a 413, say): what comes next is a new request
            self.in_headers = True
        self._disarm_body()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # The timer is armed by the next request's first byte. A request answered before its body ended still has
        # body to come: those bytes are not the next request's headers (counted as such, a kept-alive client's next
        # request met a 431), so the headers begin when that body ends (on_message_complete).
        self.in_headers = not self.in_body
        self.header_bytes = 0
        self.requests = max(0, self.requests - 1)
        if self.requests == 0 and self.admitted and not self.transport.is_closing():
            if self.shares.rest(self.share):
                self.idle = True
            else:   # its client holds its share of idle connections already: this one is not kept alive
                self.transport.close()
        super().on_response_complete()

    def _disarm_body(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _body_too_slow(self) -> None:
        """The body deadline passed: 408 unless a response started already (then the connection just closes). The
        request's app sees the client gone, so its own answer, if any, goes nowhere."""
        self.body_timer = None
        if not self.in_body or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            wanted = next((v for k, v in cycle.scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
            self._answer(RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s "
                                        f"(gateway.body_timeout_s)", field="body"),
                         cycle.scope["path"], wanted if sane_id(wanted) else new_id())
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _refuse(self, message: str, limit: str) -> None:
        """431, then close: the parser state is past saving."""
        if self.transport.is_closing():
            return
        self._answer(HeadersTooLarge(message, field=limit), self._path())
        self.transport.close()
        self._disarm()

    def _path(self) -> str:
        """The request's path as far as it was read, for its error's shape ("/", the TGI family's, if none)."""
        try:
            return httptools.parse_url(self.url).path.decode("latin-1") or "/"
        except (httptools.HttpParserInvalidURLError, AttributeError, TypeError):
            return "/"

    def _answer(self, err: InferlineError, path: str, request_id: str = "") -> None:
        """`err` as a whole response in `path`'s protocol family shape, written on the connection (closing it is
        the caller's)."""
        request_id = request_id or new_id()
        status, body, headers = render(err, path, request_id, self.retry_after_s)
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", f"x-request-id: {request_id}",
                *(f"{name}: {value}" for name, value in headers.items()), "connection: close"]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():   # not after our own 431 or 503 (its Refused unwinds as a parser error)
            super().send_400_response(msg)


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
    """The uvicorn `http=` protocol class with this gateway's limits, and its own connection shares (one class per
    server: uvicorn makes one protocol per connection)."""
    shares = Shares(settings.max_connections, settings.max_connections_per_client,
                    settings.max_idle_connections_per_client)
    return type("InferlineHttp", (GuardedHttpTools,), {"max_header_bytes": settings.max_header_bytes,
                                                       "max_headers": settings.max_headers,
                                                       "header_timeout_s": settings.header_timeout_s,
                                                       "body_timeout_s": settings.body_timeout_s,
                                                       "retry_after_s": settings.retry_after_s,
                                                       "shares": shares})
