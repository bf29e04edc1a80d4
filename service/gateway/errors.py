"""One error shape per protocol family (../shared/API.md): TGI-style and task routes, OpenAI routes
(/v1/...) and Open Inference Protocol routes (/v2/...). Never FastAPI's default {"detail": ...}."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError

from service.errors import BadRequest, InferlineError, NotFound, ValidationFailed

OPENAI_TYPES = {"validation": "invalid_request_error", "not_found": "not_found_error", "auth": "authentication_error",
                "overloaded": "server_overloaded", "unavailable": "server_error", "timeout": "timeout",
                "generation": "server_error", "dead_letter": "server_error", "internal": "server_error"}


def family(path: str) -> str:
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith("/v2/") or path == "/v2":
        return "kserve"
    return "tgi"


def render(err: InferlineError, path: str, request_id: str,
           retry_after_s: int = 1) -> tuple[int, bytes, dict[str, str]]:
    """(status, JSON body, extra headers) for an error on `path`."""
    kind = family(path)
    body: dict[str, Any]
    if kind == "openai":
        body = {"error": {"message": err.message, "type": OPENAI_TYPES.get(err.error_type, err.error_type),
                          "param": err.field, "code": err.error_type}}
    elif kind == "kserve":
        body = {"error": err.message}
    else:
        body = {"error": err.message, "error_type": err.error_type, "request_id": request_id}
        if err.field is not None:
            body["field"] = err.field
    headers = dict(err.headers)
    if err.status in (429, 503):
        headers.setdefault("retry-after", str(retry_after_s))
    return err.status, orjson.dumps(body), headers


def from_validation(exc: RequestValidationError) -> InferlineError:
    """The first problem pydantic found, as one message naming the field, the bound and the value."""
    errors = exc.errors()
    if not errors:
        return ValidationFailed("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) if loc else "body"
    kind = first.get("type", "")
    if kind == "json_invalid":
        return BadRequest(f"body is not valid JSON: {first.get('msg')}", field="body")
    if kind == "missing":
        return ValidationFailed(f"`{field}` is required", field=field)
    given = first.get("input")
    shown = repr(given)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ValidationFailed(f"`{field}`: {first.get('msg')}. Given: {shown}{more}", field=field)


def http_error(status: int, detail: str, path: str, method: str = "") -> InferlineError:
    if status == 404:
        return NotFound(f"no route {path}", field=None)
    if status == 405:
        err = InferlineError(f"method {method} is not allowed on {path}")
        err.status, err.error_type = 405, "validation"
        return err
    err = InferlineError(detail)
    err.status = status
    err.error_type = "validation" if 400 <= status < 500 else "internal"
    return err
