"""Container healthcheck for a worker: exit 0 when the worker in this container has beaten recently.

The check the gateway makes for a live replica, read from Redis: the model's worker index holds
`<hostname>-<pid>-<suffix>` scored by the last heartbeat (epoch ms). A container's hostname is its own, so a
fresh entry with this hostname is this container's worker. Runs as `python worker_healthcheck.py [MODEL]`
(MODEL and REDIS_URL from the environment by default); exit 1 with a reason on stderr otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import cast

import redis

from service.broker import keys


def main(argv: list[str]) -> int:
    model = argv[1] if len(argv) > 1 else os.environ.get("MODEL", "")
    url = os.environ.get("REDIS_URL") or os.environ.get("INFERLINE_REDIS_URL")
    max_age_ms = float(os.environ.get("HEALTHCHECK_MAX_AGE_S", "30")) * 1000
    if not model or not url:
        print("worker healthcheck: MODEL and REDIS_URL must be set", file=sys.stderr)
        return 1
    host = socket.gethostname()
    now_ms = time.time() * 1000
    tls = {opt: os.environ[env] for opt, env in (("ssl_ca_certs", "REDIS_CA_FILE"), ("ssl_certfile", "REDIS_CERT_FILE"),
                                                 ("ssl_keyfile", "REDIS_KEY_FILE")) if url.startswith("rediss:")
           and os.environ.get(env)}   # as service/broker/client.py does for the worker itself
    client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3, **tls)
    try:
        # ZRANGEBYSCORE, not ZRANGE: the worker's Redis ACL user (SECURITY.md) has the one, not the other
        beats = cast("list[tuple[bytes, float]]", client.zrangebyscore(
            keys.workers_index(model), now_ms - max_age_ms, "+inf", withscores=True))
    except (redis.RedisError, OSError) as exc:
        print(f"worker healthcheck: redis unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for member, score in beats:
        worker_id = member.decode()
        if worker_id.rsplit("-", 2)[0] == host and now_ms - score <= max_age_ms:
            return 0
    print(f"worker healthcheck: no heartbeat from {host} for model {model} in the last {max_age_ms / 1000:.0f}s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
