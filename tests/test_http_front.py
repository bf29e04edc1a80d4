"""The gateway's HTTP protocol (server/gateway/connlimits.py) writes each response's head and body as one write, and
never holds a streamed response's head past the event loop's turn. Driven as uvicorn drives it: the real protocol
class on a real event loop, given the bytes of a request; the transport records what the protocol writes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.server import ServerState

from inferline.server.config import GatewaySettings
from inferline.server.gateway.connlimits import protocol_for
from inferline.server.gateway.fairshare import Shares, client_of

REQUEST = b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi"


class RecordingTransport(asyncio.Transport):
    """asyncio's transport interface; each write() is kept as one entry."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.peer = peer
        self.protocol: Any = None   # what serve() connected it to, for later reads

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": (self.peer, 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def serve(app: Any, request: bytes, protocol_class: Any = None, peer: str = "127.0.0.1") -> RecordingTransport:
    config = Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = (protocol_class or protocol_for(GatewaySettings()))(config, ServerState(), app_state={})
    transport = RecordingTransport(peer)
    transport.protocol = protocol
    protocol.connection_made(transport)
    if request:
        protocol.data_received(request)
    return transport


def test_a_response_head_and_body_go_out_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["body"] == b"hi"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    async def main() -> None:
        transport = serve(app, REQUEST)
        await asyncio.sleep(0.05)
        assert len(transport.writes) == 1, transport.writes
        head, _, body = transport.writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
        assert body == b'{"ok":true}'
        assert not transport.closed   # kept alive

    asyncio.run(main())


def test_a_streamed_response_head_is_not_held_for_its_body() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await release.wait()   # the first chunk comes much later (a generation's first token)
        await send({"type": "http.response.body", "body": b"token", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> None:
        transport = serve(app, REQUEST)
        await asyncio.sleep(0.05)
        assert len(transport.writes) == 1, transport.writes   # the head alone, at the end of its turn
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
        assert b"transfer-encoding: chunked" in transport.writes[0]
        release.set()
        await asyncio.sleep(0.05)
        assert transport.writes[1:] == [b"5\r\ntoken\r\n", b"0\r\n\r\n"]

    asyncio.run(main())


def test_a_connection_close_response_is_written_before_the_close() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        transport = serve(app, REQUEST.replace(b"Host: gw\r\n", b"Host: gw\r\nConnection: close\r\n"))
        await asyncio.sleep(0.05)
        assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\nok")
        assert b"connection: close" in transport.writes[0]
        assert transport.closed

    asyncio.run(main())


async def answer_ok(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_stalled_body_is_answered_408_in_its_routes_shape_then_closed() -> None:
    protocol = protocol_for(GatewaySettings(body_timeout_s=0.2))

    async def main() -> None:
        stalled = serve(answer_ok, b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 9\r\n\r\n{}",
                        protocol)
        whole = serve(answer_ok, b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",
                      protocol)
        await asyncio.sleep(0.4)
        assert stalled.closed and len(stalled.writes) == 1, stalled.writes
        head, _, body = stalled.writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout") and b"connection: close" in head
        error = orjson.loads(body)["error"]   # the OpenAI family's shape
        assert error["param"] == "body" and "gateway.body_timeout_s" in error["message"], error
        assert whole.writes[0].startswith(b"HTTP/1.1 200") and not whole.closed   # its body came in time

    asyncio.run(main())


async def refuse_big_unread(scope: Any, receive: Any, send: Any) -> None:
    """413 for /big without reading its body (as the body bound does); 200 for anything else."""
    if scope["path"] != "/big":
        await answer_ok(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"no"})


def test_a_body_still_coming_after_its_answer_is_not_the_next_requests_headers() -> None:
    """A kept-alive connection whose request was answered before its body ended (a 413): the rest of that body,
    however long, is not counted against the next request's header bound (it was: the next request got a 431)."""
    async def main() -> None:
        size = 4 * GatewaySettings().max_header_bytes
        transport = serve(refuse_big_unread, b"POST /big HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % size
                          + b"x" * 100)
        await asyncio.sleep(0.05)
        assert transport.writes[0].startswith(b"HTTP/1.1 413"), transport.writes
        protocol = transport.protocol
        protocol.data_received(b"x" * (size - 100))   # the rest of the refused body, after its answer
        protocol.data_received(REQUEST)
        await asyncio.sleep(0.05)
        assert [w[:12] for w in transport.writes] == [b"HTTP/1.1 413", b"HTTP/1.1 200"], transport.writes

    asyncio.run(main())


def test_a_client_over_its_share_is_answered_503_at_once_and_others_are_not() -> None:
    protocol = protocol_for(GatewaySettings(max_connections=10, max_connections_per_client=3,
                                            max_idle_connections_per_client=2))

    async def main() -> None:
        mine = [serve(answer_ok, b"", protocol, peer="10.0.0.1") for _ in range(4)]
        theirs = serve(answer_ok, REQUEST, protocol, peer="10.0.0.2")
        await asyncio.sleep(0.05)
        assert [t.writes for t in mine[:3]] == [[], [], []]
        head, _, body = mine[3].writes[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable") and b"retry-after: 1" in head
        assert orjson.loads(body)["field"] == "max_connections_per_client"   # the TGI shape: no route read yet
        assert theirs.writes[0].startswith(b"HTTP/1.1 200")

    asyncio.run(main())


def test_kept_alive_connections_past_a_clients_idle_share_are_closed_after_their_response() -> None:
    protocol = protocol_for(GatewaySettings(max_connections=10, max_connections_per_client=5,
                                            max_idle_connections_per_client=2))

    async def main() -> None:
        served = [serve(answer_ok, REQUEST, protocol) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert all(t.writes[0].startswith(b"HTTP/1.1 200") for t in served)
        assert [t.closed for t in served] == [False, False, True, True]   # two kept alive: the idle share

    asyncio.run(main())


def test_a_client_is_its_ipv4_address_or_its_ipv6_64() -> None:
    assert client_of(("192.0.2.7", 5000)) == "192.0.2.7"
    assert client_of(("2001:db8:1:2:aaaa::1", 5000)) == client_of(("2001:db8:1:2:bbbb::9", 5001)) == "2001:db8:1:2::/64"
    assert client_of(("2001:db8:1:3::1", 5000)) != client_of(("2001:db8:1:2::1", 5000))
    assert client_of(("::ffff:192.0.2.7", 5000)) == "192.0.2.7"
    assert client_of(None) == ""


def test_shares_count_open_and_idle_connections_per_client() -> None:
    shares = Shares(total=4, per_client=3, idle_per_client=1)
    assert [shares.admit("a") for _ in range(4)] == [None, None, None, "max_connections_per_client"]
    assert shares.admit("b") is None and shares.admit("c") == "max_connections"
    assert shares.rest("a") and not shares.rest("a")   # one idle at a time
    shares.busy("a")
    assert shares.rest("a")
    shares.leave("a", idle=True)
    shares.leave("a", idle=False)
    assert shares.opened == {"a": 1, "b": 1} and shares.idle == {} and shares.open == 2
