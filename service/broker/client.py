"""The asyncio Redis client every process opens, from a redis://, rediss:// or unix:// URL, and the errors
its calls raise."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# What a broker call raises when Redis is away, hung or refusing: callers outside the broker catch this tuple.
BROKER_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
Redis = aioredis.Redis


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for `url`. TCP keepalive (a dead peer is noticed) only where there is TCP: redis-py's unix-socket
    connections refuse the option."""
    if not url.startswith("unix:"):
        options.setdefault("socket_keepalive", True)
    return aioredis.Redis.from_url(url, **options)
