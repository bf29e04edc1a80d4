"""One gateway process's shared parts, built once by create_app and handed to each layer by its constructor: the
settings, the metrics, the Redis client, the one model registry, the dispatcher and the route table. The app's
lifespan only starts and stops it."""

from __future__ import annotations

import asyncio
import gc

from inferline.server.broker.client import connect
from inferline.server.broker.registry import Registry
from inferline.server.config import Settings
from inferline.server.gateway.dispatch import Dispatcher
from inferline.server.gateway.table import ROUTES, RouteTable
from inferline.server.metrics import GatewayMetrics
from inferline.server.rollout import Controller
from inferline.server.tasks import cancel_and_wait

# The client pool's bound. A command that finds every connection in use waits for one (up to broker.timeout_s, then
# 503) rather than opening more: the hot path holds two (the reply reader's and the tick batcher's), and the rest
# serve short commands. Measured before: 30 abandoned `n=8` streaming completions took the pool from 26 to 198
# connections (one per choice's cancel, all at once), toward redis-py's max_connections of 256.
REDIS_CONNECTIONS = 64


class Gateway:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        """Connects nothing yet (the Redis client connects on first use). Raises ValueError without a redis_url."""
        if not settings.redis_url:
            raise ValueError("the gateway needs settings.redis_url")
        self.settings = settings
        self.metrics = metrics
        # broker.timeout_s bounds a hung Redis (requests get 503 after it); it outlasts every blocking read.
        self.redis = connect(str(settings.redis_url), settings.broker.timeout_s, pool_size=REDIS_CONNECTIONS,
                             cluster=settings.broker.cluster)
        self.registry = Registry(self.redis)
        self.dispatcher = Dispatcher(self.redis, settings, metrics, self.registry)
        self.table = RouteTable(ROUTES, settings)
        # Moves the models' rollouts along, one gateway at a time per model (server/rollout.py).
        self.controller = Controller(self.redis, self.registry, list(settings.models), self.dispatcher.gateway_id)
        self.controller_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reading replies (without waiting for Redis: until it answers, requests get 503 or 504)."""
        await self.dispatcher.start()
        self.controller_task = asyncio.create_task(self.controller.run())
        # What is here now (FastAPI, pydantic, the routes' schemas) lives as long as the process: without the freeze
        # a full collection walked it all every ~4,000 requests under load (54 ms each: 13 µs per request, a fifth of
        # the gateway's CPU at c=64).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        if self.controller_task is not None:
            await cancel_and_wait([self.controller_task])
        await self.dispatcher.stop()
        await self.redis.aclose()
