"""OpenTelemetry tracing: a span per request in the gateway, its W3C traceparent carried to the worker in the Redis
envelope, and in the worker a span per request (a child of the gateway's) and one per batch linked to each of them.

Off by default, and then free: `ENABLED` is False, nothing of OpenTelemetry is imported, and callers test the flag
before building anything. setup() turns it on from the standard variables:
  OTEL_TRACES_EXPORTER   otlp | console | none (unset: none, tracing off); otlp needs opentelemetry-exporter-otlp
  OTEL_SDK_DISABLED      true: off whatever the exporter
  OTEL_SERVICE_NAME      default inferline-gateway / inferline-worker
  OTEL_EXPORTER_OTLP_*, OTEL_BSP_*   read by the SDK itself (endpoint, headers; batch delay and sizes)
and one of ours: INFERLINE_TRACES_FILE makes the console exporter append one JSON object per span to that file
(stdout otherwise), e.g. for a collector that tails files, or a test.
An incoming `traceparent` header is honoured: the gateway's span joins the caller's trace.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any

ENABLED = False
_tracer: Any = None
_propagator: Any = None


class TracingError(Exception):
    """Tracing was asked for and cannot run (an unknown exporter, a missing package)."""


def setup(default_service: str) -> bool:
    """Configure tracing for this process from the environment; True when it is on. Raises TracingError."""
    global ENABLED, _tracer, _propagator
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name in ("", "none") or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise TracingError(f"OTEL_TRACES_EXPORTER={exporter_name} needs opentelemetry-sdk "
                           "(pip install 'inferline[tracing]')") from exc
    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", default_service)}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name)))
    atexit.register(provider.shutdown)   # flush what is still batched
    _tracer = provider.get_tracer("inferline")
    _propagator = TraceContextTextMapPropagator()
    ENABLED = True
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        path = os.environ.get("INFERLINE_TRACES_FILE")
        out = open(path, "a", buffering=1) if path else None   # noqa: SIM115 - lives as long as the process
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n") if out \
            else ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[no-redef]
                    OTLPSpanExporter,
                )
            except ImportError as exc:
                raise TracingError("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp") from exc
        return OTLPSpanExporter()
    raise TracingError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here: use otlp, console or none")


def _context(traceparent: str) -> Any:
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def _traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


# --- gateway -------------------------------------------------------------------------------------------------

def start_request(method: str, path: str, incoming: str, request_id: str) -> tuple[Any, str]:
    """The gateway's span for one request (a child of the caller's `traceparent` when it sent a valid one), and its
    own traceparent for the envelope. Only call when ENABLED."""
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(f"{method} {path}", context=_context(incoming), kind=SpanKind.SERVER,
                              attributes={"http.request.method": method, "url.path": path,
                                          "inferline.request_id": request_id})
    return span, _traceparent(span)


def end_request(span: Any, method: str, route: str, status: int, model: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if model:
        span.set_attribute("inferline.model", model)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


# --- worker --------------------------------------------------------------------------------------------------

def record_batch(model: str, requests: Sequence[tuple[str, str, float]], started_ns: int, ended_ns: int) -> None:
    """Spans for one batch that ran from started_ns to ended_ns (epoch ns): the batch's own span, linked to each
    request's gateway span, and per request a span in its caller's trace, linked back to the batch.
    requests: (request id, traceparent, queued ms) of each request in the batch. Only call when ENABLED."""
    from opentelemetry.trace import Link, get_current_span

    contexts = [(rid, _context(tp), queued) for rid, tp, queued in requests]
    links = [Link(get_current_span(ctx).get_span_context()) for _, ctx, _ in contexts if ctx is not None]
    batch = _tracer.start_span(f"batch {model}", links=links, start_time=started_ns,
                               attributes={"inferline.model": model, "inferline.batch_size": len(requests)})
    batch.end(end_time=ended_ns)
    back = [Link(batch.get_span_context())]
    for rid, ctx, queued in contexts:
        if ctx is not None:
            _tracer.start_span(f"worker {model}", context=ctx, links=back, start_time=started_ns, attributes={
                "inferline.model": model, "inferline.request_id": rid, "inferline.queued_ms": queued,
                "inferline.batch_size": len(requests)}).end(end_time=ended_ns)


def record_generation(model: str, request_id: str, traceparent: str, started_ns: int, ended_ns: int, queued_ms: float,
                      tokens: int) -> None:
    """A language model's request, from admission to its last token, in its caller's trace (a span per decoding
    step would be a span per token). Only call when ENABLED."""
    _tracer.start_span(f"generate {model}", context=_context(traceparent), start_time=started_ns, attributes={
        "inferline.model": model, "inferline.request_id": request_id, "inferline.queued_ms": queued_ms,
        "inferline.tokens": tokens}).end(end_time=ended_ns)
