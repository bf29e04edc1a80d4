"""What one request's log line, metrics and trace span need from the layers below the Edge. The Edge makes a record
per request and sets `current`; the route (its label), the dispatcher (its model, the worker's timings) and the
security layer (the key) fill it in.
Its own module, so that the dispatcher and the hot path write it without importing the Edge."""

from __future__ import annotations

from contextvars import ContextVar


class RequestRecord:
    __slots__ = ("request_id", "traceparent", "route", "model", "queued_ms", "compute_ms", "batch_size", "tokens",
                 "key_id", "version", "asked", "max_priority", "priority", "cache")

    def __init__(self, request_id: str, traceparent: str = "") -> None:
        self.request_id = request_id
        self.traceparent = traceparent   # the gateway span's, for the envelope ("" when tracing is off)
        self.route = ""                  # the route table's path template ("" until a route matched)
        self.model = ""
        self.queued_ms = 0.0
        self.compute_ms = 0.0
        self.batch_size = 0
        self.tokens = 0
        self.key_id = ""                 # the API key that authenticated it ("" when none was needed)
        self.version = ""                # the model version that answered: the Edge's x-model-version header
        self.asked = ""                  # the priority the caller asked for (x-priority, or a body field); "": none
        self.max_priority = "high"       # the API key's maximum (security layer); "high" without keys
        self.priority = ""               # the lane the request was queued on (dispatcher): the x-priority answered
        self.cache = ""                  # "hit" | "miss" where the model's response cache was asked: x-cache


current: ContextVar[RequestRecord | None] = ContextVar("inferline_request", default=None)


def sane_id(value: str) -> bool:
    """Whether a caller's x-request-id may be used as is: 1-64 ASCII letters, digits, '-' or '_'."""
    return 0 < len(value) <= 64 and value.isascii() and value.replace("-", "").replace("_", "").isalnum()


def request_id() -> str:
    """The request id of the request being served ("" outside one)."""
    record = current.get()
    return record.request_id if record is not None else ""
