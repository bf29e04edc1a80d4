"""Hung model calls and stalled workers, with real worker processes (and `inferline up` for the restarts): a predict
that never returns is failed with 504 at predict_timeout_s and its worker replaced; a stop signal with such a predict
in hand still ends the worker in bounded time; a worker that stalls (SIGSTOP) has what it took answered promptly, by
itself when it resumes or by a live worker once its heartbeat lapses, not after the visibility timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from inferline.server.broker import embedded, keys
from inferline.server.worker.watchdog import DRAIN_CAP_S, EXIT_DRAIN_CUT, LAST_WORDS_S
from tests.conftest import Cluster, child_env, live_workers, wait_for
from tests.faults import Row, printed_rows
from tests.test_up import alive, process_tree

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

HANG = "tests.runtimes:Hang"
ECHO = "tests.runtimes:Echo"
# The watchdog polls every min(1 s, predict_timeout_s / 4), then answers within LAST_WORDS_S: a hung call's requests
# get their 504 within predict_timeout_s + this.
ANSWERED_WITHIN_S = 1.0 + LAST_WORDS_S
REPLACED_WITHIN_S = 30.0   # `up`'s backoff (0.5 s, then 1 s) and a worker's start on a busy 2-core machine


@pytest.fixture(scope="module")
def rows(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    yield from printed_rows(request, "hang and stall rows of the fault table")


def hang_body(x: float, hang: bool = False) -> dict[str, Any]:
    return {"x": x, "hang": hang}


@pytest.fixture
def up_hang(redis_url: str, rdb: redis.Redis, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`inferline up` on the session's Redis serving the Hang model with predict_timeout_s = 2, as a user runs it."""
    port = embedded.free_port()
    config = tmp_path / "inferline.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[gateway]\nport = {port}\n'
                      f'[models.hang]\nmodel = "{HANG}"\nreplicas = 1\ntimeout_s = 30\npredict_timeout_s = 2\n')
    log = tmp_path / "up.log"
    with process_tree(["--config", str(config), "up", "--no-build"], tmp_path, log,
                      child_env(REDIS_URL=redis_url)) as proc:
        yield proc, f"http://127.0.0.1:{port}", log


def test_a_hung_predict_is_failed_504_and_its_worker_replaced(up_hang: tuple[subprocess.Popen[bytes], str, Path],
                                                              rdb: redis.Redis, rows: list[Row]) -> None:
    """Twice: first as the worker's very first batch (on the model thread, the event loop free), then after quick
    batches (inline, on the event loop's own thread, which the hang blocks). Each time the hung request gets 504
    naming the model and the timeout within predict_timeout_s + ANSWERED_WITHIN_S, `up` replaces the worker, the
    next request is answered 200 by the successor, and the request that hung is not run again (the successor lives)."""
    proc, url, log = up_hang
    predict = url + "/v1/models/hang/predict"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            up = httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
        return up and len(live_workers(rdb, "hang")) == 1

    notes = []
    for warm in (0, 6):
        wait_for(ready, 120, "a live hang worker")
        (worker,) = live_workers(rdb, "hang")
        for i in range(warm):   # quick batches: the next one runs inline
            assert httpx.post(predict, json=hang_body(i), timeout=10).json()["y"] == 2 * i
        started = time.monotonic()
        hung = httpx.post(predict, json=hang_body(1, hang=True), timeout=2 + ANSWERED_WITHIN_S + 2)
        took = time.monotonic() - started
        assert hung.status_code == 504, hung.text
        error = hung.json()["error"]
        assert error["type"] == "timeout" and "model hang" in error["message"], error
        assert "predict_timeout_s=2 s" in error["message"], error
        assert took < 2 + ANSWERED_WITHIN_S, took

        def replaced(old: str = worker["pid"]) -> list[dict[str, str]]:
            assert proc.poll() is None, log.read_text()[-3000:]
            return [w for w in live_workers(rdb, "hang") if w["pid"] != old]

        (successor,) = wait_for(replaced, REPLACED_WITHIN_S, "a successor worker")
        back = time.monotonic() - started
        assert not alive(int(worker["pid"]))

        def answered() -> httpx.Response | None:
            r = httpx.post(predict, json=hang_body(21), timeout=10)
            return r if r.status_code == 200 else None

        ok = wait_for(answered, 10, "a 200 from the successor")
        assert (ok.json()["y"], ok.json()["pid"]) == (42.0, int(successor["pid"])), ok.json()
        time.sleep(1.0)
        assert alive(int(successor["pid"]))   # the request that hung was acknowledged, not run again here
        notes.append(f"{'inline' if warm else 'model thread'}: 504 in {took:.1f} s, 200 again {back:.1f} s after")
    assert log.read_text().count("exited with 75") == 2, log.read_text()[-3000:]
    rows.append(Row("predict hangs forever (predict_timeout_s 2)", [], notes))


def test_stop_with_a_hung_predict_in_hand_is_bounded(cluster: Cluster) -> None:
    """SIGTERM while predict hangs (predict_timeout_s far off): the worker is gone within DRAIN_CAP_S + a few s,
    with EXIT_DRAIN_CUT; what it held is left to another worker, not failed (it is not known to be hung)."""
    cluster.spec("hang", model=HANG, timeout_s=60, predict_timeout_s=600)
    url = cluster.start_gateway() + "/v1/models/hang/predict"
    worker = cluster.start_worker("hang")

    async def scenario() -> float:
        async with httpx.AsyncClient(timeout=90) as client:
            hanging = asyncio.create_task(client.post(url, json=hang_body(1, hang=True)))
            await asyncio.to_thread(wait_for, lambda: cluster.client.xpending(keys.request_stream("hang"),
                                                                              keys.GROUP)["pending"] > 0, 10, "held")
            await asyncio.sleep(0.5)
            worker.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            code = await asyncio.to_thread(worker.wait, DRAIN_CAP_S + 15)
            assert code == EXIT_DRAIN_CUT, code
            hanging.cancel()
            return time.monotonic() - stopped

    took = asyncio.run(scenario())
    assert took < DRAIN_CAP_S + 1.0 + LAST_WORDS_S, took
    assert not live_workers(cluster.client, "hang")   # it left the registry: another worker takes its entries at once


def echo_body(i: int, sleep_s: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [float(i)]}],
            "parameters": {"sleep_s": sleep_s}}


def test_a_stopped_worker_holding_a_request_is_claimed_by_a_live_one(cluster: Cluster, rows: list[Row]) -> None:
    """Two workers; the one holding a request is SIGSTOPped and stays stopped. The live one claims it once the
    stopped one's heartbeat lapses (HEARTBEAT_TTL_S after its last beat), within one claim round (1 s) plus the
    request's own run: no further grace, since Redis answered the live one all along."""
    cluster.spec("echo", model=ECHO, max_batch_size=1, timeout_s=30, visibility_timeout_s=30)
    url = cluster.start_gateway() + "/v2/models/echo/infer"
    first, second = cluster.start_worker("echo"), cluster.start_worker("echo")
    time.sleep(keys.HEARTBEAT_TTL_S + 2)   # the live one's own beats have been steady longer than a heartbeat lives
    client = cluster.client
    stream = keys.request_stream("echo")
    run_s = 0.8

    async def scenario() -> tuple[httpx.Response, float, float, str]:
        async with httpx.AsyncClient(timeout=40) as http:
            sending = asyncio.create_task(http.post(url, json=echo_body(7, run_s)))
            (entry,) = await asyncio.to_thread(
                wait_for, lambda: client.xpending_range(stream, keys.GROUP, "-", "+", 10), 5, "the request held")
            holder = entry["consumer"].decode()
            victim = first if holder.split("-")[-2] == str(first.pid) else second
            os.kill(victim.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: not client.exists(keys.worker("echo", holder)), 10,
                                    "the stopped worker's heartbeat lapsed")
            lapsed = time.monotonic()
            response = await sending
            return response, time.monotonic() - stopped, time.monotonic() - lapsed, str(victim.pid)

    response, after_stop, after_lapse, victim_pid = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    pid = next(o for o in response.json()["outputs"] if o["name"] == "pid")["data"][0]
    assert str(pid) != victim_pid   # answered by the live worker
    assert after_lapse < 1.0 + run_s + 0.6, after_lapse      # the old grace alone was 2 s after the lapse
    assert after_stop < keys.HEARTBEAT_TTL_S + 1.0 + run_s + 1.0, after_stop
    for proc in cluster.workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
    rows.append(Row("worker SIGSTOP, stays stopped (1 of 2)", [],
                    [f"its request 200 from the other {after_stop:.1f} s after the stop, {after_lapse:.1f} s after "
                     "its heartbeat lapsed"]))
