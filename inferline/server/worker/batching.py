"""Dynamic batching, the scheduler of every Model that is not a language model: read -> expire -> decode -> predict
once for the batch -> answer -> acknowledge, with reclaimed work run one request at a time (one of them may be the
poison that killed its last worker).

Three things overlap so the model never waits on Redis: the next batch is read while this one runs, and this
batch's answers are sent while the next one runs (the shell keeps sends in order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from inferline.server import tracing
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.delivery import Delivery
from inferline.server.errors import InferlineError, InputError
from inferline.server.logs import RepeatingError
from inferline.server.model import Model
from inferline.server.protocol import Reply
from inferline.server.worker import memory
from inferline.server.worker.batcher import Traffic, collect
from inferline.server.worker.model_thread import ModelThread
from inferline.server.worker.rows import Item, RowCodec
from inferline.server.worker.shell import Shell, expire
from inferline.server.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

# Batches of a model that answers them this fast run on the event loop's thread: waking the model thread and being
# woken back cost ~0.3 ms of a ~1.7 ms round trip at concurrency 1, and under load that hand-off (a futex and a
# self-pipe write each way) showed as ~22 µs per request of a no-op model's. The next batch's read is sent before
# such a batch runs, so Redis answers it meanwhile. A batch expected to take longer runs on the model thread: there
# the next batch's window fills while this one runs, and the loop stays free for heartbeats and claim refreshes.
# The estimate is per row, not per request: one v2 request may carry MAX_ROWS rows, and counting it as one (as this
# did) ran a 40,000-row lstm request on the loop until its heartbeat lapsed and it reclaimed and ran its own entry.
INLINE_UNDER_S = 0.005
# Decoding a batch whose payloads are bigger than this goes to the model thread too (parsing ~1 MB of JSON takes
# milliseconds); smaller ones are decoded on the loop, where their rows are counted for the estimate above.
INLINE_DECODE_BYTES = 64 * 1024


class Executor:
    """Runs one batch of deliveries through a Model: decode each (a bad one fails alone), one predict for every row
    of the batch, encode each answer. Synchronous: the scheduler calls it on the model thread."""

    def __init__(self, model: Model, codec: RowCodec, name: str) -> None:
        self.model = model
        self.codec = codec
        self.name = name

    def run(self, deliveries: Sequence[Delivery]) -> list[Reply]:
        """One reply per delivery, in order. Never raises: a failure becomes that request's error reply."""
        items, failed = self.decode(deliveries)
        return self.finish(deliveries, items, failed)

    def decode(self, deliveries: Sequence[Delivery]) -> tuple[list[Item], dict[str, Reply]]:
        """The deliveries' rows, and an error reply for each one that does not decode. Never raises."""
        replies: dict[str, Reply] = {}
        items: list[Item] = []
        for d in deliveries:
            try:
                items.append(self.codec.decode(d))
            except InferlineError as exc:
                replies[d.request_id] = Reply.error(d.request_id, exc)
            except Exception:
                log.exception("decode failed model=%s id=%s", self.name, d.request_id)
                replies[d.request_id] = Reply.error(d.request_id, InferlineError(
                    "the worker could not decode this request"))
        return items, replies

    def finish(self, deliveries: Sequence[Delivery], items: list[Item], failed: dict[str, Reply]) -> list[Reply]:
        """Predict the decoded items (one model call for all their rows) and answer: one reply per delivery."""
        replies = dict(failed)
        if items:
            for item, reply in zip(items, self.predict(items), strict=True):
                replies[item.delivery.request_id] = reply
        return [replies[d.request_id] for d in deliveries]

    def predict(self, items: list[Item]) -> list[Reply]:
        rows = [row for item in items for row in item.rows]
        try:
            outputs = self.model.predict(rows)
            if len(outputs) != len(rows):
                raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(rows)} rows")
        except Exception as exc:
            if len(items) > 1:   # find the request that breaks the model; its batch-mates still get answers
                log.warning("batch failed model=%s size=%d; retrying requests one by one", self.name, len(items))
                return [r for item in items for r in self.predict([item])]
            rid = items[0].delivery.request_id
            if isinstance(exc, InputError):
                return [Reply.error(rid, exc)]
            log.exception("predict failed model=%s id=%s", self.name, rid)
            return [Reply.error(rid, InferlineError(f"model {self.name} failed on request {rid}"))]
        replies, start = [], 0
        for item in items:
            part = outputs[start:start + len(item.rows)]
            start += len(item.rows)
            replies.append(self.encode(item, part))
        return replies

    def encode(self, item: Item, outputs: list[object]) -> Reply:
        rid = item.delivery.request_id
        try:
            return Reply(rid, self.codec.answer(item, outputs))
        except InferlineError as exc:
            return Reply.error(rid, exc)
        except Exception:
            log.exception("encoding the answer failed model=%s id=%s", self.name, rid)
            return Reply.error(rid, InferlineError(
                f"model {self.name} could not encode the answer to {rid}"))


class DynamicBatching:
    cancellable = False   # a batch is answered within one model call: nothing to drop mid-way

    def __init__(self, shell: Shell, executor: Executor, max_batch_size: int, max_batch_delay_ms: float,
                 watchdog: Watchdog) -> None:
        self.shell = shell
        self.executor = executor
        self.watchdog = watchdog   # times every batch, inline or not: a hung one fails with 504 and the worker leaves
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_batch_delay_ms / 1000
        self.traffic = Traffic(max_batch_size)
        self.model_thread = ModelThread()
        self.row_s = float("inf")   # the last batch's time per row (none yet: the model thread)
        self.errors = RepeatingError(log, f"reading model={shell.name}", BROKER_ERRORS)

    async def run(self) -> None:
        reading = asyncio.create_task(self.next_batch())
        while True:
            batch = await reading
            stopping = self.shell.stopping
            if not stopping:
                reading = asyncio.create_task(self.next_batch())
            while reclaimed := self.shell.take_reclaimed():   # until none is left, as new ones may come meanwhile
                for d in reclaimed:   # one at a time: one of them may be the request that killed its last worker
                    await self.process([d], record=False)
            if batch:
                await self.process(batch)
                large = sum(len(d.payload) for d in batch) > memory.TRIM_OVER_BYTES
                del batch   # answered: nothing holds its payloads, rows or arrays any more
                if large:
                    await self.model_thread.run(memory.give_back)
            if stopping:
                return

    async def cancel(self, request_id: str) -> bool:
        return False

    async def next_batch(self) -> list[Delivery]:
        """A new batch, or [] after a blocking read found none. Never raises: Redis away is logged and backed off
        (nothing was acknowledged: whatever was read is redelivered)."""
        try:
            batch = await collect(self.shell.take, self.max_batch_size, self.max_delay_s, self.traffic.busy,
                                  idle_block_s=0.5)
            self.errors.ok()
            return batch
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # noqa: BLE001
            self.errors.failed(exc)
            await asyncio.sleep(1.0)
            return []

    async def process(self, batch: Sequence[Delivery], record: bool = True) -> None:
        """Run and answer one batch the shell handed out (it stays claimed until answered, however slow)."""
        live, answers = expire(batch)
        if live:
            started_ns = time.time_ns()
            started = time.perf_counter()
            with self.watchdog.watching(live):
                if sum(len(d.payload) for d in live) <= INLINE_DECODE_BYTES:
                    items, failed = self.executor.decode(live)
                else:
                    items, failed = await self.model_thread.run(self.executor.decode, live)
                rows = sum(len(item.rows) for item in items)
                if self.row_s * rows < INLINE_UNDER_S:
                    if self.traffic.busy:
                        await asyncio.sleep(0)   # the next batch's read (a task made before this batch) goes out first
                    replies = self.executor.finish(live, items, failed)
                else:
                    replies = await self.model_thread.run(self.executor.finish, live, items, failed)
            took = time.perf_counter() - started
            n = len(live)
            start_ms = started_ns // 1_000_000
            # queued: since arrival on the stream (Redis's clock; ours on one host, NTP-close across hosts)
            took_ms = took * 1e3
            timed = [r.timed(float(max(0, start_ms - d.arrived_ms)), took_ms, n)
                     for d, r in zip(live, replies, strict=True)]
            answers += zip(live, timed, strict=True)
            if rows:   # a batch that decoded to nothing says nothing about the model's speed
                self.row_s = took / rows
            if record:
                self.traffic.record(n)
            self.shell.record_batch(n)
            self.shell.record_work(n, took)
            if tracing.ENABLED:
                tracing.record_batch(self.shell.name, [(d.request_id, d.envelope.traceparent, r.queued_ms)
                                                       for d, r in zip(live, timed, strict=True)],
                                     started_ns, started_ns + int(took * 1e9))
            log.debug("batch model=%s size=%d ms=%.1f", self.shell.name, n, took * 1e3)
        await self.shell.answer(answers, batch)
