"""The inference routes as bare ASGI, in front of FastAPI. FastAPI's routing and request objects were the
largest per-request cost of the gateway (../shared/ENVIRONMENT.md: 5.3k -> 9k req/s for the same logic).
The routes served here are the route table's entries with a `hot` handler, the very handler their FastAPI route
calls, so behaviour and docs stay one thing; anything else (GET routes, multipart uploads, versioned infer) falls
through to FastAPI."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from inferline.server.gateway import record
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.table import RouteTable


class HotPath:
    def __init__(self, app: ASGIApp, table: RouteTable, dispatcher: Dispatcher) -> None:
        """app: the FastAPI app, for every request not served here."""
        self.app = app
        self.table = table
        self.dispatcher = dispatcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.table.match(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None or found[0].hot is None:
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}   # a plain dict, the first of repeated names (as Starlette's Headers.get)
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            if key not in headers:
                headers[key] = value.decode("latin-1")
        if headers.get("content-type", "").startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        route, path_params = found
        current = record.current.get()
        request_id = ""
        if current is not None:
            current.route = route.path
            request_id = current.request_id
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        assert route.hot is not None
        # joined into an argument, never a local of this frame: this frame waits as long as the request does
        body = await route.hot(self.dispatcher, request_id, take(chunks), headers, path_params,
                               scope.get("query_string", b"").decode("latin-1"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def take(chunks: list[bytes]) -> bytearray:
    """The body, joined; the chunks are let go (the list is emptied). A bytearray, so that the dispatcher can empty
    it once it is encoded for Redis (Dispatcher.call): a request waiting for its reply holds no copy of its body."""
    body = bytearray().join(chunks)
    chunks.clear()
    return body
