"""The error tree. Each class names its `error_type`, the one thing a worker reports about a failure; the gateway's
table (server/gateway/errors.py) maps each type to an HTTP status, headers and each protocol family's body.
Leaf module: imports nothing from inferline."""

from __future__ import annotations

from typing import Any


class InferlineError(Exception):
    error_type = "internal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers: dict[str, str] = {}   # gateway-side only: e.g. WWW-Authenticate, x-ratelimit-*


class ValidationFailed(InferlineError):
    """A field fails validation (422)."""

    error_type = "validation"


class BadRequest(InferlineError):
    """A body that cannot be read at all: not JSON, a bad header (400)."""

    error_type = "bad_request"


class InputError(ValidationFailed):
    """Bad input for one item, found in a worker (decode, validation or the model). Only that request fails."""


class MalformedInput(InputError):
    """Input a worker cannot parse at all (not JSON), or a tensor of the wrong datatype: 400, like the gateway's."""

    error_type = "bad_request"


class NotFound(InferlineError):
    error_type = "not_found"


class Conflict(InferlineError):
    """The request cannot apply to the resource's state now (a rollout already in progress, nothing to promote)."""

    error_type = "conflict"


class MethodNotAllowed(InferlineError):
    error_type = "method_not_allowed"


class PayloadTooLarge(InferlineError):
    error_type = "too_large"


class Overloaded(InferlineError):
    """A model's queue is at its cap: 503 with Retry-After."""

    error_type = "overloaded"


class Unavailable(InferlineError):
    """Redis or every worker of a model is unreachable."""

    error_type = "unavailable"


class Unauthorized(InferlineError):
    """No API key, or one that is malformed, unknown, revoked or expired: 401 with WWW-Authenticate."""

    error_type = "auth"

    def __init__(self, message: str, field: str | None = None, reason: str = "invalid_token") -> None:
        super().__init__(message, field)
        # RFC 6750: a request with no credentials gets the challenge without an error code.
        challenge = 'Bearer realm="inferline"' + (f', error="{reason}"' if reason else "")
        self.headers["www-authenticate"] = challenge


class Forbidden(InferlineError):
    """A valid key without the scope or model the route needs."""

    error_type = "forbidden"


class RateLimited(InferlineError):
    """A key over its rate or concurrency limit: 429 with Retry-After and x-ratelimit-* headers."""

    error_type = "rate_limited"


class HeadersTooLarge(InferlineError):
    error_type = "headers_too_large"


class DeadlineExceeded(InferlineError):
    error_type = "timeout"


class RequestTimeout(InferlineError):
    """The client did not finish sending its request body in time (gateway.body_timeout_s): 408, then closed."""

    error_type = "request_timeout"


class Cancelled(InferlineError):
    """The caller went away before its answer: a worker drops the request and says so (nobody reads it; the access
    metrics record nginx's 499)."""

    error_type = "cancelled"


class DeadLettered(InferlineError):
    """A request that failed on every delivery and was moved to the dead-letter stream: 500, not to be retried."""

    error_type = "dead_letter"


class GenerationFailed(InferlineError):
    """A language model's generation failed for one request (the engine or the model raised): 500."""

    error_type = "generation"


def typed(error_type: str, message: str, field: str | None = None) -> InferlineError:
    """An error of any type, e.g. rebuilt from a worker's reply (workers send the type as a string: they name one of
    the classes above by its error_type, and the gateway's table has a row for each)."""
    err = InferlineError(message, field)
    err.error_type = error_type
    return err


def describe_validation(errors: list[Any], prefix: str = "") -> tuple[str, str]:
    """(message, field) for the first of pydantic's errors: names the field, the bound and the value given
    (TGI's validation.rs wording). Used by the gateway's request models and by workers' row types."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or "body")
    if first.get("type") == "missing":
        return f"`{field}` is required", field
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"`{field}`: {first.get('msg')}. Given: {shown}{more}", field
