"""Stopping background tasks so that the stop itself cannot hang.

On Python 3.11 `asyncio.wait_for` drops a cancellation that lands in the loop turn in which the awaited operation
completes: it returns the result instead of raising CancelledError (CPython gh-86296; 3.12 rewrote wait_for on
asyncio.timeout). redis-py's asyncio calls run through wait_for, so a loop around a Redis call can lose the one
cancel its owner sends and go on for ever, and an owner awaiting it hangs with it (test_dispatch's stop() hung in
~1 run of 2 on Redis 7.0: Dispatcher._watch_workers swallowed the cancel in ~5% of cancels landing in a GET or a
pipeline, and looped on). `cancel_and_wait` cancels again until each task has ended, within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

RECANCEL_EVERY_S = 0.05
STOP_WITHIN_S = 5.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None]],
                          within_s: float = STOP_WITHIN_S) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again every RECANCEL_EVERY_S a task that goes on (its
    cancel was dropped). Gives up after within_s and logs the tasks still running (a task that refuses every
    cancel is a bug of its own; its owner must not hang for it). Their results and exceptions are retrieved, not
    raised: a stopped loop's last error is not its owner's. Cancelling the caller cancels this wait only."""
    pending = {task for task in tasks if not task.done()}
    done: set[asyncio.Task[object] | asyncio.Task[None]] = {task for task in tasks if task.done()}
    deadline = asyncio.get_running_loop().time() + within_s
    while pending:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.warning("tasks still running %.1f s after their cancel: %s", within_s, sorted(map(str, pending)))
            break
        for task in pending:
            task.cancel()
        ended, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY_S, left))
        done |= ended
    for task in done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
