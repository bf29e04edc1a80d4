"""A model's backlog, and the replicas it asks for: one pure computation that /metrics, `inferline top` and the
autoscaler share (no Redis here: broker/registry.py reads the numbers, this decides what they mean).

    tracker = BacklogTracker()
    view = tracker.update("cnn", health, at=time.monotonic(), bounds=spec.autoscale)
    view.waiting, view.in_flight, view.drain_rate, view.desired

Definitions:
  * waiting: entries on the model's streams no worker has been handed yet; in flight: delivered, not yet answered.
    inferline deletes an answered entry, so a stream's length is exactly waiting + in flight.
  * drain rate: requests answered per second of one replica's busy time (the workers' `inferline_served_requests`
    over `inferline_busy_seconds`, both in the model's stats hash). Busy time rather than wall time: a replica
    serving a trickle is idle most of the time, and served/wall would read its capacity as the trickle. Measured
    over the change since the last reading once at least MIN_BUSY_S of work went by, else kept; until then the
    totals' ratio.
  * busy replicas: seconds of model calls per second of wall time over the same window (1.0 = one replica always
    running): the replicas the present traffic keeps busy.
  * desired = ceil(busy + waiting / (drain rate x target_queue_s)), clamped to [min_replicas, max_replicas]: enough
    replicas for the traffic now, plus enough to drain the waiting requests within target_queue_s. Waiting alone
    (without busy) would ask for min_replicas whenever the queue is momentarily empty, however loaded the replicas
    are, and the deployment would oscillate. With no drain rate known yet (no request ever ran), a waiting request
    asks for one replica, so a deployment scaled to zero starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

SERVED = "inferline_served_requests_total"   # the stats fields the workers' counters fold into (server/metrics.py)
BUSY = "inferline_busy_seconds_total"
MIN_BUSY_S = 0.5   # a drain rate measured over less model time than this is noise (one batch's jitter)
# Workers fold their counters into Redis once a second (the heartbeat), so a window shorter than a few beats reads
# 0 or 2 seconds of work for one busy second: rates are measured over at least this long, and kept between.
WINDOW_S = 5.0
EPSILON = 1e-6     # ceil(2.0000001) must stay 2: busy time is a float sum of many batches


class Bounds(Protocol):
    min_replicas: int
    max_replicas: int
    target_queue_s: float


class Health(Protocol):
    """What registry.ModelHealth provides."""

    waiting: int
    pending: int
    oldest_waiting_age_s: float
    stats: dict[str, float]


@dataclass(frozen=True)
class Backlog:
    waiting: int
    in_flight: int
    oldest_waiting_age_s: float
    drain_rate: float | None      # requests/s per busy replica; None before any request ran
    busy_replicas: float
    desired: int


def desired_replicas(waiting: int, busy: float, drain_rate: float | None, bounds: Bounds) -> int:
    """The replicas the backlog asks for (module docstring), within the bounds."""
    if drain_rate is None or drain_rate <= 0:
        want = 1 if waiting > 0 else math.ceil(busy - EPSILON)
    else:
        want = math.ceil(busy + waiting / (drain_rate * bounds.target_queue_s) - EPSILON)
    return max(bounds.min_replicas, min(bounds.max_replicas, want))


class BacklogTracker:
    """Keeps the last reading of each model's counters, to measure the drain rate and busy replicas between two
    readings. One per reader (a gateway's /metrics, the autoscaler); bounded by the number of models."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._last: dict[str, tuple[float, float, float]] = {}   # model -> (at, served, busy_s) of the last window
        self._rate: dict[str, float] = {}
        self._busy: dict[str, float] = {}

    def update(self, model: str, health: Health, at: float, bounds: Bounds) -> Backlog:
        """Fold a new reading (taken at monotonic time `at`) and return the model's backlog."""
        served, busy_s = health.stats.get(SERVED, 0.0), health.stats.get(BUSY, 0.0)
        last = self._last.get(model)
        if model not in self._rate and busy_s >= MIN_BUSY_S:   # no rate yet: the totals' ratio, at once
            self._rate[model] = served / busy_s
        if last is None:
            self._last[model] = (at, served, busy_s)
        else:
            t0, served0, busy0 = last
            if busy_s < busy0 or served < served0:   # the stats hash was lost (Redis restarted empty): start over
                self._last[model] = (at, served, busy_s)
            elif at - t0 >= self.window_s:
                d_busy = busy_s - busy0
                self._busy[model] = d_busy / (at - t0)
                if d_busy >= MIN_BUSY_S:
                    self._rate[model] = (served - served0) / d_busy
                self._last[model] = (at, served, busy_s)
        rate = self._rate.get(model)
        busy = self._busy.get(model, 0.0)
        return Backlog(health.waiting, health.pending, health.oldest_waiting_age_s, rate, busy,
                       desired_replicas(health.waiting, busy, rate, bounds))
