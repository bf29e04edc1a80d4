"""The one process shell every worker runs, whatever its scheduler: it reads nothing itself, but keeps the consumer
group, claims a dead worker's entries after the visibility timeout (dead-lettering those delivered max_tries times),
keeps its own in-flight entries claimed, sends replies in order, forwards cancels, beats, and drains on stop.

Two schedulers plug into it (service/worker/batching.py: dynamic batching; service/worker/continuous.py: continuous
batching for language models). A scheduler reads new work through `queue`, takes reclaimed work from `claimed`,
answers through `send`, and returns from run() once `stopping` is set and what it holds is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from service.broker import keys
from service.broker.registry import Registry
from service.broker.streams import Cancels, Delivery, ModelQueue
from service.config import ModelSpec
from service.logs import RepeatingError
from service.metrics import WorkerMetrics
from service.protocol import Reply, WorkerStatus, now_ms

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0


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
                 status: WorkerStatus) -> None:
        self.spec = spec
        self.queue = queue
        self.registry = registry
        self.cancels = cancels
        self.worker_id = worker_id
        self.status = status
        self.stopping = asyncio.Event()
        self.claimed: asyncio.Queue[Delivery] = asyncio.Queue()
        self.inflight: dict[str, Delivery] = {}   # read and not yet answered: kept claimed
        self.sending: asyncio.Task[None] | None = None
        self.metrics = WorkerMetrics(spec.name)   # folded into the model's stats in Redis with each beat

    def stop(self) -> None:
        self.stopping.set()

    async def serve(self, scheduler: Scheduler) -> None:
        """Run the scheduler with the shell's upkeep around it; returns after a drain."""
        await self.queue.ensure_group()
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

    # replies ---------------------------------------------------------------------------------------------------
    async def send(self, answers: Sequence[tuple[Delivery, Reply]], done: Sequence[Delivery]) -> None:
        """Send answers, then acknowledge and delete `done`, after the previous send (order kept: tokens of one
        step before the next's, replies before acks). Returns once the send is started, so it overlaps the next
        batch or step; a crash before it lands redelivers instead of losing."""
        await self.flush()
        for d in done:
            self.inflight.pop(d.request_id, None)
        if answers or done:
            self.sending = asyncio.create_task(
                self.queue.reply_and_ack([(d.envelope.reply_to, r) for d, r in answers], done))

    async def flush(self) -> None:
        """Wait until the previous send is in Redis."""
        if self.sending is not None:
            try:
                await self.sending
            except Exception as exc:   # noqa: BLE001 - Redis away: unacked entries are redelivered, nothing is lost
                log.warning("sending replies failed model=%s: %s", self.spec.name, exc)
            self.sending = None

    # upkeep ----------------------------------------------------------------------------------------------------
    async def _beat(self) -> None:
        errors = RepeatingError(log, f"heartbeat model={self.spec.name}")
        while True:
            try:
                stats = self.metrics.pending()
                self.metrics.sample_process(self.status)
                await self.registry.beat(self.spec.name, self.worker_id, self.status, stats)
                self.metrics.commit(stats)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - a missed beat is retried next time
                errors.failed(exc)
            await asyncio.sleep(keys.HEARTBEAT_EVERY_S)

    async def _claims(self) -> None:
        """Keep in-flight entries claimed; take over entries idle past the visibility timeout (their worker died
        or hung) and dead-letter those delivered too many times."""
        every = min(RECLAIM_EVERY_S, max(0.2, self.spec.visibility_timeout_s / 3))
        errors = RepeatingError(log, f"claim upkeep model={self.spec.name}")
        while True:
            await asyncio.sleep(every)
            try:
                await self.queue.refresh_claims(list(self.inflight.values()))
                if self.stopping.is_set():
                    continue
                claimed, exhausted = await self.queue.reclaim(int(self.spec.visibility_timeout_s * 1000),
                                                              self.spec.max_tries)
                await self.queue.dead_letter(exhausted, "delivered too many times; its worker died or timed out "
                                                        "on it")
                for d in claimed:
                    log.warning("reclaimed model=%s id=%s tries=%d", self.spec.name, d.request_id, d.tries)
                    self.inflight[d.request_id] = d   # kept claimed while it waits its turn
                    self.claimed.put_nowait(d)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - the next round tries again
                errors.failed(exc)

    async def _cancels(self, scheduler: Scheduler) -> None:
        errors = RepeatingError(log, f"cancel stream model={self.spec.name}")
        while True:
            try:
                for cancel in await self.cancels.read(block_s=0.5):
                    if cancel.request_id in self.inflight and await scheduler.cancel(cancel.request_id):
                        log.info("client gone model=%s id=%s", self.spec.name, cancel.request_id)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - cancels resume when Redis is back
                errors.failed(exc)
                await asyncio.sleep(1.0)
