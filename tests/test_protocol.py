"""The codecs of what crosses Redis."""

from __future__ import annotations

import pytest

from service.protocol import Envelope, Reply, decode_payload, encode_payload, pack_replies, unpack_replies


def test_replies_pack_and_unpack_in_order_with_headers_and_empty_bodies() -> None:
    replies = [Reply("a", 200, b'{"x": 1}'), Reply("b", 500, b'{"error": "e"}', True, b'{"x-should-retry": "false"}'),
               Reply("c", 200, b"", False), Reply("d\u00e9", 422, b"\x00\xff binary", True)]
    assert unpack_replies(pack_replies(replies)) == replies
    assert unpack_replies(b"") == []


def test_payload_round_trip_and_truncation() -> None:
    raw = encode_payload({"top_k": 3}, b"\x89PNG...")
    assert decode_payload(raw) == ({"top_k": 3}, b"\x89PNG...")
    assert decode_payload(encode_payload(b'{"a": [1, 2]}')) == ({"a": [1, 2]}, b"")
    with pytest.raises(ValueError):
        decode_payload(raw[:6])
    with pytest.raises(ValueError):
        decode_payload(b"\x00")


def test_envelope_fields_round_trip() -> None:
    env = Envelope("id1", "inferline:reply:gw", 1234, "task")
    fields = {k.encode(): str(v).encode() for k, v in env.fields().items()}
    assert Envelope.from_fields(fields) == env
