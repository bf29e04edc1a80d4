"""The Cluster-safe key layout (broker/keys.py): what one script or transaction touches hashes to one slot, computed
with Redis Cluster's own slot function (CRC16-XMODEM of the hash tag, mod 16384) on the real key names, and the
scripts are called with exactly those keys."""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from inferline.server.broker import keys

MODELS = ["cnn", "lstm", "sentiment", "transformer", "gpt2", "my-model_v2.1", "a", "x" * 64]
KEY_IDS = ["0123456789abcdef", "fedcba9876543210", "00000000deadbeef"]


def crc16_xmodem(data: bytes) -> int:
    """Redis Cluster's CRC16 (XMODEM: poly 0x1021, init 0), written out here so the test does not only trust
    redis-py's copy."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key: str) -> int:
    """Cluster spec: hash only the first {...} with something inside it."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16_xmodem(raw) % 16384


def test_the_slot_function_is_redis_clusters() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3   # the spec's test vector
    for key in ["foo", "{user1000}.following", "a{}b", "{}{x}", *keys.enqueue_keys("cnn")]:
        assert slot(key) == key_slot(key.encode()), key


@pytest.mark.parametrize("group", sorted(keys.ATOMIC))
def test_every_atomic_group_is_one_slot(group: str) -> None:
    builder = keys.ATOMIC[group]
    owners = KEY_IDS if group == "admit" else MODELS
    for owner in owners:
        names = builder(owner)
        assert len(names) >= 2
        assert {slot(k) for k in names} == {slot(names[0])}, (group, owner, names)


def test_the_auth_index_and_marker_share_a_slot() -> None:
    assert len({slot(k) for k in keys.auth_index_keys()}) == 1


def test_a_models_keys_all_share_its_slot_and_models_spread_over_shards() -> None:
    for model in MODELS:
        names = [keys.request_stream(model), keys.queued_bytes(model), keys.dead_letter_stream(model),
                 keys.cancel_stream(model), keys.worker(model, "w1"), keys.workers_index(model), keys.stats(model),
                 keys.model_info(model)]
        assert {slot(k) for k in names} == {slot(names[0])}, model
    # `redis-cli --cluster create` with three primaries splits the slots 0-5460, 5461-10922, 10923-16383: the demo
    # models land on all three (sentiment; cnn and gpt2; lstm and transformer), so one model's load is one shard's.
    shard = {m: slot(keys.request_stream(m)) * 3 // 16384 for m in ["cnn", "lstm", "sentiment", "transformer", "gpt2"]}
    assert set(shard.values()) == {0, 1, 2}, shard


def test_owners_with_different_names_do_not_share_a_tag() -> None:
    """A model, a key and a gateway with the same name are three tags (a model named like a key id cannot pull that
    key's rate state onto its shard by construction, and the other way round)."""
    same = "0123456789abcdef"
    assert len({keys.request_stream(same).split(":", 2)[2], keys.api_key(same).split(":", 3)[3],
                keys.reply_stream(same).split(":", 2)[2]}) == 3


def test_the_scripts_are_called_with_one_slot(redis_url: str) -> None:
    """Run the enqueue, admission and acknowledge scripts against a real Redis while watching what it runs
    (MONITOR): each EVAL/EVALSHA names keys of one slot, and the enqueue no longer names the reply stream."""
    from inferline.server.broker.client import connect
    from inferline.server.broker.consumer import ModelQueue
    from inferline.server.broker.enqueue import Enqueuer
    from inferline.server.broker.ratelimit import Limits, RateLimiter
    from inferline.server.protocol import Envelope, Reply

    async def main() -> list[list[str]]:
        redis = connect(redis_url)
        seen: list[list[str]] = []
        async with redis.monitor() as monitor:
            async def watch() -> None:
                async for event in monitor.listen():
                    # MONITOR's line joins the arguments with spaces, a script's source included: the keys are the
                    # numkeys arguments that follow numkeys, which stands right before the first key
                    parts = [p.strip('"') for p in event["command"].split()]
                    if parts and parts[0].upper() in ("EVAL", "EVALSHA"):
                        first = next(i for i, p in enumerate(parts) if p.startswith(keys.PREFIX + ":"))
                        seen.append(parts[first:first + int(parts[first - 1])])
            watcher = asyncio.create_task(watch())
            queue = ModelQueue(redis, "layout", "w1")
            await queue.ensure_group()
            enqueuer = Enqueuer(redis)
            await enqueuer.enqueue("layout", Envelope("r1", keys.reply_stream("gw1"), 2**40, "task", ""), b"{}",
                                   cap=10, keep_ms=60_000)
            limiter = RateLimiter(redis, Limits(rate_per_s=10, burst=10, concurrency=2, lease_ms=10_000))
            await limiter.admit("0123456789abcdef", "h", "slot1")
            taken = await queue.read(10, 0.1)
            assert len(taken) == 1, taken
            await queue.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in taken], taken)
            await asyncio.sleep(0.3)
            watcher.cancel()
            await enqueuer.batcher.close()
            await limiter.batcher.close()
            await queue.close()
        await redis.aclose()
        return seen

    seen = asyncio.run(main())
    assert len(seen) >= 3, seen
    for names in seen:
        assert len({slot(k) for k in names}) == 1, names
        assert not any(k.startswith("inferline:reply:") for k in names), names
