"""A model's backlog as metrics: the pure computation (server/backlog.py: drain rate, busy replicas, desired
replicas within the bounds), and the gauges a real gateway exports while a real worker drains a real backlog
(waiting, in flight, the oldest waiting request's age, the measured drain rate)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import httpx
import pytest

from inferline.server.backlog import BUSY, SERVED, BacklogTracker, desired_replicas
from inferline.server.broker import keys
from inferline.server.config import AutoscaleSpec
from tests.conftest import Cluster
from tests.test_observability import ECHO, post_all, scrape_until, total, v2_body


@dataclass
class Reading:
    waiting: int = 0
    pending: int = 0
    oldest_waiting_age_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)


BOUNDS = AutoscaleSpec(min_replicas=1, max_replicas=8, target_queue_s=2.0)


def test_desired_replicas_drains_the_waiting_within_the_target_and_keeps_the_busy_ones() -> None:
    # 100 waiting at 10 req/s per replica, to drain in 2 s: 5 replicas, plus the 1 the traffic keeps busy
    assert desired_replicas(100, 1.0, 10.0, BOUNDS) == 6
    assert desired_replicas(0, 2.0, 10.0, BOUNDS) == 2            # no queue, two replicas busy: keep two
    assert desired_replicas(0, 0.0, 10.0, BOUNDS) == 1            # idle: the minimum
    assert desired_replicas(10_000, 0.0, 10.0, BOUNDS) == 8       # never above the maximum
    assert desired_replicas(1, 0.0, None, AutoscaleSpec(min_replicas=0)) == 1   # scaled to zero: a request wakes one
    assert desired_replicas(0, 0.0, None, AutoscaleSpec(min_replicas=0)) == 0
    assert desired_replicas(20, 0.0, 10.0, BOUNDS) == 1           # exactly one replica's target: 1, not 2


def test_tracker_measures_drain_rate_over_busy_time_and_busy_replicas_over_wall_time() -> None:
    tracker = BacklogTracker(window_s=5.0)
    first = tracker.update("m", Reading(stats={SERVED: 100.0, BUSY: 10.0}), at=0.0, bounds=BOUNDS)
    assert first.drain_rate == pytest.approx(10.0) and first.busy_replicas == 0.0   # the totals' ratio at first
    # under 5 s later: kept, not measured over one heartbeat's jitter
    assert tracker.update("m", Reading(stats={SERVED: 130.0, BUSY: 11.0}), at=1.0, bounds=BOUNDS).busy_replicas == 0
    # 10 s later: 20 s of model time answered 400 requests (20 req/s per replica); 2 replicas busy
    later = tracker.update("m", Reading(waiting=80, stats={SERVED: 500.0, BUSY: 30.0}), at=10.0, bounds=BOUNDS)
    assert later.drain_rate == pytest.approx(20.0) and later.busy_replicas == pytest.approx(2.0)
    assert later.desired == 4   # ceil(2 + 80 / (20 * 2))
    # a quiet window (under MIN_BUSY_S of work) keeps the last rate; the stats lost (Redis restarted) start over
    quiet = tracker.update("m", Reading(stats={SERVED: 501.0, BUSY: 30.1}), at=20.0, bounds=BOUNDS)
    assert quiet.drain_rate == pytest.approx(20.0) and quiet.desired == 1
    assert tracker.update("m", Reading(stats={}), at=30.0, bounds=BOUNDS).drain_rate == pytest.approx(20.0)


def test_model_streams_lists_the_common_stream_and_its_lanes() -> None:
    assert keys.model_streams("cnn") == ["inferline:req:{m:cnn}:p=high", "inferline:req:{m:cnn}",
                                         "inferline:req:{m:cnn}:p=low"]
    assert keys.request_stream("cnn") == keys.request_stream("cnn", priority="normal") == "inferline:req:{m:cnn}"
    assert keys.request_stream("cnn", version="2", priority="high") == "inferline:req:{m:cnn}:v=2:p=high"
    with pytest.raises(ValueError, match="priority"):
        keys.request_stream("cnn", priority="urgent")


@pytest.mark.slow
def test_gateway_exports_the_backlog_of_a_real_worker(cluster: Cluster) -> None:
    """One replica that answers one request per 100 ms, handed 40 at once: while it drains them the gateway shows
    them waiting, one or two in flight, the oldest's age growing, and the replicas wanted at the maximum; once
    drained, nothing waits, the drain rate reads ~10 req/s and the replicas wanted fall back to the minimum."""
    cluster.spec("echo", model=ECHO, max_batch_size=1, max_batch_delay_ms=0, timeout_s=60,
                 autoscale={"min_replicas": 1, "max_replicas": 3, "target_queue_s": 0.2})
    url = cluster.start_gateway()
    cluster.start_worker("echo")
    n = 40
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.extend(asyncio.run(post_all(
        url + "/v2/models/echo/infer", [v2_body(i, sleep_s=0.1) for i in range(n)]))))
    sender.start()
    try:
        during = scrape_until(url, lambda m: total(m, "inferline_waiting_requests", model="echo") >= 10
                              and total(m, "inferline_served_requests_total", model="echo") >= 6, 30,
                              "a backlog, and a drain rate measured")
        waiting = total(during, "inferline_waiting_requests", model="echo")
        in_flight = total(during, "inferline_in_flight_requests", model="echo")
        assert 1 <= in_flight <= 2, during   # max_batch_size 1; the next read may be out already
        assert total(during, "inferline_queue_depth", model="echo") == waiting + in_flight
        assert total(during, "inferline_oldest_waiting_age_seconds", model="echo") > 0
        # 10+ waiting at ~10/s, to drain in 0.2 s: the max
        assert total(during, "inferline_desired_replicas", model="echo") == 3
    finally:
        sender.join(timeout=90)
    assert [r.status_code for r in answers] == [200] * n
    after = scrape_until(url, lambda m: total(m, "inferline_served_requests_total", model="echo") == n, 20,
                         "the served counter folded")
    assert total(after, "inferline_waiting_requests", model="echo") == 0
    assert total(after, "inferline_in_flight_requests", model="echo") == 0
    assert total(after, "inferline_oldest_waiting_age_seconds", model="echo") == 0
    assert 5 <= total(after, "inferline_drain_rate", model="echo") <= 11   # 1 / 100 ms, less the overhead
    assert total(after, "inferline_busy_seconds_total", model="echo") >= n * 0.1
    scrape_until(url, lambda m: total(m, "inferline_busy_replicas", model="echo") < 0.2
                 and total(m, "inferline_desired_replicas", model="echo") == 1, 30, "idle, back to the minimum")
