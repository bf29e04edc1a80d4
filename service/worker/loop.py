"""The batch loop of a classic-model worker: read -> expire -> execute -> reply -> ack; reclaim work
left pending by dead workers; dead-letter what keeps failing; drain on stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from service.broker.streams import Delivery, ModelQueue
from service.config import ModelSpec
from service.protocol import Reply, now_ms
from service.worker.batcher import Traffic, collect
from service.worker.execute import Executor
from service.worker.heartbeat import WorkerStats
from service.worker.model_thread import ModelThread

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# Lone requests (traffic not busy) of a model that answers them this fast run on the event loop's thread:
# waking the model thread and being woken back cost ~0.3 ms of a ~1.7 ms round trip at concurrency 1 here,
# and with nothing else in flight there is nothing to overlap. Slower models keep the loop free for heartbeats.
INLINE_UNDER_S = 0.005


def expired_reply(d: Delivery) -> Reply:
    return Reply.error(d.request_id, 504, "timeout", f"request {d.request_id} was not run: its deadline passed while "
                       "queued")


class BatchLoop:
    def __init__(self, spec: ModelSpec, queue: ModelQueue, executor: Executor, stats: WorkerStats) -> None:
        self.spec = spec
        self.queue = queue
        self.executor = executor
        self.stats = stats
        self.traffic = Traffic(spec.max_batch_size)
        self.stopping = asyncio.Event()
        self.last_reclaim = 0.0
        self.model_thread = ModelThread()
        self.sending: asyncio.Task[None] | None = None
        self.quick = False   # the last lone batch ran under INLINE_UNDER_S

    async def serve(self) -> None:
        """Run until stop() is called; the batches in hand are finished and acknowledged before returning.

        Three things overlap so the model never waits on Redis: the next batch is read while this one runs,
        and this batch's replies are sent while the next one runs (one send at a time, in order)."""
        await self.queue.ensure_group()
        reading = asyncio.create_task(self.next_batch())
        try:
            while True:
                claimed, batch = await reading
                stopping = self.stopping.is_set()
                if not stopping:
                    reading = asyncio.create_task(self.next_batch())
                for d in claimed:   # each alone: one of them may be the poison that killed its last worker
                    await self.process([d], record=False)
                if batch:
                    await self.process(batch)
                if stopping:
                    break
        finally:
            await self.sent()

    async def next_batch(self) -> tuple[list[Delivery], list[Delivery]]:
        """(reclaimed deliveries, a new batch). Never raises: Redis away or a bug is logged and backed off."""
        try:
            claimed = await self.reclaim_stale() if time.monotonic() - self.last_reclaim >= RECLAIM_EVERY_S else []
            batch = await collect(self.queue, self.spec.max_batch_size, self.spec.max_batch_delay_ms / 1000,
                                  self.traffic.busy, idle_block_s=0.5)
            return claimed, batch
        except asyncio.CancelledError:
            raise
        except Exception:   # noqa: BLE001 - nothing was acked: what was read is redelivered
            log.exception("worker loop error model=%s", self.spec.name)
            await asyncio.sleep(1.0)
            return [], []

    async def sent(self) -> None:
        """Wait until the previous batch's replies and acks are in Redis."""
        if self.sending is not None:
            try:
                await self.sending
            except Exception:   # noqa: BLE001 - Redis away: unacked entries are redelivered, nothing is lost
                log.exception("sending replies failed model=%s", self.spec.name)
            self.sending = None

    def stop(self) -> None:
        self.stopping.set()

    async def process(self, batch: Sequence[Delivery], record: bool = True) -> None:
        deadline = now_ms()
        stale = [d for d in batch if d.envelope.deadline_ms <= deadline]
        live = [d for d in batch if d not in stale]
        replies = [(d.envelope.reply_to, expired_reply(d)) for d in stale]
        if live:
            started = time.perf_counter()
            if self.traffic.busy or not self.quick:
                answers = await self.model_thread.run(self.executor.run, live)
            else:   # a lone, quick batch: the hand-off to the model thread and back would cost more (~0.3 ms)
                answers = self.executor.run(live)
            replies += [(d.envelope.reply_to, r) for d, r in zip(live, answers, strict=True)]
            if not self.traffic.busy:
                self.quick = time.perf_counter() - started < INLINE_UNDER_S
            if record:
                self.traffic.record(len(live))
            self.stats.record_batch(len(live))
            log.debug("batch model=%s size=%d ms=%.1f", self.spec.name, len(live),
                      (time.perf_counter() - started) * 1e3)
        await self.sent()   # replies before acks, batch after batch: a crash in between redelivers
        self.sending = asyncio.create_task(self.queue.reply_and_ack(replies, batch))

    async def reclaim_stale(self) -> list[Delivery]:
        """Claim entries pending past the visibility timeout (their worker died or hung); dead-letter those
        delivered too many times. Returns the claimed ones, to be run one at a time."""
        self.last_reclaim = time.monotonic()
        claimed, exhausted = await self.queue.reclaim(int(self.spec.visibility_timeout_s * 1000), self.spec.max_tries)
        await self.queue.dead_letter(exhausted, "delivered too many times; the worker died or timed out on it")
        for d in claimed:
            log.warning("reclaimed model=%s id=%s tries=%d", self.spec.name, d.request_id, d.tries)
        return claimed
