"""The worker shell's claim rules, against a real Redis and without a model: what the shell hands a scheduler (new
or reclaimed) stays claimed until the scheduler answers it, answering releases that delivery alone, reclaimed work
is handed out once through the port, an entry delivered max_tries times is dead-lettered instead, cancels reach
what is held or are remembered for what is still queued, and a stopping shell takes over nothing more.

The scheduler here is a scripted one that uses the shell's port only (take, take_reclaimed, triage, answer,
stopping), as batching.py and continuous.py do. "Kept claimed" is read from Redis itself: the entry's idle time in
the group's pending list stays under the visibility timeout, and it is still on its first delivery (an entry let
go would be reclaimed, by this very shell, once idle that long).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.cancels import Cancels
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.delivery import Delivery
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.broker.registry import Registry
from inferline.server.config import ModelSpec
from inferline.server.protocol import Cancel, Envelope, Reply, WorkerStatus, now_ms, unpack_replies
from inferline.server.worker.batcher import collect
from inferline.server.worker.shell import Shell

MODEL = "shelltest"
ME = "worker-me"
GHOST = "worker-ghost"   # a consumer with no heartbeat: a worker that died holding entries
REPLIES = keys.reply_stream("gw-shelltest")
STREAM = keys.request_stream(MODEL)
VISIBILITY_S = 0.6       # the shell refreshes its claims every 0.2 s, and reclaims what idles 0.6 s
VISIBILITY_MS = int(VISIBILITY_S * 1000)


class Scripted:
    """A scheduler the test drives from outside: it holds nothing of its own, and on stop it stays `drain_s` in
    run() (a scheduler finishing its last work) before returning."""

    def __init__(self, shell: Shell, cancellable: bool = False, drain_s: float = 0.0) -> None:
        self.shell = shell
        self.cancellable = cancellable
        self.drain_s = drain_s
        self.cancelled: list[str] = []

    async def run(self) -> None:
        while not self.shell.stopping:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.drain_s)

    async def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True


class Harness:
    def __init__(self, client: aioredis.Redis, shell: Shell, scheduler: Scripted, served: asyncio.Task[None]) -> None:
        self.client = client
        self.shell = shell
        self.scheduler = scheduler
        self.served = served

    async def enqueue(self, request_id: str, deadline_ms: int | None = None) -> None:
        deadline = now_ms() + 60_000 if deadline_ms is None else deadline_ms
        depth = await Enqueuer(self.client).enqueue(MODEL, Envelope(request_id, REPLIES, deadline, "v2"),
                                                    b"payload", 100, 600_000)
        assert depth >= 0

    async def take(self, n: int) -> list[Delivery]:
        """Exactly n new deliveries (they were queued before: the first read finds them)."""
        got: list[Delivery] = []
        while len(got) < n:
            got += await self.shell.take(n - len(got), 1.0)
        return got

    async def pending(self) -> dict[bytes, dict[str, Any]]:
        """The group's pending entries: entry id -> consumer, idle ms, deliveries."""
        rows: Any = await self.client.xpending_range(STREAM, keys.GROUP, min="-", max="+", count=100)
        return {r["message_id"]: {"consumer": r["consumer"].decode(), "idle_ms": r["time_since_delivered"],
                                  "tries": r["times_delivered"]} for r in rows}

    async def replies(self) -> list[Reply]:
        entries: Any = await self.client.xrange(REPLIES)
        return [r for _, fields in entries for r in unpack_replies(fields.get(b"pack", b""))]

    async def ghost_reads(self) -> list[Delivery]:
        """The queued entries, read by a consumer that then dies holding them (it never beats, never answers)."""
        ghost = ModelQueue(self.client, MODEL, GHOST)
        try:
            return await ghost.read(10, None)
        finally:
            await ghost.close()

    async def answer(self, d: Delivery, body: bytes = b"{}") -> None:
        await self.shell.answer([(d, Reply(d.request_id, body))], [d])
        await self.shell.flush()


@contextlib.asynccontextmanager
async def serving(redis_url: str, cancellable: bool = False, drain_s: float = 0.0,
                  **spec: Any) -> AsyncIterator[Harness]:
    """A shell serving a Scripted scheduler on a clean model stream; stopped (and waited for) on exit."""
    client = connect(redis_url)
    queue = ModelQueue(client, MODEL, ME)
    await queue.ensure_group()
    model = ModelSpec(name=MODEL, visibility_timeout_s=VISIBILITY_S, **spec)
    status = WorkerStatus(os.getpid(), "test", "cpu", "1", int(time.time()))
    shell = Shell(model, queue, Registry(client), Cancels(client, MODEL), ME, status)
    scheduler = Scripted(shell, cancellable, drain_s)
    served = asyncio.create_task(shell.serve(scheduler))
    try:
        yield Harness(client, shell, scheduler, served)
    finally:
        shell.stop()
        await asyncio.wait_for(served, 10)
        await client.aclose()


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def test_an_entry_taken_stays_claimed_until_answered(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> None:
        async with serving(redis_url) as h:
            await h.enqueue("a")
            [d] = await h.take(1)
            await asyncio.sleep(3 * VISIBILITY_S)   # three times what an unclaimed entry may idle
            [held] = (await h.pending()).values()
            assert held["consumer"] == ME and held["tries"] == 1 and held["idle_ms"] < VISIBILITY_MS, held
            assert h.shell.take_reclaimed() == []   # not taken over again, not even by this shell

            await h.answer(d, b'{"ok": 1}')
            assert await h.pending() == {}
            assert await h.client.xlen(STREAM) == 0   # acknowledged and deleted
            assert [(r.request_id, r.body) for r in await h.replies()] == [("a", b'{"ok": 1}')]

    asyncio.run(run())


def test_answering_releases_that_delivery_alone_and_once(redis_url: str, rdb: redis.Redis) -> None:
    """A caller may reuse its request id while its first request is held: answering one leaves the other claimed,
    and answering the same delivery again releases nothing more."""
    async def run() -> None:
        async with serving(redis_url) as h:
            for rid in ("dup", "dup", "other"):
                await h.enqueue(rid)
            first, second, other = await h.take(3)
            assert (first.request_id, second.request_id) == ("dup", "dup")

            await h.answer(first)
            await h.answer(first)   # a second answer of the same delivery
            await asyncio.sleep(3 * VISIBILITY_S)
            pending = await h.pending()
            assert set(pending) == {second.entry_id, other.entry_id}
            assert all(p["consumer"] == ME and p["tries"] == 1 and p["idle_ms"] < VISIBILITY_MS
                       for p in pending.values()), pending
            assert h.shell.take_reclaimed() == []

            await h.shell.answer([(second, Reply("dup", b"{}")), (other, Reply("other", b"{}"))], [second, other])
            await h.shell.flush()
            assert await h.pending() == {}

    asyncio.run(run())


def test_a_dead_workers_entry_is_handed_out_once_and_stays_claimed(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> None:
        async with serving(redis_url) as h:
            await h.enqueue("orphan")
            [read] = await h.ghost_reads()

            [d] = await until(h.shell.take_reclaimed, 5 * VISIBILITY_S + 3, "a reclaimed delivery")
            assert (d.request_id, d.entry_id, d.tries) == ("orphan", read.entry_id, 2)
            assert h.shell.take_reclaimed() == []   # handed out once

            await asyncio.sleep(3 * VISIBILITY_S)   # held from the take-over on, not only once taken
            [held] = (await h.pending()).values()
            assert held["consumer"] == ME and held["tries"] == 2 and held["idle_ms"] < VISIBILITY_MS, held
            assert h.shell.take_reclaimed() == []

            await h.answer(d)
            assert await h.pending() == {}

    asyncio.run(run())


def test_an_entry_delivered_max_tries_times_is_dead_lettered_not_handed_out(redis_url: str,
                                                                              rdb: redis.Redis) -> None:
    async def run() -> None:
        async with serving(redis_url, max_tries=1) as h:
            await h.enqueue("poison")
            await h.ghost_reads()   # its one delivery: the ghost died on it

            dead_letters = keys.dead_letter_stream(MODEL)
            [(_, fields)] = await until(lambda: h.client.xrange(dead_letters), 5 * VISIBILITY_S + 3,
                                        "a dead letter")
            assert fields[b"id"] == b"poison"
            assert h.shell.take_reclaimed() == []
            assert await h.pending() == {}
            [reply] = await h.replies()
            assert (reply.request_id, reply.error_type) == ("poison", "dead_letter")

    asyncio.run(run())


def test_cancels_reach_what_is_held_and_drop_what_is_still_queued(redis_url: str, rdb: redis.Redis) -> None:
    async def run() -> None:
        async with serving(redis_url, cancellable=True) as h:
            cancels = Cancels(h.client, MODEL)
            await h.enqueue("held")
            [held] = await h.take(1)

            async def seen() -> bool:   # published again until the shell's cancel reader, starting up, sees one
                await cancels.publish(Cancel("held"))
                await asyncio.sleep(0.2)
                return bool(h.scheduler.cancelled)

            await until(seen, 10, "the cancel of a held request reaching the scheduler")
            assert set(h.scheduler.cancelled) == {"held"}

            await h.enqueue("queued")
            await cancels.publish(Cancel("queued"))   # its caller left before any worker read it
            await cancels.publish(Cancel("later"))    # a cancel older than the request that reuses its id
            await asyncio.sleep(0.01)                 # a later millisecond on Redis's clock
            await h.enqueue("later")
            await h.enqueue("late", deadline_ms=now_ms() - 1)
            await asyncio.sleep(1.0)   # the reader, live and blocked on its stream, sees them at once
            deliveries = await h.take(3)
            live, answers = h.shell.triage(deliveries)
            assert [d.request_id for d in live] == ["later"]
            assert sorted((d.request_id, r.error_type) for d, r in answers) == [("late", "timeout"),
                                                                                ("queued", "cancelled")]
            assert h.scheduler.cancelled.count("queued") == 0   # not held: remembered, not forwarded

            await h.shell.answer(answers, [d for d, _ in answers])
            await h.shell.flush()
            assert set(await h.pending()) == {held.entry_id, live[0].entry_id}   # answered ones released

    asyncio.run(run())


def test_a_stopping_shell_takes_over_nothing_and_leaves_unanswered_work_pending(redis_url: str,
                                                                                 rdb: redis.Redis) -> None:
    async def run() -> None:
        drain_s = 4 * VISIBILITY_S
        async with serving(redis_url, drain_s=drain_s) as h:
            for rid in ("held", "orphan"):
                await h.enqueue(rid)
            [held] = await h.take(1)
            [orphan] = await h.ghost_reads()
            assert not h.shell.stopping
            h.shell.stop()
            assert h.shell.stopping

            await asyncio.sleep(drain_s - VISIBILITY_S)   # the scheduler is still draining
            pending = await h.pending()
            assert pending[orphan.entry_id]["consumer"] == GHOST and pending[orphan.entry_id]["tries"] == 1
            assert pending[held.entry_id]["idle_ms"] < VISIBILITY_MS   # what it holds is still kept claimed
            assert h.shell.take_reclaimed() == []
            assert not h.served.done()   # serve() waits for the scheduler's drain

            await asyncio.wait_for(h.served, 10)
            pending = await h.pending()
            assert pending[held.entry_id]["consumer"] == ME   # never answered: left for another worker to claim
            assert await Registry(h.client).alive(MODEL, [ME]) == set()   # its heartbeat is gone at once

    asyncio.run(run())


def test_a_batch_whose_later_read_fails_keeps_what_it_took(tmp_path: Path) -> None:
    """Dynamic batching reads a batch in several takes; Redis dies (kill -9) after the first. What the first took is
    held, so it must come back as the batch to run and answer: dropped with the error, it stayed claimed by this live
    worker and was never run (lost under a failover). The error comes back at the next read."""
    from tests.faults import PrivateRedis

    private = PrivateRedis(tmp_path / "redis")
    private.start()

    async def run() -> tuple[list[str], list[str]]:
        async with serving(private.tcp_url) as h:
            for rid in ("a", "b"):
                await h.enqueue(rid)

            async def take(count: int, block_s: float | None) -> list[Delivery]:
                got = await h.shell.take(count, block_s)
                if got:
                    private.kill()   # between the batch's first read and the next
                return got

            batch = await collect(take, 8, 1.0, busy=True)
            try:
                await h.shell.take(8, None)
                again = "read"
            except Exception as exc:  # noqa: BLE001 - whichever connection error the client raises
                again = type(exc).__name__
            return [d.request_id for d in batch], [again]

    try:
        taken, again = asyncio.run(run())
    finally:
        private.stop()
    assert taken == ["a", "b"]
    assert again != ["read"]
