"""Durable enqueue's parts against a real Redis (each server found: tests/conftest.py ACROSS_SERVERS): the gateway's
one WAIT per tick of enqueues and what a too-short WAIT answers, and the worker's de-duplication of an entry a
failover delivers again. The failover itself, under load, is tests/test_failover.py."""

from __future__ import annotations

import asyncio
import time
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


def test_a_tick_of_enqueues_waits_once_and_fails_when_no_replica_has_it(redis_url: str, rdb: redis.Redis) -> None:
    """min_replicas 1 on a Redis without a replica: the tick's 8 enqueues and a plain command share one round trip
    ending with one WAIT; each enqueue fails NotReplicated after the WAIT's timeout (its entry is queued all the
    same), the plain command gets its own answer."""
    async def run() -> tuple[list[Any], int, float]:
        client = connect(redis_url)
        batcher = TickBatcher(client, min_replicas=1, replica_timeout_ms=150)
        enqueuer = Enqueuer(client, batcher)
        try:
            begun = time.monotonic()
            results = await asyncio.gather(*[enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000) for i in range(8)],
                                           batcher.command("SET", "plain", "v"), return_exceptions=True)
            return results, batcher.pipelines, time.monotonic() - begun
        finally:
            await client.aclose()

    results, pipelines, took = asyncio.run(run())
    assert pipelines == 1
    assert all(isinstance(r, NotReplicated) and r.acked == 0 and r.wanted == 1 for r in results[:8]), results
    assert results[8] == b"OK"
    assert 0.14 < took < 1.5
    assert rdb.xlen(keys.request_stream(MODEL)) == 8


def test_without_min_replicas_nothing_waits(redis_url: str, rdb: redis.Redis) -> None:
    """The default: no WAIT is sent (MONITOR would show it; the timing does too: no replica, no 150 ms wait)."""
    async def run() -> tuple[list[int], float]:
        client = connect(redis_url)
        enqueuer = Enqueuer(client, TickBatcher(client, min_replicas=0, replica_timeout_ms=150))
        try:
            begun = time.monotonic()
            depths = await asyncio.gather(*[enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000) for i in range(4)])
            return sorted(depths), time.monotonic() - begun
        finally:
            await client.aclose()

    depths, took = asyncio.run(run())
    assert depths == [0, 1, 2, 3] and took < 0.14


def test_the_wait_must_come_before_the_socket_timeout() -> None:
    with pytest.raises(ValueError, match="replica_ack_timeout_s"):
        BrokerSettings(timeout_s=2.0, replica_ack_timeout_s=1.5)
    assert BrokerSettings(min_replicas_ack=1).replica_ack_timeout_ms == 500


def test_an_entry_answered_before_a_failover_is_acknowledged_not_run_again(redis_url: str, rdb: redis.Redis) -> None:
    """Worker A answers two entries in durable mode (their ids recorded before the ack). Then the state a failover
    leaves when the ack did not reach the replica: the same entries back on the stream, one pending on A (A's read
    was replicated), one never read. Worker B reads and reclaims: both are acknowledged and deleted without being
    handed out; a third, new entry is handed out as usual. Without durable mode nothing is checked."""
    stream = keys.request_stream(MODEL)

    async def run() -> tuple[list[str], list[str], int, list[str]]:
        client = connect(redis_url)
        a = ModelQueue(client, MODEL, "A", durable=DURABLE)
        b = ModelQueue(client, MODEL, "B", durable=DURABLE)
        plain = ModelQueue(client, MODEL, "C")
        enqueuer = Enqueuer(client)
        try:
            await a.ensure_group()
            for i in range(2):
                await enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000)
            taken = await a.read(10, None)
            entries: Any = await client.xrange(stream)
            await a.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in taken], taken)
            assert await client.xlen(stream) == 0 and await client.zcard(keys.answered(MODEL)) == 2
            # what the promoted replica holds: both entries, the first pending on A, the answered ids
            await restore(client, entries)
            first = await client.xreadgroup(keys.GROUP, "A", {stream: ">"}, count=1)
            assert len(first[0][1]) == 1
            await enqueuer.enqueue(MODEL, envelope(2), b"x", 100, 60_000)
            fresh = await b.read(10, None)
            claimed, _ = await b.claim_from("A", 0, 3)
            # without durable mode the same state would hand the entry out again
            await restore(client, entries[:1])
            again = await plain.read(10, None)
            return ([d.request_id for d in taken], [d.request_id for d in fresh + claimed], b.skipped,
                    [d.request_id for d in again])
        finally:
            await a.close()
            await b.close()
            await plain.close()
            await enqueuer.batcher.close()
            await client.aclose()

    rdb.delete(stream, keys.answered(MODEL))
    answered, handed_out, skipped, plain = asyncio.run(run())
    assert answered == ["r0", "r1"]
    assert handed_out == ["r2"] and skipped == 2
    assert plain == ["r0"]
    pending: Any = rdb.xpending(stream, keys.GROUP)
    assert pending["pending"] == 1 and rdb.xlen(stream) == 1   # the plain read's r0 on C


async def restore(client: Any, entries: list[Any]) -> None:
    """The request stream as a replica that missed the last acks holds it: these entries, the group from 0."""
    stream = keys.request_stream(MODEL)
    await client.delete(stream)
    for entry_id, fields in entries:
        await client.xadd(stream, fields, id=entry_id)
    await client.xgroup_create(stream, keys.GROUP, id="0")


def test_answered_ids_are_trimmed_to_the_models_timeout(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> int:
        client = connect(redis_url)
        queue = ModelQueue(client, MODEL, "A", durable=Durable(0, 100, keep_ms=50))
        enqueuer = Enqueuer(client)
        try:
            await queue.ensure_group()
            for i in range(2):
                await enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000)
                taken = await queue.read(1, None)
                await queue.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in taken], taken)
                await asyncio.sleep(0.1)
            return int(await client.zcard(keys.answered(MODEL)))
        finally:
            await queue.close()
            await enqueuer.batcher.close()
            await client.aclose()

    rdb.delete(keys.request_stream(MODEL), keys.answered(MODEL))
    assert asyncio.run(run()) == 1   # the first id was older than keep_ms when the second was recorded


def test_orphans_are_looked_for_page_by_page_past_held_and_answered_ones(redis_url: str, rdb: redis.Redis) -> None:
    """What a failover leaves pending on a live worker's consumer: entries it still holds, entries it answered (their
    ids recorded, their acks lost) and one it never got the answer of. A page of `count` that yields nothing (all
    held or answered) still says the list goes on, and the next page, after its last id, finds the orphan."""
    stream = keys.request_stream(MODEL)

    async def run() -> tuple[list[list[str]], list[bool]]:
        client = connect(redis_url)
        queue = ModelQueue(client, MODEL, "A", durable=DURABLE)
        enqueuer = Enqueuer(client)
        try:
            await queue.ensure_group()
            for i in range(5):
                await enqueuer.enqueue(MODEL, envelope(i), b"x", 100, 60_000)
            taken = await queue.read(10, None)
            answered = taken[2:4]
            entries: Any = await client.xrange(stream)
            await queue.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in answered],
                                      answered)
            # the promoted replica: all five back, all pending on A (its read replicated, the acks not)
            await restore(client, entries)
            await client.xreadgroup(keys.GROUP, "A", {stream: ">"}, count=10)
            held = {d.entry_id for d in taken[:2]}
            pages, more = [], []
            after: OrphanPosition = None
            for _ in range(4):
                found, after = await queue.orphans(held, 2, after)
                pages.append([d.request_id for d in found])
                more.append(after is not None)
                if after is None:
                    break
            return pages, more
        finally:
            await queue.close()
            await enqueuer.batcher.close()
            await client.aclose()

    rdb.delete(stream, keys.answered(MODEL))
    pages, more = asyncio.run(run())
    # page 1: r0, r1 held; page 2: r2, r3 answered (acknowledged here, not handed out); page 3: r4, the orphan
    # then, at most, one more look at the model's last lane (low), which holds nothing
    assert pages[:3] == [[], [], ["r4"]] and not any(pages[3:]), pages
    assert all(more[:2]) and not more[-1], more
    pending: Any = rdb.xpending(stream, keys.GROUP)
    assert pending["pending"] == 3   # r0, r1 (held) and r4 (claimed again); r2, r3 acknowledged
