"""Every record that crosses Redis, and its codec, defined once. No fastapi, redis or model frameworks here; only
server/broker/ sends and reads these records.

A request is one entry on the model's request stream: the Envelope's fields (ids, reply address, deadline, op) and
the payload (small JSON params + an opaque blob; server/broker/enqueue.py says how unanswered entries expire).
Replies travel packed: one entry on a gateway's reply stream carries every reply a worker has for that gateway from
one batch (or one decoding step). A reply names an error *type* on failure, never an HTTP status: the gateway's one
table maps types to statuses (server/gateway/errors.py). A streaming request gets several replies, the last final.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from inferline.server.errors import InferlineError, ValidationFailed

# Ops: how the worker decodes the payload and encodes the answer.
OP_PREDICT = "predict"    # JSON rows: params {"row": {...}} or {"rows": [...]}, or raw bytes (blob) for Model.decode
OP_V2 = "v2"              # Open Inference Protocol infer: the raw HTTP body (JSON, maybe + binary tensors)
OP_GENERATE = "generate"  # text generation: params {"inputs": str | [ids]} or {"messages": [...]}; a token stream
OP_TOKENIZE = "tokenize"  # a language model's tokenizer: params {"inputs": str}; one reply, a list of TokenSpan

# OP_GENERATE payload flag: max_new_tokens is a ceiling the worker lowers to what the context leaves after the prompt
FIT_CONTEXT = "fit_context"

_LEN = struct.Struct(">I")
_FRAME = struct.Struct(">II")   # header length, body length


def now_ms() -> int:
    return int(time.time() * 1000)


def dumps(obj: Any) -> bytes:
    """JSON for a record or body: dataclasses and numpy arrays included."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _entry(name: str, optional: bool = False) -> dict[str, Any]:
    """An Envelope attribute's field name on the stream entry (metadata for dataclasses.field)."""
    return {"entry": name, "optional": optional}


@dataclass(frozen=True, slots=True)
class Envelope:
    """The stream entry. Everything a worker needs to route, expire and answer a request.

    Each attribute names its field on the entry here and nowhere else: fields(), from_fields() and the broker's
    enqueue script (generated from ENVELOPE_FIELDS when it is imported) read these names. An optional field is left
    off the entry when it is ""."""

    request_id: str = field(metadata=_entry("id"))
    reply_to: str = field(metadata=_entry("reply"))         # the gateway's reply stream
    deadline_ms: int = field(metadata=_entry("deadline"))   # wall-clock epoch ms; past it nobody waits for the answer
    op: str = field(metadata=_entry("op"))
    # W3C trace context of the gateway's request span; "" (and no field) when tracing is off
    traceparent: str = field(default="", metadata=_entry("tp", optional=True))

    def fields(self) -> dict[str, str | int]:
        """The entry's fields (without the payload), as XADD takes them."""
        values = ((f.name, getattr(self, f.attribute), f.optional) for f in ENVELOPE_FIELDS)
        return {name: value for name, value, optional in values if value != "" or not optional}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Envelope:
        """An entry's envelope (extra fields, the payload's among them, ignored). Raises KeyError when a required
        field is missing. Attribute by attribute rather than a loop over ENVELOPE_FIELDS: a worker runs it per
        request, and the loop cost 0.7 µs more a call (2.3 against 3.0 µs here)."""
        return cls(request_id=fields[_ID].decode(), reply_to=fields[_REPLY].decode(),
                   deadline_ms=int(fields[_DEADLINE]), op=fields[_OP].decode(),
                   traceparent=fields.get(_TP, b"").decode())


class EntryField(NamedTuple):
    attribute: str   # the Envelope attribute
    name: str        # its field name on the request entry
    optional: bool   # left off the entry when ""


# The envelope's fields in entry order. The payload (encode_payload's value) is the entry's PAYLOAD_FIELD, first.
ENVELOPE_FIELDS: tuple[EntryField, ...] = tuple(EntryField(f.name, f.metadata["entry"], f.metadata["optional"])
                                                for f in dataclasses.fields(Envelope))
PAYLOAD_FIELD = "p"
_KEYS = {f.attribute: f.name.encode() for f in ENVELOPE_FIELDS}   # from_fields's keys, by attribute
_ID, _REPLY, _DEADLINE, _OP, _TP = (_KEYS[a] for a in ("request_id", "reply_to", "deadline_ms", "op", "traceparent"))


def encode_payload(params: dict[str, Any] | bytes, blob: bytes | bytearray = b"") -> bytes:
    """params (a dict, or JSON already encoded) and an opaque blob, length-prefixed into one value. Raises
    ValidationFailed naming the parameter when one holds an integer JSON cannot carry here (orjson writes 64-bit
    integers only): the wire schemas bound their integers well inside that, this is the backstop for any they miss."""
    try:
        head = params if isinstance(params, bytes) else orjson.dumps(params)
    except orjson.JSONEncodeError:
        path = _huge_int(params, "")
        if path is None:
            raise
        raise ValidationFailed(f"`{path}` is out of range: integers here must fit in 64 bits",
                               field=path) from None
    return _LEN.pack(len(head)) + head + blob


def _huge_int(value: Any, path: str) -> str | None:
    """The path of the first integer outside [-2**63, 2**64) in a JSON-like value, or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return path or "body" if not -2**63 <= value < 2**64 else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _huge_int(item, f"{path}.{key}" if path and isinstance(key, str) else
                          f"{path}[{key}]" if path else str(key))
        if found is not None:
            return found
    return None


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
    """One answer (or one streamed piece of an answer). `body` is JSON bytes: the response body itself on success,
    the neutral error body {"error", "error_type", "field"?} otherwise.

    The timings say where the time went (metrics and the access log); a reply that never ran (an error before the
    model, a streamed token that is not the last) leaves them 0."""

    request_id: str
    body: bytes
    error_type: str = ""   # "" on success, else an errors.InferlineError type
    final: bool = True
    queued_ms: float = 0.0   # from arrival on the stream (Redis's clock) until the worker started on it
    compute_ms: float = 0.0  # the worker's own time on it: the batch's model call, or a generation from admission
    batch_size: int = 0      # requests in the batch it ran in (dynamic batching); 0 when not run
    tokens: int = 0          # tokens generated (language models, on the final reply)
    version: str = ""        # the model version that answered (its worker names it on the reply entry): x-model-version

    @property
    def ok(self) -> bool:
        return not self.error_type

    def timed(self, queued_ms: float, compute_ms: float, batch_size: int = 0, tokens: int = 0) -> Reply:
        """This reply with where its time went (dataclasses.replace cost 1.5 µs a reply on the batch loop, this 0.7)."""
        return Reply(self.request_id, self.body, self.error_type, self.final, queued_ms, compute_ms, batch_size, tokens)

    @classmethod
    def error(cls, request_id: str, err: InferlineError) -> Reply:
        """The reply that carries `err` to the gateway, which raises it again there (errors.typed)."""
        body: dict[str, Any] = {"error": err.message, "error_type": err.error_type}
        if err.field is not None:
            body["field"] = err.field
        return cls(request_id, orjson.dumps(body), err.error_type)

    def error_fields(self) -> tuple[str, str | None]:
        """(message, field) of an error reply."""
        try:
            body = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return self.body.decode(errors="replace"), None
        field = body.get("field")
        return str(body.get("error", "error")), field if isinstance(field, str) else None


def pack_replies(replies: list[Reply]) -> bytes:
    """Many replies as one value: per reply, a JSON header [id, error_type, final, queued_ms, compute_ms,
    batch_size, tokens] and the body. A reply without timings sends the short header [id, error_type, final]."""
    parts = []
    for r in replies:
        if r.batch_size or r.tokens or r.compute_ms:
            head = orjson.dumps([r.request_id, r.error_type, r.final, round(r.queued_ms, 3), round(r.compute_ms, 3),
                                 r.batch_size, r.tokens])
        else:
            head = orjson.dumps([r.request_id, r.error_type, r.final])
        parts += [_FRAME.pack(len(head), len(r.body)), head, r.body]
    return b"".join(parts)


def unpack_replies(data: bytes, version: str = "") -> list[Reply]:
    """Inverse of pack_replies (either header); `version` is the answering worker's, named once on the entry."""
    out, pos = [], 0
    while pos < len(data):
        n_head, n_body = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        head = orjson.loads(data[pos:pos + n_head])
        pos += n_head
        # the header is 2 or 6 values after the id: never as far as `version`
        out.append(Reply(head[0], data[pos:pos + n_body], *head[1:], version=version))  # type: ignore[misc]
        pos += n_body
    return out


@dataclass
class TokenEvent:
    """One generated token of one request: the body of a generation worker's streamed reply."""

    request_id: str
    index: int                  # 0-based index of this generated token
    token_id: int               # -1 on an error event
    text: str                   # this event's text ("" while a multi-byte character is incomplete); see stopping.py
    logprob: float              # the chosen token's (see SamplingParams.raw_logprobs for which distribution)
    special: bool
    finish_reason: str | None   # "length" | "eos_token" | "stop_sequence" | "error", on the request's last event only
    generated_text: str | None  # full generated text (special tokens left out), last event only
    prompt_tokens: int
    seed: int | None            # the sampling seed (drawn when none was given); None for greedy
    prefill: list[dict[str, Any]] | None  # on the first event when want_prefill: [{"id", "text", "logprob"}]
    top_logprobs: list[dict[str, Any]] | None = None  # when asked: [{"id", "text", "logprob", "special"}], best first
    token_text: str | None = None  # this token alone, decoded (a partial character shows as U+FFFD): what
    #                                log-probability listings call it; `text` is what the stream shows
    error: str | None = None    # why the request failed (finish_reason "error"); names the request

    def encode(self) -> bytes:
        return dumps(self)

    @classmethod
    def decode(cls, body: bytes) -> TokenEvent:
        return cls(**orjson.loads(body))

    @staticmethod
    def encode_all(events: list[TokenEvent]) -> bytes:
        """A whole generation's events as one value (what the response cache keeps)."""
        return dumps(events)

    @classmethod
    def decode_all(cls, body: bytes) -> list[TokenEvent]:
        return [cls(**event) for event in orjson.loads(body)]


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One token of a tokenized text (the answer to OP_TOKENIZE, TGI's /tokenize shape): its id, its text and where
    that text is in the input, as [start, stop) character offsets."""

    id: int
    text: str
    start: int
    stop: int

    @staticmethod
    def encode_all(spans: list[TokenSpan]) -> bytes:
        return dumps(spans)

    @classmethod
    def decode_all(cls, body: bytes) -> list[TokenSpan]:
        return [cls(**span) for span in orjson.loads(body)]


@dataclass(frozen=True, slots=True)
class Cancel:
    """A caller went away: every replica of the model drops the request if it holds it."""

    request_id: str

    def fields(self) -> dict[str, str]:
        return {"id": self.request_id}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Cancel:
        return cls(fields.get(b"id", b"").decode())


@dataclass
class ModelInfo:
    """What a model's workers publish at start and gateways read: identity, v2 tensors, the request and response
    schemas (for /docs) and kind-specific facts (a language model's context length)."""

    name: str
    version: str
    platform: str
    kind: str                                   # "batch" | "generation"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    max_batch_size: int = 1
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)   # small public facts: metrics, labels, window, ...
    context_length: int | None = None           # language models: tokens of prompt + output one request may use
    max_input_tokens: int | None = None         # language models: the longest prompt a request may have
    max_prefill_tokens: int | None = None       # language models: prompt tokens one engine step admits

    def encode(self) -> bytes:
        return dumps(self)

    @classmethod
    def decode(cls, raw: bytes) -> ModelInfo:
        data = orjson.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class WorkerStatus:
    """A worker's heartbeat record: identity and counters. Kept as a Redis hash that expires with the heartbeat."""

    pid: int
    host: str
    device: str
    version: str
    started: int
    batches: int = 0
    items: int = 0
    max_batch: int = 0
    active: int = 0            # sequences in flight (generation workers)
    beat: int = 0              # epoch ms of the last beat
    rss_bytes: int = 0         # the process's resident memory, at the last beat
    cpu_ms: int = 0            # the process's CPU time (user + system) so far
    device_memory_bytes: int = 0   # memory the framework holds on its CUDA device (0 on CPU)

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.max_batch = max(self.max_batch, size)

    def fields(self) -> dict[str, str | int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> WorkerStatus:
        data = {k.decode(): v.decode() for k, v in fields.items()}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: int(v) if types[k] == "int" else v for k, v in data.items() if k in types}
        return cls(**values)
