"""The one process shell every worker runs, whatever its scheduler: it reads nothing itself, but keeps the consumer
group, claims a dead worker's entries (dead-lettering those delivered max_tries times), keeps its own in-flight
entries claimed, sends replies in order, forwards cancels, beats, and drains on stop.

A worker's entries are claimed by another as soon as its heartbeat lapses (HEARTBEAT_TTL_S, then DEAD_AFTER_S of
grace), not after the visibility timeout: a kill -9 costs its callers seconds, well within their deadline. Its
consumer is then removed from the group. The visibility timeout still covers a worker that beats but holds an entry
without refreshing it. Every loop here retries on its own, logs a repeating error once with a count, and recreates
what Redis lost (the group, the model's metadata) where it is used.

Two schedulers plug into it (server/worker/batching.py: dynamic batching; server/worker/continuous.py: continuous
batching for language models). A scheduler reads new work through `queue`, takes reclaimed work from `claimed`,
answers through `send`, and returns from run() once `stopping` is set and what it holds is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from inferline.server.broker import keys
from inferline.server.broker.cancels import Cancels
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.consumer import Delivery, ModelQueue
from inferline.server.broker.registry import Registry
from inferline.server.config import ModelSpec
from inferline.server.logs import RepeatingError
from inferline.server.metrics import WorkerMetrics
from inferline.server.protocol import ModelInfo, Reply, WorkerStatus, now_ms

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# A consumer whose heartbeat is gone is claimed from only if it is still gone this long after first seen so: right
# after Redis comes back from a stall, every heartbeat has lapsed at once and the live ones need a beat to return.
DEAD_AFTER_S = 2.0
# Claims from a dead consumer use this min-idle rather than 0: the first claimer resets the idle time, so a second
# worker claiming at the same moment gets nothing instead of running the request twice.
DEAD_CLAIM_MIN_IDLE_MS = 1000
# Cancels of requests this worker does not hold yet (still queued in Redis) are remembered, the newest this many, so
# the request is dropped when it is read instead of run for nobody.
CANCELLED_KEPT = 10_000


class Scheduler(Protocol):
    cancellable: bool   # True when it holds requests long enough for a cancel to matter

    async def run(self) -> None:
        """Serve until the shell stops; answer what is in hand, then return."""

    async def cancel(self, request_id: str) -> bool:
        """Drop a request whose caller left; True if it was held here."""


def expire(deliveries: Sequence[Delivery]) -> tuple[list[Delivery], list[tuple[Delivery, Reply]]]:
    """(the deliveries still wanted, timeout answers for those past their deadline)."""
    now = now_ms()
    live, late = [], []
    for d in deliveries:
        if d.envelope.deadline_ms > now:
            live.append(d)
        else:
            late.append((d, Reply.error(d.request_id, "timeout", f"request {d.request_id} was not run: its deadline "
                                        "passed while it was queued")))
    return live, late


class Shell:
    def __init__(self, spec: ModelSpec, queue: ModelQueue, registry: Registry, cancels: Cancels, worker_id: str,
                 status: WorkerStatus, info: ModelInfo | None = None, alive_file: Path | None = None) -> None:
        self.spec = spec
        self.info = info                # put back in Redis by the heartbeat when Redis lost it
        self.alive_file = alive_file    # touched every beat, Redis or not: the container's liveness
        self.queue = queue
        self.registry = registry
        self.cancels = cancels
        self.worker_id = worker_id
        self.status = status
        self.stopping = asyncio.Event()
        self.claimed: asyncio.Queue[Delivery] = asyncio.Queue()
        self.inflight: dict[str, Delivery] = {}   # read and not yet answered: kept claimed
        self.send_turn = asyncio.Lock()
        self.send_errors = RepeatingError(log, f"sending replies model={spec.name}", BROKER_ERRORS)
        self.suspects: dict[str, float] = {}   # consumers without a heartbeat -> when first seen so
        # ids cancelled before this worker held them -> when (ms), oldest first. A caller may reuse an id (its own
        # x-request-id): only a request queued before the cancel is dropped.
        self.cancelled: dict[str, int] = {}
        self.metrics = WorkerMetrics(spec.name)   # folded into the model's stats in Redis with each beat

    def stop(self) -> None:
        self.stopping.set()

    def triage(self, deliveries: Sequence[Delivery]) -> tuple[list[Delivery], list[tuple[Delivery, Reply]]]:
        """(the deliveries to run, answers for the rest): past their deadline, or their caller already left."""
        live, answers = expire(deliveries)
        if not self.cancelled:
            return live, answers
        kept = []
        for d in live:
            if self.cancelled.get(d.request_id, -1) >= d.arrived_ms:
                del self.cancelled[d.request_id]
                answers.append((d, Reply.error(d.request_id, "cancelled", "the client went away")))
            else:
                kept.append(d)
        return kept, answers

    async def serve(self, scheduler: Scheduler) -> None:
        """Run the scheduler with the shell's upkeep around it; returns after a drain."""
        await self.queue.ensure_group()
        with contextlib.suppress(Exception):   # beat before the first read: a consumer without one looks dead
            await self.registry.beat(self.spec.name, self.worker_id, self.status, info=self.info)
        upkeep = [asyncio.create_task(self._beat()), asyncio.create_task(self._claims())]
        if scheduler.cancellable:
            upkeep.append(asyncio.create_task(self._cancels(scheduler)))
        try:
            await scheduler.run()
        finally:
            await self.flush()
            for task in upkeep:
                task.cancel()
            for task in upkeep:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):
                await self.registry.add_stats(self.spec.name, self.metrics.pending())   # the last beat's worth
            with contextlib.suppress(Exception):
                await self.registry.remove(self.spec.name, self.worker_id)
            await self.queue.close()

    # replies ---------------------------------------------------------------------------------------------------
    async def send(self, answers: Sequence[tuple[Delivery, Reply]], done: Sequence[Delivery]) -> None:
        """Send answers, then acknowledge and delete `done`. They are written to Redis at once, in the order sent
        (tokens of one step before the next's, replies before acks: ModelQueue.send), and not waited for, so the
        next batch or step runs while Redis answers; a crash before they land redelivers instead of losing. A
        sender waits only while too many sends are unanswered; then senders take turns (a cancel answered from the
        cancel reader while a step answers), none is dropped."""
        async with self.send_turn:
            for d in done:
                self.inflight.pop(d.request_id, None)
            sent = await self.queue.send([(d.envelope.reply_to, r) for d, r in answers], done)
            if sent is not None:
                sent.add_done_callback(self._landed)

    def _landed(self, sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled():
            return
        error = sent.exception()
        if error is None:
            self.send_errors.ok()
        else:   # Redis away: unacked entries are redelivered, nothing is lost
            self.send_errors.failed(error)

    async def flush(self) -> None:
        """Wait until everything sent is in Redis (or failed)."""
        await self.queue.drain()

    # upkeep ----------------------------------------------------------------------------------------------------
    async def _beat(self) -> None:
        errors = RepeatingError(log, f"heartbeat model={self.spec.name}", BROKER_ERRORS)
        while True:
            if self.alive_file is not None:
                with contextlib.suppress(OSError):
                    self.alive_file.touch()
            try:
                stats = self.metrics.pending()
                self.metrics.sample_process(self.status)
                await self.registry.beat(self.spec.name, self.worker_id, self.status, stats, self.info)
                self.metrics.commit(stats)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - a missed beat is retried next time
                errors.failed(exc)
            await asyncio.sleep(keys.HEARTBEAT_EVERY_S)

    async def _claims(self) -> None:
        """Keep in-flight entries claimed (which also recreates a lost group); take over the entries of workers whose
        heartbeat lapsed, and of any idle past the visibility timeout; dead-letter those delivered too many times."""
        every = min(RECLAIM_EVERY_S, max(0.2, self.spec.visibility_timeout_s / 3))
        errors = RepeatingError(log, f"claim upkeep model={self.spec.name}", BROKER_ERRORS)
        while True:
            await asyncio.sleep(every)
            try:
                await self.queue.refresh_claims(list(self.inflight.values()))
                if self.stopping.is_set():
                    continue
                await self._take_over(*await self.queue.reclaim(int(self.spec.visibility_timeout_s * 1000),
                                                                self.spec.max_tries))
                await self._claim_dead()
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - the next round tries again
                errors.failed(exc)

    async def _claim_dead(self) -> None:
        """Claim the entries of consumers whose worker stopped beating, then remove those consumers."""
        others = await self.queue.consumers()
        dead = set(others) - await self.registry.alive(self.spec.name, others)
        now = time.monotonic()
        self.suspects = {c: self.suspects.get(c, now) for c in dead}
        for consumer, since in self.suspects.items():
            if now - since < DEAD_AFTER_S:
                continue
            claimed, exhausted = await self.queue.claim_from(consumer, DEAD_CLAIM_MIN_IDLE_MS, self.spec.max_tries)
            if claimed or exhausted:
                log.warning("worker gone model=%s consumer=%s: claimed %d of its requests", self.spec.name, consumer,
                            len(claimed) + len(exhausted))
            await self._take_over(claimed, exhausted)
            if await self.queue.remove_consumer(consumer):
                log.info("removed consumer model=%s consumer=%s (no heartbeat)", self.spec.name, consumer)

    async def _take_over(self, claimed: list[Delivery], exhausted: list[Delivery]) -> None:
        await self.queue.dead_letter(exhausted, "delivered too many times; its worker died or timed out on it")
        for d in claimed:
            log.warning("reclaimed model=%s id=%s tries=%d", self.spec.name, d.request_id, d.tries)
            self.inflight[d.request_id] = d   # kept claimed while it waits its turn
            self.claimed.put_nowait(d)

    async def _cancels(self, scheduler: Scheduler) -> None:
        errors = RepeatingError(log, f"cancel stream model={self.spec.name}", BROKER_ERRORS)
        while True:
            try:
                for cancel, at_ms in await self.cancels.read(block_s=0.5):
                    held = self.inflight.get(cancel.request_id)
                    if held is None:   # still queued, or another replica's
                        self.cancelled[cancel.request_id] = at_ms
                        if len(self.cancelled) > CANCELLED_KEPT:
                            del self.cancelled[next(iter(self.cancelled))]
                    elif held.arrived_ms <= at_ms and await scheduler.cancel(cancel.request_id):
                        log.info("client gone model=%s id=%s", self.spec.name, cancel.request_id)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - cancels resume when Redis is back
                errors.failed(exc)
                await asyncio.sleep(1.0)
