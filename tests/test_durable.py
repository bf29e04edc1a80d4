"""Durable enqueue's parts against a real Redis (each server found: tests/conftest.py ACROSS_SERVERS): the gateway's
one WAIT per tick of enqueues and what a too-short WAIT answers, and the worker's de-duplication of an entry a
failover delivers again. The failover itself, under load, is tests/test_failover.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.delivery import OrphanPosition
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.broker.sender import Durable
from inferline.server.broker.ticks import NotReplicated, TickBatcher
from inferline.server.config import BrokerSettings
from inferline.server.protocol import Envelope, Reply, now_ms

MODEL = "durable"
DURABLE = Durable(min_replicas=0, timeout_ms=100, keep_ms=60_000)   # WAIT 0: answered at once, no replica needed


def envelope(i: int) -> Envelope:
    return Envelope(f"r{i}", keys.reply_stream("gw"), now_ms() + 10_000, "v2")


class Broker:
    """One test's broker parts on a clean model: a client, an enqueuer, and the queues it opens (all closed after)."""

    def __init__(self, redis_url: str) -> None:
        self.client = connect(redis_url)
        self.enqueuer = Enqueuer(self.client)
        self.queues: list[ModelQueue] = []
        self.stream = keys.request_stream(MODEL)

    async def queue(self, consumer: str, durable: Durable | None = DURABLE) -> ModelQueue:
        """A worker's queue on MODEL as `consumer` (durable mode unless durable is None), its group made."""
        queue = ModelQueue(self.client, MODEL, consumer, durable=durable)
        self.queues.append(queue)
        await queue.ensure_group()
        return queue

    async def enqueue(self, *ids: int) -> None:
        for i in ids:
            await self.enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000)

    async def answer(self, queue: ModelQueue, taken: list[Any]) -> None:
        await queue.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in taken], taken)

    async def restore(self, entries: list[Any]) -> None:
        """The request stream as a replica that missed the last acks holds it: these entries, the group from 0."""
        await self.client.delete(self.stream)
        for entry_id, fields in entries:
            await self.client.xadd(self.stream, fields, id=entry_id)
        await self.client.xgroup_create(self.stream, keys.GROUP, id="0")


@pytest.fixture
async def broker(redis_url: str, rdb: redis.Redis) -> AsyncIterator[Broker]:
    parts = Broker(redis_url)
    yield parts
    for queue in parts.queues:
        await queue.close()
    await parts.enqueuer.batcher.close()
    await parts.client.aclose()


async def test_a_tick_of_enqueues_waits_once_and_fails_when_no_replica_has_it(broker: Broker,
                                                                               rdb: redis.Redis) -> None:
    """min_replicas 1 on a Redis without a replica: the tick's 8 enqueues and a plain command share one round trip
    ending with one WAIT; each enqueue fails NotReplicated after the WAIT's timeout (its entry is queued all the
    same), the plain command gets its own answer."""
    batcher = TickBatcher(broker.client, min_replicas=1, replica_timeout_ms=150)
    enqueuer = Enqueuer(broker.client, batcher)
    begun = time.monotonic()
    results = await asyncio.gather(*[enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000) for i in range(8)],
                                   batcher.command("SET", "plain", "v"), return_exceptions=True)
    took = time.monotonic() - begun
    assert batcher.pipelines == 1
    assert all(isinstance(r, NotReplicated) and r.acked == 0 and r.wanted == 1 for r in results[:8]), results
    assert results[8] == b"OK"
    assert 0.14 < took < 1.5
    assert rdb.xlen(keys.request_stream(MODEL)) == 8


async def test_without_min_replicas_nothing_waits(broker: Broker) -> None:
    """The default: no WAIT is sent (MONITOR would show it; the timing does too: no replica, no 150 ms wait)."""
    enqueuer = Enqueuer(broker.client, TickBatcher(broker.client, min_replicas=0, replica_timeout_ms=150))
    begun = time.monotonic()
    depths = await asyncio.gather(*[enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000) for i in range(4)])
    took = time.monotonic() - begun
    assert sorted(depths) == [0, 1, 2, 3] and took < 0.14


def test_the_wait_must_come_before_the_socket_timeout() -> None:
    with pytest.raises(ValueError, match="replica_ack_timeout_s"):
        BrokerSettings(timeout_s=2.0, replica_ack_timeout_s=1.5)
    assert BrokerSettings(min_replicas_ack=1).replica_ack_timeout_ms == 500


async def test_an_entry_answered_before_a_failover_is_acknowledged_not_run_again(broker: Broker,
                                                                                  rdb: redis.Redis) -> None:
    """Worker A answers two entries in durable mode (their ids recorded before the ack). Then the state a failover
    leaves when the ack did not reach the replica: the same entries back on the stream, one pending on A (A's read
    was replicated), one never read. Worker B reads and reclaims: both are acknowledged and deleted without being
    handed out; a third, new entry is handed out as usual. Without durable mode nothing is checked."""
    client, stream = broker.client, broker.stream
    a, b, plain = await broker.queue("A"), await broker.queue("B"), await broker.queue("C", durable=None)
    await broker.enqueue(0, 1)
    taken = await a.read(10, None)
    entries: Any = await client.xrange(stream)
    await broker.answer(a, taken)
    assert await client.xlen(stream) == 0 and await client.zcard(keys.answered(MODEL)) == 2
    # what the promoted replica holds: both entries, the first pending on A, the answered ids
    await broker.restore(entries)
    first: Any = await client.xreadgroup(keys.GROUP, "A", {stream: ">"}, count=1)
    assert len(first[0][1]) == 1
    await broker.enqueue(2)
    fresh = await b.read(10, None)
    claimed, _ = await b.claim_from("A", 0, 3)
    # without durable mode the same state would hand the entry out again
    await broker.restore(entries[:1])
    again = await plain.read(10, None)

    assert [d.request_id for d in taken] == ["r0", "r1"]
    assert [d.request_id for d in fresh + claimed] == ["r2"] and b.skipped == 2
    assert [d.request_id for d in again] == ["r0"]
    pending: Any = rdb.xpending(stream, keys.GROUP)
    assert pending["pending"] == 1 and rdb.xlen(stream) == 1   # the plain read's r0 on C


async def test_answered_ids_are_trimmed_to_the_models_timeout(broker: Broker) -> None:
    queue = await broker.queue("A", durable=Durable(0, 100, keep_ms=50))
    for i in range(2):
        await broker.enqueue(i)
        await broker.answer(queue, await queue.read(1, None))
        await asyncio.sleep(0.1)
    assert await broker.client.zcard(keys.answered(MODEL)) == 1   # the first id was older than keep_ms then


async def test_orphans_are_looked_for_page_by_page_past_held_and_answered_ones(broker: Broker,
                                                                                 rdb: redis.Redis) -> None:
    """What a failover leaves pending on a live worker's consumer: entries it still holds, entries it answered (their
    ids recorded, their acks lost) and one it never got the answer of. A page of `count` that yields nothing (all
    held or answered) still says the list goes on, and the next page, after its last id, finds the orphan."""
    queue = await broker.queue("A")
    await broker.enqueue(*range(5))
    taken = await queue.read(10, None)
    entries: Any = await broker.client.xrange(broker.stream)
    await broker.answer(queue, taken[2:4])
    # the promoted replica: all five back, all pending on A (its read replicated, the acks not)
    await broker.restore(entries)
    await broker.client.xreadgroup(keys.GROUP, "A", {broker.stream: ">"}, count=10)
    held = {d.entry_id for d in taken[:2]}
    pages: list[list[str]] = []
    more: list[bool] = []
    after: OrphanPosition = None
    for _ in range(4):
        found, after = await queue.orphans(held, 2, after)
        pages.append([d.request_id for d in found])
        more.append(after is not None)
        if after is None:
            break
    # page 1: r0, r1 held; page 2: r2, r3 answered (acknowledged here, not handed out); page 3: r4, the orphan
    # then, at most, one more look at the model's last lane (low), which holds nothing
    assert pages[:3] == [[], [], ["r4"]] and not any(pages[3:]), pages
    assert all(more[:2]) and not more[-1], more
    pending: Any = rdb.xpending(broker.stream, keys.GROUP)
    assert pending["pending"] == 3   # r0, r1 (held) and r4 (claimed again); r2, r3 acknowledged
