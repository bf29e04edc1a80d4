"""`kill -9` of the primary that owns a model's stream, under load: a primary, its replica and one Sentinel (quorum
1), the gateway and worker reaching them through redis+sentinel://. A replica is promoted (the other follows it),
the model answers again within RECOVERED_WITHIN_S, and with `[broker] min_replicas_ack = 1` no accepted request is
lost; without it the row reports how many were (Redis replicates asynchronously: what the primary acknowledged last
may never reach the replica). An accepted request is one that was not refused (503): a 504 or no answer at all is a
lost one. The rows join the printed fault table format (tests/faults.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Cluster, wait_for
from tests.faults import STEADY_S, Row, first_ok_after, printed_rows, run_load, start_sentinel
from tests.test_faults import ECHO, echo_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CLIENTS = 16
DEADLINE_S = 10.0            # outlasts detection (1-2 s) + promotion + reconnects, so a late answer is not a "lost"
RECOVERED_WITHIN_S = 8.0     # after promotion the model answers 200 again within this (measured: 0.1-1.5 s)


@pytest.fixture(scope="module")
def rows(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    yield from printed_rows(request, "failover table (16 clients, loopback; lost = accepted, then 504 or no answer)")


@pytest.mark.parametrize("acks", [0, 1], ids=["async", "min_replicas_ack=1"])
def test_kill_9_primary_under_load(acks: int, tmp_path: Path, rows: list[Row]) -> None:
    from tests.faults import PrivateRedis

    primary = PrivateRedis(tmp_path / "primary")
    primary.start()
    replicas = [PrivateRedis(tmp_path / f"replica{i}", extra=["--replicaof", "127.0.0.1", str(primary.plan.port)])
                for i in range(1)]
    for replica in replicas:
        replica.start()
    # Down after 2 s, not 1: a Sentinel starved of CPU for a second (two test processes on 2 cores) took the newly
    # promoted primary for dead and failed over again, to the old primary just back as a replica; with
    # min_replicas_ack = 1 requests then met 503s (correctly: no replica) for the 10 s that took to settle.
    sentinel, sentinel_port = start_sentinel(tmp_path, primary.plan.port, down_after_ms=2000)
    ask = redis.Redis(port=sentinel_port, socket_timeout=2)
    cluster = Cluster(primary.tcp_url, tmp_path)
    try:
        wait_for(lambda: _replicas_known(ask, 1), 30, "the sentinel knows the replica")
        cluster.redis_url = f"redis+sentinel://127.0.0.1:{sentinel_port}/main"
        if acks:
            cluster.env = {"INFERLINE_BROKER__MIN_REPLICAS_ACK": str(acks)}
        cluster.spec("echo", model=ECHO, max_batch_size=8, timeout_s=DEADLINE_S)
        url = cluster.start_gateway() + "/v2/models/echo/infer"
        cluster.start_worker("echo")
        ports = {r.plan.port for r in replicas}
        marks: dict[str, float] = {}

        async def fault() -> None:
            await asyncio.sleep(STEADY_S)
            primary.kill()
            marks["killed"] = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: _master_port(ask) in ports, 30, "a replica promoted")
            marks["promoted"] = time.monotonic()
            # The old primary comes back empty as the new primary's replica, as a restarted pod asks Sentinel whom to
            # follow (Sentinel itself reconverts a returning primary only after ~10 s): until then min_replicas_ack = 1
            # has no replica to wait for, and requests get 503.
            primary.argv = [*primary.plan.argv, "--replicaof", "127.0.0.1", str(_master_port(ask))]
            await asyncio.to_thread(primary.start)
            await asyncio.to_thread(wait_for, lambda: _role(primary) == b"slave", 30, "the old primary a replica")
            marks["replicated"] = time.monotonic()

        outcomes = asyncio.run(run_load(lambda i: ("echo", url, echo_body(i, 0.005)), {"echo": DEADLINE_S},
                                        CLIENTS, 15, fault))
        lost = [o for o in outcomes if o.status in (504, "lost")]
        assert {o.status for o in outcomes} <= {200, 503, 504, "lost"}, {o.status for o in outcomes}
        # durable: answered again once a replica is back (promotion, then the old primary's restart and sync)
        since = marks["replicated"] if acks else marks["promoted"]
        recovered = first_ok_after(outcomes, "echo", since)
        assert recovered is not None and recovered < RECOVERED_WITHIN_S
        tail = [o for o in outcomes if o.started > since + RECOVERED_WITHIN_S]
        assert tail and {o.status for o in tail} == {200}
        accepted = sum(o.status != 503 for o in outcomes)
        rows.append(Row(f"primary kill -9, {f'min_replicas_ack = {acks}' if acks else 'async replication'}", outcomes,
                        [f"promoted {marks['promoted'] - marks['killed']:.1f} s after the kill",
                         f"replica back {marks['replicated'] - marks['promoted']:.1f} s after",
                         f"200 again {recovered:.1f} s after {'that' if acks else 'promotion'}",
                         f"accepted {accepted}, lost {len(lost)}"]))
        print(f"\nfailover acks={acks}: accepted={accepted} lost={len(lost)} "
              f"promoted_after_s={marks['promoted'] - marks['killed']:.1f} "
              f"replica_back_s={marks['replicated'] - marks['promoted']:.1f} recovered_after_s={recovered:.1f}")
        if acks:
            assert not lost, lost[:5]
    finally:
        cluster.close()
        sentinel.kill()
        sentinel.wait()
        ask.close()
        for replica in replicas:
            replica.stop()
        primary.stop()


def _replicas_known(ask: redis.Redis, n: int) -> bool:
    try:
        return len(ask.sentinel_slaves("main")) >= n
    except redis.RedisError:
        return False


def _role(r: object) -> bytes:
    try:
        with redis.Redis(port=r.plan.port, socket_timeout=1) as client:   # type: ignore[attr-defined]
            return bytes(client.execute_command("ROLE")[0])
    except redis.RedisError:
        return b""


def _master_port(ask: redis.Redis) -> int:
    try:
        return int(ask.sentinel_get_master_addr_by_name("main")[1])
    except (redis.RedisError, TypeError):
        return 0


@pytest.mark.parametrize("acks", [0, 1], ids=["async", "min_replicas_ack=1"])
def test_kill_9_cluster_primary_of_a_models_stream(acks: int, tmp_path: Path, rows: list[Row]) -> None:
    """The same on a Redis Cluster (3 primaries, a replica each; cluster mode): kill -9 of the primary that owns the
    model's slot; its replica takes over (cluster-node-timeout 1 s), the killed node comes back as its replica."""
    from redis.crc import key_slot

    from inferline.server.broker import keys
    from tests.redis_cluster import cluster_support, redis_cluster

    if (why := cluster_support()) is not None:
        pytest.skip(why)
    with redis_cluster(tmp_path / "nodes") as nodes:
        cluster = Cluster(nodes.url, tmp_path)
        cluster.client.close()
        cluster.client = redis.RedisCluster.from_url(nodes.url)   # type: ignore[assignment]
        try:
            cluster.env = {"INFERLINE_BROKER__CLUSTER": "true",
                           **({"INFERLINE_BROKER__MIN_REPLICAS_ACK": str(acks)} if acks else {})}
            cluster.spec("echo", model=ECHO, max_batch_size=8, timeout_s=DEADLINE_S)
            url = cluster.start_gateway() + "/v2/models/echo/infer"
            cluster.start_worker("echo")
            slot = key_slot(keys.request_stream("echo").encode())
            owner = nodes.primary_of_slot(slot)
            marks: dict[str, float] = {}

            async def fault() -> None:
                await asyncio.sleep(STEADY_S)
                nodes.kill(owner)
                marks["killed"] = time.monotonic()
                await asyncio.to_thread(wait_for, lambda: _owner(nodes, slot) not in (owner, 0), 30,
                                        "the replica promoted")
                marks["promoted"] = time.monotonic()
                await asyncio.to_thread(nodes.restart, owner)   # rejoins as the new primary's replica
                await asyncio.to_thread(wait_for, lambda: _role(_Port(owner)) == b"slave", 30, "rejoined as replica")
                marks["replicated"] = time.monotonic()

            outcomes = asyncio.run(run_load(lambda i: ("echo", url, echo_body(i, 0.005)), {"echo": DEADLINE_S},
                                            CLIENTS, 14, fault))
        finally:
            cluster.close()
    lost = [o for o in outcomes if o.status in (504, "lost")]
    assert {o.status for o in outcomes} <= {200, 503, 504, "lost"}, {o.status for o in outcomes}
    since = marks["replicated"] if acks else marks["promoted"]
    recovered = first_ok_after(outcomes, "echo", since)
    assert recovered is not None and recovered < RECOVERED_WITHIN_S
    accepted = sum(o.status != 503 for o in outcomes)
    rows.append(Row(f"Cluster primary kill -9, {f'min_replicas_ack = {acks}' if acks else 'async replication'}",
                    outcomes, [f"promoted {marks['promoted'] - marks['killed']:.1f} s after the kill",
                               f"replica back {marks['replicated'] - marks['promoted']:.1f} s after",
                               f"200 again {recovered:.1f} s after {'that' if acks else 'promotion'}",
                               f"accepted {accepted}, lost {len(lost)}"]))
    print(f"\ncluster failover acks={acks}: accepted={accepted} lost={len(lost)} "
          f"promoted_after_s={marks['promoted'] - marks['killed']:.1f} recovered_after_s={recovered:.1f}")
    if acks:
        assert not lost, lost[:5]


class _Port:
    def __init__(self, port: int) -> None:
        self.plan = self
        self.port = port


def _owner(nodes: object, slot: int) -> int:
    try:
        return int(nodes.primary_of_slot(slot))   # type: ignore[attr-defined]
    except (redis.RedisError, KeyError, ValueError, StopIteration, IndexError):
        return 0
