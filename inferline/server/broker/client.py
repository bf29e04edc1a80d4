"""The asyncio Redis client every process opens, from a redis://, rediss://, unix:// or redis+sentinel:// URL, and
the errors its calls raise.

TLS (rediss://): the server is verified against REDIS_CA_FILE (else the system's CAs), and REDIS_CERT_FILE /
REDIS_KEY_FILE present a client certificate when the server asks for one (tls-auth-clients). The same options
may be given in the URL's query (ssl_ca_certs=, ssl_certfile=, ssl_keyfile=); the URL wins. A Redis ACL user and
password go in the URL: rediss://USER:PASSWORD@host:port/0 (SECURITY.md lists the users' ACL lines).

Sentinel: redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB] asks the sentinels where the
primary of MASTER_NAME is, and asks again whenever a connection to it breaks, so a failover is followed: calls
caught in the switch fail (our loops retry them, requests get 503 or their deadline) and the next ones reach the
promoted replica. The user and password are the data nodes'; the sentinels are asked with REDIS_SENTINEL_PASSWORD
when it is set (their `requirepass`), else without one. rediss+sentinel:// is the same over TLS, to the sentinels
and the data nodes alike, with the certificates of REDIS_*_FILE as for rediss:// (deploy/k8s-redis-sentinel).

Cluster (cluster=True, `[broker] cluster`): the URL names any node of a Redis Cluster (redis:// or rediss://, with
its user and password); the client discovers the others. It is redis-py's RedisCluster for ordinary commands and
pipelines, and carries a nodes.Router that the hot paths (ticks.py, roundtrip.py) route by: one plain client per
node, made by this same function from the same URL with that node's host and port (so TLS and the ACL user hold).

Timeouts: every call fails within `timeout_s` when Redis hangs (SIGSTOP, a dead host without a RST). Blocking
reads (XREAD, XREADGROUP) block at most MAX_BLOCK_S, so their answer always comes well inside that bound. A call
is retried once, at once, and only when its connection broke (a pooled connection to a Redis that restarted): never
after a timeout. (redis-py's default retries ten times with backoff, timeouts included: a hung Redis held each call
for 10 x the timeout.)
"""

from __future__ import annotations

import os
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from inferline.server.broker.nodes import Cluster, Router

# What a broker call raises when Redis is away, hung or refusing: callers outside the broker catch this tuple.
BROKER_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
Redis = aioredis.Redis | Cluster   # what connect() returns: a client of one Redis, or of a Cluster

TLS_ENV = {"ssl_ca_certs": "REDIS_CA_FILE", "ssl_certfile": "REDIS_CERT_FILE", "ssl_keyfile": "REDIS_KEY_FILE"}
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
MAX_BLOCK_S = 1.0           # the longest BLOCK of any read: timeout_s must outlast it
DEFAULT_TIMEOUT_S = 2.0


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, pool_size: int | None = None, cluster: bool = False,
            **options: Any) -> Redis:
    """A client for `url` whose calls fail after timeout_s (connect and each reply) instead of hanging. TCP
    keepalive (a dead peer is noticed) only where there is TCP: redis-py's unix-socket connections refuse it.
    pool_size: at most this many connections, and a call that finds them all in use waits for one, up to
    timeout_s, then raises ConnectionError (redis-py's default pool opens a connection for every concurrent call up
    to its max_connections, and refuses the next at once). A sentinel URL's pool cannot wait: there it is only the
    bound. cluster: `url` names a node of a Redis Cluster (see the module's docstring); pool_size then bounds each
    node's connections. Raises ValueError for a timeout that a blocking read would outlast, a malformed sentinel
    URL, or a cluster URL that is not redis:// or rediss://."""
    if timeout_s <= MAX_BLOCK_S:
        raise ValueError(f"timeout_s {timeout_s} must be above the longest blocking read ({MAX_BLOCK_S} s)")
    if cluster:
        return _cluster(url, timeout_s, pool_size, options)
    options.setdefault("socket_timeout", timeout_s)
    options.setdefault("socket_connect_timeout", timeout_s)
    options.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    if url.startswith(SENTINEL_SCHEMES):
        if pool_size is not None:
            options.setdefault("max_connections", pool_size)
        return _via_sentinel(url, options)
    if not url.startswith("unix:"):
        options.setdefault("socket_keepalive", True)
    _tls(url, options)
    if pool_size is not None:
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=timeout_s, **options)
        return aioredis.Redis.from_pool(pool)   # the client owns the pool: aclose() closes it
    return aioredis.Redis.from_url(url, **options)


def _tls(url: str, options: dict[str, Any]) -> None:
    """For a rediss:// (or rediss+sentinel://) URL: the REDIS_*_FILE certificates the URL's query does not name, and
    a verified server."""
    if url.startswith("rediss:") or url.startswith("rediss+"):
        for option, env in TLS_ENV.items():
            if os.environ.get(env) and f"{option}=" not in url:
                options.setdefault(option, os.environ[env])
        options.setdefault("ssl_cert_reqs", "required")


def _cluster(url: str, timeout_s: float, pool_size: int | None, options: dict[str, Any]) -> Cluster:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("cluster mode: REDIS_URL must be redis://[USER:PASSWORD@]HOST:PORT or rediss://... naming "
                         "any node of the cluster")
    node_options = dict(options)
    cluster_options = dict(options)
    cluster_options.setdefault("socket_timeout", timeout_s)
    cluster_options.setdefault("socket_connect_timeout", timeout_s)
    _tls(url, cluster_options)
    if pool_size is not None:
        cluster_options["max_connections"] = pool_size
    # One try more on a broken connection, at once; never after a timeout (see above). Redirects are followed apart
    # from this (redis-py's own bound, 16 a call).
    cluster_options.setdefault("retry", Retry(NoBackoff(), 1))
    client = cast(Cluster, Cluster.from_url(url, **cluster_options))

    def node_client(node: str) -> aioredis.Redis:
        host, _, port = node.rpartition(":")
        host = f"[{host}]" if ":" in host else host
        netloc = parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""
        node_url = urlunsplit((parts.scheme, f"{netloc}{host}:{port}", parts.path, parts.query, parts.fragment))
        made = connect(node_url, timeout_s, **node_options)
        assert isinstance(made, aioredis.Redis)
        return made

    client.router = Router(client, node_client)
    return client


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None, str | None]:
    """(sentinel addresses, master name, db, username, password) of a redis+sentinel:// URL."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    addresses = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel URL: {hostport!r} is not HOST:PORT")
        addresses.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("sentinel URL: expected redis+sentinel://HOST:PORT[,HOST:PORT]/MASTER_NAME[/DB]")
    db = int(path[1]) if len(path) == 2 else 0
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return addresses, path[0], db, user, password


def _via_sentinel(url: str, options: dict[str, Any]) -> aioredis.Redis:
    addresses, master, db, user, password = parse_sentinel_url(url)
    timeouts = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout", "retry")}
    tls: dict[str, Any] = {}
    _tls(url, tls)
    if tls:
        tls["ssl"] = True
        options.update(tls)
    asked = {**timeouts, **tls}
    if os.environ.get("REDIS_SENTINEL_PASSWORD"):
        asked["password"] = os.environ["REDIS_SENTINEL_PASSWORD"]
    sentinel = Sentinel(addresses, sentinel_kwargs=asked, **timeouts)
    options = {k: v for k, v in options.items() if k not in timeouts}
    return sentinel.master_for(master, db=db, username=user, password=password, **timeouts, **options)
