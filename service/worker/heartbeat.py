"""A worker's liveness record: a hash with a TTL plus a sorted-set index scored by last beat. Behind
/readyz, /v2/models/{m}/ready and /v1/models."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from service.broker import keys


@dataclass
class WorkerStats:
    """Counters the heartbeat publishes (the tests read `max_batch` to see that batches formed)."""

    batches: int = 0
    items: int = 0
    max_batch: int = 0
    active: int = 0          # sequences in flight (generation workers)
    extra: dict[str, Any] = field(default_factory=dict)

    def record_batch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.max_batch = max(self.max_batch, size)


class Heartbeat:
    def __init__(self, redis: aioredis.Redis, model: str, worker_id: str, device: str, version: str,
                 stats: WorkerStats) -> None:
        self.redis = redis
        self.model = model
        self.worker_id = worker_id
        self.stats = stats
        self.static = {"pid": os.getpid(), "host": socket.gethostname(), "device": device, "version": version,
                       "started": int(time.time())}

    async def beat(self) -> None:
        now_ms = int(time.time() * 1000)
        record: dict[str, Any] = {**self.static, "batches": self.stats.batches, "items": self.stats.items,
                  "max_batch": self.stats.max_batch, "active": self.stats.active, "beat": now_ms}
        key = keys.worker(self.model, self.worker_id)
        index = keys.workers_index(self.model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=record)   # type: ignore[arg-type]
            pipe.pexpire(key, int(keys.HEARTBEAT_TTL_S * 1000))
            pipe.zadd(index, {self.worker_id: now_ms})
            pipe.zremrangebyscore(index, 0, now_ms - int(keys.HEARTBEAT_TTL_S * 1000) * 10)
            await pipe.execute()

    async def run(self, stopping: asyncio.Event) -> None:
        """Beat until stopping is set; a Redis hiccup skips a beat rather than killing the worker."""
        while not stopping.is_set():
            try:
                await self.beat()
            except Exception:   # noqa: BLE001 - a missed beat is retried next time
                pass
            try:
                await asyncio.wait_for(stopping.wait(), timeout=keys.HEARTBEAT_EVERY_S)
            except TimeoutError:
                pass

    async def remove(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker(self.model, self.worker_id))
            pipe.zrem(keys.workers_index(self.model), self.worker_id)
            await pipe.execute()

