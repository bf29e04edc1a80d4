"""Every Prometheus metric and its labels. The gateway serves them on /metrics; workers keep their own
registry and publish counters through their heartbeat (and an optional prometheus_client port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("inferline_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("inferline_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("inferline_queue_depth", "Requests queued or in flight per model", ["model"],
                                 registry=self.registry)
        self.live_workers = Gauge("inferline_live_workers", "Workers with a live heartbeat per model", ["model"],
                                  registry=self.registry)
        self.worker_batches = Gauge("inferline_worker_batches", "Batches run per model (sum over live workers)",
                                    ["model"], registry=self.registry)
        self.worker_items = Gauge("inferline_worker_items", "Items run per model (sum over live workers)",
                                  ["model"], registry=self.registry)
        self.rejected = Counter("inferline_rejected", "Requests refused before queueing", ["model", "reason"],
                                registry=self.registry)
