"""The gateway's Redis connection pool is bounded and waits for a connection rather than growing: first the pool
itself (many concurrent commands on a pool of two), then a real gateway whose callers abandon many streaming
completions at once (each choice's cancel used to take a pool connection of its own: 26 -> 198 connections for 30
abandoned `n=8` completions)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.gateway.core import REDIS_CONNECTIONS
from tests.conftest import Cluster

pytestmark = pytest.mark.timeout(300)


def test_a_full_pool_waits_for_a_connection_instead_of_opening_more(redis_url: str) -> None:
    async def run() -> tuple[list[bytes | None], int]:
        redis = connect(redis_url, 2.0, pool_size=2)
        try:
            key = "inferline:test:pool"
            await redis.set(key, b"v")
            answers = await asyncio.gather(*[redis.get(key) for _ in range(200)])
            pool = redis.connection_pool
            opened = len(pool._available_connections) + len(pool._in_use_connections)  # type: ignore[attr-defined]
            return answers, opened
        finally:
            await redis.aclose()

    answers, opened = asyncio.run(run())
    assert answers == [b"v"] * 200   # none refused ("Too many connections"): each waited its turn
    assert opened <= 2


def redis_connections(pid: int, redis_url: str) -> int:
    """The sockets process `pid` holds to the Redis at `redis_url` (a unix socket or TCP), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:   # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    if redis_url.startswith("unix:"):   # a connected client end of a unix socket is listed without a path
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
        return sum(1 for line in lines if line.split()[6] in inodes)
    port = f"{urlsplit(redis_url).port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2].rsplit(":", 1)[1] == port and fields[9] in inodes:
                count += 1
    return count


ABANDONED = 30   # the probe's: 30 completions of n=8 (240 sequences), left after their first event


@pytest.mark.slow
def test_abandoned_streaming_completions_do_not_grow_the_gateways_pool(cluster: Cluster, quick_gpt2: Path) -> None:
    """30 callers leave their `n=8` streams at once: the gateway's 240 cancels go out in a pipeline on a connection
    it holds anyway, instead of each taking a pool connection of its own (the old code's pool grew by up to one per
    cancel, toward its 256), and the pool never passes its bound."""
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=256, timeout_s=60)
    url = cluster.start_gateway()
    cluster.start_worker("gpt2")
    cluster.wait_until_serving(60)
    assert cluster.gateway is not None
    pid = cluster.gateway.pid
    body = {"model": "gpt2", "prompt": "The function returns", "max_tokens": 200, "n": 8, "stream": True,
            "temperature": 1.0}
    with httpx.Client(timeout=60) as client:   # warm: one whole completion, so the pool holds what serving needs
        assert client.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}).status_code \
            == 200
    before = redis_connections(pid, cluster.redis_url)

    async def abandon() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=ABANDONED)) as client:
            async def one(ready: asyncio.Event, leave: asyncio.Event) -> None:
                async with client.stream("POST", url + "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_bytes():   # the first event: every choice is generating
                        break
                    ready.set()
                    await leave.wait()   # then all callers leave at once (the response is closed unread)

            leave = asyncio.Event()
            started = [asyncio.Event() for _ in range(ABANDONED)]
            tasks = [asyncio.create_task(one(started[i], leave)) for i in range(ABANDONED)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            leave.set()
            await asyncio.gather(*tasks)

    asyncio.run(abandon())
    peak = before
    deadline = time.monotonic() + 3   # the cancels go out within a few event-loop turns; watch a while longer
    while time.monotonic() < deadline:
        peak = max(peak, redis_connections(pid, cluster.redis_url))
        time.sleep(0.02)
    cancels = cluster.client.xlen(keys.cancel_stream("gpt2"))
    print(f"gateway Redis connections: {before} before, {peak} at most after {ABANDONED} x n=8 abandoned; "
          f"{cancels} cancels")
    assert peak <= REDIS_CONNECTIONS, (before, peak)
    assert peak - before <= 4, (before, peak)   # the cancels went out on connections the gateway already held
    # Every sequence still generating is told to stop (a few may have ended on their own): a cancel lost to
    # Python 3.11's wait_for left a stream running to its last token, and this count at 136 of 240 under load.
    assert cancels >= 200, f"{cancels} of {8 * ABANDONED} cancels published"
    with httpx.Client(timeout=60) as client:   # and the gateway still serves
        assert client.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}).status_code \
            == 200
