"""Every Prometheus metric and its labels, defined once (names in base units: _seconds, _bytes, _total on counters).

Where each number comes from, and why:
  * Per request (GatewayMetrics): counted by the gateway that answered it: requests by model, route and status,
    end-to-end latency, and the queue wait / compute split the worker returns with each answer (protocol.Reply);
    for language models time to first token, time per output token, generated and prompt tokens. Each request
    goes through one gateway: sum these over gateways.
  * Per batch (WorkerMetrics): each worker keeps a prometheus_client registry and folds its increments into one
    Redis hash per model with every heartbeat (keys.stats); the gateway exports the hash. The totals live in Redis,
    not in a process, so no counter ever goes backwards when a worker restarts (a new worker adds to them), one
    scrape target per gateway sees every replica, and no worker opens a port. The cost is one pipelined
    HINCRBYFLOAT per changed field per heartbeat (1/s), nothing per request. A worker killed with -9 loses at
    most its last second of increments.
  * Broker health (BrokerCollector): read from Redis at scrape time (queue depth, pending entries, their ages,
    dead-letter length, live replicas by device); redeliveries, reclaims and dead letters are counted in the same
    hash at the moment the broker makes them (a worker that dies next cannot lose them). Every gateway reports the
    same values: take max over gateways. While Redis is unreachable none of these is exported (no stale value
    served as current) and inferline_redis_up reads 0.
  * Per worker process (heartbeat): resident memory, CPU time and CUDA memory of each live worker.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferline import server as service
from inferline.server.backlog import Backlog, BacklogTracker, Bounds
from inferline.server.broker import keys
from inferline.server.broker.registry import ModelHealth
from inferline.server.config import AutoscaleSpec
from inferline.server.protocol import WorkerStatus

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
REJECT_REASONS = ("queue_full", "queue_bytes", "redis", "not_replicated")   # queue_cap, queue_cap_bytes, Redis away,
# broker.min_replicas_ack unmet


class GatewayMetrics:
    """The gateway's registry: its own per-request metrics, process and build info, and the broker's health."""

    def __init__(self, models: dict[str, int] | None = None, bounds: dict[str, Bounds] | None = None) -> None:
        """models: {configured model: its configured replicas}; their series start at 0, so a healthy system's
        panels read 0 rather than "No data". bounds: {model: its autoscale bounds} for the desired-replicas gauge
        (config.AutoscaleSpec's defaults for a model not named)."""
        models = models or {}
        self.registry = CollectorRegistry()
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        r = self.registry
        Gauge("inferline_build_info", "The running inferline: always 1", ["version", "python"],
              registry=r).labels(service.__version__, platform.python_version()).set(1)
        self.requests = Counter("inferline_requests", "HTTP requests answered", ["model", "route", "status"],
                                registry=r)
        self.latency = Histogram("inferline_request_seconds", "Time to answer a request, end to end in the gateway",
                                 ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("inferline_queue_wait_seconds", "Time a request waited on its stream before a "
                                    "worker started on it", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("inferline_compute_seconds", "Worker time on a request: its batch's model call, or "
                                 "a generation from admission to its last token", ["model"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("inferline_time_to_first_token_seconds", "From a generation request's arrival at the "
                              "gateway to its first token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("inferline_time_per_output_token_seconds", "Mean time between a generation's tokens "
                              "after the first", ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("inferline_generated_tokens", "Tokens generated and sent to callers",
                                        ["model"], registry=r)
        self.prompt_tokens = Counter("inferline_prompt_tokens", "Prompt tokens of finished generations", ["model"],
                                     registry=r)
        self.rejected = Counter("inferline_rejected", "Requests refused before queueing", ["model", "reason"],
                                registry=r)
        self.cache = Counter("inferline_cache_requests", "Requests that asked a model's response cache, by result "
                             "(hit: answered from it without queueing; miss)", ["model", "result"], registry=r)
        self.configured = Gauge("inferline_configured_replicas", "Replicas the gateway's config asks for",
                                ["model"], registry=r)
        for model, replicas in models.items():
            self.configured.labels(model).set(replicas)
            self.generated_tokens.labels(model)
            self.prompt_tokens.labels(model)
            for reason in REJECT_REASONS:
                self.rejected.labels(model, reason)
        self.broker = BrokerCollector(bounds or {})
        self.registry.register(self.broker)


# --- workers -------------------------------------------------------------------------------------------------

class WorkerMetrics:
    """One worker's registry. Its counters and histograms are never served by the worker: pending() and commit()
    fold their increments into the model's Redis hash at each heartbeat, and the gateway exports the totals."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_size = Histogram("inferline_batch_size", "Requests per batch (dynamic batching) or sequences per "
                                    "decoding step (continuous batching); its sum is the items served",
                                    ["model"], buckets=BATCH_BUCKETS, registry=self.registry).labels(model)
        # The drain rate (server/backlog.py): requests answered per second a replica spends running the model. Busy
        # time, not wall time, so a replica's capacity reads the same at light load as when saturated.
        self.served = Counter("inferline_served_requests", "Requests answered by the model's workers (a generation "
                              "counts once, when it finishes)", ["model"], registry=self.registry).labels(model)
        self.busy = Counter("inferline_busy_seconds", "Time the model's workers spent in model calls (batches, "
                            "decoding steps)", ["model"], registry=self.registry).labels(model)
        self.sent: dict[str, float] = {}

    def pending(self) -> dict[str, float]:
        """{stats field: increment since the last commit} for every sample that moved."""
        now = current_totals(self.registry)
        return {k: v - self.sent.get(k, 0.0) for k, v in now.items() if v != self.sent.get(k, 0.0)}

    def commit(self, sent: dict[str, float]) -> None:
        """The increments of pending() are in Redis."""
        for k, v in sent.items():
            self.sent[k] = self.sent.get(k, 0.0) + v

    @staticmethod
    def sample_process(status: WorkerStatus) -> None:
        """Fill the heartbeat's process fields: resident memory, CPU time, and CUDA memory if torch holds any."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        status.cpu_ms = int((usage.ru_utime + usage.ru_stime) * 1000)
        status.rss_bytes = resident_bytes()
        status.device_memory_bytes = device_memory_bytes(status.device)


def current_totals(registry: CollectorRegistry) -> dict[str, float]:
    """Counters and histograms as stats fields: the sample name, and "|le" for a bucket. The model is the hash."""
    out: dict[str, float] = {}
    for family in registry.collect():
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name + ("|" + s.labels["le"] if "le" in s.labels else "")] = s.value
    return out


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):   # not Linux: the peak is what getrusage has
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_bytes(device: str) -> int:
    """What torch holds on the worker's CUDA device; 0 on CPU or where torch is not loaded (never imported here)."""
    import sys

    torch: Any = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return 0
    try:
        return int(torch.cuda.memory_reserved(device))
    except Exception:   # noqa: BLE001 - a metric must never break a heartbeat
        return 0


# --- the broker's health, as the gateway reads it ------------------------------------------------------------
# (stats field, metric name, help) of the counters the broker adds to the stats hash itself.
BROKER_COUNTERS = (
    (keys.STAT_RECLAIMED, "inferline_reclaimed", "Entries taken over from a worker that died or hung past the "
     "visibility timeout"),
    (keys.STAT_REDELIVERED, "inferline_redeliveries", "Reclaimed entries run again (the rest were dead-lettered)"),
    (keys.STAT_DEAD_LETTERED, "inferline_dead_letters", "Requests moved to the dead-letter stream"),
    (keys.STAT_ROLLBACKS, "inferline_automatic_rollbacks", "Rollouts that rolled back by themselves (the new "
     "version failed to load, or failed too often in its window)"),
)
DEFAULT_BOUNDS = AutoscaleSpec()
# The worker registry's families (names, types, help, buckets), read once from a template.
_WORKER_FAMILIES = list(WorkerMetrics("_").registry.collect())


class BrokerCollector(Collector):
    """Exports the last snapshot the /metrics route read from Redis, and nothing of it while Redis is away."""

    def __init__(self, bounds: dict[str, Bounds] | None = None) -> None:
        self.up = False
        self.models: dict[str, ModelHealth] = {}
        self.backlogs: dict[str, Backlog] = {}
        self.read_at = 0.0
        self.bounds = bounds or {}
        self.tracker = BacklogTracker()

    def update(self, models: dict[str, ModelHealth]) -> None:
        self.up, self.models, self.read_at = True, models, time.time()
        at = time.monotonic()
        self.backlogs = {model: self.tracker.update(model, health, at, self.bounds.get(model, DEFAULT_BOUNDS))
                         for model, health in models.items()}

    def unreachable(self) -> None:
        self.up, self.models = False, {}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("inferline_redis_up", "1 when the gateway's last read of Redis succeeded",
                                value=1 if self.up else 0)
        if not self.up:
            return
        yield from self._gauges()
        yield from self._stats()
        yield from self._workers()

    def _gauges(self) -> Iterator[Metric]:
        rows = (("inferline_queue_depth", "Requests on the model's stream: queued or in a worker's hands",
                 lambda h: h.queue_depth),
                ("inferline_pending_requests", "Requests delivered to a worker and not yet answered",
                 lambda h: h.pending),
                ("inferline_oldest_pending_age_seconds", "Age of the oldest request delivered and not yet answered "
                 "(0 when none)", lambda h: h.oldest_pending_age_s),
                ("inferline_queue_oldest_age_seconds", "Age of the oldest request on the stream, queued or "
                 "delivered (0 when none)", lambda h: h.oldest_queued_age_s),
                ("inferline_dead_letter_length", "Entries on the model's dead-letter stream",
                 lambda h: h.dead_letter_length),
                ("inferline_cache_bytes", "Bytes of the model's cached answers (0 without a cache)",
                 lambda h: h.cache_bytes),
                ("inferline_live_workers", "Workers with a live heartbeat", lambda h: len(h.workers)),
                ("inferline_running_sequences", "Sequences being generated, over live workers",
                 lambda h: sum(w.active for _, w in h.workers)))
        for name, doc, value in rows:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, health in self.models.items():
                family.add_metric([model], value(health))
            yield family
        backlog_rows = (
            ("inferline_waiting_requests", "Requests on the model's streams not yet delivered to any worker",
             lambda b: b.waiting),
            ("inferline_in_flight_requests", "Requests delivered to a worker and not yet answered",
             lambda b: b.in_flight),
            ("inferline_oldest_waiting_age_seconds", "Age of the oldest request not yet delivered (0 when none)",
             lambda b: b.oldest_waiting_age_s),
            ("inferline_drain_rate", "Requests a replica answers per second of model time (measured; 0 before any "
             "request ran)", lambda b: b.drain_rate or 0.0),
            ("inferline_busy_replicas", "Replicas the present traffic keeps busy (seconds of model calls per second)",
             lambda b: b.busy_replicas),
            ("inferline_desired_replicas", "Replicas the backlog asks for: ceil(busy + waiting / (drain rate x "
             "target_queue_s)) within the deployment's autoscale bounds", lambda b: b.desired))
        for name, doc, pick in backlog_rows:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, backlog in self.backlogs.items():
                family.add_metric([model], pick(backlog))
            yield family
        by_device = GaugeMetricFamily("inferline_live_replicas", "Live workers by device", labels=["model", "device"])
        for model, health in self.models.items():
            counts: dict[str, int] = {}
            for _, w in health.workers:
                counts[w.device] = counts.get(w.device, 0) + 1
            for device, n in sorted(counts.items()):
                by_device.add_metric([model, device], n)
        yield by_device

    def _stats(self) -> Iterator[Metric]:
        for stat, name, doc in BROKER_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["model"])
            for model, health in self.models.items():
                family.add_metric([model], health.stats.get(stat, 0.0))
            yield family
        for template in _WORKER_FAMILIES:
            if template.type == "counter":
                counter = CounterMetricFamily(template.name, template.documentation, labels=["model"])
                for model, health in self.models.items():
                    counter.add_metric([model], health.stats.get(template.name + "_total", 0.0))
                yield counter
            elif template.type == "histogram":
                hist = HistogramMetricFamily(template.name, template.documentation, labels=["model"])
                les = [s.labels["le"] for s in template.samples if s.name.endswith("_bucket")]
                for model, health in self.models.items():
                    st = health.stats
                    hist.add_metric([model], [(le, st.get(f"{template.name}_bucket|{le}", 0.0)) for le in les],
                                    sum_value=st.get(template.name + "_sum", 0.0))
                yield hist

    def _workers(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily("inferline_worker_resident_memory_bytes", "A live worker's resident memory",
                                labels=["model", "worker", "device"])
        cpu = CounterMetricFamily("inferline_worker_cpu_seconds", "A live worker's CPU time (user + system)",
                                  labels=["model", "worker"])
        dev = GaugeMetricFamily("inferline_worker_device_memory_bytes", "CUDA memory a live worker's framework "
                                "holds (0 on CPU)", labels=["model", "worker", "device"])
        for model, health in self.models.items():
            for worker_id, w in health.workers:
                rss.add_metric([model, worker_id, w.device], w.rss_bytes)
                cpu.add_metric([model, worker_id], w.cpu_ms / 1000)
                dev.add_metric([model, worker_id, w.device], w.device_memory_bytes)
        yield from (rss, cpu, dev)


def configured_replicas(models: Iterable[Any]) -> dict[str, int]:
    """{name: replicas} of ModelSpecs."""
    return {spec.name: spec.replicas for spec in models}


def autoscale_bounds(models: Iterable[Any]) -> dict[str, Bounds]:
    """{name: autoscale spec} of ModelSpecs."""
    return {spec.name: spec.autoscale for spec in models}
