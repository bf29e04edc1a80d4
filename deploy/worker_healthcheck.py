"""Container healthcheck for a worker.

Liveness (the default, what Docker's HEALTHCHECK and the Kubernetes liveness and startup probes run): exit 0 when
the worker process in this container touched its alive file (INFERLINE_ALIVE_FILE, default
/tmp/inferline-worker.alive) within HEALTHCHECK_MAX_AGE_S (default 30). The worker touches it every heartbeat whether
Redis answers or not, so a Redis outage never restarts workers: Redis health is readiness, which the gateway's
/readyz reports. The file appears only once the model is loaded, so the same check serves as the startup probe.

`--heartbeat [MODEL]`: exit 0 when this container's worker has a fresh heartbeat in Redis (what the gateway counts as
a live replica; MODEL and REDIS_URL from the environment by default). For diagnosis, not for liveness.
Exit 1 with a reason on stderr otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import cast

DEFAULT_ALIVE_FILE = "/tmp/inferline-worker.alive"


def max_age_s() -> float:
    return float(os.environ.get("HEALTHCHECK_MAX_AGE_S", "30"))


def alive() -> int:
    path = Path(os.environ.get("INFERLINE_ALIVE_FILE") or DEFAULT_ALIVE_FILE)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print(f"worker healthcheck: {path} does not exist (the worker has not started serving)", file=sys.stderr)
        return 1
    if age > max_age_s():
        print(f"worker healthcheck: the worker last touched {path} {age:.0f} s ago", file=sys.stderr)
        return 1
    return 0


def heartbeat(model: str) -> int:
    import redis

    from inferline.server.broker import keys

    url = os.environ.get("REDIS_URL") or os.environ.get("INFERLINE_REDIS_URL")
    if not model or not url:
        print("worker healthcheck: MODEL and REDIS_URL must be set", file=sys.stderr)
        return 1
    host = socket.gethostname()
    now_ms = time.time() * 1000
    tls = {opt: os.environ[env] for opt, env in (("ssl_ca_certs", "REDIS_CA_FILE"), ("ssl_certfile", "REDIS_CERT_FILE"),
                                                 ("ssl_keyfile", "REDIS_KEY_FILE")) if url.startswith("rediss:")
           and os.environ.get(env)}   # as server/broker/client.py does for the worker itself
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3, **tls)
    try:
        # ZRANGEBYSCORE, not ZRANGE: the worker's Redis ACL user (SECURITY.md) has the one, not the other
        beats = cast("list[tuple[bytes, float]]", client.zrangebyscore(
            keys.workers_index(model), now_ms - max_age_s() * 1000, "+inf", withscores=True))
    except (redis.RedisError, OSError) as exc:
        print(f"worker healthcheck: redis unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for member, score in beats:
        worker_id = member.decode()
        if worker_id.rsplit("-", 2)[0] == host and now_ms - score <= max_age_s() * 1000:
            return 0
    print(f"worker healthcheck: no heartbeat from {host} for model {model} in the last {max_age_s():.0f}s",
          file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--heartbeat":
        return heartbeat(argv[2] if len(argv) > 2 else os.environ.get("MODEL", ""))
    return alive()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
