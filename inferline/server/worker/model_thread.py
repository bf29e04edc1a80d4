"""One dedicated thread for a worker's model work. The event loop stays free for Redis I/O; model calls run
one at a time in the order they were made (a generation cancel lands between two steps), on one thread
rather than spread over a pool (asyncio.to_thread). The batch loop runs a quick batch on the loop's own
thread instead (batching.INLINE_UNDER_S): the runtimes keep no per-thread state (devices are named inside each
call, torch's inference mode is entered per call)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the model thread; calls run one at a time, in the order they were made."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
