"""The worker's own CPU per request, in process: a batch of v2 bodies through the worker's Executor (decode each,
one predict, encode each), timed with time.process_time over many batches, optionally under cProfile.

    python bench/profile_worker.py                    # the no-op model (tests.runtimes:Noop), batches of 32 and 1
    python bench/profile_worker.py --profile          # + the functions with the most time, per request
    python bench/profile_worker.py --model cnn --store model_store

What it prints is what the worker spends per request beyond Redis and the event loop: the codec and the model.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_serving import Bare, noop_body, v2_bodies  # noqa: E402


def per_request_us(fn: object, n_requests: int, seconds: float) -> list[float]:
    """CPU µs per request of fn() (which serves n_requests), in 5 rounds of about seconds / 5."""
    out = []
    for _ in range(5):
        runs, started = 0, time.process_time()
        while time.process_time() - started < seconds / 5:
            fn()   # type: ignore[operator]
            runs += 1
        out.append((time.process_time() - started) / (runs * n_requests) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="noop", choices=("noop", "cnn", "torch_cnn"))
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    bodies = v2_bodies(32)
    if args.model == "noop":
        bare = Bare.for_model("noop", {"model": "tests.runtimes:Noop"}, [noop_body(b) for b in bodies])
    elif args.model == "torch_cnn":
        bare = Bare.for_model("torch_cnn", {"model": "bench.torch_cnn:TorchCnn"}, bodies)
    else:
        from inferline.zoo import store

        bare = Bare(store.resolve(Path(args.store).resolve() / "cnn"), bodies)
    for size in (32, 1):
        batch = bare.batch[:size]
        spread = per_request_us(lambda b=batch: bare.executor.run(b), size, args.seconds)   # type: ignore[misc]
        print(f"{args.model} batch {size}: {min(spread):.1f}-{max(spread):.1f} µs CPU per request "
              f"(median {sorted(spread)[2]:.1f})", flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            runs = 0
            started = time.process_time()
            while time.process_time() - started < args.seconds / 2:
                bare.executor.run(batch)
                runs += 1
            profiler.disable()
            print(f"  cProfile, {runs * size} requests (tottime/cumtime are totals; divide by the requests):")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
