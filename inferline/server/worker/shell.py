"""The one process shell every worker runs, whatever its scheduler: it keeps the consumer group, claims a dead
worker's entries (dead-lettering those delivered max_tries times), keeps its own in-flight entries claimed, sends
replies in order, forwards cancels, beats, and drains on stop.

A worker's entries are claimed by another as soon as its heartbeat lapses (HEARTBEAT_TTL_S, then DEAD_AFTER_S of
grace only if Redis itself may have stalled), not after the visibility timeout: a kill -9 or a stalled worker
(SIGSTOP, a long pause) costs its callers seconds, well within their deadline. A worker that stalls past the socket
timeout while a read of its was answered claims those entries back itself when it resumes (take()). Its
consumer is then removed from the group. The visibility timeout still covers a worker that beats but holds an entry
without refreshing it. Every loop here retries on its own, logs a repeating error once with a count, and recreates
what Redis lost (the group, the model's metadata) where it is used.

Two schedulers plug into it (server/worker/batching.py: dynamic batching; server/worker/continuous.py: continuous
batching for language models), through these calls only, so the claim rule lives in this file alone:

- `take(count, block_s)`: new entries. `take_reclaimed()`: entries taken over from a dead or hung worker.
- `answer(answers, done)`: send replies; every delivery in `done` is acknowledged and no longer held.
- `triage(deliveries)`: split off those past their deadline or whose caller already left.
- `stopping`, `name`, `record_batch(size)`, `record_running(count)`.

The rule: every delivery handed to a scheduler is held (kept claimed, found by cancels) from the moment it is
handed out until the scheduler answers it with it in `done`; a scheduler never claims or releases anything itself.
It returns from run() once `stopping` is true and what it took is answered. What is still held when serve()
returns was not acknowledged: another worker claims it once this one's heartbeat is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from inferline.server.broker import keys
from inferline.server.broker.cancels import Cancels
from inferline.server.broker.client import BROKER_ERRORS
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.delivery import Delivery, OrphanPosition
from inferline.server.broker.registry import Registry
from inferline.server.config import ModelSpec
from inferline.server.errors import Cancelled, DeadlineExceeded
from inferline.server.logs import RepeatingError
from inferline.server.metrics import WorkerMetrics
from inferline.server.protocol import ModelInfo, Reply, WorkerStatus, now_ms
from inferline.server.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RECLAIM_EVERY_S = 1.0
# A consumer whose heartbeat is gone is claimed from only if it is still gone this long after first seen so: right
# after Redis comes back from a stall, every heartbeat has lapsed at once and the live ones need a beat to return.
# Not waited when this worker's own beats have landed steadily for longer than a heartbeat lives (STEADY_FOR_S):
# then Redis was up all along, and a heartbeat that lapsed means its worker stopped (died, or stalled: SIGSTOP, a
# long pause), so its entries are claimed within HEARTBEAT_TTL_S + one claim round of its last beat.
DEAD_AFTER_S = 2.0
STEADY_GAP_S = 2 * keys.HEARTBEAT_EVERY_S + 0.5   # beats further apart than this break the steady run
STEADY_FOR_S = keys.HEARTBEAT_TTL_S + keys.HEARTBEAT_EVERY_S
# Claims from a dead consumer use this min-idle rather than 0: the first claimer resets the idle time, so a second
# worker claiming at the same moment gets nothing instead of running the request twice.
DEAD_CLAIM_MIN_IDLE_MS = 1000
# Cancels of requests this worker does not hold yet (still queued in Redis) are remembered, the newest this many, so
# the request is dropped when it is read instead of run for nobody.
CANCELLED_KEPT = 10_000


class Scheduler(Protocol):
    cancellable: bool   # True when it holds requests long enough for a cancel to matter

    async def run(self) -> None:
        """Serve until the shell is stopping; answer what is in hand, then return."""

    async def cancel(self, request_id: str) -> bool:
        """Drop a request whose caller left and answer it; True if it was running here. Called by the shell only
        for a request it holds, and only when the cancel was published after the request arrived."""


def expire(deliveries: Sequence[Delivery]) -> tuple[list[Delivery], list[tuple[Delivery, Reply]]]:
    """(the deliveries still wanted, timeout answers for those past their deadline)."""
    now = now_ms()
    live, late = [], []
    for d in deliveries:
        if d.envelope.deadline_ms > now:
            live.append(d)
        else:
            late.append((d, Reply.error(d.request_id, DeadlineExceeded(
                f"request {d.request_id} was not run: its deadline passed while it was queued"))))
    return live, late


class Shell:
    """A worker's process shell around one scheduler (the module docstring lists the calls a scheduler makes).
    Constructed by worker/main.py, which then runs serve() until a signal calls stop()."""

    def __init__(self, spec: ModelSpec, queue: ModelQueue, registry: Registry, cancels: Cancels, worker_id: str,
                 status: WorkerStatus, info: ModelInfo | None = None, alive_file: Path | None = None) -> None:
        self.info = info                 # put back in Redis by the heartbeat when Redis lost it
        self._spec = spec
        self._alive_file = alive_file    # touched every beat, Redis or not: the container's liveness
        self._queue = queue
        self._registry = registry
        self._cancels = cancels
        self._worker_id = worker_id
        self._status = status
        self._stopping = asyncio.Event()
        # What a drain request (read with the heartbeat) calls: worker/main.py sets its SIGTERM handler, which also
        # bounds the drain (the watchdog); stop() alone by default.
        self.on_drain_request: Callable[[], None] = self.stop
        # Handed to the scheduler and not yet answered: kept claimed, and found by cancels. Keyed by entry id, not
        # request id: a caller may reuse its id (x-request-id) while its first request is still held, and each
        # entry must stay claimed until it is itself answered.
        self._held: dict[bytes, Delivery] = {}
        # Taken over from dead or hung workers (held already), waiting for take_reclaimed(). Bounded by the claims
        # (at most 100 entries a round per source, ModelQueue.reclaim and claim_from) and emptied by the schedulers
        # every batch or intake turn.
        self._reclaimed: list[Delivery] = []
        self._send_turn = asyncio.Lock()
        self._send_errors = RepeatingError(log, f"sending replies model={spec.name}", BROKER_ERRORS)
        self._suspects: dict[str, float] = {}   # consumers without a heartbeat -> when first seen so
        self._beat_landed = 0.0    # monotonic time of this worker's last beat that Redis took
        self._steady_since = 0.0   # ... and of the first of the unbroken run of beats it ends (STEADY_GAP_S apart)
        # A read failed (its socket timed out, the connection broke): Redis may have delivered entries all the same,
        # which nothing here holds. The next take() claims them back first (ModelQueue.orphans: claims.py).
        self._lost_read = False
        self._orphans_after: OrphanPosition = None   # where the next look for them goes on (None: from the start)
        # ids cancelled before this worker held them -> when (ms), oldest first. A caller may reuse an id (its own
        # x-request-id): only a request queued before the cancel is dropped.
        self._cancelled: dict[str, int] = {}
        self._metrics = WorkerMetrics(spec.name)   # folded into the model's stats in Redis with each beat

    # the port: what a scheduler calls -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The model's name, for logs and traces."""
        return self._spec.name

    @property
    def stopping(self) -> bool:
        """True once stop() was called: the scheduler takes nothing new, answers what it took, and returns."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Begin the drain (a signal handler calls it). Reclaiming stops at once; run() ends when the scheduler's
        does."""
        self._stopping.set()

    async def take(self, count: int, block_s: float | None) -> list[Delivery]:
        """Up to `count` new entries from the model's stream, waiting up to block_s for the first (None: no wait).
        Each is held from here until answered. Raises what ModelQueue.read raises; what Redis handed out to a read
        that failed (a worker stalled past the socket timeout while Redis answered it: SIGSTOP, a long pause) is
        claimed back and returned by the next take(), before it reads anything new, instead of waiting in the
        group's pending list for the visibility timeout; so is what a failed send left pending (after a failover the
        promoted replica may have it pending here). They are looked for one page of `count` pending entries per
        take(), page after page until the list's end, however many of them this worker holds or durable mode finds
        answered already. Reads are one at a time (HeldConnection), so no read is in flight while the orphans are
        looked for."""
        if self._lost_read:
            # Cleared while looking: a send that fails meanwhile sets it again, and the next look starts over.
            after, self._lost_read, self._orphans_after = self._orphans_after, False, None
            try:
                found, more = await self._queue.orphans(self._held, count, after)
            except BaseException:
                self._lost_read = True
                raise
            if more is not None and not self._lost_read:   # the pending list goes on: the next take() looks on
                self._lost_read, self._orphans_after = True, more
            if found:
                log.warning("recovered model=%s n=%d: delivered to a read that failed", self._spec.name, len(found))
                for d in found:
                    self._held[d.entry_id] = d
                return found
        try:
            got = await self._queue.read(count, block_s)
        except BaseException:
            self._lost_read, self._orphans_after = True, None
            raise
        held = self._held
        for d in got:   # the dict insert the scheduler used to do itself: no extra cost per request
            held[d.entry_id] = d
        return got

    def take_reclaimed(self) -> list[Delivery]:
        """The entries taken over from dead or hung workers since the last call (oldest first; already held, and
        each may be the request that killed its last worker). Each is handed out once."""
        if not self._reclaimed:
            return []
        taken, self._reclaimed = self._reclaimed, []
        return taken

    def triage(self, deliveries: Sequence[Delivery]) -> tuple[list[Delivery], list[tuple[Delivery, Reply]]]:
        """(the deliveries to run, answers for the rest): past their deadline, or their caller already left. The
        answers still have to be sent through answer()."""
        live, answers = expire(deliveries)
        if not self._cancelled:
            return live, answers
        kept = []
        for d in live:
            if self._cancelled.get(d.request_id, -1) >= d.arrived_ms:
                del self._cancelled[d.request_id]
                answers.append((d, Reply.error(d.request_id, Cancelled("the client went away"))))
            else:
                kept.append(d)
        return kept, answers

    async def answer(self, answers: Sequence[tuple[Delivery, Reply]], done: Sequence[Delivery]) -> None:
        """Send answers, then acknowledge and delete `done`, which are no longer held from here: answering is the
        only way a delivery is released, and it releases that delivery alone (answering it again releases nothing,
        and another delivery under the same request id stays held). The sends are written to Redis at once, in the
        order made (tokens of one step before the next's, replies before acks: sender.py), and not waited
        for, so the next batch or step runs while Redis answers; a crash before they land redelivers instead of
        losing. A caller waits only while too many sends are unanswered; then callers take turns (a cancel answered
        from the cancel reader while a step answers), none is dropped."""
        async with self._send_turn:
            held = self._held
            for d in done:
                held.pop(d.entry_id, None)
            sent = await self._queue.send([(d.envelope.reply_to, r) for d, r in answers], done)
            if sent is not None:
                sent.add_done_callback(self._landed)

    def record_batch(self, size: int) -> None:
        """Count one batch (or decoding step) of `size` requests in the worker's status and metrics."""
        self._status.record_batch(size)
        self._metrics.batch_size.observe(size)

    def record_work(self, served: int, busy_s: float) -> None:
        """Count `served` requests answered and `busy_s` seconds in model calls (the drain rate's two halves)."""
        if served:
            self._metrics.served.inc(served)
        if busy_s > 0:
            self._metrics.busy.inc(busy_s)

    def record_running(self, count: int) -> None:
        """The sequences a generation worker has in flight now, as its heartbeat reports them."""
        self._status.active = count

    # the process --------------------------------------------------------------------------------------------
    async def serve(self, scheduler: Scheduler) -> None:
        """Run the scheduler with the shell's upkeep around it; returns after a drain."""
        await self._queue.ensure_group()
        with contextlib.suppress(Exception):   # beat before the first read: a consumer without one looks dead
            await self._registry.beat(self._spec.name, self._worker_id, self._status, info=self.info)
        upkeep = [asyncio.create_task(self._beat()), asyncio.create_task(self._claims())]
        if scheduler.cancellable:
            upkeep.append(asyncio.create_task(self._watch_cancels(scheduler)))
        try:
            await scheduler.run()
        finally:
            await self.flush()
            await cancel_and_wait(upkeep)
            with contextlib.suppress(Exception):
                await self._registry.add_stats(self._spec.name, self._metrics.pending())   # the last beat's worth
            with contextlib.suppress(Exception):
                await self._registry.remove(self._spec.name, self._worker_id)
            await self._queue.close()

    def _landed(self, sent: asyncio.Future[list[Any]]) -> None:
        if sent.cancelled():
            return
        error = sent.exception()
        if error is None:
            self._send_errors.ok()
        else:   # Redis away: unacked entries are redelivered, nothing is lost
            self._send_errors.failed(error)
            # Its entries stay pending on this consumer, held by nobody here: the next take() claims them back (sent
            # again, or acknowledged unrun when durable mode finds them answered), rather than leaving them to the
            # visibility timeout. Measured: a primary killed under load left 4 of 658 requests unanswered for 10 s.
            self._lost_read, self._orphans_after = True, None   # they may be anywhere in the pending list

    async def flush(self) -> None:
        """Wait until everything sent is in Redis (or failed)."""
        await self._queue.drain()

    # upkeep ----------------------------------------------------------------------------------------------------
    async def _beat(self) -> None:
        errors = RepeatingError(log, f"heartbeat model={self._spec.name}", BROKER_ERRORS)
        while True:
            if self._alive_file is not None:
                with contextlib.suppress(OSError):
                    self._alive_file.touch()
            try:
                stats = self._metrics.pending()
                self._metrics.sample_process(self._status)
                drain = await self._registry.beat(self._spec.name, self._worker_id, self._status, stats, self.info)
                self._metrics.commit(stats)
                if drain and not self.stopping:
                    log.warning("drain requested model=%s id=%s: draining as on SIGTERM", self._spec.name,
                                self._worker_id)
                    self.on_drain_request()
                await self._queue.watch_rollout()
                landed = time.monotonic()
                if landed - self._beat_landed > STEADY_GAP_S:
                    self._steady_since = landed
                self._beat_landed = landed
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - a missed beat is retried next time
                errors.failed(exc)
            await asyncio.sleep(keys.HEARTBEAT_EVERY_S)

    async def _claims(self) -> None:
        """Keep in-flight entries claimed (which also recreates a lost group); take over the entries of workers whose
        heartbeat lapsed, and of any idle past the visibility timeout; dead-letter those delivered too many times."""
        every = min(RECLAIM_EVERY_S, max(0.2, self._spec.visibility_timeout_s / 3))
        errors = RepeatingError(log, f"claim upkeep model={self._spec.name}", BROKER_ERRORS)
        while True:
            await asyncio.sleep(every)
            try:
                await self._queue.refresh_claims(list(self._held.values()))
                if self.stopping:
                    continue
                await self._take_over(*await self._queue.reclaim(int(self._spec.visibility_timeout_s * 1000),
                                                                 self._spec.max_tries))
                await self._claim_dead()
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - the next round tries again
                errors.failed(exc)

    async def _claim_dead(self) -> None:
        """Claim the entries of consumers whose worker stopped beating, then remove those consumers."""
        others = await self._queue.consumers()
        dead = set(others) - await self._registry.alive(self._spec.name, others)
        now = time.monotonic()
        self._suspects = {c: self._suspects.get(c, now) for c in dead}
        steady = now - self._beat_landed <= STEADY_GAP_S and now - self._steady_since >= STEADY_FOR_S
        for consumer, since in self._suspects.items():
            if now - since < DEAD_AFTER_S and not steady:
                continue
            claimed, exhausted = await self._queue.claim_from(consumer, DEAD_CLAIM_MIN_IDLE_MS, self._spec.max_tries)
            if claimed or exhausted:
                log.warning("worker gone model=%s consumer=%s: claimed %d of its requests", self._spec.name, consumer,
                            len(claimed) + len(exhausted))
            await self._take_over(claimed, exhausted)
            if await self._queue.remove_consumer(consumer):
                log.info("removed consumer model=%s consumer=%s (no heartbeat)", self._spec.name, consumer)

    async def _take_over(self, claimed: list[Delivery], exhausted: list[Delivery]) -> None:
        await self._queue.dead_letter(exhausted, "delivered too many times; its worker died or timed out on it")
        for d in claimed:
            log.warning("reclaimed model=%s id=%s tries=%d", self._spec.name, d.request_id, d.tries)
            self._held[d.entry_id] = d   # kept claimed while it waits its turn
            self._reclaimed.append(d)

    async def _watch_cancels(self, scheduler: Scheduler) -> None:
        errors = RepeatingError(log, f"cancel stream model={self._spec.name}", BROKER_ERRORS)
        while True:
            try:
                for cancel, at_ms in await self._cancels.read(block_s=0.5):
                    # A scan, not a second index: cancels are rare, and what is held is at most a batch or the
                    # engine's running sequences; the hot path keeps its one dict insert per request.
                    held = [d for d in self._held.values() if d.request_id == cancel.request_id]
                    if not held:   # still queued, or another replica's
                        self._cancelled[cancel.request_id] = at_ms
                        if len(self._cancelled) > CANCELLED_KEPT:
                            del self._cancelled[next(iter(self._cancelled))]
                    elif any(d.arrived_ms <= at_ms for d in held) and await scheduler.cancel(cancel.request_id):
                        log.info("client gone model=%s id=%s", self._spec.name, cancel.request_id)
                errors.ok()
            except Exception as exc:   # noqa: BLE001 - cancels resume when Redis is back
                errors.failed(exc)
                await asyncio.sleep(1.0)
