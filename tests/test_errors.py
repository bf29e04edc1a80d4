"""errors.render, the gateway's one table from error type to status, headers and body: every error class has a row,
each row gives the status API.md names, and each protocol family gets its own body shape. Pure: no Redis, no app."""

from __future__ import annotations

import orjson
import pytest
from fastapi.exceptions import RequestValidationError

from inferline.server import errors
from inferline.server.gateway.errors import (
    CLIENT_GONE,
    ERRORS,
    TABLE,
    from_validation,
    http_error,
    render,
    stream_event,
)
from inferline.server.schemas.responses import OpenAIError, TaskError, V2Error

# API.md's statuses, by error type. Written out here, not read from the table, so a changed status fails a test.
STATUSES = {"validation": 422, "bad_request": 400, "not_found": 404, "conflict": 409, "method_not_allowed": 405,
            "too_large": 413, "headers_too_large": 431, "auth": 401, "forbidden": 403, "rate_limited": 429,
            "cancelled": 499,
            "overloaded": 503, "unavailable": 503, "timeout": 504, "request_timeout": 408, "dead_letter": 500,
            "generation": 500, "internal": 500}
FAMILIES = {"tgi": ["/generate", "/generate_stream", "/", "/forecast", "/classify-image"],
            "openai": ["/v1/completions", "/v1/chat/completions", "/v1/models/m/predict"],
            "kserve": ["/v2/models/m/infer", "/v2"]}
RETRY_AFTER_S = 7


def error_classes() -> list[type[errors.InferlineError]]:
    """InferlineError and every subclass of it, however deep."""
    found: list[type[errors.InferlineError]] = [errors.InferlineError]
    for cls in found:
        found += cls.__subclasses__()
    return found


def instance(error_type: str, field: str | None = "horizon") -> errors.InferlineError:
    """An error of that type, as a worker's reply rebuilds it."""
    return errors.typed(error_type, f"something {error_type}", field)


def test_every_error_class_has_a_row_and_every_row_a_class() -> None:
    """The table is keyed by class, so a row cannot exist without a class; a class added without a row fails here
    (as would a row that a second class with the same type silently replaced)."""
    types = {cls.error_type for cls in error_classes()}
    assert types <= set(ERRORS), sorted(types - set(ERRORS))
    assert len(ERRORS) == len(TABLE)
    assert set(ERRORS) == set(STATUSES)


@pytest.mark.parametrize("error_type", sorted(ERRORS))
def test_each_type_renders_its_status_on_every_family(error_type: str) -> None:
    for paths in FAMILIES.values():
        for path in paths:
            status, _, _ = render(instance(error_type), path, "rid1")
            assert status == STATUSES[error_type], (error_type, path)


@pytest.mark.parametrize("error_type", sorted(ERRORS))
def test_retry_after_exactly_on_429_and_503_and_no_retry_on_dead_letters(error_type: str) -> None:
    _, _, headers = render(instance(error_type), "/generate", "rid1", retry_after_s=RETRY_AFTER_S)
    if STATUSES[error_type] in (429, 503):
        assert headers["retry-after"] == str(RETRY_AFTER_S)
    else:
        assert "retry-after" not in headers
    assert (headers.get("x-should-retry") == "false") == (error_type == "dead_letter")


def test_an_errors_own_headers_are_sent_beside_the_tables() -> None:
    unauthorized = errors.Unauthorized("missing API key")
    status, _, headers = render(unauthorized, "/v1/completions", "rid1")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="inferline", error="invalid_token"'
    limited = errors.RateLimited("rate limit: 10 requests/s")
    limited.headers["x-ratelimit-limit"] = "10"
    status, _, headers = render(limited, "/forecast", "rid1", retry_after_s=3)
    assert status == 429 and headers == {"retry-after": "3", "x-ratelimit-limit": "10"}


@pytest.mark.parametrize("error_type", sorted(ERRORS))
def test_tgi_and_task_routes_answer_error_error_type_request_id_and_field(error_type: str) -> None:
    for path in FAMILIES["tgi"]:
        body = orjson.loads(render(instance(error_type), path, "rid1")[1])
        assert body == {"error": f"something {error_type}", "error_type": ERRORS[error_type].public,
                        "request_id": "rid1", "field": "horizon"}
        TaskError.model_validate(body)
    without_field = orjson.loads(render(instance(error_type, None), "/generate", "rid1")[1])
    assert set(without_field) == {"error", "error_type", "request_id"}


@pytest.mark.parametrize("error_type", sorted(ERRORS))
def test_openai_routes_answer_an_error_object(error_type: str) -> None:
    for path in FAMILIES["openai"]:
        body = orjson.loads(render(instance(error_type), path, "rid1")[1])
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"] == f"something {error_type}" and body["error"]["param"] == "horizon"
        assert body["error"]["code"] == ERRORS[error_type].public
        OpenAIError.model_validate(body)


def test_openai_error_types_are_openais_own_words() -> None:
    def openai_type(err: errors.InferlineError) -> str:
        return str(orjson.loads(render(err, "/v1/completions", "r")[1])["error"]["type"])

    assert openai_type(errors.ValidationFailed("bad")) == "invalid_request_error"
    assert openai_type(errors.BadRequest("not JSON")) == "invalid_request_error"
    assert openai_type(errors.Unauthorized("no key")) == "authentication_error"
    assert openai_type(errors.RateLimited("slow down")) == "rate_limit_error"
    assert openai_type(errors.DeadLettered("gone")) == "server_error"


@pytest.mark.parametrize("error_type", sorted(ERRORS))
def test_open_inference_routes_answer_the_message_alone(error_type: str) -> None:
    for path in FAMILIES["kserve"]:
        body = orjson.loads(render(instance(error_type), path, "rid1")[1])
        assert body == {"error": f"something {error_type}"}
        V2Error.model_validate(body)


def test_a_type_no_class_has_is_a_500_internal() -> None:
    status, body, _ = render(instance("no_such_type"), "/generate", "rid1")
    assert status == 500 and orjson.loads(body)["error_type"] == "internal"


def test_the_classes_render_as_their_rebuilt_types_do() -> None:
    """A worker names a type; the gateway's own code raises the class: both get the same row."""
    for cls in error_classes():
        if cls is errors.Unauthorized:   # adds its own challenge header
            continue
        assert render(cls("m", "f"), "/forecast", "r") == render(errors.typed(cls.error_type, "m", "f"), "/forecast",
                                                                 "r"), cls


def test_client_gone_is_the_tables_cancelled_status() -> None:
    assert CLIENT_GONE == TABLE[errors.Cancelled].status == 499


def test_a_stream_error_event_carries_the_public_type() -> None:
    assert stream_event(errors.MalformedInput("not JSON")) == {"error": "not JSON", "error_type": "validation"}
    assert stream_event(errors.GenerationFailed("model raised")) == {"error": "model raised",
                                                                     "error_type": "generation"}


def test_starlettes_http_errors_and_pydantics_validation_become_table_errors() -> None:
    assert isinstance(http_error(404, "Not Found", "/nope"), errors.NotFound)
    assert isinstance(http_error(405, "Method Not Allowed", "/generate", "GET"), errors.MethodNotAllowed)
    assert http_error(413, "too big", "/forecast").error_type == "too_large"
    assert http_error(418, "teapot", "/forecast").error_type == "bad_request"
    invalid = from_validation(RequestValidationError([{"type": "greater_than_equal", "loc": ("body", "horizon"),
                                                       "msg": "Input should be greater than or equal to 1",
                                                       "input": 0}]))
    assert isinstance(invalid, errors.ValidationFailed) and invalid.field == "horizon"
    assert render(invalid, "/forecast", "r")[0] == 422
    not_json = from_validation(RequestValidationError([{"type": "json_invalid", "loc": ("body", 0),
                                                        "msg": "JSON decode error"}]))
    assert isinstance(not_json, errors.BadRequest) and render(not_json, "/forecast", "r")[0] == 400
