"""The asyncio Redis client every process opens, from a redis://, rediss:// or unix:// URL."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for `url`. TCP keepalive (a dead peer is noticed) only where there is TCP: redis-py's unix-socket
    connections refuse the option."""
    if not url.startswith("unix:"):
        options.setdefault("socket_keepalive", True)
    return aioredis.Redis.from_url(url, **options)
