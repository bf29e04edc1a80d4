"""Requests failed and latency during a rollout, against steady state on the same machine; and what the traffic split
costs the enqueue script.

    python bench/bench_rollout.py                       # both parts
    python bench/bench_rollout.py --clients 8 --steady 10
    python bench/bench_rollout.py --script-only         # only the enqueue script's Redis CPU, without/with a split

Part 1 starts `inferline up` (a private Redis, a gateway, one worker) serving a small user Model from a store with
versions 1 and 2 (tests/test_rollouts.py's model), drives POST /v1/models/echo/predict with --clients closed-loop
clients, and prints per phase: requests, failed (any status but 200), p50 and p99 latency:
  steady (version 1) | rollout 1 -> 2 (from the POST until it is done) | steady (version 2) | rollback 2 -> 1.
Part 2 runs the enqueue script (broker/enqueue.py) against a private Redis, the version before the split and the one
with it (no rollout, and during one), and prints Redis's own CPU per call (INFO commandstats: usec_per_call),
alternating rounds: the no-rollout path must cost what it did.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferline.server.broker import embedded, keys  # noqa: E402
from tests.served import Load, cli_process, wait_ready  # noqa: E402
from tests.test_rollouts import BEHAVIOUR, MODEL  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(load: Load, name: str, start: float, end: float) -> str:
    rows = [a for a in load.answers if start <= a.at < end]
    ms = [a.seconds * 1000 for a in rows]
    failed = sum(1 for a in rows if a.status != 200)
    rate = len(rows) / max(end - start, 1e-9)
    return (f"{name:<22} {end - start:6.1f} s {len(rows):7d} req {rate:7.0f} req/s  failed {failed:4d}  "
            f"p50 {statistics.median(ms) if ms else float('nan'):6.1f} ms  p99 {percentile(ms, 0.99):6.1f} ms")


def rollout(url: str, version: str) -> tuple[float, float, str]:
    started = time.monotonic()
    r = httpx.post(url + "/admin/models/echo/rollout", json={"version": version, "window_requests": 200,
                                                               "window_s": 3.0}, timeout=10)
    r.raise_for_status()
    while True:
        state = httpx.get(url + "/admin/models/echo/rollout", timeout=10).json()
        if state["state"] in ("done", "rolled_back"):
            return started, time.monotonic(), state["state"]
        time.sleep(0.1)


def serving_bench(args: argparse.Namespace) -> None:
    where = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    (where / "echo_model.py").write_text(MODEL)
    for version in ("1", "2"):
        d = where / "store" / "echo" / version
        d.mkdir(parents=True)
        (d / "behaviour.json").write_text(json.dumps(BEHAVIOUR[version]))
        (d / "manifest.json").write_text(json.dumps({"version": version}))
    port = embedded.free_port()
    config = where / "inferline.toml"
    config.write_text(f'model_store = "{where / "store"}"\nstate_dir = "{where / "state"}"\n[gateway]\nport = {port}\n'
                      f'access_log = false\n[models.echo]\nmodel = "{where / "echo_model.py"}:Echo"\nversion = "1"\n'
                      'replicas = 1\n')
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "INFERLINE_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}"
    with cli_process(["up", "--no-build"], where, env, where / "up.log") as proc:
        wait_ready(proc, where / "up.log", [url])
        with Load([url], "echo", clients=args.clients, warm=0) as load:
            time.sleep(1.0)   # warm-up, not measured
            t0 = time.monotonic()
            time.sleep(args.steady)
            t1 = time.monotonic()
            r_start, r_end, outcome = rollout(url, "2")
            time.sleep(1.0)
            t2 = time.monotonic()
            time.sleep(args.steady)
            t3 = time.monotonic()
            b_start, b_end, back = rollout(url, "1")
        print(f"rollout bench: {args.clients} clients, one worker per version, echo model (CPU), this machine")
        print(phase(load, "steady (version 1)", t0, t1))
        print(phase(load, f"rollout 1 -> 2 ({outcome})", r_start, r_end))
        print(phase(load, "steady (version 2)", t2, t3))
        print(phase(load, f"rollback 2 -> 1 ({back})", b_start, b_end))


def _script_at(commit: str) -> str:
    """The enqueue script of an earlier commit (its enqueue.py run in a namespace of its own)."""
    source = subprocess.run(["git", "show", f"{commit}:inferline/server/broker/enqueue.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    namespace: dict[str, Any] = {"__name__": f"enqueue_{commit}"}
    exec(compile(source, f"enqueue_{commit}.py", "exec"), namespace)
    return str(namespace["_ENQUEUE"])


def script_bench(args: argparse.Namespace) -> None:
    """Redis CPU per enqueue call: the script before the split (a410736), with the split before priority lanes
    (e8c3a47), and now (the split and priority lanes), without and with a rollout's split in place."""
    from inferline.server.broker import enqueue

    with tempfile.TemporaryDirectory() as tmp, embedded.redis_server(Path(tmp)) as url:
        client = redis.Redis.from_url(url)
        old_sha, split_sha = client.script_load(_script_at("a410736")), client.script_load(_script_at("e8c3a47"))
        new_sha = client.script_load(enqueue._ENQUEUE)
        model = "bench"
        envelope = ["r1", keys.reply_stream("g"), 2**40, "task", ""]
        old_argv = [10_000_000, 90_000, b"x" * 200, 0, *envelope]
        # before priority lanes: the split's key beside the stream's and the counter's
        split_keys = [keys.request_stream(model), keys.queued_bytes(model), keys.routing(model)]

        def run(sha: str, script_keys: list[str], split: bool, argv: list[Any]) -> float:
            client.delete(*keys.model_streams(model, ["1", "2"]), keys.routing(model))
            if split:
                client.hset(keys.routing(model), mapping={"a": "1", "b": "2", "share": 20, "n": 0})
            client.config_resetstat()
            for _ in range(args.calls // 500):
                pipe = client.pipeline(transaction=False)
                for _ in range(500):
                    pipe.evalsha(sha, len(script_keys), *script_keys, *argv)
                pipe.execute()
                client.delete(*keys.model_streams(model, ["1", "2"]))
            stats = client.info("commandstats")["cmdstat_evalsha"]
            return float(stats["usec_per_call"])

        old_keys = [keys.request_stream(model), keys.queued_bytes(model)]
        lanes = enqueue._KEY_OF
        results: dict[str, list[float]] = {"before the split": [], "split, before lanes": [], "now, no rollout": [],
                                           "now, no rollout, high": [], "now, during a rollout": []}
        for _ in range(args.rounds):
            results["before the split"].append(run(old_sha, old_keys, False, old_argv))
            results["split, before lanes"].append(run(split_sha, split_keys, False, [*old_argv[:4], "", *envelope]))
            results["now, no rollout"].append(run(new_sha, keys.enqueue_keys(model, False), False,
                                                  [*old_argv[:4], "", lanes["normal"], *envelope]))
            results["now, no rollout, high"].append(run(new_sha, keys.enqueue_keys(model, False), False,
                                                        [*old_argv[:4], "", lanes["high"], *envelope]))
            results["now, during a rollout"].append(run(new_sha, keys.enqueue_keys(model), True,
                                                        [*old_argv[:4], "1", lanes["normal"], *envelope]))
        print(f"enqueue script, Redis CPU per call (usec_per_call), {args.rounds} alternating rounds of {args.calls}:")
        for name, values in results.items():
            print(f"  {name:<24} median {statistics.median(values):5.2f} µs  (min {min(values):.2f}, "
                  f"max {max(values):.2f})")
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steady", type=float, default=8.0, help="seconds of each steady phase")
    parser.add_argument("--calls", type=int, default=20_000, help="enqueue calls per script round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--script-only", action="store_true")
    args = parser.parse_args()
    script_bench(args)
    if not args.script_only:
        serving_bench(args)


if __name__ == "__main__":
    main()
