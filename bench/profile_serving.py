"""Where one served request's CPU goes: per process (gateway, worker, Redis), at chosen concurrencies.

    python bench/profile_serving.py                          # no-op model, c=1 and c=64, CPU µs per request
    python bench/profile_serving.py --profile                # + py-spy on gateway and worker: µs/request by function
    python bench/profile_serving.py --model cnn --store model_store --concurrency 1 64 --duration 8
    python bench/profile_serving.py --cluster                # the same on a local Redis Cluster (3 + 3 nodes)

Starts a private Redis, one worker and one gateway (bench_serving.Served), drives /v2/models/{model}/infer with wrk
(one thread, the 784-float v2 body of bench_serving) and reads each process's CPU from /proc before and after:
CPU µs per request = CPU seconds spent / requests answered. That figure is robust on a shared, loaded machine where
req/s is not (other engineers' tests take the cores; identical code varied 60% in req/s): run before/after
alternately and compare the spread.

--cluster starts a Redis Cluster on loopback (tests/redis_cluster.py: 3 primaries, 3 replicas) and runs the gateway
and worker against it in cluster mode (INFERLINE_BROKER__CLUSTER=true); Redis's own CPU is then not counted. Compare
it with plain runs, alternating. The gateway's id is random, so its reply stream lands on the model's node in about
one run of three: each run says whether it did.

--profile attaches `py-spy record --pid` (pip install py-spy) to the gateway and the worker for each run (sampling
at --rate Hz, idle time left out) and turns the samples into µs per request: a function's samples / rate / requests.
It prints, per process, the functions with the most self time and the most inclusive time. py-spy runs in its own
process; it slows the sampled ones a little (they stop for each sample), so compare profiled runs with profiled runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_serving import Served, noop_body, start_wrk, v2_bodies, wrk  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def spy(pid: int, seconds: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:]*)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:123)` -> `file.py:function` (lines merged)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{Path(m['file']).name}:{m['fn']}"


def by_function(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(self samples, inclusive samples, total samples) per function from py-spy's raw (collapsed stack) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    return own, incl, total


def report(name: str, raw: Path, rate: int, requests: float, top: int) -> None:
    if not raw.exists():
        print(f"  {name}: no py-spy output (is py-spy installed and allowed to attach?)")
        return
    own, incl, total = by_function(raw)
    per = 1e6 / rate / max(requests, 1.0)
    print(f"  {name}: {total * per:.0f} µs/request sampled ({total} samples)")
    print("    self µs/req  | inclusive µs/req")
    selfs, incls = own.most_common(top), incl.most_common(top)
    for (fa, na), (fb, nb) in zip(selfs, incls, strict=False):
        print(f"    {na * per:6.1f} {fa[:58]:58} | {nb * per:6.1f} {fb[:58]}")


def same_node(tmp: Path, cluster: Any, model: str) -> str:
    """Whether the gateway's reply stream (its id is in gateway.log) and the model's request stream share a node:
    cluster mode's figures differ between the two (bench/RESULTS.md)."""
    from redis.crc import key_slot

    from inferline.server.broker import keys

    found = re.search(r"gateway up id=(\S+)", (tmp / "gateway.log").read_text(errors="replace"))
    if found is None:
        return "unknown"
    reply, request = keys.reply_stream(found.group(1)), keys.request_stream(model)
    same = cluster.primary_of_slot(key_slot(reply.encode())) == cluster.primary_of_slot(key_slot(request.encode()))
    return "yes" if same else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("noop", "cnn", "torch_cnn"), default="noop")
    parser.add_argument("--store", default="model_store", help="the cnn's store (built when missing)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="runs per concurrency (their spread is printed)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway and the worker")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cluster", action="store_true", help="serve from a local Redis Cluster, in cluster mode")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        if args.cluster:
            from tests.redis_cluster import redis_cluster

            nodes = stack.enter_context(redis_cluster(tmp / "redis-cluster"))
            os.environ.update(REDIS_URL=nodes.url, INFERLINE_BROKER__CLUSTER="true")
        body_path = tmp / "body.json"
        if args.model == "noop":
            body_path.write_bytes(noop_body(v2_bodies(8)[7]))
            spec: dict[str, object] = {"model": "tests.runtimes:Noop"}
        elif args.model == "torch_cnn":
            body_path.write_bytes(v2_bodies(8)[7])
            spec = {"model": "bench.torch_cnn:TorchCnn"}
        else:
            from inferline.zoo import build, store

            store_dir = Path(args.store).resolve()
            build.build_missing(store_dir, ["cnn"], quick=not store.latest(store_dir, "cnn"))
            body_path.write_bytes(v2_bodies(8)[7])
            spec = {"artifact": str(store_dir / "cnn")}
        served = Served(tmp, args.model, spec)
        url = f"{served.url}/v2/models/{args.model}/infer"
        results: dict[str, list[dict[str, float]]] = {}
        try:
            start_wrk(url, body_path, 64, 2).communicate(timeout=60)   # warm up
            for c in args.concurrency:
                for i in range(args.repeat):
                    spies = {}
                    if args.profile:
                        for p in ("gateway", "worker"):
                            out = tmp / f"{p}-{c}-{i}.txt"
                            spies[p] = (out, spy(served.pids[p], args.duration, out, args.rate))
                        time.sleep(0.5)   # py-spy attaches
                    r = wrk(url, body_path, c, args.duration, served.pids)
                    results.setdefault(f"c={c}", []).append(r)
                    print(f"{args.model} c={c}: {r['req_s']:,.0f} req/s p50 {r['p50_ms']:.2f} ms; CPU µs/request: "
                          + ", ".join(f"{p} {r[f'cpu_us_{p}']:.0f}" for p in served.pids), flush=True)
                    for p, (out, proc) in spies.items():
                        proc.wait(timeout=args.duration + 30)
                        report(p, out, args.rate, r["req_s"] * args.duration, args.top)
        finally:
            if args.cluster:   # the worker's ack rides its next read when the two streams are on different nodes
                print(f"gateway's reply stream on the model's node: {same_node(tmp, nodes, args.model)}")
            served.close()
    print(json.dumps({k: [{m: round(v, 2) for m, v in r.items()} for r in rs] for k, rs in results.items()}))


if __name__ == "__main__":
    if os.environ.get("OMP_NUM_THREADS") is None:
        os.environ["OMP_NUM_THREADS"] = "1"
    main()
