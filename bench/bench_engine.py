"""Throughput and time-to-first-token of GPT-2 generation at 1, 8 and 32 concurrent streams.

    python -m bench.bench_engine --store /tmp/store       # the full demo model (built by inferline.zoo.gpt2.train)
    python -m bench.bench_engine                          # builds a quick model in a temp dir first

Measurements (each takes the same Workload and returns one Record per request):
  (a) served    the whole platform: a private Redis, one gpt2 worker and a gateway (bench_serving.Served, real
                processes); this process posts each round's requests together to /generate_stream with an asyncio
                HTTP client and times the first SSE token event of each.
  (b) generate  the naive baseline: transformers `model.generate()` per request, one after another, in arrival order.
  (c) engine    the continuous-batching engine stepped in-process; each round's requests arrive together.
Targets at 32 streams: (a)/(b) tokens/s >= 5x, (a)/(c) >= 0.75.

Greedy decoding, so every measurement does the same work (same tokens, EOS included): the table shows the token
counts and a line flags any level where they differ. torch runs at 1 thread in this process and in the worker.

Open loop (--arrivals N): N requests arrive as a Poisson process at --rate req/s (default: 0.9 of what the engine
just sustained at 32 closed-loop streams), whether or not earlier ones are done, on (c) the bare engine and (b) naive
`generate()` serving them one at a time in arrival order. Per request: TTFT (arrival to first token) and TPOT
(time per output token after the first); also ITL p99, the worst gaps between two tokens of one stream, where a
step that stops to admit newcomers shows up. Closed-loop rounds hide that cost: everyone arrives together.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `bench.bench_serving` when run as a script

import orjson
import torch
from transformers.generation.streamers import BaseStreamer

from inferline.server.generation.engine import Engine, SamplingParams
from inferline.zoo.gpt2 import data
from inferline.zoo.gpt2.serve import load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    rounds: list[list[str]]   # each round's prompts arrive together; the next round starts when it is done
    max_new_tokens: int

    @property
    def streams(self) -> int:
        return len(self.rounds[0])


@dataclass(frozen=True)
class Record:
    ttft_s: float     # from the round's arrival to this request's first generated token
    tokens: int       # generated tokens


@dataclass(frozen=True)
class Result:
    name: str
    streams: int
    records: list[Record]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        """Nearest-rank percentile: with a few dozen samples, interpolation would invent precision."""
        values = sorted(r.ttft_s for r in self.records)
        return 1000 * values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


Measurement = Callable[[Workload], list[Record]]


def engine_measurement(engine: Engine) -> Measurement:
    def run(work: Workload) -> list[Record]:
        records: list[Record] = []
        params = SamplingParams(max_new_tokens=work.max_new_tokens)
        for r, prompts in enumerate(work.rounds):
            arrived = time.perf_counter()
            for i, prompt in enumerate(prompts):
                engine.add(f"{r}-{i}", prompt, params)
            first: dict[str, float] = {}
            tokens: dict[str, int] = {}
            while engine.has_work():
                events = engine.step()
                now = time.perf_counter()
                for ev in events:
                    first.setdefault(ev.request_id, now - arrived)
                    tokens[ev.request_id] = ev.index + 1
            records += [Record(first[k], tokens[k]) for k in first]
        return records

    return run


class _FirstToken(BaseStreamer):
    """generate() calls put() once with the prompt, then once per new token: time the second call."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate_measurement(model: Any, tokenizer: Any) -> Measurement:
    def run(work: Workload) -> list[Record]:
        records: list[Record] = []
        for prompts in work.rounds:
            arrived = time.perf_counter()
            for prompt in prompts:  # one request at a time: what a naive server does
                enc = tokenizer(prompt, return_tensors="pt")
                streamer = _FirstToken()
                with torch.inference_mode():
                    out = model.generate(**enc, max_new_tokens=work.max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id, streamer=streamer)
                assert streamer.at is not None
                records.append(Record(streamer.at - arrived, out.shape[1] - enc["input_ids"].shape[1]))
        return records

    return run


async def _stream_one(host: str, port: int, prompt: str, max_new_tokens: int, arrived: float) -> Record:
    """One greedy request through /generate_stream: time to its first token event, and its token count.

    A bare asyncio HTTP/1.1 client: the load generator shares the 2 cores with the gateway, Redis and the worker,
    and httpx's pure-Python parsing cost about as much CPU per token as the gateway itself. It counts SSE events
    and stamps the first one; the token texts are checked by tests/test_generation_serving.py, not here."""
    body = orjson.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}})
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /generate_stream HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    first: float | None = None
    events, tail, seen = 0, b"", b""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/generate_stream answered {head[:200]!r}: {(await reader.read(300))!r}")
        while chunk := await reader.read(65536):
            window = tail + chunk
            found = window.count(b"data:")
            if found and first is None:
                first = time.perf_counter() - arrived
            events += found
            if b'"error"' in window:
                seen = window
            tail = window[-4:]   # a marker split across reads is counted once, in the next window
    finally:
        writer.close()
        await writer.wait_closed()
    if seen:
        raise RuntimeError(f"stream failed: {seen[-300:]!r}")
    if first is None:
        raise RuntimeError("stream ended without a token")
    return Record(first, events)


def served_measurement(base_url: str) -> Measurement:
    """(a) over HTTP: each round's requests go out together on their own connections."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)

    async def rounds(work: Workload) -> list[Record]:
        records: list[Record] = []
        for prompts in work.rounds:
            arrived = time.perf_counter()
            records += await asyncio.gather(*[_stream_one(host, int(port), p, work.max_new_tokens, arrived)
                                              for p in prompts])
        return records

    def run(work: Workload) -> list[Record]:
        return asyncio.run(rounds(work))

    return run


@contextmanager
def served_stack(artifact: Path, max_batch_size: int) -> Iterator[Measurement]:
    """Start a private Redis, one gpt2 worker (1 torch thread) and a gateway, yield (a), stop them all."""
    from bench.bench_serving import Served

    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        stack = Served(Path(tmp), "gpt2", {"artifact": str(artifact), "task": "generate",
                                           "max_batch_size": max_batch_size, "timeout_s": 300})
        try:
            yield served_measurement(stack.url)
        finally:
            stack.close()


def workload(streams: int, requests: int, max_new_tokens: int) -> Workload:
    """`requests` prompts of 3..42 words of real prose, in rounds of `streams`."""
    paragraphs = [p for doc in data.topic_texts() for p in data.clean(doc)]
    prompts = [" ".join(p.split()[: 3 + (7 * i) % 40]) for i, p in enumerate(paragraphs[::5][:requests])]
    return Workload([prompts[i : i + streams] for i in range(0, requests, streams)], max_new_tokens)


def measure(name: str, fn: Measurement, work: Workload) -> Result:
    started = time.perf_counter()
    records = fn(work)
    return Result(name, work.streams, records, time.perf_counter() - started)


@dataclass(frozen=True)
class Arrival:
    at_s: float       # offset from the start of the run
    prompt: str


@dataclass(frozen=True)
class Timeline:
    arrived_s: float
    token_s: list[float]  # when each generated token was emitted, same clock

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.arrived_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_s)
        return (self.token_s[-1] - self.token_s[0]) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class OpenResult:
    name: str
    rate: float
    timelines: list[Timeline]

    @property
    def tokens(self) -> int:
        return sum(len(t.token_s) for t in self.timelines)

    @property
    def tokens_per_s(self) -> float:
        span = max(t.token_s[-1] for t in self.timelines) - min(t.arrived_s for t in self.timelines)
        return self.tokens / span


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def poisson_arrivals(prompts: list[str], rate: float, seed: int = 0) -> list[Arrival]:
    """Exponential gaps at `rate` per second (seeded: before/after runs see the same arrival times)."""
    rng = random.Random(seed)
    at, out = 0.0, []
    for prompt in prompts:
        out.append(Arrival(at, prompt))
        at += rng.expovariate(rate)
    return out


def engine_open_loop(engine: Engine, arrivals: list[Arrival], max_new_tokens: int) -> list[Timeline]:
    """Step the engine while requests arrive on their own clock: before each step, add every request whose time
    has come; idle only when nothing is running or waiting."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    times: dict[str, list[float]] = {}
    arrived: dict[str, float] = {}
    pending = list(arrivals)
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0].at_s <= now:
            a = pending.pop(0)
            rid = f"o{len(arrived)}"
            arrived[rid] = a.at_s
            times[rid] = []
            engine.add(rid, a.prompt, params)
        if not engine.has_work():
            time.sleep(max(0.0, pending[0].at_s - (time.perf_counter() - start)))
            continue
        events = engine.step()
        stamp = time.perf_counter() - start
        for ev in events:
            times[ev.request_id].append(stamp)
    return [Timeline(arrived[rid], times[rid]) for rid in arrived]


def generate_open_loop(model: Any, tokenizer: Any, arrivals: list[Arrival], max_new_tokens: int) -> list[Timeline]:
    """The naive server under the same arrivals: one generate() at a time, in arrival order."""

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at: list[float] = []

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls > 1:   # the first call is the prompt
                self.at.append(time.perf_counter() - start)

        def end(self) -> None:
            pass

    out: list[Timeline] = []
    start = time.perf_counter()
    for a in arrivals:
        time.sleep(max(0.0, a.at_s - (time.perf_counter() - start)))
        enc = tokenizer(a.prompt, return_tensors="pt")
        stamps = Stamps()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id, streamer=stamps)
        out.append(Timeline(a.at_s, stamps.at))
    return out


def print_open_table(results: list[OpenResult]) -> None:
    print(f"{'open loop':<13} {'req/s':>6} {'requests':>8} {'tokens':>7} {'tok/s':>7} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9} {'itl p99':>8}   (ms)")
    for r in results:
        ttft = [t.ttft_s for t in r.timelines]
        tpot = [x for t in r.timelines if (x := t.tpot_s) is not None]
        gaps = [b - a for t in r.timelines for a, b in zip(t.token_s[:-1], t.token_s[1:], strict=True)]
        print(f"{LABELS[r.name]:<13} {r.rate:>6.2f} {len(r.timelines):>8} {r.tokens:>7} {r.tokens_per_s:>7.0f} "
              f"{1000 * nearest_rank(ttft, 0.5):>9.1f} {1000 * nearest_rank(ttft, 0.99):>9.1f} "
              f"{1000 * nearest_rank(tpot, 0.5):>9.2f} {1000 * nearest_rank(tpot, 0.99):>9.2f} "
              f"{1000 * nearest_rank(gaps, 0.99):>8.2f}")


def open_loop(model: Any, tokenizer: Any, engine: Engine, args: argparse.Namespace,
              closed: list[Result]) -> list[OpenResult]:
    """The open-loop runs; the default rate is 0.9 of the closed-loop engine's requests/s at its widest level."""
    rate = args.rate
    if rate is None:
        widest = max((r for r in closed if r.name == "engine"), key=lambda r: r.streams, default=None)
        if widest is None:
            raise SystemExit("--rate is needed when the closed-loop engine levels are skipped")
        rate = 0.9 * widest.tokens_per_s / args.max_new_tokens
    prompts = workload(args.arrivals, args.arrivals, args.max_new_tokens).rounds[0]
    arrivals = poisson_arrivals(prompts, rate)
    engine_open_loop(engine, poisson_arrivals(prompts[:4], 100.0), 8)   # warm-up, as run_levels does
    results = [OpenResult("engine", rate, engine_open_loop(engine, arrivals, args.max_new_tokens))]
    print(f"  done engine open loop rate={rate:.2f}/s", flush=True)
    if not args.skip_generate:
        results.append(OpenResult("generate", rate, generate_open_loop(model, tokenizer, arrivals,
                                                                       args.max_new_tokens)))
        print(f"  done generate open loop rate={rate:.2f}/s", flush=True)
    return results


LABELS = {"served": "(a) served", "generate": "(b) generate", "engine": "(c) engine"}
# (numerator, denominator, tok/s target at TARGET_STREAMS or None)
RATIOS = [("served", "generate", 5.0), ("served", "engine", 0.75), ("engine", "generate", None)]
TARGET_STREAMS = 32


def print_table(results: list[Result]) -> None:
    order = list(LABELS)
    results = sorted(results, key=lambda r: (r.streams, order.index(r.name)))
    print(f"{'measurement':<13} {'streams':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} "
          f"{'ttft p50 ms':>12} {'ttft p99 ms':>12}")
    for r in results:
        print(f"{LABELS[r.name]:<13} {r.streams:>7} {len(r.records):>8} {r.tokens:>7} {r.tokens_per_s:>8.0f} "
              f"{r.ttft_ms(0.5):>12.1f} {r.ttft_ms(0.99):>12.1f}")
    levels = sorted({r.streams for r in results})
    for streams in levels:   # greedy: every measurement must have generated the same tokens
        counts = {r.name: r.tokens for r in results if r.streams == streams}
        if len(set(counts.values())) > 1:
            print(f"  ! {streams} streams: token counts differ {counts}; the tok/s are not comparable")
    by = {(r.name, r.streams): r for r in results}
    lines = []
    for num, den, target in RATIOS:
        for streams in levels:
            if (num, streams) not in by or (den, streams) not in by:
                continue
            a, b = by[(num, streams)], by[(den, streams)]
            ratio = a.tokens_per_s / b.tokens_per_s
            verdict = ""
            if target is not None and streams == TARGET_STREAMS:
                verdict = f"   target >= {target:g}: {'met' if ratio >= target else 'MISSED'}"
            lines.append(f"  {LABELS[num]} / {LABELS[den]:<13} {streams:>2} streams: tok/s x{ratio:.2f}, "
                         f"ttft p50 x{a.ttft_ms(0.5) / b.ttft_ms(0.5):.2f}, "
                         f"p99 x{a.ttft_ms(0.99) / b.ttft_ms(0.99):.2f}{verdict}")
    if lines:
        print("\nratios (tok/s: higher is better; ttft: lower is better)")
        print("\n".join(lines))


def run_levels(name: str, fn: Measurement, works: list[Workload]) -> list[Result]:
    fn(workload(1, 2, 8))  # first calls pay for lazy init (kernels, allocator); keep that out of the numbers
    results = []
    for work in works:
        results.append(measure(name, fn, work))
        print(f"  done {name} streams={work.streams} s={results[-1].wall_s:.1f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a store, model or version directory (default: quick build)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (>= streams)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-generate", action="store_true", help="no (b): the baseline is slow")
    parser.add_argument("--skip-served", action="store_true", help="no (a): in-process measurements only")
    parser.add_argument("--arrivals", type=int, default=0, help="open loop: this many Poisson arrivals (0: none)")
    parser.add_argument("--rate", type=float, help="open-loop arrivals per second (default: 0.9 of capacity)")
    parser.add_argument("--skip-closed", action="store_true", help="no closed-loop levels (needs --rate)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    source = args.store
    if source is None:
        from inferline.zoo.gpt2.train import train  # only when there is nothing to load: training imports more

        source = train(Path(tempfile.mkdtemp(prefix="bench-gpt2-")), quick=True)
    elif (source / "gpt2").is_dir():
        source = source / "gpt2"
    model, tokenizer = load(source, "cpu", threads=1)
    print(f"model={source} params={sum(p.numel() for p in model.parameters())} max_new_tokens={args.max_new_tokens}")
    works = [workload(streams, max(args.requests, streams), args.max_new_tokens) for streams in args.streams]

    results: list[Result] = []
    engine = Engine(model, tokenizer, max_batch_size=max(args.streams))
    if not args.skip_closed:
        if not args.skip_served:   # the stack runs only while (a) is measured: its polling stays out of (b), (c)
            with served_stack(source, max_batch_size=max(args.streams)) as served:
                results += run_levels("served", served, works)
        results += run_levels("engine", engine_measurement(engine), works)
        if not args.skip_generate:
            results += run_levels("generate", generate_measurement(model, tokenizer), works)
    opened = open_loop(model, tokenizer, engine, args, results) if args.arrivals else []
    if results:
        print()
        print_table(results)
    if opened:
        print()
        print_open_table(opened)


if __name__ == "__main__":
    main()
