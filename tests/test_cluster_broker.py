"""The broker's core calls on a real Redis Cluster (3 primaries + 3 replicas on loopback, tests/redis_cluster.py):
a tick's calls split by node, enqueue -> read -> reply -> ack across shards, dead letters, reclaims, cancels, rate
limits, and the redirects of a slot moved under the hot paths (ASK while it moves, MOVED after), a script a node
forgot. Models here: sentiment (slot 2586, shard 0), cnn (7058, shard 1), lstm (13621, shard 2)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from inferline.server.broker import keys
from inferline.server.broker.cancels import Cancels
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.broker.nodes import Cluster as ClusterClient
from inferline.server.broker.ratelimit import ADMITTED, LIMITED, Limits, RateLimiter
from inferline.server.broker.replies import ReplyInbox
from inferline.server.broker.ticks import TickBatcher
from inferline.server.protocol import Cancel, Envelope, Reply, now_ms
from tests.redis_cluster import Cluster, cluster_support, redis_cluster
from tests.security_cluster import make_certs
from tests.test_security_redis import PASSWORDS, acl_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120),
              pytest.mark.skipif(cluster_support() is not None, reason=str(cluster_support()))]

MODELS = ("sentiment", "cnn", "lstm")
COUNT = "return redis.call('INCR', KEYS[1])"


def slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.fixture(scope="module")
def rc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def crdb(rc: Cluster) -> Iterator[redis.RedisCluster]:
    """A clean cluster for each test (every primary flushed, moved slots left where they are)."""
    client = redis.RedisCluster.from_url(rc.url)
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    yield client
    client.close()


def test_the_models_spread_over_the_shards(rc: Cluster) -> None:
    owners = {m: rc.primary_of_slot(slot(keys.request_stream(m))) for m in MODELS}
    assert len(set(owners.values())) == 3, owners


def test_a_ticks_calls_go_to_each_keys_node_one_round_trip_per_node(rc: Cluster, crdb: redis.RedisCluster) -> None:
    names = [keys.request_stream(m) + ":n" for m in MODELS]

    async def run() -> tuple[list[Any], int]:
        client = connect(rc.url, cluster=True)
        batcher = TickBatcher(client)
        try:
            calls = [batcher.script(COUNT, [names[i % 3]], []) for i in range(30)]
            calls += [batcher.command("SET", "{x}k", "v"), batcher.command("HSET", "{x}k", "f", "v")]  # wrong type
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, batcher.pipelines
        finally:
            await client.aclose()

    results, pipelines = asyncio.run(run())
    assert sorted(results[:30]) == sorted(list(range(1, 11)) * 3)
    assert results[30] == b"OK" and isinstance(results[31], redis.ResponseError) and "WRONGTYPE" in str(results[31])
    assert pipelines in (1 + 3, 3)   # the first tick waits for the slot map and the script, then one per node
    assert [int(crdb.get(n)) for n in names] == [10, 10, 10]


def test_requests_cross_shards_and_come_back(rc: Cluster, crdb: redis.RedisCluster) -> None:
    """Gateway side (enqueue, reply inbox) and worker side (group read, reply, ack) of three models on three shards,
    the reply stream on whichever shard its gateway id hashes to: every request answered once, streams emptied,
    the byte counters back to 0."""
    async def run() -> list[Reply]:
        client = connect(rc.url, cluster=True)
        inbox = ReplyInbox(client, "gw1")
        enqueuer = Enqueuer(client)
        queues = [ModelQueue(client, m, "w1") for m in MODELS]
        try:
            await inbox.create()
            for q in queues:
                await q.ensure_group()
            for i in range(30):
                model = MODELS[i % 3]
                await enqueuer.enqueue(model, Envelope(f"r{i}", inbox.stream, now_ms() + 30_000, "v2"),
                                       b"p%d" % i, 100, 60_000)
            for q in queues:
                got = await q.read(100, 0.5)
                assert len(got) == 10
                await q.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, d.payload)) for d in got], got)
            replies: list[Reply] = []
            for _ in range(20):
                replies += await inbox.read(0.2)
                if len(replies) >= 30:
                    break
            return replies
        finally:
            for q in queues:
                await q.close()
            await client.aclose()

    replies = asyncio.run(run())
    assert sorted(r.request_id for r in replies) == sorted(f"r{i}" for i in range(30))
    for m in MODELS:
        assert crdb.xlen(keys.request_stream(m)) == 0
        assert int(crdb.get(keys.queued_bytes(m)) or 0) == 0


def test_reclaim_dead_letter_and_cancels_on_the_cluster(rc: Cluster, crdb: redis.RedisCluster) -> None:
    async def run() -> None:
        client = connect(rc.url, cluster=True)
        inbox = ReplyInbox(client, "gw2")
        dead, alive = ModelQueue(client, "cnn", "dead"), ModelQueue(client, "cnn", "alive")
        cancels = Cancels(client, "lstm")
        try:
            await inbox.create()
            await dead.ensure_group()
            for i in range(2):
                await Enqueuer(client).enqueue("cnn", Envelope(f"c{i}", inbox.stream, now_ms() + 30_000, "v2"), b"x",
                                               100, 60_000)
            assert len(await dead.read(10, 0.5)) == 2   # the "dead" worker never answers
            await asyncio.sleep(0.05)
            fresh, exhausted = await alive.reclaim(min_idle_ms=10, max_tries=1)
            assert fresh == [] and len(exhausted) == 2   # delivered twice now: over max_tries=1
            await alive.dead_letter(exhausted, "test")
            replies = await inbox.read(1.0)
            assert sorted(r.request_id for r in replies) == ["c0", "c1"] and all(not r.ok for r in replies)
            assert await cancels.read(0.05) == []
            await cancels.publish(Cancel("r9"))
            got = await cancels.read(0.5)
            assert [c.request_id for c, _ in got] == ["r9"]
        finally:
            for q in (dead, alive):
                await q.close()
            await client.aclose()

    asyncio.run(run())
    assert crdb.xlen(keys.dead_letter_stream("cnn")) == 2
    assert crdb.xlen(keys.request_stream("cnn")) == 0
    assert float(crdb.hget(keys.stats("cnn"), keys.STAT_DEAD_LETTERED) or 0) == 2


def test_rate_limits_hold_for_keys_on_every_shard(rc: Cluster, crdb: redis.RedisCluster) -> None:
    key_ids = [k for k in (f"{i:016x}" for i in range(40))][:12]
    for k in key_ids:
        crdb.hset(keys.api_key(k), mapping={"hash": "h", "scopes": "infer", "models": "*"})
    assert len({rc.primary_of_slot(slot(keys.api_key(k))) for k in key_ids}) >= 2

    async def run() -> list[int]:
        client = connect(rc.url, cluster=True)
        limiter = RateLimiter(client, Limits(rate_per_s=0.001, burst=3, concurrency=100, lease_ms=60_000))
        try:
            admitted = await asyncio.gather(*[limiter.admit(k, "h", f"s{i}") for k in key_ids for i in range(5)])
            await asyncio.gather(*[limiter.release(k, f"s{i}") for k in key_ids for i in range(5)])
            return [a.code for a in admitted]
        finally:
            await client.aclose()

    codes = asyncio.run(run())
    for n in range(len(key_ids)):
        mine = codes[5 * n:5 * n + 5]
        assert mine.count(ADMITTED) == 3 and mine.count(LIMITED) == 2
    assert all(crdb.zcard(keys.in_flight(k)) == 0 for k in key_ids)


def test_a_slot_moved_under_the_hot_paths_is_followed(rc: Cluster, crdb: redis.RedisCluster) -> None:
    """Move the cnn stream's slot to another primary while enqueues and group reads run: ASK while its keys move
    (the stream and its byte counter migrated one at a time, so a script meets TRYAGAIN too), MOVED after; nothing
    fails and the router learns the new owner. Then a script the new owner's node forgot is loaded there."""
    model = "cnn"
    stream_slot = slot(keys.request_stream(model))
    source = rc.primary_of_slot(stream_slot)
    target = next(p for p in rc.primaries() if p != source)

    async def run() -> tuple[int, int, str, dict[str, int]]:
        client = connect(rc.url, cluster=True)
        assert isinstance(client, ClusterClient)
        queue = ModelQueue(client, model, "w")
        enqueuer = Enqueuer(client)
        sent = read = 0
        try:
            await queue.ensure_group()
            await enqueuer.enqueue(model, Envelope("first", keys.reply_stream("g"), now_ms() + 30_000, "v2"), b"x",
                                   1000, 60_000)
            moving = asyncio.create_task(asyncio.to_thread(rc.move_slot, stream_slot, target, 1,
                                                           lambda: __import__("time").sleep(0.2)))
            sent = 1
            while not moving.done() or sent < 40:
                await enqueuer.enqueue(model, Envelope(f"r{sent}", keys.reply_stream("g"), now_ms() + 30_000, "v2"),
                                       b"x", 1000, 60_000)
                sent += 1
                got = await queue.read(100, None)
                read += len(got)
                if got:
                    await queue.reply_and_ack([], got)
                await asyncio.sleep(0.01)
            await moving
            for _ in range(10):
                got = await queue.read(100, 0.1)
                read += len(got)
                if got:
                    await queue.reply_and_ack([], got)
            client.router.owner[stream_slot] = f"127.0.0.1:{source}"   # a stale map: the next call meets MOVED
            await enqueuer.enqueue(model, Envelope("late", keys.reply_stream("g"), now_ms() + 30_000, "v2"), b"x",
                                   1000, 60_000)
            with contextlib.closing(rc.node(target)) as node:
                node.script_flush()
            await enqueuer.enqueue(model, Envelope("flushed", keys.reply_stream("g"), now_ms() + 30_000, "v2"), b"x",
                                   1000, 60_000)
            read += len(await queue.read(100, 0.5))
            return sent + 2, read, client.router.node_of(keys.request_stream(model)), client.router.redirects
        finally:
            await queue.close()
            await client.aclose()

    sent, read, owner, redirects = asyncio.run(run())
    assert redirects["ASK"] > 0 and redirects["MOVED"] > 0
    assert rc.primary_of_slot(stream_slot) == target
    assert owner == f"127.0.0.1:{target}" and read == sent
    assert crdb.xlen(keys.request_stream(model)) == 2   # "late" and "flushed": read, not acked



def test_tls_and_acl_users_on_a_tls_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Cluster that speaks only TLS (clients, bus, replication), its users SECURITY.md's: the gateway's user queues
    requests for models on two shards and reads its replies, the worker's user reads, answers and acks them; the
    node clients the hot paths open for each shard verify each node with REDIS_CA_FILE and log in as the same user."""
    certs = make_certs(tmp_path / "certs")
    acl = tmp_path / "users.acl"
    acl.write_text("\n".join(ln.replace("user default off", "user default on nopass ~* &* +@all")
                             for ln in acl_lines()) + "\n")
    monkeypatch.setenv("REDIS_CA_FILE", str(certs["ca.pem"]))

    with redis_cluster(tmp_path / "nodes", acl=str(acl), tls=certs) as tls_rc:
        def as_user(user: str, password: str) -> str:
            return tls_rc.url.replace("rediss://", f"rediss://{user}:{PASSWORDS[password]}@")

        async def run() -> list[Reply]:
            gateway = connect(as_user("inferline-gateway", "GATEWAY_PASSWORD"), cluster=True)
            worker = connect(as_user("inferline-worker", "WORKER_PASSWORD"), cluster=True)
            inbox = ReplyInbox(gateway, "gw-b")   # reply stream slot 13344: the third shard
            queues = [ModelQueue(worker, m, "w") for m in ("sentiment", "cnn")]
            try:
                await inbox.create()
                for q in queues:
                    await q.ensure_group()
                    await Enqueuer(gateway).enqueue(q.model, Envelope(f"r-{q.model}", inbox.stream,
                                                                      now_ms() + 30_000, "v2"), b"x", 100, 60_000)
                    got = await q.read(10, 0.5)
                    await q.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"ok")) for d in got], got)
                replies: list[Reply] = []
                for _ in range(10):
                    replies += await inbox.read(0.2)
                    if len(replies) >= 2:
                        break
                assert isinstance(worker, ClusterClient) and len(worker.router.clients) == 3   # 2 shards + inbox's
                return replies
            finally:
                for q in queues:
                    await q.close()
                await gateway.aclose()
                await worker.aclose()

        replies = asyncio.run(run())
    assert sorted(r.request_id for r in replies) == ["r-cnn", "r-sentiment"]
