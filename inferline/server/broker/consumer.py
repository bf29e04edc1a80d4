"""A worker's side of a model's request stream: `ModelQueue` reads with the consumer group, replies, acknowledges and
deletes, reclaims work left pending by a dead worker, and dead-letters what keeps failing; `Delivery` is one request
as a worker received it. Gateways put requests on the stream with enqueue.py and read the replies with replies.py.

Ordering rules that keep work from being lost: an entry is XDEL'd only after it is XACK'd (XCLAIM and
XAUTOCLAIM skip pending ids whose entries are gone), and only after its reply was sent (a crash in
between redelivers instead of dropping).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from inferline.server.broker import keys, roundtrip
from inferline.server.broker.pipelined import Pipelined
from inferline.server.broker.reads import stream_entries, streams_entries
from inferline.server.errors import DeadLettered
from inferline.server.protocol import PAYLOAD_FIELD, Envelope, Reply, pack_replies

log = logging.getLogger(__name__)

# A gateway's reply stream is trimmed to about this many entries by the workers' XADDs (one entry per gateway per
# send): a gateway that stopped reading cannot grow it without bound.
REPLY_MAXLEN = 100_000


# Acknowledge and delete answered entries, and count their payload bytes off the model's queued-bytes counter (the
# enqueue script, enqueue.py, counted them on): only an entry this XDEL removed is counted off, so a second answer to a
# redelivered request subtracts nothing. KEYS: request stream, its byte counter. ARGV: group, then (entry id, payload
# bytes) pairs. Sent as EVAL on the pipelined connection (EVALSHA's NOSCRIPT could not be retried there; the script
# text is ~400 bytes a send, not a request).
_ACK = """
local gone = 0
for i = 2, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then gone = gone + tonumber(ARGV[i + 1]) end
end
if gone > 0 and redis.call('DECRBY', KEYS[2], gone) < 0 then redis.call('SET', KEYS[2], 0) end
return gone
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One request as a worker received it."""

    entry_id: bytes
    envelope: Envelope
    payload: bytes
    tries: int = 1
    lane: str = "normal"   # the priority lane (keys.PRIORITY_LANES) whose stream it came from

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def arrived_ms(self) -> int:
        """When the entry reached the stream: its id's time part, Redis's clock (epoch ms)."""
        return int(self.entry_id.split(b"-", 1)[0])



class ModelQueue:
    """A worker's view of one model's request streams: its priority lanes (keys.PRIORITY_LANES), one consumer group
    on each, read highest first.

    Priority, and its bound on waiting: a read takes from the lanes in order (high, normal, low) until it has `count`
    entries, so a batch is filled from the highest lanes; every LOWER_FIRST_EVERY-th read takes from the lowest lane
    first. So while higher lanes keep every batch full, a `low` request at the head of its lane is taken within
    LOWER_FIRST_EVERY reads of one worker (4 batches, or 4 admissions of a generation worker), never starved; behind
    other `low` requests it waits for those too, at a quarter of the worker's batches at least."""

    LOWER_FIRST_EVERY = 4

    def __init__(self, redis: aioredis.Redis, model: str, consumer: str) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.stream = keys.request_stream(model)   # the common ("normal") lane
        self.lanes = {lane: keys.request_stream(model, priority=lane) for lane in keys.PRIORITY_LANES}
        self._lane_of = {name.encode(): lane for lane, name in self.lanes.items()}
        self.reads = roundtrip.HeldConnection(redis)   # XREADGROUP
        self.pipelined = Pipelined(redis)              # replies and acks
        self._reads = 0
        # Entries a blocking read over all lanes brought beyond `count` (several lanes filled at once): merged into
        # the next read, highest lanes first. At most (lanes - 1) x count.
        self._spare: list[Delivery] = []
        self._backlog = False

    async def ensure_group(self) -> None:
        """Create each lane's stream and its consumer group if missing (idempotent, safe across replicas)."""
        for stream in self.lanes.values():
            try:
                await self.redis.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, count: int, block_s: float | None) -> list[Delivery]:
        """Up to `count` new entries for this consumer, from the lanes in priority order (class docstring), waiting
        up to block_s for the first when every lane is empty. block_s None: do not block.

        While there is a backlog (the last read filled its batch) each lane is read in turn; otherwise one blocking
        read over all lanes (it answers at once with what is there, highest lanes first): a lone request costs one
        read, as before lanes (three non-blocking reads ahead of it cost the worker ~+100 µs a request at c=1)."""
        got, self._spare = self._spare, []
        self._reads += 1
        if self._backlog or got or block_s is None:
            order = list(self.lanes)
            if self._reads % self.LOWER_FIRST_EVERY == 0:
                order.reverse()
            for lane in order:
                if len(got) >= count:
                    break
                got += await self._read([lane], count - len(got), None)
        if not got and block_s is not None:
            got = await self._read(list(self.lanes), count, block_s)
        got.sort(key=lambda d: _RANK[d.lane])
        got, self._spare = got[:count], got[count:]
        self._backlog = len(got) >= count
        return got

    async def _read(self, lanes: list[str], count: int, block_s: float | None) -> list[Delivery]:
        block = () if block_s is None else ("BLOCK", max(1, int(block_s * 1000)))
        [res] = await self.reads.run([("XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", count, *block,
                                       "STREAMS", *(self.lanes[lane] for lane in lanes), *(">" for _ in lanes))])
        if isinstance(res, ResponseError):
            await self._recreate_on_nogroup(res)   # the stream was deleted under us (e.g. FLUSHALL): start over
            return []
        if len(lanes) == 1:
            return [parse_entry(eid, fields, 1, lanes[0]) for eid, fields in stream_entries(res)]
        return [parse_entry(eid, fields, 1, self._lane_of[name]) for name, entries in streams_entries(res)
                for eid, fields in entries]

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
        # One entry per gateway, however many replies. The XADD makes the stream if Redis lost it (a restart,
        # FLUSHALL, a Cluster failover that lost the last writes), and the EXPIRE bounds it if its gateway is gone
        # for good: the enqueue script no longer makes it (it hashes to another slot than the request stream).
        commands: list[Sequence[Any]] = []
        for reply_to, batch in by_gateway.items():
            commands.append(("XADD", reply_to, "MAXLEN", "~", REPLY_MAXLEN, "*", "pack", pack_replies(batch)))
            commands.append(("EXPIRE", reply_to, keys.REPLY_STREAM_TTL_S))
        by_lane: dict[str, list[Delivery]] = {}
        for d in deliveries:
            by_lane.setdefault(d.lane, []).append(d)
        for lane, done in by_lane.items():
            pairs = [x for d in done for x in (d.entry_id, len(d.payload))]
            commands.append(("EVAL", _ACK, 2, *keys.ack_keys(self.model, lane), keys.GROUP, *pairs))
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
        deliveries: list[Delivery] = []
        for lane, stream in self.lanes.items():
            try:
                pending: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=count,
                                                               idle=min_idle_ms, consumername=consumer)
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)
                continue
            if not pending:
                continue
            tries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
            # XCLAIM with the same min-idle: if another worker claimed one first, it is not returned twice.
            claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, min_idle_ms, list(tries))
            deleted = [eid for eid, fields in claimed if not fields]
            if deleted:   # entries deleted under the PEL (Redis 6.2 still lists them): clear them for good
                await self.redis.xack(stream, keys.GROUP, *deleted)
            # XCLAIM counted this delivery: the tries are the old count + 1.
            deliveries += [parse_entry(eid, f, tries[eid] + 1, lane) for eid, f in claimed if f]
        fresh = [d for d in deliveries if d.tries <= max_tries]
        exhausted = [d for d in deliveries if d.tries > max_tries]
        if deliveries:   # counted now, in Redis: the worker that claimed them may die on the next one
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.stats(self.model), keys.STAT_RECLAIMED, len(deliveries))
                if fresh:
                    pipe.hincrby(keys.stats(self.model), keys.STAT_REDELIVERED, len(fresh))
                await pipe.execute()
        return fresh, exhausted

    async def orphans(self, held: Container[bytes], count: int) -> list[Delivery]:
        """Entries Redis delivered to this consumer that its worker does not hold: a blocking read that Redis answered
        but whose answer the worker never read (it stalled past the socket timeout, SIGSTOP or a long pause, and the
        read failed). Claimed again by this consumer, so their idle time restarts and their delivery count stays
        what it was (they never ran). At most `count`. Call it only while no read of this consumer is in flight:
        that read's entries would look orphaned too."""
        spare = {d.entry_id for d in self._spare}   # read, not yet handed out: not orphans
        found: list[Delivery] = []
        for lane, stream in self.lanes.items():
            if len(found) >= count:
                break
            try:
                pending: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+",
                                                               count=count - len(found), consumername=self.consumer)
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)
                continue
            by_tries: dict[int, list[Any]] = {}   # one XCLAIM per delivery count, to keep each entry's (usually one)
            for p in pending:
                if p["message_id"] not in held and p["message_id"] not in spare:
                    by_tries.setdefault(int(p["times_delivered"]), []).append(p["message_id"])
            for tries, ids in by_tries.items():
                claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, ids, retrycount=tries)
                found += [parse_entry(eid, f, tries, lane) for eid, f in claimed if f]
                deleted = [eid for eid, f in claimed if not f]
                if deleted:   # entries deleted under the PEL: clear them for good
                    await self.redis.xack(stream, keys.GROUP, *deleted)
        return found

    async def consumers(self) -> list[str]:
        """The names of the groups' consumers other than this one (worker ids), over all lanes."""
        names: list[str] = []
        for stream in self.lanes.values():
            try:
                found: Any = await self.redis.xinfo_consumers(stream, keys.GROUP)
            except ResponseError as exc:
                await self._recreate_on_nogroup(exc)
                continue
            for c in found:
                name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
                if name != self.consumer and name not in names:
                    names.append(name)
        return names

    async def remove_consumer(self, consumer: str) -> bool:
        """Remove a dead worker's consumer from the group once nothing is pending on it (XGROUP DELCONSUMER would
        drop what is), from every lane. True when it was removed from all."""
        try:
            for stream in self.lanes.values():
                left: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=1,
                                                            consumername=consumer)
                if left:
                    return False
            for stream in self.lanes.values():
                await self.redis.xgroup_delconsumer(stream, keys.GROUP, consumer)
        except ResponseError as exc:
            await self._recreate_on_nogroup(exc)
            return False
        return True

    async def refresh_claims(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on, so no other worker reclaims live work. Also
        proves the group is there: Redis lost it (restart, FLUSHALL) -> it is recreated here, on the spot."""
        by_lane: dict[str, list[Any]] = {}
        for d in deliveries:
            by_lane.setdefault(d.lane, []).append(d.entry_id)
        for lane, stream in self.lanes.items():
            try:
                if lane in by_lane:
                    await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, by_lane[lane], justid=True)
                else:
                    groups: Any = await self.redis.xinfo_groups(stream)
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


_PAYLOAD = PAYLOAD_FIELD.encode()
_RANK = {lane: i for i, lane in enumerate(keys.PRIORITY_LANES)}


def parse_entry(entry_id: bytes, fields: dict[bytes, bytes], tries: int, lane: str = "normal") -> Delivery:
    """An entry as read from `lane`. One without a payload (written by an older gateway, or by hand) gets an empty
    one, which fails to decode: that request alone is answered with an error and acknowledged, not retried."""
    return Delivery(entry_id, Envelope.from_fields(fields), fields.get(_PAYLOAD, b""), tries, lane)


def dead_letter_reply(delivery: Delivery, reason: str) -> Reply:
    return Reply.error(delivery.request_id, DeadLettered(
        f"request {delivery.request_id} failed {delivery.tries - 1} times ({reason}) and was moved to the dead-letter "
        "stream"))

