"""Throughput and time-to-first-token of GPT-2 generation at 1, 8 and 32 concurrent streams.

    python -m bench.bench_engine --store /tmp/store       # the full demo model (built by models.gpt2.train)
    python -m bench.bench_engine                          # builds a quick model in a temp dir first

Measurements (each takes the same Workload and returns one Record per request):
  (c) engine    the continuous-batching engine stepped in-process; each round's requests arrive together.
  (b) generate  the naive baseline: transformers `model.generate()` per request, one after another, in arrival order.
  (a) served    through the gateway over HTTP: not here yet. Add `def served(base_url: str) -> Measurement` that
                returns a function posting each round's requests concurrently to /generate_stream and timing the
                first SSE event, then register it in MEASUREMENTS; the table and ratios need nothing else.

Greedy decoding, so every measurement does the same work (same tokens, EOS included); the table shows the token
counts so that can be checked. torch runs at 1 thread: other work shares these cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from models.gpt2 import data
from models.gpt2.loader import load
from service.generation.engine import Engine, SamplingParams

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


def workload(streams: int, requests: int, max_new_tokens: int) -> Workload:
    """`requests` prompts of 3..42 words of real prose, in rounds of `streams`."""
    paragraphs = [p for doc in data.topic_texts() for p in data.clean(doc)]
    prompts = [" ".join(p.split()[: 3 + (7 * i) % 40]) for i, p in enumerate(paragraphs[::5][:requests])]
    return Workload([prompts[i : i + streams] for i in range(0, requests, streams)], max_new_tokens)


def measure(name: str, fn: Measurement, work: Workload) -> Result:
    started = time.perf_counter()
    records = fn(work)
    return Result(name, work.streams, records, time.perf_counter() - started)


def print_table(results: list[Result]) -> None:
    print(f"{'measurement':<10} {'streams':>7} {'requests':>8} {'tokens':>7} {'tok/s':>8} "
          f"{'ttft p50 ms':>12} {'ttft p99 ms':>12}")
    for r in results:
        print(f"{r.name:<10} {r.streams:>7} {len(r.records):>8} {r.tokens:>7} {r.tokens_per_s:>8.0f} "
              f"{r.ttft_ms(0.5):>12.1f} {r.ttft_ms(0.99):>12.1f}")
    by = {(r.name, r.streams): r for r in results}
    pairs = [(s, by[("engine", s)], by[("generate", s)]) for s in sorted({r.streams for r in results})
             if ("engine", s) in by and ("generate", s) in by]
    if pairs:
        print("\nratios engine / generate (tok/s: higher is better; ttft: lower is better)")
    for streams, e, g in pairs:
        print(f"  {streams:>2} streams: tok/s x{e.tokens_per_s / g.tokens_per_s:.2f}, "
              f"ttft p50 x{e.ttft_ms(0.5) / g.ttft_ms(0.5):.2f}, p99 x{e.ttft_ms(0.99) / g.ttft_ms(0.99):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="a store, model or version directory (default: quick build)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (>= streams)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-generate", action="store_true", help="engine only (the baseline is slow)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    source = args.store
    if source is None:
        from models.gpt2.train import train  # only when there is nothing to load: training imports more

        source = train(Path(tempfile.mkdtemp(prefix="bench-gpt2-")), quick=True)
    elif (source / "gpt2").is_dir():
        source = source / "gpt2"
    model, tokenizer = load(source, "cpu", threads=1)
    print(f"model={source} params={sum(p.numel() for p in model.parameters())} max_new_tokens={args.max_new_tokens}")

    engine = Engine(model, tokenizer, max_batch_size=max(args.streams))
    measurements: dict[str, Measurement] = {"engine": engine_measurement(engine)}
    if not args.skip_generate:
        measurements["generate"] = generate_measurement(model, tokenizer)
    warm = workload(1, 2, 8)
    for fn in measurements.values():
        fn(warm)  # first calls pay for lazy init (kernels, allocator); keep that out of the numbers

    results = []
    for streams in args.streams:
        work = workload(streams, max(args.requests, streams), args.max_new_tokens)
        for name, fn in measurements.items():
            results.append(measure(name, fn, work))
            print(f"  done {name} streams={streams} s={results[-1].wall_s:.1f}", flush=True)
    print()
    print_table(results)


if __name__ == "__main__":
    main()
