"""`inferline top`: a per-model view of a running deployment, from what any client can read: /v1/models (version,
each version's live and wanted replicas and share of the traffic during a rollout, replicas, devices, queue depth)
and /metrics (the gateway's Prometheus text, labelled by model). Rates come from the
difference of two scrapes: req/s from the requests counter, tokens/s from the generated-tokens counter, batch size
from the batch-size histogram (items per batch), p50/p99 from the latency histogram's buckets. No web stack, no Redis:
only the client and prometheus_client's text parser."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from inferline.client.types import ModelCard


@dataclass
class Scrape:
    """One reading of /metrics, per model: cumulative counters, latency buckets, and the oldest pending age."""

    at: float
    requests: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    batch_items: dict[str, float] = field(default_factory=dict)
    batches: dict[str, float] = field(default_factory=dict)
    oldest_s: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, dict[str, float]] = field(default_factory=dict)      # BACKLOG gauge -> model -> value
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)   # model -> le -> cumulative count


# The backlog gauges (server/backlog.py, exported by the gateway) shown as they are.
BACKLOG = ("inferline_waiting_requests", "inferline_in_flight_requests", "inferline_oldest_waiting_age_seconds",
           "inferline_drain_rate", "inferline_desired_replicas")


def _add(into: dict[str, float], model: str, value: float) -> None:
    into[model] = into.get(model, 0.0) + value


def parse(text: str, at: float) -> Scrape:
    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model", "")
            if not model:
                continue
            name = sample.name
            if name == "inferline_requests_total":
                _add(scrape.requests, model, sample.value)
            elif name == "inferline_generated_tokens_total":
                _add(scrape.tokens, model, sample.value)
            elif name == "inferline_batch_size_sum":
                _add(scrape.batch_items, model, sample.value)
            elif name == "inferline_batch_size_count":
                _add(scrape.batches, model, sample.value)
            elif name == "inferline_oldest_pending_age_seconds":
                scrape.oldest_s[model] = sample.value
            elif name in BACKLOG:
                scrape.gauges.setdefault(name, {})[model] = sample.value
            elif name == "inferline_request_seconds_bucket":   # summed over the model's routes
                buckets = scrape.buckets.setdefault(model, {})
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
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
    versions: str               # each version's live/wanted replicas and traffic weight (versions_cell)
    kind: str
    live: str
    devices: str
    queue: int
    oldest_s: float | None
    rate: float | None          # requests per second
    tokens: float | None        # tokens per second (generation models)
    batch: float | None         # items per batch
    p50: float | None
    p99: float | None
    waiting: float | None = None
    in_flight: float | None = None
    oldest_wait_s: float | None = None
    drain: float | None = None      # requests/s per busy replica
    desired: float | None = None


def delta(now: dict[str, float], before: dict[str, float], model: str) -> float:
    return now.get(model, 0.0) - before.get(model, 0.0)


def rows(cards: Iterable[ModelCard], now: Scrape, before: Scrape | None) -> list[Row]:
    """One row per model; rates need `before` (an earlier scrape), else they are None."""
    out = []
    for card in cards:
        rate = tokens = batch = p50 = p99 = None
        if before is not None and now.at > before.at:
            seconds = now.at - before.at
            rate = delta(now.requests, before.requests, card.id) / seconds
            if card.kind == "generation":
                tokens = delta(now.tokens, before.tokens, card.id) / seconds
            batches = delta(now.batches, before.batches, card.id)
            batch = delta(now.batch_items, before.batch_items, card.id) / batches if batches > 0 else None
            earlier = before.buckets.get(card.id, {})
            window = {le: count - earlier.get(le, 0.0) for le, count in now.buckets.get(card.id, {}).items()}
            p50, p99 = quantile(0.5, window), quantile(0.99, window)
        out.append(Row(card.id, card.version or "-", versions_cell(getattr(card, "versions", None) or []),
                       card.kind or "-", f"{card.live_replicas}/{card.replicas}",
                       ",".join(card.devices) or "-", card.queue_depth, now.oldest_s.get(card.id), rate, tokens,
                       batch, p50, p99, *(now.gauges.get(g, {}).get(card.id) for g in BACKLOG)))
    return out


def versions_cell(versions: list[Any]) -> str:
    """Each version as VERSION:LIVE/WANTED@WEIGHT% ("1:2/2@80%,2:1/1@20%"); "-" when none is known. Entries of
    /v1/models's `versions` (the rollout's broker state, as the gateway reads it), objects or dicts."""
    cells = []
    for v in versions:
        get = v.get if isinstance(v, dict) else (lambda k, _v=v: getattr(_v, k))
        cells.append(f"{get('version')}:{get('live_replicas')}/{get('replicas')}@{get('weight')}%")
    return ",".join(cells) or "-"


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
    """The top frame: a header line, a blank line, the column names and one line per model."""
    body = [[r.name, r.version, r.versions, r.kind, r.live, r.devices, str(r.queue), ms(r.oldest_s), num(r.rate),
             num(r.tokens), num(r.batch), ms(r.p50), ms(r.p99), num(r.waiting, 0), num(r.in_flight, 0),
             ms(r.oldest_wait_s), num(r.drain), num(r.desired, 0)] for r in view]
    head = f"inferline top - {url} - every {interval_s:g} s (Ctrl-C quits)"
    return head + "\n\n" + table(["MODEL", "VERSION", "VERSIONS", "KIND", "LIVE", "DEVICE", "QUEUE", "OLDEST_MS",
                                  "REQ/S", "TOK/S", "BATCH", "P50_MS", "P99_MS", "WAITING", "INFLIGHT", "WAIT_MS",
                                  "DRAIN/S", "WANT"], body)
