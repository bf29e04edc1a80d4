"""`inferline top`: a per-model view of a running deployment, from what any client can read — /v1/models (version,
replicas, devices, queue depth) and /metrics (the gateway's Prometheus text). Rates come from the difference of two
scrapes: req/s and tokens/s from the workers' item counts, batch size from items per batch, p50/p99 from the latency
histogram of the routes bound to the model's task (the gateway labels latency by route, not by model). No web stack,
no Redis: only the client and prometheus_client's text parser."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from inferline.client.types import ModelCard

# The routes whose latency belongs to a model bound to each task (routes/*.py).
TASK_ROUTES = {"classify-image": ("/classify-image",), "forecast": ("/forecast",), "sentiment": ("/sentiment",),
               "classify-text": ("/classify-text",), "generate": ("/generate", "/generate_stream", "/")}
LATENCY = "inferline_request_seconds"


@dataclass
class Scrape:
    """One reading of /metrics: per-model worker counters and per-route latency buckets."""

    at: float
    items: dict[str, float] = field(default_factory=dict)
    batches: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)   # route -> le -> cumulative count


def parse(text: str, at: float) -> Scrape:
    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferline_worker_items":
                scrape.items[sample.labels["model"]] = sample.value
            elif sample.name == "inferline_worker_batches":
                scrape.batches[sample.labels["model"]] = sample.value
            elif sample.name == LATENCY + "_bucket":
                le = float(sample.labels["le"])
                route = scrape.buckets.setdefault(sample.labels["route"], {})
                route[le] = route.get(le, 0.0) + sample.value
    return scrape


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (le -> count): linear within the bucket."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1.0)
        lower_le, lower_count = le, count
    return lower_le


@dataclass
class Row:
    name: str
    version: str
    live: str
    devices: str
    queue: int
    rate: float | None          # requests (items) per second; tokens per second for a generation model
    batch: float | None
    p50: float | None
    p99: float | None
    kind: str


def rows(cards: Iterable[ModelCard], now: Scrape, before: Scrape | None) -> list[Row]:
    out = []
    for card in cards:
        rate = batch = p50 = p99 = None
        if before is not None and now.at > before.at:
            items = now.items.get(card.id, 0.0) - before.items.get(card.id, 0.0)
            batches = now.batches.get(card.id, 0.0) - before.batches.get(card.id, 0.0)
            if items >= 0:   # a restarted worker resets its counters: show nothing for that interval
                rate = items / (now.at - before.at)
                batch = items / batches if batches > 0 else None
            window: dict[float, float] = {}
            for route in TASK_ROUTES.get(card.task or "", ()):
                for le, count in now.buckets.get(route, {}).items():
                    window[le] = window.get(le, 0.0) + count - before.buckets.get(route, {}).get(le, 0.0)
            p50, p99 = quantile(0.5, window), quantile(0.99, window)
        out.append(Row(card.id, card.version or "-", f"{card.live_replicas}/{card.replicas}",
                       ",".join(card.devices) or "-", card.queue_depth, rate, batch, p50, p99, card.kind or "-"))
    return out


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def render(view: list[Row], url: str, interval_s: float) -> str:
    """The top frame: one line per model. rate is req/s, or tok/s for a generation model."""
    body = [[r.name, r.version, r.kind, r.live, r.devices, str(r.queue),
             num(r.rate) + (" tok/s" if r.kind == "generation" and r.rate is not None else ""), num(r.batch),
             ms(r.p50), ms(r.p99)] for r in view]
    head = f"inferline top - {url} - every {interval_s:g} s (Ctrl-C quits)"
    return head + "\n\n" + table(["MODEL", "VERSION", "KIND", "LIVE", "DEVICE", "QUEUE", "REQ/S", "BATCH", "P50 MS",
                                  "P99 MS"], body)
