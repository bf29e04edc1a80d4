"""Raw reads of a stream, shared by the three readers (consumer.py's group reads, cancels.py, replies.py): one XREAD
on a held connection, and the parse of an XREAD / XREADGROUP reply in either of Redis's protocols."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from inferline.server.broker import roundtrip


async def xread(conn: roundtrip.HeldConnection, stream: str, after: Any, count: int,
                block_s: float) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of `stream` after id `after`, waiting up to block_s for the first (one round trip)."""
    [res] = await conn.run([("XREAD", "COUNT", count, "BLOCK", max(1, int(block_s * 1000)), "STREAMS", stream, after)])
    if isinstance(res, ResponseError):
        raise res
    return stream_entries(res)


def streams_entries(raw: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """(stream name, its entries as stream_entries gives them) of each stream of a raw XREADGROUP reply over several
    streams (None when the block ran out)."""
    if not raw:
        return []
    pairs = raw.items() if isinstance(raw, dict) else [(name, entries) for name, entries in raw]
    out = []
    for name, entries in pairs:
        found = [(eid, dict(zip(it, it, strict=True))) for eid, flat in entries if flat for it in [iter(flat)]]
        out.append((name if isinstance(name, bytes) else str(name).encode(), found))
    return out


def stream_entries(raw: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """(entry id, fields) of one stream from a raw XREAD / XREADGROUP reply (None when the block ran out). Entries
    whose fields are gone (deleted while pending) are left out."""
    if not raw:
        return []
    # RESP3 (redis-py's default protocol from 8.0) answers a map of stream -> entries, RESP2 a list of pairs
    entries = next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
    out = []
    for entry_id, flat in entries:
        if flat:
            it = iter(flat)
            out.append((entry_id, dict(zip(it, it, strict=True))))
    return out

