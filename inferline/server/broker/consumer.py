"""A worker's side of a model's request streams: `ModelQueue` reads them with the consumer group, in priority order,
and hands its replies and acks to its sender (sender.py: replies, then acknowledge and delete) and the take-over of
pending work to its claims (claims.py: reclaims from dead workers, this worker's orphans, dead letters). The streams
and their group are lanes.py's; `Delivery`, one request as a worker received it, is delivery.py's. Gateways put
requests on the streams with enqueue.py and read the replies with replies.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Container, Sequence
from typing import Any

from redis.exceptions import ResponseError

from inferline.server.broker import keys, roundtrip
from inferline.server.broker.claims import Claims
from inferline.server.broker.client import Redis
from inferline.server.broker.delivery import Delivery, OrphanPosition, parse_entry
from inferline.server.broker.lanes import Lanes
from inferline.server.broker.reads import streams_entries
from inferline.server.broker.sender import Durable, Sender
from inferline.server.protocol import Reply

_RANK = {lane: i for i, lane in enumerate(keys.PRIORITY_LANES)}


class ModelQueue:
    """A worker's view of one model's request streams: the common one and, for a worker that knows its version, that
    version's lane (keys.request_stream), each in its priority lanes (keys.PRIORITY_LANES); one consumer group on each
    stream, each entry acknowledged on its own stream.

    Priority, and its bound on waiting: a read takes from the priorities in order (high, normal, low; each one's
    streams, common and version, in one XREADGROUP) until it has `count` entries, so a batch is filled from the
    highest lanes; every LOWER_FIRST_EVERY-th read takes from the lowest first. So while higher lanes keep every batch
    full, a `low` request at the head of its lane is taken within LOWER_FIRST_EVERY reads of one worker (4 batches,
    or 4 admissions of a generation worker), never starved; behind other `low` requests it waits for those too, at a
    quarter of the worker's batches at least."""

    LOWER_FIRST_EVERY = 4

    def __init__(self, redis: Redis, model: str, consumer: str, version: str = "", label: str = "", *,
                 durable: Durable | None = None) -> None:
        """version: the store version whose lane this worker reads beside the common stream ("": none). label: the
        version its answers name (x-model-version), default `version` (a model without store versions has a label,
        its class's own version, and no lane). durable: de-duplicate redelivered entries (sender.py's docstring);
        None: the default path, no extra command."""
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.version = version
        self.lanes = Lanes(redis, model, version)
        self.stream = self.lanes.stream
        self.by_lane = self.lanes.by_lane
        self.sender = Sender(redis, model, version, label or version, durable=durable)
        self.claims = Claims(redis, self.lanes, consumer, self.sender)
        self.reads = roundtrip.HeldConnection(redis, self.stream)   # XREADGROUP (all lanes: one slot, one node)
        self._reads = 0
        # Entries a blocking read over all lanes brought beyond `count` (several lanes filled at once): merged into
        # the next read, highest lanes first. At most (lanes - 1) x count.
        self._spare: list[Delivery] = []
        self._backlog = False

    @property
    def skipped(self) -> int:
        """Deliveries found answered already (durable mode), for tests and logs."""
        return self.sender.skipped

    async def ensure_group(self) -> None:
        """Create the streams and their consumer group if missing (idempotent, safe across replicas), and learn
        whether the server acknowledges and deletes in one command (Sender.detect)."""
        await self.lanes.ensure_group()
        await self.sender.detect()

    async def watch_rollout(self) -> None:
        """Sender.watch_rollout: whether this worker's version is in a rollout (its answers are counted)."""
        await self.sender.watch_rollout()

    async def read(self, count: int, block_s: float | None) -> list[Delivery]:
        """Up to `count` new entries for this consumer, from the priority lanes in order (class docstring), waiting
        up to block_s for the first when every stream is empty. block_s None: do not block.

        While there is a backlog (the last read filled its batch) each priority is read in turn; otherwise one
        blocking read over all streams (it answers at once with what is there, highest lanes first): a lone request
        costs one read, as before lanes (three non-blocking reads ahead of it cost the worker ~+100 µs a request at
        c=1)."""
        got, self._spare = self._spare, []
        self._reads += 1
        if self._backlog or got or block_s is None:
            order = list(keys.PRIORITY_LANES)
            if self._reads % self.LOWER_FIRST_EVERY == 0:
                order.reverse()
            for priority in order:
                if len(got) >= count:
                    break
                got += await self._read([priority], count - len(got), None)
        if not got and block_s is not None:
            got = await self._read(list(keys.PRIORITY_LANES), count, block_s)
        got.sort(key=lambda d: _RANK[d.priority])
        got, self._spare = got[:count], got[count:]
        self._backlog = len(got) >= count
        return got

    async def _read(self, priorities: list[str], count: int, block_s: float | None) -> list[Delivery]:
        streams = [self.by_lane[(v, p)] for p in priorities for v in self.lanes.versions]
        block = () if block_s is None else ("BLOCK", max(1, int(block_s * 1000)))
        read = ("XREADGROUP", "GROUP", keys.GROUP, self.consumer, "COUNT", count, *block,
                "STREAMS", *streams, *(">",) * len(streams))
        if self.sender.due:   # a Cluster's acks that wait for a read: written before it, on its connection
            res = await self.sender.ack_with(self.reads, read)
        else:
            [res] = await self.reads.run([read])
        if isinstance(res, ResponseError):
            await self.lanes.recreate_on_nogroup(res)   # the stream was deleted under us (e.g. FLUSHALL): start over
            return []
        found = [parse_entry(eid, fields, 1, *self.lanes.lane_of[name])
                 for name, entries in streams_entries(res) for eid, fields in entries]
        return await self.sender.unanswered(found)

    # replies and acks: sender.py -----------------------------------------------------------------------------
    async def reply_and_ack(self, replies: Sequence[tuple[str, Reply]], deliveries: Sequence[Delivery]) -> None:
        """Sender.reply_and_ack: send(), then wait until Redis ran it."""
        await self.sender.reply_and_ack(replies, deliveries)

    async def send(self, replies: Sequence[tuple[str, Reply]],
                   deliveries: Sequence[Delivery]) -> asyncio.Future[list[Any]] | None:
        """Sender.send: replies first, then acknowledge and delete; the future done when Redis ran them."""
        return await self.sender.send(replies, deliveries)

    async def drain(self) -> None:
        """Wait until everything sent is run by Redis, or failed."""
        await self.sender.drain()

    async def close(self) -> None:
        """Wait for what was sent, then let the sender's connections go, and the one reads were held on."""
        await self.sender.close()
        await self.reads.close()

    # taking over pending work: claims.py -----------------------------------------------------------------------
    async def reclaim(self, min_idle_ms: int, max_tries: int,
                      count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Claims.reclaim: (claimed, exhausted) of the entries pending longer than min_idle_ms."""
        return await self.claims.reclaim(min_idle_ms, max_tries, count)

    async def claim_from(self, consumer: str, min_idle_ms: int, max_tries: int,
                         count: int = 100) -> tuple[list[Delivery], list[Delivery]]:
        """Claims.claim_from: reclaim() of one dead consumer's entries."""
        return await self.claims.claim_from(consumer, min_idle_ms, max_tries, count)

    async def orphans(self, held: Container[bytes], count: int,
                      after: OrphanPosition = None) -> tuple[list[Delivery], OrphanPosition]:
        """Claims.orphans: entries pending on this consumer that its worker neither holds (`held`) nor has read and
        not handed out yet. Call it only while no read is in flight."""
        return await self.claims.orphans(held, count, after, {d.entry_id for d in self._spare})

    async def consumers(self) -> list[str]:
        """Claims.consumers: the other consumers (worker ids) in the group of any of its streams."""
        return await self.claims.consumers()

    async def remove_consumer(self, consumer: str) -> bool:
        """Claims.remove_consumer: drop a dead worker's consumer once nothing is pending on it."""
        return await self.claims.remove_consumer(consumer)

    async def refresh_claims(self, deliveries: Sequence[Delivery]) -> None:
        """Claims.refresh_claims: reset the idle time of entries this worker still works on."""
        await self.claims.refresh_claims(deliveries)

    async def dead_letter(self, deliveries: Sequence[Delivery], reason: str) -> None:
        """Claims.dead_letter: move deliveries to the dead-letter stream, answer, ack and delete them."""
        await self.claims.dead_letter(deliveries, reason)
