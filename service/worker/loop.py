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


def expired_reply(d: Delivery) -> Reply:
    why = "its payload expired" if d.payload is None else "its deadline passed"
    return Reply.error(d.request_id, 504, "timeout", f"request {d.request_id} was not run: {why} while queued")


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

    async def serve(self) -> None:
        """Run until stop() is called; the batch in hand is finished and acknowledged before returning."""
        await self.queue.ensure_group()
        while not self.stopping.is_set():
            try:
                if time.monotonic() - self.last_reclaim >= RECLAIM_EVERY_S:
                    await self.reclaim_stale()
                batch = await collect(self.queue, self.spec.max_batch_size, self.spec.max_batch_delay_ms / 1000,
                                      self.traffic.busy, idle_block_s=0.5)
                if batch:
                    await self.process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:   # Redis went away or a bug: log, back off, carry on; nothing is acked
                log.exception("worker loop error model=%s", self.spec.name)
                await asyncio.sleep(1.0)

    def stop(self) -> None:
        self.stopping.set()

    async def process(self, batch: Sequence[Delivery], record: bool = True) -> None:
        deadline = now_ms()
        stale = [d for d in batch if d.payload is None or d.envelope.deadline_ms <= deadline]
        live = [d for d in batch if d not in stale]
        replies = [(d.envelope.reply_to, expired_reply(d)) for d in stale]
        if live:
            started = time.perf_counter()
            answers = await self.model_thread.run(self.executor.run, live)
            replies += [(d.envelope.reply_to, r) for d, r in zip(live, answers, strict=True)]
            if record:
                self.traffic.record(len(live))
            self.stats.record_batch(len(live))
            log.debug("batch model=%s size=%d ms=%.1f", self.spec.name, len(live),
                      (time.perf_counter() - started) * 1e3)
        await self.queue.reply_and_ack(replies, batch)   # replies before acks: a crash in between redelivers

    async def reclaim_stale(self) -> None:
        """Claim entries pending past the visibility timeout. Each is run alone: one of them may be the
        poison that killed its last worker, and it must not take its batch-mates down again."""
        self.last_reclaim = time.monotonic()
        claimed, exhausted = await self.queue.reclaim(int(self.spec.visibility_timeout_s * 1000), self.spec.max_tries)
        await self.queue.dead_letter(exhausted, "delivered too many times; the worker died or timed out on it")
        for d in claimed:
            log.warning("reclaimed model=%s id=%s tries=%d", self.spec.name, d.request_id, d.tries)
            await self.process([d], record=False)
