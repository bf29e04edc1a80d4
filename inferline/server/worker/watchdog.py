"""The watchdog of a worker's model calls: a call (one batch's predict, one decoding step) still running
`predict_timeout_s` after it began is hung, and so is a drain still going DRAIN_CAP_S after the stop signal.

    with watchdog.watching(deliveries):   # the scheduler, around every model call
        replies = executor.run(deliveries)

A hung call cannot be taken back: Python cannot stop the thread it holds (the model thread, or the event loop's own
when a quick batch runs inline), so the worker leaves. The watchdog runs on a thread of its own, which works whether
or not the event loop is blocked, and on firing:

- a hung call: answers each of its requests with 504 (DeadlineExceeded naming the model and predict_timeout_s) and
  acknowledges them, so the request that hung is not run again elsewhere, then exits with EXIT_HUNG;
- a drain past DRAIN_CAP_S: answers nothing (what is in hand is not known to be hung: another worker runs it again)
  and exits with EXIT_DRAIN_CUT.

Either way it first removes the worker's heartbeat record, so the other workers take over what it still held (read
and not yet run) at once rather than after HEARTBEAT_TTL_S. Its last words go through a Redis client of their own,
on an event loop of their own, bounded by LAST_WORDS_S; then os._exit (a normal exit would wait for the hung
thread forever). The supervisor (`inferline up`) and Kubernetes restart a worker that exits.

Bounds: a hung call's requests are answered within predict_timeout_s + LAST_WORDS_S of the call's start, and the
process is gone by then; after SIGTERM/SIGINT the process is gone within min(predict_timeout_s, DRAIN_CAP_S) +
LAST_WORDS_S (~23 s at most with the defaults, under `up`'s 30 s and the manifests' 60 s grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.delivery import Delivery
from inferline.server.broker.registry import Registry
from inferline.server.errors import DeadlineExceeded
from inferline.server.protocol import Reply

log = logging.getLogger(__name__)

EXIT_HUNG = 75         # a model call passed predict_timeout_s (sysexits' EX_TEMPFAIL: run it again)
EXIT_DRAIN_CUT = 76    # the drain after a stop signal passed DRAIN_CAP_S
# The longest a drain may take: under `inferline up`'s 30 s before SIGKILL, and Kubernetes' default 30 s grace.
DRAIN_CAP_S = 20.0
LAST_WORDS_S = 3.0     # answering the hung call's requests and leaving the registry, then exit whatever happened

# (the hung call's answers; empty for a drain cut) -> awaitable that sends them and removes the heartbeat record
LastWords = Callable[[list[tuple[Delivery, Reply]]], Awaitable[None]]


def hung_reply(delivery: Delivery, model: str, timeout_s: float) -> Reply:
    return Reply.error(delivery.request_id, DeadlineExceeded(
        f"model {model} did not answer within predict_timeout_s={timeout_s:g} s: the call was abandoned and its "
        "worker replaced"))


def farewell(redis_url: str, broker_timeout_s: float, model: str, worker_id: str, version: str = "",
             cluster: bool = False) -> LastWords:
    """The last words of worker `worker_id` of `model`: its own Redis client (the worker's belongs to an event loop
    that may be blocked), the answers sent and acknowledged, its heartbeat record removed."""
    async def last_words(answers: list[tuple[Delivery, Reply]]) -> None:
        redis = connect(redis_url, broker_timeout_s, cluster=cluster)
        try:
            if answers:
                await ModelQueue(redis, model, worker_id, version).reply_and_ack(
                    [(d.envelope.reply_to, r) for d, r in answers], [d for d, _ in answers])
            await Registry(redis).remove(model, worker_id)
        finally:
            await redis.aclose()
    return last_words


class Watchdog:
    """Times a worker's model calls, one at a time, from a daemon thread; see the module docstring. Constructed by
    worker/main.py; the scheduler wraps each model call in watching(), the signal handler calls stop().

    The thread polls (every min(1 s, predict_timeout_s / 4)) rather than being woken per call: watching() is two
    attribute stores on the hot path, no lock and no thread switch per batch. A hang is so found within
    predict_timeout_s + that period of its call's start."""

    def __init__(self, model: str, timeout_s: float, last_words: LastWords,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.poll_s = min(1.0, timeout_s / 4)
        self._last_words = last_words
        self._exit = exit_process
        # (monotonic start, its deliveries) of the call running now: replaced whole, so the thread reads one call's
        self._call: tuple[float, Sequence[Delivery]] | None = None
        self._drain_ends: float | None = None
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, deliveries: Sequence[Delivery]) -> Iterator[None]:
        """Time the model call made inside this block, for `deliveries` (what a hang fails; not copied)."""
        self._call = (time.monotonic(), deliveries)
        try:
            yield
        finally:
            self._call = None

    def stop(self) -> None:
        """The drain began: the process is gone within DRAIN_CAP_S (+ the poll and LAST_WORDS_S) from now."""
        if self._drain_ends is None:
            self._drain_ends = time.monotonic() + DRAIN_CAP_S

    def _watch(self) -> None:
        hung: Sequence[Delivery] | None = None
        while True:
            time.sleep(self.poll_s)
            call, now = self._call, time.monotonic()
            if call is not None and now - call[0] >= self.timeout_s:
                hung = call[1]
                break
            if self._drain_ends is not None and now >= self._drain_ends:
                break
        if hung is not None:
            log.error("model call hung model=%s size=%d: no answer within predict_timeout_s=%g s; failing its "
                      "requests and exiting (code %d) to be replaced", self.model, len(hung), self.timeout_s,
                      EXIT_HUNG)
            answers = [(d, hung_reply(d, self.model, self.timeout_s)) for d in hung]
        else:
            log.error("drain cut model=%s: still running %g s after the stop signal; exiting (code %d), what is in "
                      "hand is run again by another worker", self.model, DRAIN_CAP_S, EXIT_DRAIN_CUT)
            answers = []
        try:
            asyncio.run(asyncio.wait_for(self._last_words(answers), LAST_WORDS_S))
        except Exception as exc:   # noqa: BLE001 - leaving anyway: unanswered requests get their deadline's 504
            log.error("last words failed model=%s: %r", self.model, exc)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self._exit(EXIT_HUNG if hung is not None else EXIT_DRAIN_CUT)
