"""Versions and version lanes without processes: the store's numeric order and pinning, the enqueue script's split
(exact share, lanes in the model's slot, nothing read without a rollout) and a worker's queue reading its lane beside
the common stream, against a real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis

from inferline.server import store
from inferline.server.broker import fleet, keys
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.config import ConfigError, ModelSpec
from inferline.server.protocol import PAYLOAD_FIELD, Envelope, Reply, now_ms
from inferline.server.worker.loading import model_class


def make_store(root: Path, versions: list[str]) -> Path:
    for v in versions:
        (root / "m" / v).mkdir(parents=True)
        (root / "m" / v / store.MANIFEST).write_text(json.dumps({"version": v, "runtime": "inferline:Model"}))
    return root / "m"


def test_versions_order_numerically_and_a_deployment_pins_one(tmp_path: Path) -> None:
    model_dir = make_store(tmp_path, ["9", "10", "2", "20261207T101010"])
    assert [p.name for p in store.versions(model_dir)] == ["2", "9", "10", "20261207T101010"]
    assert store.resolve(model_dir).name == "20261207T101010"
    assert store.resolve(model_dir, "9").name == "9"
    with pytest.raises(FileNotFoundError, match="no version 3"):
        store.resolve(model_dir, "3")
    _, version_dir, manifest = model_class(ModelSpec(name="m", artifact=model_dir, version="10"))
    assert version_dir == model_dir / "10" and manifest["version"] == "10"
    with pytest.raises(ConfigError, match="no version 3"):
        model_class(ModelSpec(name="m", artifact=model_dir, version="3"))
    with pytest.raises(ValueError):
        ModelSpec(name="m", version="1}:x")   # a version is part of Redis key names


def test_the_split_is_exact_over_every_100_requests_and_stays_in_the_models_slot(redis_url: str,
                                                                                 rdb: redis.Redis) -> None:
    async def main() -> tuple[int, int, int, int]:
        client = connect(redis_url)
        enqueuer = Enqueuer(client)

        async def send(n: int, split: bool, priority: str = "normal") -> None:
            for i in range(n):
                await enqueuer.enqueue("m", Envelope(f"r{i}", keys.reply_stream("g"), now_ms() + 60_000, "v2"), b"{}",
                                       cap=10_000, keep_ms=60_000, split=split, priority=priority)

        await send(10, split=True)                  # no split stored: the common stream
        common = rdb.xlen(keys.request_stream("m"))
        await fleet.begin_rollout(client, "m", {"state": "starting"}, "1", "2", 1, limit=10)
        await fleet.set_share(client, "m", 20)
        await send(10, split=False)                 # a gateway that has not seen the rollout: the common stream
        await send(300, split=True)
        await send(100, split=True, priority="high")   # the split first, then the priority lane of that version
        assert await fleet.lane_depth(client, "m", "2") == 60 + 20   # a version's lane counts its priority lanes
        await enqueuer.batcher.close()
        await client.aclose()
        return common, rdb.xlen(keys.request_stream("m")), rdb.xlen(keys.request_stream("m", "1")), \
            rdb.xlen(keys.request_stream("m", "2")), rdb.xlen(keys.request_stream("m", "1", "high")), \
            rdb.xlen(keys.request_stream("m", "2", "high"))

    common_before, common, old, new, old_high, new_high = asyncio.run(main())
    assert (common_before, common) == (10, 20)
    assert (old, new) == (240, 60)   # 20 of every 100, whichever gateway sent them
    assert (old_high, new_high) == (80, 20)
    assert keys.request_stream("m", "2", "high") == "inferline:req:{m:m}:v=2:p=high"


def test_a_worker_reads_its_lane_and_the_common_stream_and_acks_each_on_its_own(redis_url: str,
                                                                               rdb: redis.Redis) -> None:
    async def main() -> tuple[list[str], list[int]]:
        client = connect(redis_url)
        v2 = ModelQueue(client, "m", "w2", "2")
        await v2.ensure_group()
        await ModelQueue(client, "m", "w1", "1").ensure_group()
        for stream, rid in ((keys.request_stream("m", priority="low"), "low"), (keys.request_stream("m"), "c"),
                            (keys.request_stream("m", "2"), "l2"), (keys.request_stream("m", "1"), "l1"),
                            (keys.request_stream("m", "2", "high"), "h2")):
            envelope = Envelope(rid, keys.reply_stream("g"), now_ms() + 60_000, "v2")
            rdb.xadd(stream, {**envelope.fields(), PAYLOAD_FIELD: b"{}"})
        got = await v2.read(10, 0.1)
        await v2.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in got], got)
        await v2.close()
        await client.aclose()
        return [f"{d.request_id}@{d.lane}:{d.priority}" for d in got], \
            [rdb.xlen(s) for s in keys.model_streams("m", ["1", "2"])]

    read, left = asyncio.run(main())
    # never version 1's lane; the highest priority first, whichever of its two streams
    assert read == ["h2@2:high", "c@:normal", "l2@2:normal", "low@:low"]
    assert left == [0, 0, 0, 0, 1, 0, 0, 0, 0]   # each acked and deleted on its own stream; v1's entry untouched
    reply = rdb.xrange(keys.reply_stream("g"))[-1][1]
    assert reply[b"v"] == b"2"           # the answer names its version (x-model-version)


def test_a_model_without_store_versions_still_names_its_version(redis_url: str, rdb: redis.Redis) -> None:
    async def main() -> None:
        client = connect(redis_url)
        queue = ModelQueue(client, "m", "w0", label="7")   # its class's own version; no lane
        await queue.reply_and_ack([(keys.reply_stream("g"), Reply("r", b"{}"))], [])
        await queue.close()
        await client.aclose()

    asyncio.run(main())
    assert rdb.xrange(keys.reply_stream("g"))[-1][1][b"v"] == b"7"
