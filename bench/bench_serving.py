"""Serving benchmark for the platform core: one worker, 1 model thread, batches of up to 32 within 5 ms, for three
models of different speeds: the Keras cnn (the zoo's cnn), a PyTorch CNN of the same MNIST shape (bench/torch_cnn.py,
weights from a fixed seed) and a no-op model (tests.runtimes:Noop). All three take the same 784-float v2 JSON body.

Measures, in one run, per model:
  * the limit, in process: the forward pass alone at batch 32, and the whole pipeline a server cannot avoid (decode
    32 request bodies, forward, encode 32 answers, through the worker's own Executor), plus single-item times;
  * served throughput, p50/p99 latency and the CPU each process (gateway, worker, Redis) spent per request, at
    concurrency 1 and 64, from wrk in its own process, through gateway -> Redis -> worker;
  * a naive FastAPI server running the same model in its route (bench/naive_fastapi.py) at concurrency 1: the p50
    the served c=1 latency is compared with;
  * the bare cnn pipeline again while the no-op service runs at c=64 on the same cores.
Then prints the ratios against the targets (issue 9: torch CNN served c=64 >= 0.95 of its bare pipeline; c=1 p50
within 0.5 ms of naive FastAPI; c=1 CPU per request <= 1.5x the c=64 figure) and the CPU per request table.
CPU per request is the robust figure on a shared machine; req/s moves with whatever else runs.

    python bench/bench_serving.py [--store model_store] [--duration 10] [--models cnn torch_cnn noop]

Needs `wrk` (Debian: apt-get install wrk). Starts a private Redis unless REDIS_URL is set. Where the time goes,
by process and function: bench/profile_serving.py (py-spy) and bench/profile_worker.py (cProfile).
"""

from __future__ import annotations

import argparse
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

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from inferline.server.broker import embedded  # noqa: E402


def v2_bodies(n: int) -> list[bytes]:
    """n distinct real digit images as v2 JSON bodies: 784 FP32 values each."""
    from sklearn.datasets import load_digits

    from inferline.zoo.cnn.imaging import ImageFormat, digit_image, image_to_array

    digits = load_digits()
    fmt = ImageFormat()
    out = []
    for i in range(n):
        pixels = image_to_array(digit_image(digits.images[i % len(digits.images)]), fmt).reshape(-1)
        body = {"inputs": [{"name": "input", "shape": [1, 28, 28, 1], "datatype": "FP32",
                            "data": [round(float(v), 4) for v in pixels]}]}
        out.append(json.dumps(body).encode())
    return out


def noop_body(body: bytes) -> bytes:
    """The same 784 floats as the no-op model's input: its FP32 `x` of shape [1, 784]. The no-op run then pays the
    decode every real tensor request pays (a one-float body hid it)."""
    data = json.loads(body)["inputs"][0]["data"]
    return json.dumps({"inputs": [{"name": "x", "shape": [1, len(data)], "datatype": "FP32", "data": data}]}).encode()


def timeit(fn: Any, seconds: float = 3.0) -> tuple[float, float]:
    """(calls per second, median seconds per call) over about `seconds`."""
    fn()
    times = []
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return len(times) / sum(times), float(np.median(times))


class Bare:
    """The cnn in this process, 1 thread, through the worker's own decode, predict and encode (its Executor)."""

    def __init__(self, version_dir: Path | None, bodies: list[bytes], name: str = "cnn",
                 spec: dict[str, Any] | None = None) -> None:
        from inferline.server.config import ModelSpec
        from inferline.server.worker.batching import Executor
        from inferline.server.worker.loading import load_model
        from inferline.server.worker.rows import RowCodec

        self.model = load_model(ModelSpec(name=name, **(spec or {"artifact": version_dir})), "cpu")
        self.codec = RowCodec(self.model, name)
        self.executor = Executor(self.model, self.codec, name)
        self.batch = [self.delivery(i, b) for i, b in enumerate(bodies[:32])]

    @classmethod
    def for_model(cls, name: str, spec: dict[str, Any], bodies: list[bytes]) -> Bare:
        """Any model by its ModelSpec fields (e.g. {"model": "tests.runtimes:Noop"})."""
        return cls(None, bodies, name, spec)

    @staticmethod
    def delivery(i: int, body: bytes) -> Any:
        from inferline.server.broker.delivery import Delivery
        from inferline.server.protocol import OP_V2, Envelope, encode_payload, now_ms

        return Delivery(f"0-{i}".encode(), Envelope(f"bare-{i}", "nowhere", now_ms() + 3_600_000, OP_V2),
                        encode_payload({"header_length": None}, body))

    def pipeline(self) -> None:
        """Decode 32 bodies, one forward pass, encode 32 answers."""
        self.executor.run(self.batch)

    def pipeline_img_s(self, seconds: float = 3.0) -> float:
        return timeit(self.pipeline, seconds)[0] * 32

    def limits(self) -> dict[str, float]:
        """Forward alone and whole pipeline at batch 32; single-item forward (hot, and after 2 ms idle) and
        single-item pipeline."""
        rows = [row for d in self.batch for row in self.codec.decode(d).rows]
        fwd_rate, _ = timeit(lambda: self.model.predict(rows))
        pipeline_img_s = self.pipeline_img_s()
        _, single = timeit(lambda: self.model.predict(rows[:1]))
        # A served request at concurrency 1 finds the model idle for the ~2 ms of its trip through HTTP and Redis.
        # On these VMs the framework then runs slower than in a hot loop (caches gone cold: TF ~0.8 -> ~2 ms,
        # numpy barely), so the bare single forward is also measured after the same idle gap.
        after_idle = []
        for _ in range(300):
            time.sleep(0.002)
            started = time.perf_counter()
            self.model.predict(rows[:1])
            after_idle.append(time.perf_counter() - started)
        _, single_pipe = timeit(lambda: self.executor.run(self.batch[:1]))
        return {"forward_img_s": fwd_rate * 32, "pipeline_img_s": pipeline_img_s, "single_forward_ms": single * 1e3,
                "single_pipeline_ms": single_pipe * 1e3, "single_after_idle_ms": float(np.median(after_idle)) * 1e3}


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{path}", "rb")
wrk.body = f:read("*a")
f:close()
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_wrk(url: str, body_path: Path, connections: int, duration: int) -> subprocess.Popen[str]:
    script = body_path.with_suffix(".lua")
    script.write_text(LUA.replace("{path}", str(body_path)))
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True)


def wrk(url: str, body_path: Path, connections: int, duration: int,
        processes: dict[str, int] | None = None) -> dict[str, float]:
    """Rate and latency from wrk; with `processes` (name -> pid), also the CPU µs per request each one spent."""
    before = {name: cpu_seconds(pid) for name, pid in (processes or {}).items()}
    proc = start_wrk(url, body_path, connections, duration)
    out, _ = proc.communicate(timeout=duration + 60)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in (processes or {}).items()}
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))   # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed responses:\n{out}")

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    requests = rate * duration
    return {"req_s": rate, "p50_ms": pct("50"), "p99_ms": pct("99"),
            **{f"cpu_us_{name}": seconds / requests * 1e6 for name, seconds in used.items()}}


def wait_ready(url: str, failure: str, within_s: float = 120) -> None:
    """Until `url`/readyz answers 200; RuntimeError(failure) after within_s."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(failure)


class Served:
    """A private Redis (unless REDIS_URL), one worker for `model`, one gateway: real processes."""

    def __init__(self, tmp: Path, model: str, spec: dict[str, Any]) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}
        self.redis_url = os.environ.get("REDIS_URL", "")
        if not self.redis_url:
            proc, self.redis_url = embedded.start(tmp / "redis")
            self.procs.append(proc)
            self.pids["redis"] = proc.pid
        import redis
        redis.Redis.from_url(self.redis_url).flushdb()
        spec = {"name": model, "max_batch_size": 32, "max_batch_delay_ms": 5, "threads": 1, **spec}
        config = tmp / f"{model}.toml"
        config.write_text(f"[models.{model}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.items()
                                                         if k != "name"))
        env = {**os.environ, "REDIS_URL": self.redis_url, "INFERLINE_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
        self.port = embedded.free_port()
        worker = subprocess.Popen([sys.executable, "-m", "inferline.server.worker.main", model], env=env, cwd=ROOT,
                                  stderr=(tmp / "worker.log").open("wb"))
        gateway = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", "gateway", "--port", str(self.port)],
                                   env=env, cwd=ROOT, stderr=(tmp / "gateway.log").open("wb"))
        self.procs += [worker, gateway]
        self.pids.update(worker=worker.pid, gateway=gateway.pid)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.url, "service did not become ready; see logs in " + str(tmp))

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class Naive:
    """bench/naive_fastapi.py serving the same model in its route: the c=1 latency baseline."""

    def __init__(self, tmp: Path, spec: dict[str, Any]) -> None:
        self.port = embedded.free_port()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "naive_fastapi.py"), str(self.port),
                                      json.dumps(spec)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stderr=(tmp / "naive.log").open("wb"))
        self.pids = {"naive": self.proc.pid}
        self.url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.url, "the naive server did not start; see " + str(tmp / "naive.log"))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


PROCESSES = ("gateway", "worker", "redis", "naive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["cnn", "torch_cnn", "noop"],
                        choices=("cnn", "torch_cnn", "noop"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    bodies = v2_bodies(64)
    specs: dict[str, dict[str, Any]] = {"torch_cnn": {"model": "bench.torch_cnn:TorchCnn"},
                                        "noop": {"model": "tests.runtimes:Noop"}}
    if "cnn" in args.models:
        from inferline.zoo import build, store

        store_dir = Path(args.store).resolve()
        build.build_missing(store_dir, ["cnn"], quick=not store.latest(store_dir, "cnn"))
        specs["cnn"] = {"artifact": str(store_dir / "cnn")}
    limits: dict[str, dict[str, float]] = {}
    bares: dict[str, Bare] = {}
    for name in args.models:
        model_bodies = [noop_body(b) for b in bodies] if name == "noop" else bodies
        bares[name] = Bare.for_model(name, specs[name], model_bodies)
        limits[name] = limit = bares[name].limits()
        print(f"bare {name} (1 thread): forward {limit['forward_img_s']:,.0f} img/s at batch 32; pipeline "
              f"{limit['pipeline_img_s']:,.0f} img/s; single forward {limit['single_forward_ms']:.2f} ms, single "
              f"pipeline {limit['single_pipeline_ms']:.2f} ms, single forward after 2 ms idle "
              f"{limit['single_after_idle_ms']:.2f} ms", flush=True)
    results: dict[str, dict[str, float]] = {}
    shared_pipeline = float("nan")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.models:
            body_path = tmp / f"{name}.json"
            body_path.write_bytes(noop_body(bodies[7]) if name == "noop" else bodies[7])
            served = Served(tmp, name, specs[name])
            try:
                url = f"{served.url}/v2/models/{name}/infer"
                wrk(url, body_path, 64, 2)   # warm up
                for c in (1, 64):
                    results[f"{name} c={c}"] = r = wrk(url, body_path, c, args.duration, served.pids)
                    print(f"served {name} c={c}: {r}", flush=True)
                if name == "noop" and "cnn" in bares:
                    loading = start_wrk(url, body_path, 64, 6)
                    time.sleep(1.0)
                    shared_pipeline = bares["cnn"].pipeline_img_s(4.0)
                    loading.communicate(timeout=60)
                    print(f"bare cnn pipeline while the no-op service runs at c=64: {shared_pipeline:,.0f} img/s",
                          flush=True)
            finally:
                served.close()
            naive = Naive(tmp, {"name": name, **specs[name]})
            try:
                url = f"{naive.url}/v2/models/{name}/infer"
                wrk(url, body_path, 1, 2)
                results[f"{name} naive c=1"] = r = wrk(url, body_path, 1, args.duration, naive.pids)
                print(f"naive FastAPI {name} c=1: {r}", flush=True)
            finally:
                naive.close()

    print("\n| measure | value | target |\n|---|---|---|")
    for name in args.models:
        limit, c64, c1, naive_c1 = limits[name], results[f"{name} c=64"], results[f"{name} c=1"], \
            results[f"{name} naive c=1"]
        print(f"| {name}: bare pipeline, batch 32 (decode+forward+encode) | {limit['pipeline_img_s']:,.0f} img/s | |")
        print(f"| {name}: served c=64 | {c64['req_s']:,.0f} req/s, p50 {c64['p50_ms']:.1f} ms, p99 "
              f"{c64['p99_ms']:.1f} ms | |")
        if name != "noop":
            print(f"| {name}: served / bare pipeline at c=64 | {c64['req_s'] / limit['pipeline_img_s']:.2f} | "
                  f"{'>= 0.95' if name == 'torch_cnn' else ''} |")
        print(f"| {name}: served c=1 | {c1['req_s']:,.0f} req/s, p50 {c1['p50_ms']:.2f} ms, p99 {c1['p99_ms']:.2f} ms "
              "| |")
        print(f"| {name}: naive FastAPI c=1 | {naive_c1['req_s']:,.0f} req/s, p50 {naive_c1['p50_ms']:.2f} ms | |")
        print(f"| {name}: c=1 p50 - naive FastAPI p50 | {c1['p50_ms'] - naive_c1['p50_ms']:.2f} ms | <= 0.5 ms |")
        print(f"| {name}: c=1 p50 - bare single forward after 2 ms idle | "
              f"{c1['p50_ms'] - limit['single_after_idle_ms']:.2f} ms | |")
    if "cnn" in limits and shared_pipeline == shared_pipeline:
        print(f"| bare cnn pipeline, no-op service at c=64 on the same cores | {shared_pipeline:,.0f} img/s "
              f"({shared_pipeline / limits['cnn']['pipeline_img_s']:.2f} of idle) | |")
    print("\nCPU per request (µs), by process (the bare pipeline's own per request at batch 32: "
          + ", ".join(f"{n} {1e6 / limits[n]['pipeline_img_s']:.0f}" for n in args.models) + "):")
    print("| run | " + " | ".join(PROCESSES) + " | c=1 / c=64 (gateway+worker) |\n|---|---|---|---|---|---|")
    for run, r in results.items():
        ratio = ""
        if run.endswith("c=1") and "naive" not in run:
            c64 = results[run.replace("c=1", "c=64")]
            ratio = f"{(r['cpu_us_gateway'] + r['cpu_us_worker']) / (c64['cpu_us_gateway'] + c64['cpu_us_worker']):.2f}"
        print(f"| {run} | " + " | ".join(f"{r[f'cpu_us_{p}']:.0f}" if f"cpu_us_{p}" in r else "" for p in PROCESSES)
              + f" | {ratio} |")


if __name__ == "__main__":
    main()
