"""Nothing is lost, nothing hangs: dead workers, poison requests, full queues and deadlines, with real
worker processes and a real gateway on a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from inferline.server.broker import keys
from inferline.server.broker.enqueue import Enqueuer
from inferline.server.protocol import Envelope, Reply, now_ms, unpack_replies
from tests.conftest import Cluster, live_workers, wait_for

ECHO = "tests.runtimes:Echo"


def v2_body(value: float, **params: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}], "parameters": params}


async def post_all(url: str, bodies: list[dict[str, Any]], timeout: float = 60) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*[client.post(url, json=b) for b in bodies])


async def worker_holds_some(cluster: Cluster, model: str, what: str) -> None:
    """Wait (off the event loop) until a worker has read requests of `model` and not yet answered them."""
    stream = keys.request_stream(model)
    await asyncio.to_thread(wait_for, lambda: cluster.client.xpending(stream, keys.GROUP)["pending"] > 0, 10, what)


def test_kill_9_worker_with_requests_in_flight_loses_nothing(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=4, visibility_timeout_s=1.0, timeout_s=60)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    victim = cluster.start_worker("echo")
    stream = keys.request_stream("echo")

    async def scenario() -> list[httpx.Response]:
        sending = asyncio.create_task(post_all(url, [v2_body(i, sleep_s=0.4) for i in range(12)]))
        # wait until the victim holds delivered-but-unanswered requests, then kill it without warning
        await worker_holds_some(cluster, "echo", "requests in flight")
        os.kill(victim.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        await asyncio.to_thread(cluster.start_worker, "echo")
        return await sending

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["outputs"][0]["data"][0] for r in responses) == [2.0 * i for i in range(12)]
    wait_for(lambda: cluster.client.xlen(stream) == 0, 5, "stream emptied")   # answered entries are deleted


def test_poison_request_is_dead_lettered_and_its_caller_gets_500(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, visibility_timeout_s=0.5, max_tries=2, timeout_s=60)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")

    async def scenario() -> list[httpx.Response]:
        sending = asyncio.create_task(post_all(url, [v2_body(1, kill=True)]))
        deaths = 0
        while not sending.done() and deaths < 5:   # keep replacing the workers the poison kills
            dead = [w for w in cluster.workers if w.poll() is not None]
            if len(dead) > deaths:
                deaths = len(dead)
                # the successor may claim the poison (and die) before it is seen live: do not wait
                await asyncio.to_thread(cluster.start_worker, "echo", False)
            await asyncio.sleep(0.05)
        return await sending

    (poisoned,) = asyncio.run(scenario())
    assert poisoned.status_code == 500
    assert poisoned.headers["x-should-retry"] == "false"
    assert "dead-letter" in poisoned.json()["error"]
    assert sum(w.poll() is not None for w in cluster.workers) == 2   # it ran exactly max_tries times
    (entry,) = cluster.client.xrange(keys.dead_letter_stream("echo"))
    assert entry[1][b"id"].decode() == poisoned.headers["x-request-id"]
    # the worker that survives still answers normal requests
    (ok,) = asyncio.run(post_all(url, [v2_body(3)]))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [6.0]


def test_exception_in_model_fails_only_that_item(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=8, max_batch_delay_ms=50)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")
    bodies = [v2_body(i, sleep_s=0.05) for i in range(6)] + [v2_body(99, **{"raise": True}), v2_body(7, reject=True)]
    responses = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in responses] == [200] * 6 + [500, 422]
    assert responses[7].json()["error"] == "`reject` was set"
    assert "failed on request" in responses[6].json()["error"]


def test_quick_batches_run_on_the_workers_loop_and_slow_ones_on_its_model_thread(cluster: Cluster) -> None:
    """A quick batch costs less run on the worker's event loop than handed to the model thread and back; a slow one
    must not hold the loop (its reads, beats and replies). The worker decides from the last batch's time per request:
    with none yet, and on the first slow batch after quick ones, it cannot know better."""
    cluster.spec("echo", model=ECHO, max_batch_size=4)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")

    def output(reply: httpx.Response, name: str) -> Any:
        assert reply.status_code == 200, reply.text
        (found,) = [o for o in reply.json()["outputs"] if o["name"] == name]
        return found["data"][0]

    def ran_on(**params: Any) -> str:
        return str(output(httpx.post(url, json=v2_body(1, where=True, **params), timeout=30), "thread"))

    quick = [ran_on() for _ in range(6)]
    assert quick[0].startswith("model") and quick[1:].count("MainThread") >= 3, quick   # the first: no estimate yet
    # under load (batches filling up: the worker waits for more and reads the next batch while one runs)
    crowded = [r for _ in range(3) for r in asyncio.run(post_all(url, [v2_body(i, where=True) for i in range(16)]))]
    batched = [str(output(r, "thread")) for r in crowded if output(r, "batch") > 1]
    # Most, not all: a batch the machine stalled (another process on the cores) sends the next to the model thread.
    # Before quick batches ran inline under load too, only those before the traffic counted as busy did (~1 in 6).
    assert len(batched) >= 16 and batched.count("MainThread") >= 0.4 * len(batched), batched
    slow = [ran_on(sleep_s=0.03) for _ in range(4)]
    assert all(t.startswith("model") for t in slow[1:]), slow   # the first of them could not be known to be slow
    assert ran_on().startswith("model")   # a quick one after them: its estimate is the last batch's


def test_full_queue_answers_503_with_retry_after(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=1, queue_cap=2, timeout_s=30)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")
    responses = asyncio.run(post_all(url, [v2_body(i, sleep_s=0.3) for i in range(8)]))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert "queue_cap" in refused.json()["error"]


def test_deadline_answers_504_and_workers_skip_expired_work(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=1, timeout_s=0.5)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")
    stream = keys.request_stream("echo")

    async def scenario() -> list[httpx.Response]:
        # the second request only once the worker holds the first: it then waits in the queue past its deadline
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.create_task(client.post(url, json=v2_body(1, sleep_s=1.0)))
            await worker_holds_some(cluster, "echo", "the first request running")
            second = await client.post(url, json=v2_body(2))
            return [await first, second]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [504, 504]
    assert "within 0.5 s" in responses[0].json()["error"]
    # the second request expired while queued: the worker answers it 504 without running it, then
    # deletes it; the worker is still healthy
    wait_for(lambda: cluster.client.xlen(stream) == 0, 5, "expired entries removed")
    time.sleep(2 * keys.HEARTBEAT_EVERY_S)   # let the heartbeat publish the final counters
    (worker,) = live_workers(cluster.client, "echo")
    assert int(worker["items"]) == 1   # only the first request ran


def test_no_worker_means_503_at_once_not_a_hang(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, timeout_s=30)
    url = cluster.start_gateway()
    started = time.monotonic()
    (r,) = asyncio.run(post_all(url + "/v2/models/echo/infer", [v2_body(1)]))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "echo has no live worker" in r.json()["error"]
    assert time.monotonic() - started < 5   # refused, not queued until its 30 s deadline
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 503 and "echo" in ready.json()["error"]
    assert ready.json()["models"]["echo"] == {"ready": False, "live_workers": 0, "reason": "no live worker"}
    cluster.start_worker("echo")   # a worker that comes up is used at once, not after a cache expires
    (r,) = asyncio.run(post_all(url + "/v2/models/echo/infer", [v2_body(1)]))
    assert r.status_code == 200


def test_serves_through_a_tcp_redis_url(redis_url: str, rdb: redis.Redis, tmp_path: Path) -> None:
    """The suite's private Redis is reached by unix socket; fleets reach theirs over TCP (redis://)."""
    assert redis_url.startswith("unix://")
    cluster = Cluster(f"redis://127.0.0.1:{rdb.config_get('port')['port']}/0", tmp_path)
    try:
        cluster.spec("echo", model=ECHO, max_batch_size=4)
        url = cluster.start_gateway() + "/v2/models/echo/infer"
        cluster.start_worker("echo")
        responses = asyncio.run(post_all(url, [v2_body(i) for i in range(8)]))
        assert sorted(r.json()["outputs"][0]["data"][0] for r in responses) == [2.0 * i for i in range(8)]
    finally:
        cluster.close()


def test_an_entry_without_a_payload_fails_alone(cluster: Cluster) -> None:
    """E.g. written by an older gateway: its caller gets an error, it is acknowledged, the worker goes on."""
    cluster.spec("echo", model=ECHO)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    cluster.start_worker("echo")
    reply_to = keys.reply_stream("by-hand")
    cluster.client.xadd(reply_to, {"pack": b""})
    stream = keys.request_stream("echo")
    cluster.client.xadd(stream, {"id": "nopayload", "reply": reply_to, "deadline": now_ms() + 10_000, "op": "v2"})

    def answered() -> list[Reply]:
        return [r for _, f in cluster.client.xrange(reply_to) for r in unpack_replies(f[b"pack"])]

    (reply,) = wait_for(answered, 10, "a reply to the entry without payload")
    assert (reply.request_id, reply.error_type) == ("nopayload", "internal")
    wait_for(lambda: cluster.client.xlen(stream) == 0, 5, "the entry acknowledged and deleted")
    (ok,) = asyncio.run(post_all(url, [v2_body(3)]))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [6.0]


def test_a_request_nobody_answers_expires_from_its_stream(redis_url: str, rdb: redis.Redis) -> None:
    """No worker ever reads it: the next enqueue to the model trims it once it is older than the horizon
    (the gateway passes the model's timeout plus keys.UNANSWERED_GRACE_MS)."""
    stream = keys.request_stream("echo")

    async def enqueue(request_id: str, keep_ms: int) -> int:
        client = aioredis.Redis.from_url(redis_url)
        try:
            envelope = Envelope(request_id, keys.reply_stream("gw"), now_ms() + 100, "v2")
            return await Enqueuer(client).enqueue("echo", envelope, b"payload " + request_id.encode(), 10, keep_ms)
        finally:
            await client.aclose()

    assert asyncio.run(enqueue("old", 60_000)) == 0
    time.sleep(1.0)
    assert asyncio.run(enqueue("young", 60_000)) == 1   # within the horizon: both kept
    # A horizon that "young" is inside by 0.5 s and "old" outside by about 0.5 s, on Redis's clock: margins a busy
    # machine's scheduling cannot eat (a 25 ms margin once did).
    young_ms = int(rdb.xrange(stream)[-1][0].split(b"-")[0])
    seconds, micros = rdb.time()
    keep_ms = seconds * 1000 + micros // 1000 - young_ms + 500
    assert asyncio.run(enqueue("new", keep_ms)) == 2
    kept = [fields[b"id"] for _, fields in rdb.xrange(stream)]
    assert kept == [b"young", b"new"]
    assert rdb.xrange(stream)[-1][1][b"p"] == b"payload new"


def test_sigterm_drains_the_batch_in_hand_then_exits(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=4, timeout_s=30, visibility_timeout_s=30)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    worker = cluster.start_worker("echo")
    stream = keys.request_stream("echo")

    async def scenario() -> list[httpx.Response]:
        sending = asyncio.create_task(post_all(url, [v2_body(i, sleep_s=0.5) for i in range(6)]))
        await worker_holds_some(cluster, "echo", "a batch in flight")
        worker.send_signal(signal.SIGTERM)   # mid-batch: it finishes and acknowledges what it holds, reads no more
        assert await asyncio.to_thread(worker.wait, 10) == 0
        # nothing it held is left pending (a visibility timeout of 30 s would otherwise delay it well past this)
        assert cluster.client.xpending(stream, keys.GROUP)["pending"] == 0
        await asyncio.to_thread(cluster.start_worker, "echo")   # the rest waits in the stream for a replica
        return await sending

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 6
    assert sorted(r.json()["outputs"][0]["data"][0] for r in responses) == [2.0 * i for i in range(6)]
