"""The codecs of what crosses Redis."""

from __future__ import annotations

import dataclasses

import pytest

from inferline.server.errors import DeadLettered
from inferline.server.protocol import (
    ENVELOPE_FIELDS,
    PAYLOAD_FIELD,
    Cancel,
    Envelope,
    ModelInfo,
    Reply,
    TokenEvent,
    WorkerStatus,
    decode_payload,
    encode_payload,
    pack_replies,
    unpack_replies,
)


def test_replies_pack_and_unpack_in_order_with_error_types_and_empty_bodies() -> None:
    replies = [Reply("a", b'{"x": 1}'), Reply.error("b", DeadLettered("gone", field="x")),
               Reply("c", b"", final=False), Reply("d\u00e9", b"\x00\xff binary", "validation")]
    assert unpack_replies(pack_replies(replies)) == replies
    assert unpack_replies(b"") == []
    assert replies[1].error_fields() == ("gone", "x") and not replies[1].ok and replies[0].ok


def test_every_record_round_trips_through_its_codec() -> None:
    event = TokenEvent("r1", 3, 42, " the", -0.25, False, "length", "a the", 7, 11, [{"id": 1, "text": "a",
                                                                                      "logprob": None}])
    assert TokenEvent.decode(event.encode()) == event
    info = ModelInfo("m", "2", "python", "batch", [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}], [], 8,
                     {"type": "object"}, None, {"metrics": {"accuracy": 0.9}})
    assert ModelInfo.decode(info.encode()) == info
    status = WorkerStatus(12, "host", "cpu", "2", 1000, batches=3, items=9, max_batch=4, active=1, beat=77)
    fields = {k.encode(): str(v).encode() for k, v in status.fields().items()}
    assert WorkerStatus.from_fields(fields) == status
    cancel = Cancel("r9")
    assert Cancel.from_fields({k.encode(): v.encode() for k, v in cancel.fields().items()}) == cancel


def test_payload_round_trip_and_truncation() -> None:
    raw = encode_payload({"top_k": 3}, b"\x89PNG...")
    assert decode_payload(raw) == ({"top_k": 3}, b"\x89PNG...")
    assert decode_payload(encode_payload(b'{"a": [1, 2]}')) == ({"a": [1, 2]}, b"")
    with pytest.raises(ValueError):
        decode_payload(raw[:6])
    with pytest.raises(ValueError):
        decode_payload(b"\x00")


@pytest.mark.parametrize("traceparent", ["", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_envelope_fields_round_trip(traceparent: str) -> None:
    env = Envelope("id1", "inferline:reply:gw", 1234, "task", traceparent)
    fields = {k.encode(): str(v).encode() for k, v in env.fields().items()}
    assert Envelope.from_fields(fields) == env
    assert ("tp" in env.fields()) == bool(traceparent)   # an optional field is left off the entry when empty


def test_every_envelope_attribute_has_one_entry_field() -> None:
    """ENVELOPE_FIELDS (what the enqueue script is generated from) covers every attribute, names each field once,
    and never takes the payload's field."""
    assert [f.attribute for f in ENVELOPE_FIELDS] == [f.name for f in dataclasses.fields(Envelope)]
    names = [f.name for f in ENVELOPE_FIELDS] + [PAYLOAD_FIELD]
    assert len(set(names)) == len(names)
