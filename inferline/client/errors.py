"""What a failed call raises: one exception class per kind of failure, each carrying the HTTP status, the server's
error type, the field it names and the request id. Reads all three of the gateway's error bodies (TGI-style and task
routes, OpenAI routes, Open Inference Protocol routes) and anything else a proxy in between may answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


class InferlineError(Exception):
    """Base of everything the client raises."""


class APIConnectionError(InferlineError):
    """The gateway could not be reached (after the retries), or the connection broke before an answer."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class APIError(InferlineError):
    """The gateway answered with an error.

    status: the HTTP status; error_type: the server's kind of error ("validation", "overloaded", "timeout",
    "dead_letter", ...); field: the request field it names, if any; request_id: the id of the call (the same on
    every try); retry_after: seconds from Retry-After, if sent; body: the decoded error body."""

    def __init__(self, message: str, *, status: int, error_type: str, field: str | None, request_id: str,
                 retry_after: float | None = None, body: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.field = field
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body
        self.headers = dict(headers or {})   # the response's headers (x-should-retry, retry-after, ...)

    def __str__(self) -> str:
        where = f", field {self.field}" if self.field else ""
        return f"{self.status} {self.error_type}{where}: {self.message} (request {self.request_id})"


class BadRequestError(APIError):
    """400, 405, 413, 422, 431: the request is wrong; sending it again will not help."""


class AuthenticationError(APIError):
    """401: no API key, or one the gateway does not accept."""


class PermissionDeniedError(APIError):
    """403: the key may not call this route or model."""


class NotFoundError(APIError):
    """404: no such model, version or route."""


class RateLimitError(APIError):
    """429: the key's rate, burst or concurrency limit (retried by the client, honouring Retry-After)."""


class OverloadedError(APIError):
    """503: a model's queue is full or the gateway's Redis is away (retried by the client, honouring Retry-After)."""


class DeadlineError(APIError):
    """504: the request's deadline passed before a worker answered."""


class ServerError(APIError):
    """500 and any other 5xx: a request the workers could not process (a dead-lettered one is never retried)."""


CLASSES: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                                      404: NotFoundError, 405: BadRequestError, 413: BadRequestError,
                                      422: BadRequestError, 429: RateLimitError, 431: BadRequestError,
                                      503: OverloadedError, 504: DeadlineError}
# The error type a status stands for where the body does not say (v2 bodies carry a message only).
TYPES = {400: "validation", 401: "auth", 403: "forbidden", 404: "not_found", 405: "validation", 413: "validation",
         422: "validation", 429: "rate_limited", 431: "validation", 499: "cancelled", 500: "internal",
         503: "overloaded", 504: "timeout"}


def error_from(status: int, headers: Mapping[str, str], body: bytes, request_id: str) -> APIError:
    """The exception for an error answer: its class from the status, its details from whichever body shape came."""
    try:
        data: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    return error_from_data(status, headers, data, request_id, text=body.decode("utf-8", "replace")[:500])


def error_from_data(status: int, headers: Mapping[str, str], data: Any, request_id: str,
                    text: str = "") -> APIError:
    """Like error_from, from a decoded body (an error event in the middle of a stream comes this way)."""
    message, error_type, field = text or f"HTTP {status}", TYPES.get(status, "internal"), None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):   # OpenAI: {"error": {"message", "type", "param", "code"}}; code is our type
            message = str(err.get("message") or message)
            error_type = str(err.get("code") or err.get("type") or error_type)
            field = err.get("param")
        elif isinstance(err, str):  # TGI-style {"error", "error_type", "field", "request_id"}, or v2 {"error"}
            message = err
            error_type = str(data.get("error_type") or error_type)
            field = data.get("field")
            request_id = str(data.get("request_id") or request_id)
        elif "detail" in data:      # a plain FastAPI/Starlette answer from something in front of the gateway
            message = str(data["detail"])
    retry_after = parse_retry_after(headers.get("retry-after"))
    cls = CLASSES.get(status, ServerError if status >= 500 else BadRequestError)
    return cls(message, status=status, error_type=error_type, field=field if isinstance(field, str) else None,
               request_id=headers.get("x-request-id") or request_id, retry_after=retry_after, body=data,
               headers=headers)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import time

    return max(0.0, when.timestamp() - time.time())
