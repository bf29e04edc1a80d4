"""The inference routes as bare ASGI, in front of FastAPI. FastAPI's routing and request objects were the
largest per-request cost of the gateway (../shared/ENVIRONMENT.md: 5.3k -> 9k req/s for the same logic).
The handlers are the very ones the FastAPI routes call, so behaviour and docs stay one thing; anything
not matched here (GET routes, multipart uploads, versioned infer) falls through to FastAPI."""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from inferline.server.gateway.routes import classify, forecast, kserve, predict, sentiment
from inferline.server.gateway.routes.common import Handler

EXACT: dict[str, Handler] = {"/forecast": forecast.handle, "/sentiment": sentiment.handle_sentiment,
                             "/classify-text": sentiment.handle_classify_text, "/classify-image": classify.handle}
# /v2/models/{model}/infer and /v1/models/{model}/predict
BY_MODEL = (("/v2/models/", "/infer", kserve.handle_infer, "/v2/models/{model}/infer"),
            (predict.PREFIX, predict.SUFFIX, predict.handle, "/v1/models/{model}/predict"))


class HotPath:
    def __init__(self, app: Any) -> None:
        self.app = app   # the FastAPI app: its state holds the dispatcher once the lifespan ran

    def match(self, scope: Scope) -> tuple[Handler, str, dict[str, str]] | None:
        path: str = scope["path"]
        handler = EXACT.get(path)
        if handler is not None:
            return handler, path, {}
        for prefix, suffix, by_model, route in BY_MODEL:
            if path.startswith(prefix) and path.endswith(suffix):
                model = path[len(prefix):-len(suffix)]
                if model and "/" not in model:
                    return by_model, route, {"model": model}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        headers: dict[str, str] = {}
        if found is not None:   # a plain dict, the first of repeated names (as Starlette's Headers.get)
            for name, value in scope["headers"]:
                key = name.decode("latin-1")
                if key not in headers:
                    headers[key] = value.decode("latin-1")
        if found is None or headers.get("content-type", "").startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        handler, route, path_params = found
        scope["inferline.route"] = route
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        # joined into an argument, never a local of this frame: this frame waits as long as the request does
        body = await handler(self.app.state.dispatcher, scope["state"]["request_id"], take(chunks), headers,
                             path_params, scope.get("query_string", b"").decode("latin-1"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def take(chunks: list[bytes]) -> bytearray:
    """The body, joined; the chunks are let go (the list is emptied). A bytearray, so that the dispatcher can empty
    it once it is encoded for Redis (Dispatcher.call): a request waiting for its reply holds no copy of its body."""
    body = bytearray().join(chunks)
    chunks.clear()
    return body
