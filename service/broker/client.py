"""The asyncio Redis client every process opens, from a redis://, rediss:// or unix:// URL, and the errors
its calls raise.

TLS (rediss://): the server is verified against REDIS_CA_FILE (else the system's CAs), and REDIS_CERT_FILE /
REDIS_KEY_FILE present a client certificate when the server asks for one (tls-auth-clients). The same options
may be given in the URL's query (ssl_ca_certs=, ssl_certfile=, ssl_keyfile=); the URL wins. A Redis ACL user and
password go in the URL: rediss://USER:PASSWORD@host:port/0 (SECURITY.md lists the users' ACL lines)."""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

# What a broker call raises when Redis is away, hung or refusing: callers outside the broker catch this tuple.
BROKER_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
Redis = aioredis.Redis

TLS_ENV = {"ssl_ca_certs": "REDIS_CA_FILE", "ssl_certfile": "REDIS_CERT_FILE", "ssl_keyfile": "REDIS_KEY_FILE"}


def connect(url: str, **options: Any) -> aioredis.Redis:
    """A client for `url`. TCP keepalive (a dead peer is noticed) only where there is TCP: redis-py's unix-socket
    connections refuse the option."""
    if not url.startswith("unix:"):
        options.setdefault("socket_keepalive", True)
    if url.startswith("rediss:"):
        for option, env in TLS_ENV.items():
            if os.environ.get(env) and f"{option}=" not in url:
                options.setdefault(option, os.environ[env])
        options.setdefault("ssl_cert_reqs", "required")
    return aioredis.Redis.from_url(url, **options)
