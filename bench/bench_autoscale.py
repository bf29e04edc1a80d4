"""A burst at a one-replica deployment with the autoscaler off and on: how long the backlog takes to drain, and the
latency of a trickle of `high` requests sent beside the burst.

    python bench/bench_autoscale.py                       # N = 300, a model of 80 ms a request, max_replicas 3
    python bench/bench_autoscale.py --burst 500 --sleep-ms 50 --runs 2

Each run starts `inferline up` (a private Redis, a gateway, one worker) serving a small user Model that sleeps
--sleep-ms per request (one request a batch), with `[models.slow.autoscale]` enabled = false, then true (min 1,
max --max-replicas, target_queue_s 1, up_delay_s 1, down_delay_s 5). It sends --burst requests at once (normal
priority), and beside them one `x-priority: high` request every 1/--trickle s until the burst is answered; it prints
the burst's drain time (first sent to last answered), failures, the replicas reached, and the trickle's p50/p99.
The replicas are capped by the machine too (autoscaler.machine_ceiling: the cores, on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferline.server.broker import embedded  # noqa: E402
from tests.served import SLOW_MODEL, cli_process, wait_ready  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(url: str, burst: int, trickle_per_s: float) -> dict[str, Any]:
    # Few kept alive: the gateway closes a client's idle connections past gateway.max_idle_connections_per_client
    # (32), and reusing one it closed is a ReadError here, not a failure of the server.
    limits = httpx.Limits(max_connections=burst + 50, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        live_peak = 1
        done = asyncio.Event()
        errors: list[str] = []

        async def one(x: int, high: bool = False) -> tuple[int, float]:
            started = time.monotonic()
            try:
                r = await http.post(url + "/v1/models/slow/predict", json={"x": x},
                                    headers={"x-priority": "high"} if high else {})
                status = r.status_code if r.status_code != 200 or r.json()["y"] == x + 1 else -1
                if status != 200 and len(errors) < 3:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                status = 0
                if len(errors) < 3:
                    errors.append(repr(exc))
            return status, time.monotonic() - started

        async def trickle() -> list[tuple[int, float]]:
            got: list[asyncio.Task[tuple[int, float]]] = []
            while not done.is_set():
                got.append(asyncio.create_task(one(-1 - len(got), high=True)))
                await asyncio.sleep(1 / trickle_per_s)
            return [await t for t in got]

        async def watch() -> None:
            nonlocal live_peak
            while not done.is_set():
                cards = (await http.get(url + "/v1/models")).json()["data"]
                live_peak = max(live_peak, int(cards[0]["live_replicas"]))
                await asyncio.sleep(0.5)

        started = time.monotonic()
        side = asyncio.create_task(trickle())
        watcher = asyncio.create_task(watch())
        results = await asyncio.gather(*(one(i) for i in range(burst)))
        drained_s = time.monotonic() - started
        done.set()
        highs = await side
        await watcher
    failed = sum(1 for s, _ in [*results, *highs] if s != 200)
    highs_s = [t for _, t in highs]
    return {"drain_s": drained_s, "failed": failed, "errors": errors, "replicas": live_peak, "high_n": len(highs),
            "high_p50": quantile(highs_s, 0.5), "high_p99": quantile(highs_s, 0.99)}


def run(args: argparse.Namespace, enabled: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        (where / "slow_model.py").write_text(SLOW_MODEL)
        port = embedded.free_port()
        config = where / "inferline.toml"
        config.write_text(
            f'state_dir = "{where / "state"}"\n[gateway]\nport = {port}\n'
            f'max_connections_per_client = {args.burst + 100}\n[models.slow]\n'
            f'model = "{where / "slow_model.py"}:Slow"\nreplicas = 1\ntimeout_s = 120\nqueue_cap = 100000\n'
            f'autoscale = {{ enabled = {"true" if enabled else "false"}, min_replicas = 1, '
            f'max_replicas = {args.max_replicas}, target_queue_s = 1, up_delay_s = 1, down_delay_s = 5 }}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_") and k != "REDIS_URL"}
        env.update(PYTHONPATH=str(ROOT), INFERLINE_CONFIG=str(config), BENCH_SLEEP_MS=str(args.sleep_ms))
        url = f"http://127.0.0.1:{port}"
        with cli_process(["up", "--no-build"], where, env, where / "up.log", stop_s=60) as proc:
            wait_ready(proc, where / "up.log", [url])
            return asyncio.run(drive(url, args.burst, args.trickle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--sleep-ms", type=float, default=80.0)
    parser.add_argument("--trickle", type=float, default=5.0, help="high requests per second beside the burst")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="off/on pairs, alternating")
    args = parser.parse_args()
    print(f"autoscale bench: burst {args.burst} at one replica, {args.sleep_ms:g} ms a request, max_replicas "
          f"{args.max_replicas} (machine ceiling: {os.cpu_count()} cores), high trickle {args.trickle:g}/s")
    rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.runs):
        for name, enabled in (("off", False), ("on", True)):
            rows[name].append(run(args, enabled))
            r = rows[name][-1]
            print(f"  autoscaler {name:<3}  drain {r['drain_s']:6.1f} s  failed {r['failed']}  replicas reached "
                  f"{r['replicas']}  high x{r['high_n']}: p50 {r['high_p50'] * 1000:6.0f} ms  p99 "
                  f"{r['high_p99'] * 1000:6.0f} ms", flush=True)
            for error in r["errors"]:
                print(f"    e.g. {error}")
    if args.runs > 1:
        for name, found in rows.items():
            print(f"  median {name}: drain {statistics.median(r['drain_s'] for r in found):.1f} s, high p99 "
                  f"{statistics.median(r['high_p99'] for r in found) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
