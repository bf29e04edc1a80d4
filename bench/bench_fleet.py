"""Fleet benchmark on loopback: S shards x 2 gateways x one worker per model, for 3+ no-op models
(tests.runtimes:Noop, the 784-float v2 body of bench_serving's noop run). Prints, per run: requests/s, p50/p99 (from
one wrk per gateway, the models' URLs in turn), and the CPU µs per request of each Redis process, the gateways and
the workers; from the Redis figures, the requests/s one Redis core carries for this traffic (the README's capacity
figure: 1e6 / all Redis processes' µs per request, since a Redis runs its commands on one core), and the fleet's
Redis ceiling (1e6 / the busiest node's µs per request: a model is bound to one node).

    python bench/bench_fleet.py [--shards 1 2 3] [--models 3] [--connections 64] [--duration 8]
    python bench/bench_fleet.py --durable [--connections 1 64] [--rounds 3]   # min_replicas_ack 0 vs 1, alternating

1 shard is one Redis (the embedded server, on TCP). 2 and 3 shards are a Redis Cluster of that many primaries, no
replicas (tests/redis_cluster.py's nodes, Debian's redis-server 7.0; `[broker] cluster = true`). --durable runs one
Redis with one replica and alternates min_replicas_ack = 0 and 1 per round, so both see the same machine load.
Needs `wrk`. On a shared 2-core machine the figures move with other load: keep runs short and read ranges over
rounds, not single numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.bench_serving import cpu_seconds, wait_ready  # noqa: E402
from inferline.server.broker import embedded  # noqa: E402
from inferline.server.config import BrokerSettings  # noqa: E402

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                               "data": [round(i / 784, 4) for i in range(784)]}]})
# wrk: the models' routes in turn, one body for all (a request's route is all that differs).
LUA = """
local paths = {PATHS}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{BODY}", "rb")
wrk.body = f:read("*a")
f:close()
request = function()
  i = i + 1
  return wrk.format(nil, paths[(i % #paths) + 1])
end
"""


def has_cluster_mode() -> bool:
    return "cluster" in BrokerSettings.model_fields


class Fleet:
    """Gateways and workers (real processes) on a Redis URL; `redis_pids` are the servers whose CPU is measured."""

    def __init__(self, tmp: Path, redis_url: str, redis_pids: dict[str, int], models: list[str], gateways: int,
                 env: dict[str, str]) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids = dict(redis_pids)
        config = tmp / "fleet.toml"
        config.write_text("".join(f"[models.{m}]\nmodel = \"tests.runtimes:Noop\"\nmax_batch_size = 32\n"
                                  f"max_batch_delay_ms = 5\n" for m in models)
                          + "[security]\nauth = \"off\"\n[gateway]\naccess_log = false\n")
        base = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_") and k != "REDIS_URL"}
        self.env = {**base, "REDIS_URL": redis_url, "INFERLINE_CONFIG": str(config), "PYTHONPATH": str(ROOT), **env}
        for m in models:
            self._spawn(f"worker-{m}", [sys.executable, "-m", "inferline.server.worker.main", m])
        self.urls = []
        for g in range(gateways):
            port = embedded.free_port()
            self._spawn(f"gateway-{g}", [sys.executable, "-m", "inferline.server.cli", "gateway", "--port", str(port)])
            self.urls.append(f"http://127.0.0.1:{port}")
        for url in self.urls:
            wait_ready(url, "fleet did not become ready; see logs in " + str(tmp), within_s=300)   # loaded machines
        self.models = models

    def _spawn(self, name: str, argv: list[str]) -> None:
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=(self.tmp / f"{name}.log").open("wb"))
        self.procs.append(proc)
        self.pids[name] = proc.pid

    def run(self, connections: int, duration: int) -> dict[str, Any]:
        """One wrk per gateway (connections split between them) for duration s: the totals and each process's
        CPU µs per request."""
        body = self.tmp / "body.json"
        body.write_text(BODY)
        script = self.tmp / "fleet.lua"
        paths = ", ".join(f'"/v2/models/{m}/infer"' for m in self.models)
        script.write_text(LUA.replace("{PATHS}", "{" + paths + "}").replace("{BODY}", str(body)))
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        per = [max(1, connections // len(self.urls))] * len(self.urls)
        if connections == 1:
            per = [1] + [0] * (len(self.urls) - 1)
        wrks = [subprocess.Popen(["wrk", "-t1", f"-c{c}", f"-d{duration}s", "--latency", "-s", str(script), url],
                                 stdout=subprocess.PIPE, text=True) for url, c in zip(self.urls, per, strict=True) if c]
        outs = [w.communicate(timeout=duration + 60)[0] for w in wrks]
        used = {name: cpu_seconds(pid) - before[name] for name, pid in self.pids.items()}
        rate = sum(float(re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)) for o in outs)   # type: ignore[union-attr]
        failed = sum(int(m.group(1)) for o in outs if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", o)))
        requests = rate * duration
        result: dict[str, Any] = {"req_s": rate, "failed": failed, "p50_ms": max(_pct(o, "50") for o in outs),
                                  "p99_ms": max(_pct(o, "99") for o in outs)}
        for group in ("redis", "gateway", "worker"):
            result[f"cpu_us_{group}"] = sum(s for n, s in used.items() if n.startswith(group)) / requests * 1e6
        result["redis_each"] = {n: round(s / requests * 1e6, 1) for n, s in used.items() if n.startswith("redis")}
        # one core's worth of Redis CPU over what all the Redis processes spent per request; the fleet's own
        # Redis ceiling is its busiest node saturating (models spread unevenly: each is bound to one node)
        total, busiest = result["cpu_us_redis"], max(result["redis_each"].values())
        result["req_s_per_redis_core"] = 1e6 / total if total else float("inf")
        result["redis_ceiling_req_s"] = 1e6 / busiest if busiest else float("inf")
        return result

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _pct(out: str, p: str) -> float:
    m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
    assert m, out
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


@contextlib.contextmanager
def one_redis(tmp: Path, replica: bool = False) -> Iterator[tuple[str, dict[str, int]]]:
    """The embedded server on loopback TCP (and a replica of it): its URL and {name: pid}."""
    procs = []
    primary = embedded.plan(tmp / "redis", port=embedded.free_port(), open_tcp=True)
    procs.append(subprocess.Popen(primary.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    embedded.wait_ready(procs[0], primary)
    pids = {"redis-primary": procs[0].pid}
    if replica:
        second = embedded.plan(tmp / "replica", port=embedded.free_port(), open_tcp=True)
        procs.append(subprocess.Popen([*second.argv, "--replicaof", "127.0.0.1", str(primary.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        embedded.wait_ready(procs[1], second)
        pids["redis-replica"] = procs[1].pid
        import redis
        with redis.Redis(port=second.port) as client:
            deadline = time.monotonic() + 20
            while client.info("replication").get("master_link_status") != "up" and time.monotonic() < deadline:
                time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{primary.port}/0", pids
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def cluster_redis(tmp: Path, shards: int) -> Iterator[tuple[str, dict[str, int]]]:
    """`shards` primaries without replicas (tests/redis_cluster.py's nodes), the slots split evenly in port order,
    joined by hand: `redis-cli --cluster create` wants at least 3 primaries."""
    from tests.redis_cluster import Cluster, free_ports

    cluster = Cluster(tmp / "cluster", free_ports(shards), None, 0)
    try:
        for port in cluster.ports:
            cluster.start(port)
        for i, port in enumerate(cluster.ports):
            deadline = time.monotonic() + 10
            with contextlib.closing(cluster.node(port)) as node:
                while True:
                    try:
                        node.ping()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, f"node {port} did not start"
                        time.sleep(0.05)
                    except Exception:   # noqa: BLE001 - redis.ConnectionError while it starts
                        assert time.monotonic() < deadline, f"node {port} did not start"
                        time.sleep(0.05)
                node.execute_command("CLUSTER", "ADDSLOTSRANGE", 16384 * i // shards, 16384 * (i + 1) // shards - 1)
                if i:
                    node.execute_command("CLUSTER", "MEET", "127.0.0.1", cluster.ports[0])
        cluster.wait_ok(with_replicas=False)
        yield cluster.url, {f"redis-{port}": proc.pid for port, proc in cluster.procs.items()}
    finally:
        cluster.stop()


def show(label: str, r: dict[str, Any]) -> None:
    print(f"{label:<34} {r['req_s']:>8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
          f"CPU µs/req: redis {r['cpu_us_redis']:5.1f} {r['redis_each']}  gateways {r['cpu_us_gateway']:5.0f}  "
          f"workers {r['cpu_us_worker']:5.0f}  -> {r['req_s_per_redis_core']:,.0f} req/s per Redis core, "
          f"{r['redis_ceiling_req_s']:,.0f} req/s when the busiest node is saturated"
          + (f"  FAILED {r['failed']}" if r["failed"] else ""), flush=True)


def fleet_runs(args: argparse.Namespace, models: list[str]) -> None:
    for shards in args.shards:
        if shards > 1 and not has_cluster_mode():
            print(f"{shards} shards: skipped (no cluster mode in this build: merge the cluster branch)")
            continue
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            servers = one_redis(tmp) if shards == 1 else cluster_redis(tmp, shards)
            with servers as (url, pids):
                env = {"INFERLINE_BROKER__CLUSTER": "true"} if shards > 1 else {}
                fleet = Fleet(tmp, url, pids, models, args.gateways, env)
                try:
                    fleet.run(8, 2)   # warm-up
                    for c in args.connections:
                        for n in range(args.rounds):
                            show(f"{shards} shard(s) c={c} round {n + 1}", fleet.run(c, args.duration))
                finally:
                    fleet.close()


def durable_runs(args: argparse.Namespace, models: list[str]) -> None:
    """min_replicas_ack 0 and 1 on the same primary + replica, alternating per round (a fresh fleet each)."""
    results: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with one_redis(tmp, replica=True) as (url, pids):
            for n in range(args.rounds):
                for acks in (0, 1):
                    run_dir = tmp / f"run-{n}-{acks}"
                    run_dir.mkdir()
                    fleet = Fleet(run_dir, url, pids, models, args.gateways,
                                  {"INFERLINE_BROKER__MIN_REPLICAS_ACK": str(acks)})
                    try:
                        fleet.run(8, 2)
                        for c in args.connections:
                            r = fleet.run(c, args.duration)
                            results.setdefault((acks, c), []).append(r)
                            show(f"min_replicas_ack={acks} c={c} round {n + 1}", r)
                    finally:
                        fleet.close()
    print("\nsummary (median over rounds; range in brackets)")
    for c in args.connections:
        for acks in (0, 1):
            rs = results[(acks, c)]
            rate = [r["req_s"] for r in rs]
            p50 = [r["p50_ms"] for r in rs]
            print(f"  c={c:<3} min_replicas_ack={acks}: {statistics.median(rate):7.0f} req/s [{min(rate):.0f}-"
                  f"{max(rate):.0f}]  p50 {statistics.median(p50):.2f} ms [{min(p50):.2f}-{max(p50):.2f}]  "
                  f"gateway CPU {statistics.median(r['cpu_us_gateway'] for r in rs):.0f} µs/req  "
                  f"primary {statistics.median(r['redis_each']['redis-primary'] for r in rs):.1f} µs/req")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--connections", type=int, nargs="+", default=[64])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--durable", action="store_true", help="min_replicas_ack 0 vs 1 on one Redis + replica")
    args = parser.parse_args()
    models = [f"noop{i}" for i in range(args.models)]
    print(f"fleet: {args.gateways} gateways, {len(models)} no-op models (one worker each), {os.cpu_count()} CPUs, "
          f"{args.duration} s runs", flush=True)
    if args.durable:
        durable_runs(args, models)
    else:
        fleet_runs(args, models)


if __name__ == "__main__":
    main()
