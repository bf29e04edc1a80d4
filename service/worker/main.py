"""Worker process entry: `inferline worker MODEL` (or `python -m service.worker.main MODEL`).

Resolve the device, load the runtime once, publish the model's metadata, heartbeat, and serve batches
until SIGTERM/SIGINT, which drains: stop reading, finish and acknowledge the batch in hand, exit.
No web framework is imported on this side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from service.broker import keys
from service.broker.client import connect
from service.broker.streams import ModelQueue
from service.config import ConfigError, ModelSpec, Settings, spec_from_env
from service.runtimes.base import Runtime
from service.worker import device as devices
from service.worker.heartbeat import Heartbeat, WorkerStats

log = logging.getLogger("inferline.worker")


class Serving(Protocol):
    """A worker's main loop: the batch loop of classic models, or the generation loop."""

    async def serve(self) -> None: ...

    def stop(self) -> None: ...


def limit_threads(threads: int) -> None:
    """Before any framework loads: at their default thread counts torch and TF collapse when another
    process is busy on these small machines (../shared/ENVIRONMENT.md); one thread per worker by default."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def import_object(path: str) -> Any:
    """`package.module:Name` -> the object."""
    module, _, name = path.partition(":")
    if not name:
        raise ConfigError(f"runtime {path!r} must look like 'package.module:Class'")
    return getattr(importlib.import_module(module), name)


def locate(spec: ModelSpec) -> tuple[str, Path | None, dict[str, Any]]:
    """(runtime dotted path, version directory or None, manifest) for a spec."""
    manifest: dict[str, Any] = {}
    version_dir = None
    if spec.options.get("source"):   # a generation model loaded from a hub id or a save_pretrained directory
        return "generation", None, {"kind": "generation"}
    if spec.artifact is not None:
        from models import store  # light: no frameworks
        version_dir = store.resolve(Path(spec.artifact))
        manifest = store.read_manifest(version_dir)
    runtime = spec.runtime or manifest.get("runtime") or ("generation" if manifest.get("kind") == "generation"
                                                          else None)
    if not runtime:
        raise ConfigError(f"models.{spec.name}.runtime is not set and {version_dir} has no runtime in its manifest")
    return runtime, version_dir, manifest


async def publish_info(redis: aioredis.Redis, spec: ModelSpec, runtime: Runtime[Any, Any], kind: str) -> None:
    info = {"name": spec.name, "version": runtime.version, "platform": runtime.platform, "kind": kind,
            "inputs": [t.to_json() for t in runtime.v2_inputs()],
            "outputs": [t.to_json() for t in runtime.v2_outputs()],
            "max_batch_size": spec.max_batch_size, "manifest": public_manifest(runtime.manifest)}
    await redis.set(keys.model_info(spec.name), orjson.dumps(info))


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a gateway may show of a manifest: small scalars and metrics, not vocabularies."""
    return {k: v for k, v in manifest.items() if k in ("version", "framework", "metrics", "labels", "window",
                                                       "max_horizon", "quick", "context_length")}


async def run(spec: ModelSpec, redis_url: str, replica: int) -> None:
    device = devices.resolve(spec.device, replica)
    runtime_path, version_dir, manifest = locate(spec)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    redis = connect(redis_url, health_check_interval=30)
    stats = WorkerStats()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    serving: Serving
    if manifest.get("kind") == "generation" or spec.options.get("source"):
        from service.worker.generate_loop import build_generation_loop
        serving, version, info = await build_generation_loop(spec, redis, worker_id, version_dir, manifest, device,
                                                             stats)
        await redis.set(keys.model_info(spec.name), orjson.dumps(info))
    else:
        from service.worker.execute import Executor
        from service.worker.loop import BatchLoop
        runtime: Runtime[Any, Any] = import_object(runtime_path)()
        runtime.load(version_dir, device, spec.threads)
        version = runtime.version
        await publish_info(redis, spec, runtime, "batch")
        serving = BatchLoop(spec, ModelQueue(redis, spec.name, worker_id), Executor(runtime, spec.name), stats)

    def drain() -> None:
        stopping.set()
        serving.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    # The framework and the model are millions of long-lived objects: keep the collector from walking them
    # again and again (full collections showed as ~90 ms stalls in latency tails).
    gc.collect()
    gc.freeze()
    heartbeat = Heartbeat(redis, spec.name, worker_id, device, version, stats)
    beating = asyncio.create_task(heartbeat.run(stopping))
    log.info("worker ready model=%s version=%s device=%s id=%s", spec.name, version, device, worker_id)
    try:
        await serving.serve()
    finally:
        stopping.set()
        await beating
        await heartbeat.remove()
        await redis.aclose()
        log.info("worker stopped model=%s id=%s batches=%d items=%d", spec.name, worker_id, stats.batches, stats.items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferline worker", description="Serve one model replica.")
    parser.add_argument("model", nargs="?", help="model name in the config (or INFERLINE_MODEL_SPEC)")
    parser.add_argument("--config", help="config file (default: INFERLINE_CONFIG or ./inferline.toml)")
    parser.add_argument("--replica", type=int, default=int(os.environ.get("INFERLINE_REPLICA", "0")),
                        help="replica index, for device=auto round-robin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("INFERLINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        spec = spec_from_env()
        settings = Settings.load(args.config)
        if spec is None:
            if not args.model or args.model not in settings.models:
                raise ConfigError(f"model {args.model!r} is not in the config; configured: {sorted(settings.models)}")
            spec = settings.models[args.model]
        if not settings.redis_url:
            raise ConfigError("REDIS_URL is not set: a worker needs the Redis its gateway uses")
        limit_threads(spec.threads)
        asyncio.run(run(spec, settings.redis_url, args.replica))
    except ConfigError as exc:
        print(f"inferline worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
