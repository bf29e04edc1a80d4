"""A model's dead letters: how a worker writes them (`DEAD_LETTER`, run by claims.py) and what the management API
reads and does with them (list, the payload for a replay, purge).

A dead letter is metadata (request id, original entry id, tries, reason, op) on keys.dead_letter_stream; that is all
a listing ever returns. For a replay, the request's payload is kept beside it on keys.dead_payloads, under the dead
letter's own entry id, when it is at most keys.DEAD_PAYLOAD_BYTES; that stream keeps the newest
keys.DEAD_PAYLOAD_MAXLEN payloads (so at most ~64 MiB per model outlive their requests, SECURITY.md). Both are written
by one script, so a dead letter marked `kept` has its payload under the same id until trimmed or purged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inferline.server.broker import keys
from inferline.server.broker.client import Redis

# KEYS: dead-letter stream, kept payloads, the model's stats. ARGV: the dead-letter stream's and the payloads' MAXLEN,
# the stats field, the reason, then five values per request: request id, entry id, tries, op, payload ("": not kept).
DEAD_LETTER = """
local n = 0
for i = 5, #ARGV, 5 do
  local kept = 0
  if ARGV[i + 4] ~= '' then kept = 1 end
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'id', ARGV[i], 'entry', ARGV[i + 1],
                        'tries', ARGV[i + 2], 'reason', ARGV[4], 'op', ARGV[i + 3], 'kept', kept)
  if kept == 1 then redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id, 'p', ARGV[i + 4]) end
  n = n + 1
end
redis.call('HINCRBY', KEYS[3], ARGV[3], n)
return n
"""


def dead_letter_args(model: str, reason: str, rows: Sequence[tuple[str, bytes, int, str, bytes]]) -> list[Any]:
    """DEAD_LETTER's KEYS and ARGV (numkeys first) for rows of (request id, entry id, tries, op, payload); a payload
    over keys.DEAD_PAYLOAD_BYTES is not kept."""
    argv: list[Any] = [keys.DEAD_LETTER_MAXLEN, keys.DEAD_PAYLOAD_MAXLEN, keys.STAT_DEAD_LETTERED, reason]
    for request_id, entry_id, tries, op, payload in rows:
        argv += [request_id, entry_id, tries, op, payload if len(payload) <= keys.DEAD_PAYLOAD_BYTES else b""]
    return [3, keys.dead_letter_stream(model), keys.dead_payloads(model), keys.stats(model), *argv]


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    id: str
    request_id: str
    op: str
    tries: int
    reason: str
    kept: bool

    @property
    def at_ms(self) -> int:
        return int(self.id.split("-", 1)[0])

    def public(self, oldest_kept: str | None = None) -> dict[str, Any]:
        """The listing's row (schemas/admin.DeadLetter): metadata only. oldest_kept: the oldest id with a payload
        still kept (older ones were trimmed)."""
        replayable = self.kept and oldest_kept is not None and _id_key(self.id) >= _id_key(oldest_kept)
        return {"id": self.id, "request_id": self.request_id, "op": self.op, "tries": self.tries,
                "reason": self.reason, "at_ms": self.at_ms, "replayable": replayable}


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entry(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetterEntry:
    get = fields.get
    return DeadLetterEntry(id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
                           request_id=get(b"id", b"").decode(), op=get(b"op", b"").decode(),
                           tries=int(get(b"tries", b"0") or 0), reason=get(b"reason", b"").decode(),
                           kept=get(b"kept", b"0") == b"1")


async def listing(redis: Redis, model: str, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """(how many dead letters the model has, the oldest `limit` of them as listing rows). Two round trips; reads no
    payload but the oldest kept one's (at most keys.DEAD_PAYLOAD_BYTES), to know where the kept ones start."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.dead_letter_stream(model))
        pipe.xrange(keys.dead_letter_stream(model), count=limit)
        pipe.xrange(keys.dead_payloads(model), count=1)
        total, rows, first = await pipe.execute()
    oldest = first[0][0].decode() if first else None
    return int(total), [_entry(eid, f).public(oldest) for eid, f in rows]


async def entries(redis: Redis, model: str, ids: Sequence[str], limit: int) -> list[DeadLetterEntry]:
    """The dead letters with these ids (unknown ones left out), or the oldest `limit` when ids is empty."""
    stream = keys.dead_letter_stream(model)
    if not ids:
        rows: Any = await redis.xrange(stream, count=limit)
        return [_entry(eid, f) for eid, f in rows]
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        found: list[Any] = await pipe.execute(raise_on_error=False)
    return [_entry(*rows[0]) for rows in found if isinstance(rows, list) and rows]


async def payload(redis: Redis, model: str, dead_letter_id: str) -> bytes | None:
    """The kept payload of one dead letter, or None (never kept, trimmed, or purged)."""
    rows: Any = await redis.xrange(keys.dead_payloads(model), dead_letter_id, dead_letter_id, count=1)
    return rows[0][1].get(b"p") if rows else None


async def purge(redis: Redis, model: str, ids: Sequence[str] = ()) -> int:
    """Delete these dead letters and their kept payloads (all of them when ids is empty). Returns how many dead
    letters were deleted."""
    if not ids:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.dead_letter_stream(model))
            pipe.delete(keys.dead_letter_stream(model), keys.dead_payloads(model))
            count, _ = await pipe.execute()
        return int(count)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xdel(keys.dead_letter_stream(model), *ids)
        pipe.xdel(keys.dead_payloads(model), *ids)
        deleted, _ = await pipe.execute()
    return int(deleted)

