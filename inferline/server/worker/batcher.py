"""Dynamic batching: block for the first request, then take what is already queued. Wait for more only
while traffic is heavy, so a lone request never sits out the batching window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from inferline.server.broker.delivery import Delivery

POLL_S = 0.0005   # between reads while a busy batch fills

# How deliveries are read: (count, block_s; None: do not block) -> up to count of them. The worker passes
# Shell.take, which holds what it returns until answered.
Take = Callable[[int, float | None], Awaitable[list[Delivery]]]


async def collect(take: Take, max_size: int, max_delay_s: float, busy: bool,
                  idle_block_s: float = 1.0) -> list[Delivery]:
    """Up to max_size deliveries, read with `take`. Idle: one blocking read (no spinning). Busy (recent batches were
    filling up): keep reading until the batch is full or max_delay_s has passed since the first arrival;
    max_delay_s is an upper bound, never a fixed wait.

    The window is timed here, with short non-blocking reads, not with a short BLOCK: Redis checks blocked
    clients' timeouts only as often as its `hz` (10/s by default), so a 5 ms BLOCK that nothing ends
    could return after 100 ms (measured: ~100 ms per request for the first requests after a burst).

    A read that fails after the first one ends the batch with what was taken: those deliveries are held (the shell
    keeps them claimed until they are answered), so dropping them with the error would leave them pending forever,
    claimed by a live worker that never runs them (a primary killed under load lost 1-4 accepted requests a run
    that way). The error comes back at the next read."""
    batch = await take(max_size, idle_block_s)
    if not busy or not batch:
        return batch
    window_ends = time.monotonic() + max_delay_s
    while len(batch) < max_size:
        try:
            more = await take(max_size - len(batch), None)
        except Exception:   # noqa: BLE001 - see above: what was taken must be run; the next read raises again
            break
        batch += more
        left = window_ends - time.monotonic()
        if left <= 0:
            break
        if not more:
            await asyncio.sleep(min(left, POLL_S))
    return batch


class Traffic:
    """Remembers whether recent batches were filling up (an exponential average of fill ratio)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.fill = 0.0

    def record(self, size: int) -> None:
        self.fill = 0.7 * self.fill + 0.3 * (size / self.max_size)

    @property
    def busy(self) -> bool:
        # Two or more at once recently: waiting a little gathers more per forward pass.
        return self.max_size > 1 and self.fill * self.max_size >= 2.0
