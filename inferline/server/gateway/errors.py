"""The one table from error type to HTTP status and headers, and the one body shape per protocol family
(../shared/API.md): TGI-style and task routes, OpenAI routes (/v1/...) and Open Inference Protocol routes
(/v2/...). Workers and the broker report error types only; statuses are chosen here. Never FastAPI's {"detail"}."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from fastapi.exceptions import RequestValidationError

from inferline.server.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    DeadLettered,
    DeadlineExceeded,
    Forbidden,
    GenerationFailed,
    HeadersTooLarge,
    InferlineError,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    describe_validation,
    typed,
)


class Kind(NamedTuple):
    status: int
    public: str                      # the error_type clients see
    headers: tuple[tuple[str, str], ...] = ()


RETRY = "retry-after"   # its value is the gateway's retry_after_s
CLIENT_GONE = 499       # nginx's "client closed request": the status the access metrics record for a caller that left
# The one table: every error class (server/errors.py) -> its status, public type and headers. Keyed by class, so an
# error type with no class cannot get a row; tests/test_errors.py fails for a class without one.
TABLE: dict[type[InferlineError], Kind] = {
    ValidationFailed: Kind(422, "validation"),
    BadRequest: Kind(400, "validation"),
    NotFound: Kind(404, "not_found"),
    Conflict: Kind(409, "conflict"),
    MethodNotAllowed: Kind(405, "validation"),
    PayloadTooLarge: Kind(413, "validation"),
    HeadersTooLarge: Kind(431, "validation"),
    Unauthorized: Kind(401, "auth"),
    Forbidden: Kind(403, "forbidden"),
    RateLimited: Kind(429, "rate_limited", ((RETRY, ""),)),
    Cancelled: Kind(CLIENT_GONE, "cancelled"),
    Overloaded: Kind(503, "overloaded", ((RETRY, ""),)),
    Unavailable: Kind(503, "unavailable", ((RETRY, ""),)),
    DeadlineExceeded: Kind(504, "timeout"),
    RequestTimeout: Kind(408, "timeout"),
    DeadLettered: Kind(500, "dead_letter", (("x-should-retry", "false"),)),
    GenerationFailed: Kind(500, "generation"),
    InferlineError: Kind(500, "internal"),
}
# By error_type: what a worker's reply names (errors.typed rebuilds those as the base class with that type).
ERRORS: dict[str, Kind] = {cls.error_type: kind for cls, kind in TABLE.items()}
OPENAI_TYPES = {"validation": "invalid_request_error", "not_found": "not_found_error", "auth": "authentication_error",
                "forbidden": "permission_error", "rate_limited": "rate_limit_error",
                "overloaded": "server_overloaded", "unavailable": "server_error", "timeout": "timeout",
                "generation": "server_error", "dead_letter": "server_error", "internal": "server_error"}


def kind_of(err: InferlineError) -> Kind:
    return ERRORS.get(err.error_type, TABLE[InferlineError])


def family(path: str) -> str:
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith("/v2/") or path == "/v2":
        return "kserve"
    return "tgi"


def body_of(err: InferlineError, path: str, request_id: str) -> dict[str, Any]:
    """The error body in the shape of `path`'s protocol family."""
    public = kind_of(err).public
    kind = family(path)
    if kind == "openai":
        return {"error": {"message": err.message, "type": OPENAI_TYPES.get(public, public), "param": err.field,
                          "code": public}}
    if kind == "kserve":
        return {"error": err.message}
    body: dict[str, Any] = {"error": err.message, "error_type": public, "request_id": request_id}
    if err.field is not None:
        body["field"] = err.field
    return body


def render(err: InferlineError, path: str, request_id: str,
           retry_after_s: int = 1) -> tuple[int, bytes, dict[str, str]]:
    """(status, JSON body, extra headers) for an error on `path`."""
    kind = kind_of(err)
    headers = {name: value or str(retry_after_s) for name, value in kind.headers} | err.headers
    return kind.status, orjson.dumps(body_of(err, path, request_id)), headers


def stream_event(err: InferlineError) -> dict[str, Any]:
    """An error in the middle of a TGI stream: an SSE event of its own."""
    return {"error": err.message, "error_type": kind_of(err).public}


def from_validation(exc: RequestValidationError) -> InferlineError:
    """The first problem pydantic found, as one message naming the field, the bound and the value."""
    errors = exc.errors()
    if not errors:
        return ValidationFailed("invalid request")
    if errors[0].get("type") == "json_invalid":
        return BadRequest(f"body is not valid JSON: {errors[0].get('msg')}", field="body")
    message, field = describe_validation(list(errors))
    return ValidationFailed(message, field=field)


def http_error(status: int, detail: str, path: str, method: str = "") -> InferlineError:
    if status == 404:
        return NotFound(f"no route {path}", field=None)
    if status == 405:
        return MethodNotAllowed(f"method {method} is not allowed on {path}")
    statuses = {k.status: name for name, k in ERRORS.items()}
    return typed(statuses.get(status, "bad_request" if 400 <= status < 500 else "internal"), detail)
