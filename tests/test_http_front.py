"""The gateway's HTTP protocol (server/gateway/connlimits.py) writes each response's head and body as one write, and
never holds a streamed response's head past the event loop's turn. Driven as uvicorn drives it: the real protocol
class on a real event loop, given the bytes of a request; the transport records what the protocol writes."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from inferline.server.config import GatewaySettings
from inferline.server.gateway.connlimits import protocol_for

REQUEST = b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi"


class RecordingTransport(asyncio.Transport):
    """asyncio's transport interface; each write() is kept as one entry."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def serve(app: Any, request: bytes) -> RecordingTransport:
    config = Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = protocol_for(GatewaySettings())(config, ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
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
