"""Redis Streams operations for both sides. redis.asyncio only; all key names come from keys.py.

Gateway side: `Enqueuer` puts requests on a model's stream, one pipelined round trip for all the
requests of one event-loop tick, the queue cap checked atomically in the same script.
Worker side: `ModelQueue` reads with the consumer group, acknowledges and deletes, replies, reclaims
work left pending by a dead worker, and dead-letters what keeps failing.

A request is one stream entry, its payload inline: the worker gets everything in the read that finds it
(a payload under its own key cost one more round trip per batch, ~0.17 ms of every lone request here).
Streams have no per-entry TTL, but entry ids are arrival times (Redis's clock): every enqueue trims, with XADD's MINID,
the entries that arrived longer ago than the model's timeout plus a grace, so a request nobody answered
expires. An answered one is deleted at once.

Ordering rules that keep work from being lost: an entry is XDEL'd only after it is XACK'd (XCLAIM and
XAUTOCLAIM skip pending ids whose entries are gone), and only after its reply was sent (a crash in
between redelivers instead of dropping).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from inferline.server.broker import keys, roundtrip
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.pipelined import Pipelined
from inferline.server.broker.registry import entry_ms
from inferline.server.broker.ticks import TickBatcher
from inferline.server.errors import DeadLettered
from inferline.server.protocol import (
    ENVELOPE_FIELDS,
    PAYLOAD_FIELD,
    Cancel,
    Envelope,
    Reply,
    pack_replies,
    unpack_replies,
)

log = logging.getLogger(__name__)

REPLY_MAXLEN = 100_000

# KEYS: request stream, the gateway's reply stream. ARGV: cap, how long (ms) to keep entries, payload, the cap in bytes
# (0: none), the reply stream's TTL (s), then the envelope's values in protocol.ENVELOPE_FIELDS order. Returns the
# queue length before the add, or -1 when the queue is at a cap (nothing written). A reply stream Redis lost (a
# restart, FLUSHALL) is made again here, before the request it must carry the answer of is queued: workers reply with
# NOMKSTREAM, so without it the answer would be dropped and the caller would wait out its deadline.
# The trim threshold comes from Redis's own clock, the one its entry ids come from: a gateway whose clock is
# ahead would otherwise trim fresh entries, its own new one included. The byte cap reads MEMORY USAGE (sampled,
# so approximate for mixed sizes); an empty queue always takes one request, so a body over the cap is not
# refused forever.
# The entry's field names come from protocol.py (the codec workers read entries with), not typed here: the XADD is
# generated once, at import, one branch per combination of optional fields present (Lua's unpack of a table built per
# call cost 0.4 µs more a call in Redis). A request costs what it did: ten ARGV, one EVALSHA.
_ENVELOPE_ARGV = 6   # ARGV index of the envelope's first value; Enqueuer.enqueue passes them in ENVELOPE_FIELDS order


def _xadd(fields: list[str], optional: list[tuple[int, str]]) -> str:
    """Lua: the request entry's XADD with `fields` (name, value pairs), and each optional field only when its ARGV
    (index, name) is not ''."""
    if not optional:
        return f"redis.call('XADD', KEYS[1], 'MINID', string.format('%.0f', oldest), '*', {', '.join(fields)})"
    (i, name), rest = optional[0], optional[1:]
    present = _xadd([*fields, f"'{name}', ARGV[{i}]"], rest)
    return f"if ARGV[{i}] ~= '' then\n{present}\nelse\n{_xadd(fields, rest)}\nend"


_ENQUEUE = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return -1 end
local cap_bytes = tonumber(ARGV[4])
if n > 0 and cap_bytes > 0 then
  local used = redis.call('MEMORY', 'USAGE', KEYS[1]) or 0
  if used + string.len(ARGV[3]) > cap_bytes then return -1 end
end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '*', 'pack', '')
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
""" + _xadd([f"'{PAYLOAD_FIELD}', ARGV[3]"] + [f"'{f.name}', ARGV[{_ENVELOPE_ARGV + i}]"
                                              for i, f in enumerate(ENVELOPE_FIELDS) if not f.optional],
            [(_ENVELOPE_ARGV + i, f.name) for i, f in enumerate(ENVELOPE_FIELDS) if f.optional]) + """
return n
"""

@dataclass(frozen=True, slots=True)
class Delivery:
    """One request as a worker received it."""

    entry_id: bytes
    envelope: Envelope
    payload: bytes
    tries: int = 1

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def arrived_ms(self) -> int:
        """When the entry reached the stream: its id's time part, Redis's clock (epoch ms)."""
        return int(self.entry_id.split(b"-", 1)[0])


class Enqueuer:
    """Puts requests on model streams. The enqueues of one event-loop tick share one Redis round trip (a
    TickBatcher, which a gateway also shares with its rate limiter)."""

    def __init__(self, redis: aioredis.Redis, batcher: TickBatcher | None = None) -> None:
        self.batcher = batcher if batcher is not None else TickBatcher(redis)

    async def enqueue(self, model: str, envelope: Envelope, payload: bytes, cap: int, keep_ms: int,
                      cap_bytes: int = 0) -> int:
        """Queue one request, and drop the model's entries that arrived more than keep_ms ago (nobody waits
        for them any more). Returns the queue depth it found, or -1 when the model's queue is full (cap entries,
        or cap_bytes of Redis memory when cap_bytes > 0).
        Raises redis errors (the caller answers 503)."""
        depth = await self.batcher.script(_ENQUEUE, [keys.request_stream(model), envelope.reply_to], [
            cap, keep_ms, payload, cap_bytes, keys.REPLY_STREAM_TTL_S,
            # in ENVELOPE_FIELDS order (test_ticks checks the entry against Envelope.fields()): read one by one,
            # as protocol.envelope_values would cost 70-95 ns more a request
            envelope.request_id, envelope.reply_to, envelope.deadline_ms, envelope.op, envelope.traceparent])
        return int(depth)


class ModelQueue:
    """A worker's view of one model's request stream."""

    def __init__(self, redis: aioredis.Redis, model: str, consumer: str) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.stream = keys.request_stream(model)
        self.reads = roundtrip.HeldConnection(redis)   # XREADGROUP
        self.pipelined = Pipelined(redis)              # replies and acks

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent, safe across replicas)."""
        try:
            await self.redis.xgroup_create(self.stream, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_s: float | None) -> list[Delivery]:
        """New entries for this consumer. block_s None: do not block."""
        block = () if block_s is None else ("BLOCK", max(1, int(block_s * 1000)))
        [res] = await self.reads.run([("XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", count, *block,
                                       "STREAMS", self.stream, ">")])
        if isinstance(res, ResponseError):
            await self._recreate_on_nogroup(res)   # the stream was deleted under us (e.g. FLUSHALL): start over
            return []
        return [parse_entry(eid, fields, 1) for eid, fields in stream_entries(res)]

    async def reply_and_ack(self, replies: Sequence[tuple[str, Reply]], deliveries: Sequence[Delivery]) -> None:
        """send(), then wait until Redis ran it. Raises the connection's error or Redis's refusal."""
        sent = await self.send(replies, deliveries)
        if sent is not None:
            await sent

    async def send(self, replies: Sequence[tuple[str, Reply]],
                   deliveries: Sequence[Delivery]) -> asyncio.Future[list[Any]] | None:
        """Replies first, then acknowledge and delete: written at once on the queue's pipelined connection, the
        future done when Redis ran them (or failed with why not; None when there was nothing to send). Redis runs
        one connection's commands in order, so an ack never lands before its reply, and a send never waits for the
        last one's answer; if the connection breaks in between, the entry stays pending and is redelivered (the
        gateway ignores a second reply). Waits only while too many sends are unanswered."""
        if not replies and not deliveries:
            return None
        by_gateway: dict[str, list[Reply]] = {}
        for reply_to, reply in replies:
            by_gateway.setdefault(reply_to, []).append(reply)
        # one entry per gateway, however many replies
        commands: list[Sequence[Any]] = [("XADD", reply_to, "NOMKSTREAM", "MAXLEN", "~", REPLY_MAXLEN, "*", "pack",
                                          pack_replies(batch)) for reply_to, batch in by_gateway.items()]
        if deliveries:
            ids = [d.entry_id for d in deliveries]
            commands += [("XACK", self.stream, keys.GROUP, *ids), ("XDEL", self.stream, *ids)]
        await self.pipelined.wait_for_room()
        return self.pipelined.send(commands, refusal_fails=True)

    async def drain(self) -> None:
        """Wait until everything sent is run by Redis, or failed."""
        await self.pipelined.drain()

    async def close(self) -> None:
        """Wait for what was sent, then let the pipelined connection go, and the one reads were held on."""
        await self.pipelined.drain()
        await self.pipelined.close()
        await self.reads.close()

    async def reclaim(self, min_idle_ms: int, max_tries: int,
                      count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over entries left pending longer than min_idle_ms (their worker died or hung).
        Returns (claimed, exhausted): exhausted ones were already delivered max_tries times and must be
        dead-lettered, not run again."""
        return await self._claim(min_idle_ms, max_tries, count, None)

    async def claim_from(self, consumer: str, min_idle_ms: int, max_tries: int,
                         count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over the entries of one consumer (a worker whose heartbeat lapsed), as reclaim() does. min_idle_ms
        is kept above zero on purpose: the first claimer resets the idle time, so two workers claiming the same dead
        consumer's entries at once never both get one."""
        return await self._claim(min_idle_ms, max_tries, count, consumer)

    async def _claim(self, min_idle_ms: int, max_tries: int, count: int,
                     consumer: str | None) -> tuple[list[Delivery], list[Delivery]]:
        try:
            pending: Any = await self.redis.xpending_range(self.stream, keys.GROUP, min="-", max="+", count=count,
                                                           idle=min_idle_ms, consumername=consumer)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return [], []
        if not pending:
            return [], []
        tries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        # XCLAIM with the same min-idle: if another worker claimed one first, it is not returned twice.
        claimed: Any = await self.redis.xclaim(self.stream, keys.GROUP, self.consumer, min_idle_ms, list(tries))
        deleted = [eid for eid, fields in claimed if not fields]
        if deleted:   # entries deleted under the PEL (Redis 6.2 still lists them): clear them for good
            await self.redis.xack(self.stream, keys.GROUP, *deleted)
        # XCLAIM counted this delivery: the tries are the old count + 1.
        deliveries = [parse_entry(eid, f, tries[eid] + 1) for eid, f in claimed if f]
        fresh = [d for d in deliveries if d.tries <= max_tries]
        exhausted = [d for d in deliveries if d.tries > max_tries]
        if deliveries:   # counted now, in Redis: the worker that claimed them may die on the next one
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.stats(self.model), keys.STAT_RECLAIMED, len(deliveries))
                if fresh:
                    pipe.hincrby(keys.stats(self.model), keys.STAT_REDELIVERED, len(fresh))
                await pipe.execute()
        return fresh, exhausted

    async def consumers(self) -> list[str]:
        """The names of the group's consumers other than this one (worker ids)."""
        try:
            found: Any = await self.redis.xinfo_consumers(self.stream, keys.GROUP)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return []
        names = [c["name"] for c in found]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names if n not in (self.consumer,
                                                                                             self.consumer.encode())]

    async def remove_consumer(self, consumer: str) -> bool:
        """Remove a dead worker's consumer from the group once nothing is pending on it (XGROUP DELCONSUMER would
        drop what is). True when it was removed."""
        try:
            left: Any = await self.redis.xpending_range(self.stream, keys.GROUP, min="-", max="+", count=1,
                                                        consumername=consumer)
            if left:
                return False
            await self.redis.xgroup_delconsumer(self.stream, keys.GROUP, consumer)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return False
        return True

    async def refresh_claims(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on, so no other worker reclaims live work. Also
        proves the group is there: Redis lost it (restart, FLUSHALL) -> it is recreated here, on the spot."""
        try:
            if deliveries:
                await self.redis.xclaim(self.stream, keys.GROUP, self.consumer, 0, [d.entry_id for d in deliveries],
                                        justid=True)
            else:
                groups: Any = await self.redis.xinfo_groups(self.stream)
                if not any(g["name"] in (keys.GROUP, keys.GROUP.encode()) for g in groups):
                    await self.ensure_group()   # the stream is back (an enqueue made it) but not its group
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)

    async def _recreate_on_nogroup(self, exc: ResponseError) -> None:
        """Redis lost the stream or its group (a restart without persistence, FLUSHALL): make them again here, on
        the spot, rather than failing the same call every round. Other errors are raised."""
        text = str(exc)
        if "NOGROUP" not in text and "no such key" not in text.lower():
            raise exc
        await self.ensure_group()

    async def dead_letter(self, deliveries: Sequence[Delivery], reason: str) -> None:
        """Move deliveries to the dead-letter stream, answer them (not to be retried), ack and delete."""
        if not deliveries:
            return
        dlq = keys.dead_letter_stream(self.model)
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in deliveries:
                pipe.xadd(dlq, {"id": d.request_id, "entry": d.entry_id, "tries": d.tries, "reason": reason,
                                "op": d.envelope.op},   # metadata only: no payload outlives its request
                          maxlen=keys.DEAD_LETTER_MAXLEN, approximate=True)
            pipe.hincrby(keys.stats(self.model), keys.STAT_DEAD_LETTERED, len(deliveries))
            await pipe.execute()
        log.warning("dead-lettered model=%s n=%d reason=%s", self.model, len(deliveries), reason)
        await self.reply_and_ack([(d.envelope.reply_to, dead_letter_reply(d, reason)) for d in deliveries], deliveries)


async def xread(conn: roundtrip.HeldConnection, stream: str, after: Any, count: int,
                block_s: float) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of `stream` after id `after`, waiting up to block_s for the first (one round trip)."""
    [res] = await conn.run([("XREAD", "COUNT", count, "BLOCK", max(1, int(block_s * 1000)), "STREAMS", stream, after)])
    if isinstance(res, ResponseError):
        raise res
    return stream_entries(res)


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


_PAYLOAD = PAYLOAD_FIELD.encode()


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes], tries: int) -> Delivery:
    """An entry as read. One without a payload (written by an older gateway, or by hand) gets an empty one,
    which fails to decode: that request alone is answered with an error and acknowledged, not retried."""
    return Delivery(entry_id, Envelope.from_fields(fields), fields.get(_PAYLOAD, b""), tries)


def dead_letter_reply(delivery: Delivery, reason: str) -> Reply:
    return Reply.error(delivery.request_id, DeadLettered.error_type,
                       f"request {delivery.request_id} failed {delivery.tries - 1} times ({reason}) and was moved "
                       "to the dead-letter stream")


class Cancels:
    """A model's cancel stream: gateways announce callers that left; every replica reads them all (no group)."""

    def __init__(self, redis: aioredis.Redis, model: str) -> None:
        self.redis = redis
        self.stream = keys.cancel_stream(model)
        self.last: Any = None
        self.reads = roundtrip.HeldConnection(redis)

    async def publish(self, cancel: Cancel) -> None:
        await self.redis.xadd(self.stream, cancel.fields(), maxlen=keys.CANCEL_MAXLEN,  # type: ignore[arg-type]
                              approximate=True)

    async def read(self, block_s: float) -> list[tuple[Cancel, int]]:
        """Cancels published since the last read (since the first read's call, the first time), each with when it
        was published (ms, Redis's clock: the one request entry ids are made from, see entry_ms)."""
        if self.last is None:
            newest: Any = await self.redis.xrevrange(self.stream, count=1)
            self.last = newest[0][0] if newest else b"0-0"
        res = await xread(self.reads, self.stream, self.last, 100, block_s)
        out = []
        for entry_id, fields in res:
            self.last = entry_id
            out.append((Cancel.from_fields(fields), entry_ms(entry_id)))
        return out


class ReplyInbox:
    """A gateway's reply stream: made here, never by workers (they send with NOMKSTREAM), so a dead gateway's stream
    just expires. Recreated on the spot when Redis lost it (a restart or FLUSHALL)."""

    def __init__(self, redis: aioredis.Redis, gateway_id: str) -> None:
        self.redis = redis
        self.stream = keys.reply_stream(gateway_id)
        self.last: Any = None
        self.reads = roundtrip.HeldConnection(redis)

    async def create(self) -> None:
        """Make the stream (one empty entry) with its TTL, and read from that entry on."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.stream, {"pack": b""})
            pipe.expire(self.stream, keys.REPLY_STREAM_TTL_S)
            last, _ = await pipe.execute()
        self.last = last

    async def read(self, block_s: float) -> list[Reply]:
        """The replies that arrived since the last read, waiting up to block_s for the first."""
        if self.last is None:
            await self.create()
        res = await xread(self.reads, self.stream, self.last, 1000, block_s)
        if not res and not await self.redis.exists(self.stream):
            # Redis lost the stream (restart, FLUSHALL): workers reply with NOMKSTREAM, so until it exists again
            # every reply is dropped. An empty read is the cheap moment to look: one EXISTS per idle block.
            await self.create()
            return []
        replies: list[Reply] = []
        for entry_id, fields in res:
            self.last = entry_id
            replies += unpack_replies(fields.get(b"pack", b""))
        return replies

    async def trim(self) -> None:
        """Drop the entries already read."""
        if self.last is not None:
            await self.redis.xtrim(self.stream, minid=self.last)

    async def refresh(self) -> None:
        """Extend the TTL; recreate the stream if Redis lost it."""
        if not await self.redis.expire(self.stream, keys.REPLY_STREAM_TTL_S):
            await self.create()

    async def delete(self) -> None:
        try:
            await self.redis.delete(self.stream)
        except BROKER_ERRORS:
            pass
