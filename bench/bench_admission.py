"""Gateway CPU per request with API keys on: the security layer's admission (and slot release) against a real
Redis, through the gateway's ASGI app in this process (no HTTP server, so the number is the app's own cost plus
this driver's, the same with and without keys), a real Echo worker process answering.

    python -m bench.bench_admission [--requests 3000] [--concurrency 32] [--rounds 3]

Prints CPU ms per request (time.process_time of this process, best of --rounds) and requests/s, for keys off and
keys required; their difference is what the security layer costs a request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from inferline.server.auth.keys import new_key
from inferline.server.broker import embedded, keystore
from inferline.server.broker.client import connect
from inferline.server.config import Settings
from inferline.server.gateway.app import create_app

ROOT = Path(__file__).resolve().parent.parent
BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})
SPEC = {"name": "echo", "runtime": "tests.runtimes:Echo", "max_batch_size": 64, "max_batch_delay_ms": 1}


async def one(app: Any, headers: list[tuple[bytes, bytes]]) -> int:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "method": "POST", "path": "/v2/models/echo/infer", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "root_path": "", "state": {}}
    await app(scope, receive, send)
    return status


async def measure(url: str, auth: str, requests: int, concurrency: int, rounds: int) -> tuple[float, float]:
    settings = Settings(redis_url=url, models={"echo": SPEC},
                        security={"auth": auth, "rate_per_s": 1e6, "burst": 10_000_000, "concurrency": 100_000})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    if auth == "required":
        key, record = new_key()
        redis = connect(url)
        await keystore.save(redis, record.key_id, record.to_fields())
        await redis.aclose()
        headers.append((b"authorization", f"Bearer {key}".encode()))
    app = create_app(settings)
    inner = app
    while hasattr(inner, "app"):
        inner = inner.app
    best_cpu, best_rate = float("inf"), 0.0
    lifespan = inner.router.lifespan_context(inner)
    await lifespan.__aenter__()
    try:
        gate = asyncio.Semaphore(concurrency)

        async def bounded() -> int:
            async with gate:
                return await one(app, headers)

        assert await one(app, headers) == 200
        for _ in range(rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            codes = await asyncio.gather(*[bounded() for _ in range(requests)])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            assert set(codes) == {200}, set(codes)
            best_cpu, best_rate = min(best_cpu, cpu * 1000 / requests), max(best_rate, requests / wall)
    finally:   # the reply reader's cancellation can wait on its blocking XREAD: do not let the bench hang on it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lifespan.__aexit__(None, None, None), 5)
    return best_cpu, best_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, embedded.redis_server(Path(tmp) / "redis", open_tcp=False) as url:
        env = {**os.environ, "REDIS_URL": url, "INFERLINE_MODEL_SPEC": json.dumps(SPEC), "PYTHONPATH": str(ROOT)}
        worker = subprocess.Popen([sys.executable, "-m", "inferline.server.worker.main"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            for auth in ("off", "required"):
                cpu_ms, rate = asyncio.run(measure(url, auth, args.requests, args.concurrency, args.rounds))
                print(f"keys {auth:8s}  {cpu_ms:.3f} ms CPU/request  {rate:,.0f} req/s  "
                      f"({args.requests} requests at concurrency {args.concurrency}, best of {args.rounds})")
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
