"""What crosses Redis, and its codec. No fastapi, redis or model frameworks here.

A request is one entry on the model's request stream: the Envelope's fields (ids, reply address,
deadline, op) and the payload (service/broker/streams.py says how unanswered entries expire).
Replies travel packed: one entry on a gateway's reply stream carries every reply a worker has for
that gateway from one batch (or one decoding step), so a batch of 32 costs one XADD and one entry
to parse, not 32. A streaming request gets several replies, the last one marked final.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import orjson

# Ops: how the worker decodes the payload and encodes the answer.
OP_TASK = "task"          # a task route: params JSON + blob (image bytes)
OP_V2 = "v2"              # Open Inference Protocol infer: the raw HTTP body (JSON, maybe + binary tensors)
OP_GENERATE = "generate"  # text generation: params JSON; the answer is a stream of token replies

_LEN = struct.Struct(">I")
_FRAME = struct.Struct(">II")   # header length, body length


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The stream entry. Everything a worker needs to route, expire and answer a request."""

    request_id: str
    reply_to: str          # the gateway's reply stream
    deadline_ms: int       # wall-clock epoch ms; past it nobody waits for the answer
    op: str

    def fields(self) -> dict[str, str | int]:
        return {"id": self.request_id, "reply": self.reply_to, "deadline": self.deadline_ms, "op": self.op}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Envelope:
        return cls(request_id=fields[b"id"].decode(), reply_to=fields[b"reply"].decode(),
                   deadline_ms=int(fields[b"deadline"]), op=fields[b"op"].decode())


def pack_replies(replies: list[Reply]) -> bytes:
    """Many replies as one value: per reply, a JSON header [id, status, final, headers] and the body."""
    parts = []
    for r in replies:
        head = orjson.dumps([r.request_id, r.status, r.final, r.headers.decode() if r.headers else ""])
        parts += [_FRAME.pack(len(head), len(r.body)), head, r.body]
    return b"".join(parts)


def unpack_replies(data: bytes) -> list[Reply]:
    """Inverse of pack_replies."""
    out, pos = [], 0
    while pos < len(data):
        n_head, n_body = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        request_id, status, final, headers = orjson.loads(data[pos:pos + n_head])
        pos += n_head
        out.append(Reply(request_id, status, data[pos:pos + n_body], final, headers.encode()))
        pos += n_body
    return out


def encode_payload(params: dict[str, Any] | bytes, blob: bytes = b"") -> bytes:
    """params (a dict, or JSON already encoded) and an opaque blob, length-prefixed into one value."""
    head = params if isinstance(params, bytes) else orjson.dumps(params)
    return _LEN.pack(len(head)) + head + blob


def decode_payload(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of encode_payload. Raises ValueError on a truncated value."""
    if len(raw) < _LEN.size:
        raise ValueError("payload too short")
    (n,) = _LEN.unpack_from(raw)
    head = raw[_LEN.size:_LEN.size + n]
    if len(head) != n:
        raise ValueError("payload truncated")
    params = orjson.loads(head) if n else {}
    return params, raw[_LEN.size + n:]


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer (or one streamed piece of an answer). `body` is JSON bytes: the response body itself
    on success, the neutral error body {"error", "error_type", "field"?} otherwise."""

    request_id: str
    status: int
    body: bytes
    final: bool = True
    headers: bytes = b""   # JSON object of extra response headers, e.g. {"x-should-retry": "false"}


    @classmethod
    def error(cls, request_id: str, status: int, error_type: str, message: str, field: str | None = None,
              headers: dict[str, str] | None = None) -> Reply:
        body: dict[str, Any] = {"error": message, "error_type": error_type}
        if field is not None:
            body["field"] = field
        return cls(request_id, status, orjson.dumps(body), True, orjson.dumps(headers) if headers else b"")
