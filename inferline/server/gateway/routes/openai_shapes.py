"""What the OpenAI routes (/v1/completions in routes/openai.py, /v1/chat/completions in routes/chat.py) share:
finish reasons, usage, log-probability values, and the parameter names of a worker's errors."""

from __future__ import annotations

import math

from inferline.server.errors import InferlineError
from inferline.server.gateway.errors import body_of
from inferline.server.gateway.routes.common import build
from inferline.server.gateway.routes.sse import sse
from inferline.server.protocol import TokenEvent
from inferline.server.schemas import responses as wire

OPENAI_FAMILY = "/v1"   # errors.family reads the protocol family from a path's prefix
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
# JSON has no -inf: OpenAI and vLLM report a token the model rules out with this logprob instead.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float | None) -> float | None:
    """A logprob OpenAI's schema takes: a number (never NaN or -inf, which JSON cannot carry), or None as given."""
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The fields of a wire.Usage (built with the answer that holds it)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def renamed(exc: InferlineError, names: dict[str, str]) -> InferlineError:
    """A worker's error names the engine's field (`inputs`, `max_new_tokens`); OpenAI clients know theirs."""
    if exc.field is not None:
        exc.field = names.get(exc.field, exc.field)
    return exc


def token_name(event: TokenEvent) -> str:
    """What log-probability listings call the token: its own text (the streamed `text` may be held back)."""
    return event.token_text if event.token_text is not None else event.text


def error_chunk(exc: InferlineError, names: dict[str, str]) -> bytes:
    """An error in the middle of an OpenAI stream: an event with OpenAI's error body, naming OpenAI's fields."""
    return sse(build(wire.OpenAIError, body_of(renamed(exc, names), OPENAI_FAMILY, "")))
