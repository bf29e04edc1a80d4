"""Taking over what a model's request streams hold pending for workers that cannot answer it: entries left by a
dead or hung worker (reclaimed after the visibility timeout, or at once from a consumer whose heartbeat lapsed), the
orphans of this worker's own failed reads and sends, and the dead-lettering of entries that keep failing. Also the
upkeep of the consumer group's members (a dead worker's consumer is removed once nothing is pending on it) and of
this worker's claims (kept fresh, so nobody reclaims live work). `Claims` serves one worker's `ModelQueue`
(consumer.py): it reads the same lanes (lanes.py) and answers through the same sender (sender.py)."""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any

from redis.exceptions import ResponseError

from inferline.server.broker import deadletters, keys
from inferline.server.broker.client import Redis
from inferline.server.broker.delivery import Delivery, OrphanPosition, dead_letter_reply, parse_entry
from inferline.server.broker.lanes import Lanes
from inferline.server.broker.sender import Sender

log = logging.getLogger(__name__)


class Claims:
    def __init__(self, redis: Redis, lanes: Lanes, consumer: str, sender: Sender) -> None:
        """lanes: the streams and group of the worker named `consumer`; sender: its replies and acks."""
        self.redis = redis
        self.lanes = lanes
        self.model = lanes.model
        self.consumer = consumer
        self.sender = sender

    async def reclaim(self, min_idle_ms: int, max_tries: int,
                      count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over entries left pending longer than min_idle_ms (their worker died or hung), on each of this
        worker's streams (at most `count` from each). Returns (claimed, exhausted): exhausted ones were already
        delivered max_tries times and must be dead-lettered, not run again."""
        return await self._claim_all(min_idle_ms, max_tries, count, None)

    async def claim_from(self, consumer: str, min_idle_ms: int, max_tries: int,
                         count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Take over the entries of one consumer (a worker whose heartbeat lapsed), as reclaim() does. min_idle_ms
        is kept above zero on purpose: the first claimer resets the idle time, so two workers claiming the same dead
        consumer's entries at once never both get one."""
        return await self._claim_all(min_idle_ms, max_tries, count, consumer)

    async def _claim_all(self, min_idle_ms: int, max_tries: int, count: int,
                         consumer: str | None) -> tuple[list[Delivery], list[Delivery]]:
        fresh: list[Delivery] = []
        exhausted: list[Delivery] = []
        for lane in self.lanes.by_lane:
            f, e = await self._claim(lane, min_idle_ms, max_tries, count, consumer)
            fresh += f
            exhausted += e
        return fresh, exhausted

    async def _claim(self, lane: tuple[str, str], min_idle_ms: int, max_tries: int, count: int,
                     consumer: str | None) -> tuple[list[Delivery], list[Delivery]]:
        stream = self.lanes.by_lane[lane]
        try:
            pending: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=count,
                                                           idle=min_idle_ms, consumername=consumer)
        except ResponseError as exc:
            await self.lanes.recreate_on_nogroup(exc)
            return [], []
        if not pending:
            return [], []
        tries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        # XCLAIM with the same min-idle: if another worker claimed one first, it is not returned twice.
        claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, min_idle_ms, list(tries))
        deleted = [eid for eid, fields in claimed if not fields]
        if deleted:   # entries deleted under the PEL (Redis 6.2 still lists them): clear them for good
            await self.redis.xack(stream, keys.GROUP, *deleted)
        # XCLAIM counted this delivery: the tries are the old count + 1.
        deliveries = [parse_entry(eid, f, tries[eid] + 1, *lane) for eid, f in claimed if f]
        deliveries = await self.sender.unanswered(deliveries)
        fresh = [d for d in deliveries if d.tries <= max_tries]
        exhausted = [d for d in deliveries if d.tries > max_tries]
        if deliveries:   # counted now, in Redis: the worker that claimed them may die on the next one
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.stats(self.model), keys.STAT_RECLAIMED, len(deliveries))
                if fresh:
                    pipe.hincrby(keys.stats(self.model), keys.STAT_REDELIVERED, len(fresh))
                await pipe.execute()
        return fresh, exhausted

    async def orphans(self, held: Container[bytes], count: int, after: OrphanPosition = None,
                      spare: Container[bytes] = ()) -> tuple[list[Delivery], OrphanPosition]:
        """Entries Redis delivered to this consumer that its worker does not hold: a blocking read that Redis answered
        but whose answer the worker never read (it stalled past the socket timeout, SIGSTOP or a long pause, and the
        read failed), or a send that failed (after a failover the promoted replica has the entry pending here).
        Claimed again by this consumer, so their idle time restarts and their delivery count stays what it was (they
        never ran). Looks at one page of `count` pending entries of one of its streams (`by_lane`'s order), from the
        position `after` (None: the first stream's start); returns (what it claimed, the position to go on from, or
        None once every stream's pending list was read to its end). The page, not what was claimed, says whether
        there is more: held entries (and `spare`, those read but not handed out yet) are skipped, and in durable mode
        the answered ones are acknowledged, not returned, so a page can yield nothing while more wait behind it. Call
        it only while no read of this consumer is in flight: that read's entries would look orphaned too."""
        if self.sender.due:   # answered entries whose acks wait for a read are not orphans: ack them first
            await self.sender.drain()
        index, last = after if after is not None else (0, None)
        lanes = list(self.lanes.by_lane)
        while True:   # a stream whose pending list ends short of a page: on to the next one in the same call
            found, last = await self._orphan_page(lanes[index], last, held, count, spare)
            if last is not None:
                return found, (index, last)
            if index + 1 == len(lanes):
                return found, None
            index += 1
            if found:
                return found, (index, None)

    async def _orphan_page(self, lane: tuple[str, str], last: bytes | None, held: Container[bytes], count: int,
                           spare: Container[bytes]) -> tuple[list[Delivery], bytes | None]:
        """One page of orphans() on one stream: what it claimed, and the last id seen when the page was full."""
        stream = self.lanes.by_lane[lane]
        try:
            pending: Any = await self.redis.xpending_range(stream, keys.GROUP,
                                                           min="-" if last is None else b"(" + last, max="+",
                                                           count=count, consumername=self.consumer)
        except ResponseError as exc:
            await self.lanes.recreate_on_nogroup(exc)
            return [], None
        by_tries: dict[int, list[Any]] = {}   # one XCLAIM per delivery count, to keep each entry's (usually one)
        for p in pending:
            if p["message_id"] not in held and p["message_id"] not in spare:
                by_tries.setdefault(int(p["times_delivered"]), []).append(p["message_id"])
        found: list[Delivery] = []
        for tries, ids in by_tries.items():
            claimed: Any = await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, ids, retrycount=tries)
            found += await self.sender.unanswered([parse_entry(eid, f, tries, *lane) for eid, f in claimed if f])
            deleted = [eid for eid, f in claimed if not f]
            if deleted:   # entries deleted under the PEL: clear them for good
                await self.redis.xack(stream, keys.GROUP, *deleted)
        return found, (pending[-1]["message_id"] if len(pending) == count else None)

    async def consumers(self) -> list[str]:
        """The names of the consumers other than this one (worker ids) in the group of any of its streams."""
        names: list[str] = []
        for stream in self.lanes.streams:
            try:
                found: Any = await self.redis.xinfo_consumers(stream, keys.GROUP)
            except ResponseError as exc:
                await self.lanes.recreate_on_nogroup(exc)
                continue
            for c in found:
                n = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
                if n != self.consumer and n not in names:
                    names.append(n)
        return names

    async def remove_consumer(self, consumer: str) -> bool:
        """Remove a dead worker's consumer from the groups of this worker's streams once nothing is pending on it
        there (XGROUP DELCONSUMER would drop what is). True when it was removed from all of them."""
        removed = True
        for stream in self.lanes.streams:
            try:
                left: Any = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+", count=1,
                                                            consumername=consumer)
                if left:
                    removed = False
                    continue
                await self.redis.xgroup_delconsumer(stream, keys.GROUP, consumer)
            except ResponseError as exc:
                await self.lanes.recreate_on_nogroup(exc)
                removed = False
        return removed

    async def refresh_claims(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of entries this worker still works on, so no other worker reclaims live work. Also
        proves the groups are there: Redis lost one (restart, FLUSHALL) -> it is recreated here, on the spot."""
        for lane, stream in self.lanes.by_lane.items():
            ids: list[Any] = [d.entry_id for d in deliveries if (d.lane, d.priority) == lane]
            try:
                if ids:
                    await self.redis.xclaim(stream, keys.GROUP, self.consumer, 0, ids, justid=True)
                else:
                    groups: Any = await self.redis.xinfo_groups(stream)
                    if not any(g["name"] in (keys.GROUP, keys.GROUP.encode()) for g in groups):
                        await self.lanes.ensure_group()   # the stream is back (an enqueue made it) but not its group
            except ResponseError as exc:
                await self.lanes.recreate_on_nogroup(exc)

    async def dead_letter(self, deliveries: Sequence[Delivery], reason: str) -> None:
        """Move deliveries to the dead-letter stream (their metadata, and their payload for a replay when small:
        deadletters.py), answer them (not to be retried), ack and delete."""
        if not deliveries:
            return
        rows = [(d.request_id, d.entry_id, d.tries, d.envelope.op, d.payload) for d in deliveries]
        await self.redis.eval(deadletters.DEAD_LETTER, *deadletters.dead_letter_args(self.model, reason, rows))
        lanes = {d.lane for d in deliveries if d.lane}
        if lanes:   # a rollout's version counts its own dead letters
            async with self.redis.pipeline(transaction=False) as pipe:
                for lane in lanes:
                    pipe.hincrby(keys.version_stats(self.model, lane), "dead_lettered",
                                 sum(1 for d in deliveries if d.lane == lane))
                await pipe.execute()
        log.warning("dead-lettered model=%s n=%d reason=%s", self.model, len(deliveries), reason)
        await self.sender.reply_and_ack([(d.envelope.reply_to, dead_letter_reply(d, reason)) for d in deliveries],
                                        deliveries)
