"""The outermost ASGI layer: request ids, body-size limit, request metrics, the access log, the request's trace span,
and a last-resort 500 in the right error shape. Pure ASGI (no per-request object churn): it sits on every request's
path. What the layers below learn of a request (its route, its model, the worker's timings) they write into its
RequestRecord (record.py), which this layer makes and sets as `record.current` for each request."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferline.server import priority, tracing
from inferline.server.errors import HeadersTooLarge, InferlineError, PayloadTooLarge
from inferline.server.gateway.errors import render
from inferline.server.gateway.memory import Reclaimer
from inferline.server.gateway.record import RequestRecord, current, sane_id
from inferline.server.ids import new_id
from inferline.server.logs import AccessLog
from inferline.server.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class Edge:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: GatewayMetrics, retry_after_s: int,
                 max_headers: int = 100, access_log: bool = True) -> None:
        self.app = app
        self.access = AccessLog() if access_log else None
        # Each (model, route, status)'s metric children, found once: labels() showed in profiles of the hot path.
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.reclaimer = Reclaimer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        wanted = ""
        incoming_trace = ""
        asked = ""
        length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                wanted = value.decode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"traceparent":
                incoming_trace = value.decode("latin-1")
            elif name == b"x-priority":
                asked = value.decode("latin-1")
        request_id = wanted if sane_id(wanted) else new_id()
        span: Any = None
        if tracing.ENABLED:
            span, traceparent = tracing.start_request(scope["method"], scope["path"], incoming_trace, request_id)
            record = RequestRecord(request_id, traceparent)
        else:
            record = RequestRecord(request_id)
        token = current.set(record)
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message["headers"] = [*message.get("headers", []), id_header]
                if record.version:   # the version whose worker answered (set by the dispatcher before the start)
                    message["headers"].append((b"x-model-version", record.version.encode()))
                if record.priority:   # the lane it was queued on, after the key's clamp
                    message["headers"].append((b"x-priority", record.priority.encode()))
                if record.cache:
                    message["headers"].append((b"x-cache", record.cache.encode()))
            await send(message)

        async def send_error(err: InferlineError) -> None:
            code, body, headers = render(err, scope["path"], request_id, self.retry_after_s)
            await send_with_id({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()),
                                            *[(k.encode(), v.encode()) for k, v in headers.items()]]})
            await send({"type": "http.response.body", "body": body})

        limit = self.max_body_bytes
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body is larger than {limit} bytes", field="body")
            return message

        try:
            if asked:
                record.asked = priority.parse(asked)   # ValidationFailed: 422 below
            if len(scope["headers"]) > self.max_headers:   # the connection layer refuses these first; kept for h11
                await send_error(HeadersTooLarge(f"request has {len(scope['headers'])} headers; the limit is "
                                                 f"{self.max_headers} (gateway.max_headers)", field="headers"))
            elif length > limit:
                await send_error(PayloadTooLarge(f"body is {length} bytes; the limit is {limit}", field="body"))
            elif length >= 0:   # the parser hands on no more than content-length: nothing to count
                seen = length
                await self.app(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception as exc:   # noqa: BLE001 - the last line of defence: never FastAPI's plain-text 500
            if started_response:
                raise
            if isinstance(exc, InferlineError):
                await send_error(exc)
            else:
                log.exception("unhandled error path=%s id=%s", scope["path"], request_id)
                await send_error(InferlineError(f"internal error while handling request {request_id}"))
        finally:
            current.reset(token)
            self.reclaimer.released(seen)   # whatever the request held of its body is garbage now
            elapsed = time.perf_counter() - started
            # the route table's path; a mount's (/docs/assets) or "unmatched" (a 404) for the rest
            label = record.route or str(getattr(scope.get("route"), "path", "unmatched"))
            model = record.model
            children = self.children.get((model, label, status))
            if children is None:
                children = self.children[model, label, status] = (
                    self.metrics.requests.labels(model, label, str(status)), self.metrics.latency.labels(model, label))
            children[0].inc()
            children[1].observe(elapsed)
            if self.access is not None:
                self.access.write(request_id, scope["method"], label, model, status, elapsed * 1e3, record.queued_ms,
                                  record.compute_ms, record.batch_size, record.tokens)
            if span is not None:
                tracing.end_request(span, scope["method"], label, status, model)
