"""Server-Sent Events as the generation routes send them: the response headers every stream carries, and OpenAI's
event framing (`data: <json>`, the stream ending in `data: [DONE]`). TGI's events are framed in routes/generate.py:
`data:` without the space, and no [DONE] line."""

from __future__ import annotations

from pydantic import BaseModel

from inferline.server.gateway.routes.common import encode

# no-cache: a proxy must not hold events back; x-accel-buffering: nginx passes each event on as it comes
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse(event: BaseModel) -> bytes:
    """One OpenAI event: a chunk (wire.Completion, wire.ChatChunk) or an error (wire.OpenAIError)."""
    return b"data: " + encode(event) + b"\n\n"
