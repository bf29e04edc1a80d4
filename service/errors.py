"""The error tree. Each class carries its HTTP status and `error_type`; the gateway renders it in the
body shape of the route's protocol family. Leaf module: imports nothing from inferline."""

from __future__ import annotations


class InferlineError(Exception):
    status = 500
    error_type = "internal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers: dict[str, str] = {}   # extra response headers, e.g. x-should-retry


class ValidationFailed(InferlineError):
    status = 422
    error_type = "validation"


class BadRequest(InferlineError):
    status = 400
    error_type = "validation"


class InputError(ValidationFailed):
    """Bad input for one item, found in a worker's preprocess. Only that request gets the 4xx."""


class MalformedInput(InputError):
    """Input a worker cannot parse at all (not JSON): 400, as the gateway answers for an unparsable body."""

    status = 400


class NotFound(InferlineError):
    status = 404
    error_type = "not_found"


class PayloadTooLarge(InferlineError):
    status = 413
    error_type = "validation"


class Overloaded(InferlineError):
    """A model's queue is at its cap: 503 with Retry-After."""

    status = 503
    error_type = "overloaded"


class Unavailable(InferlineError):
    """Redis or every worker of a model is unreachable."""

    status = 503
    error_type = "unavailable"


class Unauthorized(InferlineError):
    """No API key, or one that is malformed, unknown, revoked or expired: 401 with WWW-Authenticate."""

    status = 401
    error_type = "auth"

    def __init__(self, message: str, field: str | None = None, reason: str = "invalid_token") -> None:
        super().__init__(message, field)
        # RFC 6750: a request with no credentials gets the challenge without an error code.
        challenge = 'Bearer realm="inferline"' + (f', error="{reason}"' if reason else "")
        self.headers["www-authenticate"] = challenge


class Forbidden(InferlineError):
    """A valid key without the scope or model the route needs."""

    status = 403
    error_type = "forbidden"


class RateLimited(InferlineError):
    """A key over its rate or concurrency limit: 429 with Retry-After and x-ratelimit-* headers."""

    status = 429
    error_type = "rate_limited"


class HeadersTooLarge(InferlineError):
    status = 431
    error_type = "validation"


class DeadlineExceeded(InferlineError):
    status = 504
    error_type = "timeout"


def from_body(status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> InferlineError:
    """Rebuild an error from a worker's reply, keeping its status, error_type and headers."""
    field = body.get("field")
    err = InferlineError(str(body.get("error", "error")), field if isinstance(field, str) else None)
    err.status = status
    err.error_type = str(body.get("error_type", "internal"))
    err.headers = dict(headers or {})
    return err
