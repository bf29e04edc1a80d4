"""inferline on a real Redis Cluster (3 primaries + 3 replicas on loopback, tests/redis_cluster.py), as deployed:
two gateway processes and one worker process per model, every process given REDIS_URL naming one node and
INFERLINE_BROKER__CLUSTER=true. Four models whose request streams hash to all three shards: echo-b (slot 3357,
shard 0), echo-c (7484, shard 1), echo-a (15742) and echo-d (11739, shard 2). Under concurrent load every answer is
right and none is lost; API keys and a key's rate limit hold across both gateways; and a busy model's slot moved live
to another primary (SETSLOT IMPORTING/MIGRATING, MIGRATE key by key, SETSLOT NODE: what `redis-cli --cluster
reshard` does) fails no request."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from inferline.server.broker import keys
from tests.conftest import Cluster, every_model_ready, wait_for
from tests.redis_cluster import Cluster as RedisCluster
from tests.redis_cluster import cluster_support, redis_cluster
from tests.security_cluster import ECHO, bearer, create_key, start_gateway, v2_body
from tests.test_security_redis import PASSWORDS, acl_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(cluster_support() is not None, reason=str(cluster_support()))]

MODELS = ("echo-a", "echo-b", "echo-c", "echo-d")
CLUSTER_ENV = {"INFERLINE_BROKER__CLUSTER": "true"}


def user_url(rc: RedisCluster, user: str, password: str) -> str:
    """The URL of the cluster's first node as one of SECURITY.md's users."""
    return rc.url.replace("redis://", f"redis://{user}:{PASSWORDS[password]}@")


def acl_file(tmp: Path) -> Path:
    """SECURITY.md's ACL block with the test's passwords, and a default user with every right for the test's own
    checks and for joining the nodes."""
    path = tmp / "users.acl"
    path.write_text("\n".join([*[ln.replace("user default off", "user default on nopass ~* &* +@all")
                                  for ln in acl_lines()]]) + "\n")
    return path


class OnCluster(Cluster):
    """tests.conftest's process cluster, its workers told that REDIS_URL names a Cluster node (as the worker ACL
    user); the test's own client is the default user."""

    def __init__(self, rc: RedisCluster, tmp: Path) -> None:
        super().__init__(user_url(rc, "inferline-worker", "WORKER_PASSWORD"), tmp)
        self.client.close()
        self.client = redis.RedisCluster.from_url(rc.url)   # type: ignore[assignment]
        self.env = dict(CLUSTER_ENV)


class Served:
    def __init__(self, rc: RedisCluster, procs: OnCluster, gateways: list[str], key: str, limited: str) -> None:
        self.rc, self.procs, self.gateways, self.key, self.limited = rc, procs, gateways, key, limited


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("cluster-serving")
    with redis_cluster(tmp / "redis", acl=str(acl_file(tmp))) as rc:
        procs = OnCluster(rc, tmp)
        try:
            for model in MODELS:
                procs.spec(model, model=ECHO, max_batch_size=16, timeout_s=60)
            admin = user_url(rc, "inferline-admin", "ADMIN_PASSWORD")
            key, _ = create_key(admin, cluster=True, name="load", rate_per_s=100_000, burst=100_000,
                                concurrency=10_000)
            limited, _ = create_key(admin, cluster=True, name="limited", rate_per_s=0.001, burst=5)
            gateways = [start_gateway(procs, f"gw{i}", security={"auth": "required"}, env=CLUSTER_ENV,
                                      redis_url=user_url(rc, "inferline-gateway", "GATEWAY_PASSWORD"))
                        for i in range(2)]
            for model in MODELS:
                procs.start_worker(model)
            for url in gateways:
                wait_for(lambda url=url: every_model_ready(url, MODELS), 60, f"{url}: every model ready")
                # One request first: a gateway's first check of a key runs scrypt, and 32 first checks at once
                # would spend the peer's failure throttle (gateway/throttle.py) before the first one matched.
                assert httpx.post(f"{url}/v2/models/echo-a/infer", json=v2_body(1.0), headers=bearer(key),
                                  timeout=30).status_code == 200
            yield Served(rc, procs, gateways, key, limited)
        finally:
            procs.close()


async def load(served: Served, requests: list[tuple[str, float]], concurrency: int,
               key: str | None = None) -> list[tuple[str, float, httpx.Response | Exception]]:
    """POST each (model, value) round-robin over the gateways, `concurrency` at a time."""
    gateways = itertools.cycle(served.gateways)
    todo = [(next(gateways), model, value) for model, value in requests]
    out: list[tuple[str, float, httpx.Response | Exception]] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, url: str, model: str, value: float) -> None:
        async with gate:
            try:
                r = await client.post(f"{url}/v2/models/{model}/infer", json=v2_body(value),
                                      headers=bearer(key or served.key))
                out.append((model, value, r))
            except httpx.HTTPError as exc:
                out.append((model, value, exc))

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*[one(client, *t) for t in todo])
    return out


def failures(results: list[tuple[str, float, httpx.Response | Exception]]) -> list[Any]:
    bad = []
    for model, value, r in results:
        if isinstance(r, Exception) or r.status_code != 200 or r.json()["outputs"][0]["data"] != [2.0 * value]:
            bad.append((model, value, r if isinstance(r, Exception) else (r.status_code, r.text[:200])))
    return bad


def test_the_models_streams_spread_over_all_shards(served: Served) -> None:
    owners = {m: served.rc.primary_of_slot(key_slot(keys.request_stream(m).encode())) for m in MODELS}
    assert len(set(owners.values())) == 3, owners


def test_two_gateways_four_models_under_load_every_answer_right(served: Served) -> None:
    requests = [(MODELS[i % 4], float(i)) for i in range(400)]
    results = asyncio.run(load(served, requests, concurrency=32))
    assert len(results) == 400 and failures(results) == []
    client = served.procs.client
    # Answered entries are deleted, their bytes counted off: an ack whose replies went to another node rides the
    # worker's next read, or goes alone within sender.ACK_WAIT_S (10 ms) of the replies: 1 s is ample.
    waited = time.monotonic() + 1.0
    while any(client.xlen(keys.request_stream(m)) for m in MODELS) and time.monotonic() < waited:
        time.sleep(0.02)
    for model in MODELS:
        assert client.xlen(keys.request_stream(model)) == 0
    for url in served.gateways:   # the broker's view of every model, read across the shards as the gateway's user
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200 and all(f'model="{m}"' in metrics.text for m in MODELS)


def test_keys_and_rate_limits_hold_across_both_gateways(served: Served) -> None:
    results = asyncio.run(load(served, [("echo-b", float(i)) for i in range(12)], concurrency=1, key=served.limited))
    codes = [r.status_code for _, _, r in results if isinstance(r, httpx.Response)]
    assert sorted(codes) == [200] * 5 + [429] * 7   # burst 5 for the key, whichever gateway each request hit
    for url in served.gateways:
        assert httpx.post(f"{url}/v2/models/echo-b/infer", json=v2_body(1.0),
                          headers=bearer("not-a-key")).status_code == 401
        assert httpx.post(f"{url}/v2/models/echo-b/infer", json=v2_body(1.0)).status_code == 401


def test_a_busy_models_slot_moved_live_fails_no_request(served: Served) -> None:
    """Move echo-a's slot (shard 2) to the first shard's primary while both gateways send it requests at c=16 (and
    the other models some): the stream, its consumer group with what is pending, and its byte counter migrate key
    by key (ASK meanwhile), then the slot is handed over (MOVED after). Not one request fails."""
    rc = served.rc
    slot = key_slot(keys.request_stream("echo-a").encode())
    source = rc.primary_of_slot(slot)
    target = next(p for p in rc.primaries() if p != source)
    moved = threading.Event()

    def move() -> None:
        time.sleep(0.5)   # the load is running
        rc.move_slot(slot, target, batch=1, between=lambda: time.sleep(0.3))
        moved.set()

    async def scenario() -> list[tuple[str, float, httpx.Response | Exception]]:
        mover = asyncio.create_task(asyncio.to_thread(move))
        results: list[tuple[str, float, httpx.Response | Exception]] = []
        n = 0
        while not moved.is_set() or n < 300:
            batch = [("echo-a" if i % 4 else MODELS[(i // 4) % 4], float(n + i)) for i in range(64)]
            results += await load(served, batch, concurrency=16)
            n += 64
        await mover
        return results

    results = asyncio.run(scenario())
    assert rc.primary_of_slot(slot) == target
    assert failures(results) == [] and len(results) >= 300
    rc.wait_ok()
