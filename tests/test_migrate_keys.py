"""`inferline migrate-keys` as an operator runs it (a real subprocess) on a real Redis holding a deployment's keys in
the layout before hash tags: each is renamed to keys.py's name or dropped, a request stream keeps its consumer group
and pending entry, nothing that exists under a new name is overwritten, and a second run finds nothing to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from inferline.server.broker import keys
from tests.conftest import child_env

KEY_ID = "0123456789abcdef"


def migrate_keys(redis_url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferline.server.cli", "migrate-keys", *args], capture_output=True,
                          text=True, env=child_env(REDIS_URL=redis_url), cwd=tmp, timeout=60)


def old_deployment(rdb: redis.Redis) -> None:
    """What an inferline before the Cluster-safe layout left in Redis: one model "cnn" with a queued entry
    delivered to a (now stopped) worker, one API key with its rate state, and the ephemeral keys."""
    rdb.xadd("inferline:req:cnn", {"p": b"x", "id": "r1"})
    rdb.xgroup_create("inferline:req:cnn", keys.GROUP, id="0")
    rdb.xreadgroup(keys.GROUP, "old-worker", {"inferline:req:cnn": ">"}, count=1)
    rdb.set("inferline:req:cnn:bytes", 1)
    rdb.xadd("inferline:dlq:cnn", {"id": "r0"})
    rdb.xadd("inferline:cancel:cnn", {"id": "r2"})
    rdb.set("inferline:model:cnn", b"{}")
    rdb.hset("inferline:stats:cnn", "requests", 5)
    rdb.hset(f"inferline:auth:key:{KEY_ID}", mapping={"hash": "h", "scopes": "infer"})
    rdb.sadd("inferline:auth:keys", KEY_ID)
    rdb.hset("inferline:auth:key:_managed", "updated", "1")
    rdb.hset(f"inferline:auth:bucket:{KEY_ID}", "tokens", 3)
    rdb.zadd(f"inferline:auth:inflight:{KEY_ID}", {"s": 1})
    rdb.hset("inferline:worker:cnn:w1", "pid", 1)
    rdb.zadd("inferline:workers:cnn", {"w1": 1})
    rdb.xadd("inferline:reply:gw1", {"pack": b""})


def test_migrate_keys_renames_the_old_layout_and_keeps_the_streams_groups(redis_url: str, rdb: redis.Redis,
                                                                           tmp_path: Path) -> None:
    old_deployment(rdb)
    before = sorted(k.decode() for k in rdb.keys("*"))

    dry = migrate_keys(redis_url, tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(k.decode() for k in rdb.keys("*")) == before      # a dry run changes nothing
    assert f"inferline:req:cnn\t-> {keys.request_stream('cnn')}\t(not done: dry run)" in dry.stdout

    done = migrate_keys(redis_url, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "14 old key(s) found, 14 migrated" in done.stderr
    assert sorted(k.decode() for k in rdb.keys("*")) == sorted([
        keys.request_stream("cnn"), keys.queued_bytes("cnn"), keys.dead_letter_stream("cnn"),
        keys.cancel_stream("cnn"), keys.model_info("cnn"), keys.stats("cnn"), keys.api_key(KEY_ID),
        keys.API_KEY_INDEX, keys.AUTH_MARKER])
    stream = keys.request_stream("cnn")
    assert rdb.xpending(stream, keys.GROUP)["pending"] == 1         # the group and its delivered entry moved along
    assert rdb.xlen(stream) == 1 and rdb.get(keys.queued_bytes("cnn")) == b"1"
    assert rdb.hget(keys.api_key(KEY_ID), "hash") == b"h" and rdb.smembers(keys.API_KEY_INDEX) == {KEY_ID.encode()}

    again = migrate_keys(redis_url, tmp_path)
    assert again.returncode == 0 and "0 old key(s) found" in again.stderr


def test_migrate_keys_never_overwrites_a_new_name(redis_url: str, rdb: redis.Redis, tmp_path: Path) -> None:
    rdb.set("inferline:model:cnn", b"old")
    rdb.set(keys.model_info("cnn"), b"new")     # a new-version worker already ran
    rdb.set("inferline:something:else", b"?")   # not a name of the old layout
    result = migrate_keys(redis_url, tmp_path)
    assert result.returncode == 1
    assert "(not done: the new name exists already" in result.stdout and "inferline:something:else" in result.stdout
    assert rdb.get(keys.model_info("cnn")) == b"new" and rdb.get("inferline:model:cnn") == b"old"
