"""Worker process entry: `inferline worker MODEL` (or `python -m service.worker.main MODEL`).

Resolve the device, load the deployment's Model once, publish its metadata, and serve it through the one worker
shell with the scheduler its kind needs (dynamic batching, or continuous batching for a LanguageModel) until
SIGTERM/SIGINT, which drains: stop reading, answer and acknowledge what is in hand, exit. A model call that hangs
(past predict_timeout_s), or a drain past its cap, ends the process instead (worker/watchdog.py: exit code 75 or 76),
for its supervisor to replace it.
No web framework is imported on this side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from inferline.server import logs, tracing
from inferline.server.broker import fleet
from inferline.server.broker.cancels import Cancels
from inferline.server.broker.client import connect
from inferline.server.broker.consumer import ModelQueue
from inferline.server.broker.registry import Registry
from inferline.server.broker.sender import Durable
from inferline.server.config import ConfigError, ModelSpec, Settings, spec_from_env
from inferline.server.model import LanguageModel, Model, signature
from inferline.server.protocol import ModelInfo, WorkerStatus
from inferline.server.worker import device as devices
from inferline.server.worker.batching import DynamicBatching, Executor
from inferline.server.worker.loading import load_model
from inferline.server.worker.rows import RowCodec
from inferline.server.worker.shell import Scheduler, Shell
from inferline.server.worker.watchdog import Watchdog, farewell

if TYPE_CHECKING:   # the engine imports torch: only a language model's worker loads it
    from inferline.server.generation.engine import Engine

log = logging.getLogger("inferline.worker")

PUBLIC_MANIFEST = ("version", "framework", "metrics", "labels", "window", "max_horizon", "quick", "context_length")


def limit_threads(threads: int) -> None:
    """Before any framework loads: at their default thread counts torch and TF collapse when another
    process is busy on these small machines (../shared/ENVIRONMENT.md); one thread per worker by default."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def model_info(spec: ModelSpec, model: Model, max_batch_size: int, engine: Engine | None = None) -> ModelInfo:
    """What gateways learn of this model: identity, v2 tensors, request/response schemas (for /docs), and for a
    language model the engine's limits (TGI's /info reports them)."""
    manifest = {k: v for k, v in model.manifest.items() if k in PUBLIC_MANIFEST}
    if isinstance(model, LanguageModel):
        return ModelInfo(spec.name, model.version, model.platform, model.kind,
                         [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
                         [{"name": "text_output", "datatype": "BYTES", "shape": [1]}], max_batch_size,
                         manifest=manifest, context_length=engine.context_length if engine else None,
                         max_input_tokens=engine.max_input_tokens if engine else None,
                         max_prefill_tokens=engine.max_prefill_tokens if engine else None)
    sig = signature(type(model))
    return ModelInfo(spec.name, model.version, model.platform, model.kind, [t.to_json() for t in sig.inputs],
                     [t.to_json() for t in sig.outputs], max_batch_size, manifest=manifest, **sig.schemas())


def scheduler_for(shell: Shell, spec: ModelSpec, model: Model, device: str,
                  watchdog: Watchdog) -> tuple[Scheduler, ModelInfo]:
    max_batch_size = spec.max_batch_size or type(model).max_batch_size
    if isinstance(model, LanguageModel):
        from inferline.server.generation.engine import Engine
        from inferline.server.worker.continuous import ContinuousBatching

        engine = Engine(model.model, model.tokenizer, device=device, max_batch_size=max_batch_size)
        return (ContinuousBatching(shell, model, engine, max_batch_size, watchdog),
                model_info(spec, model, max_batch_size, engine))
    delay = spec.max_batch_delay_ms if spec.max_batch_delay_ms is not None else type(model).max_batch_delay_ms
    executor = Executor(model, RowCodec(model, spec.name), spec.name)
    return (DynamicBatching(shell, executor, max_batch_size, delay, watchdog),
            model_info(spec, model, max_batch_size))


async def run(spec: ModelSpec, settings: Settings, redis_url: str, replica: int) -> None:
    device = devices.resolve(spec.device, replica)
    redis = connect(redis_url, settings.broker.timeout_s, health_check_interval=30, cluster=settings.broker.cluster)
    try:
        model = load_model(spec, device)
    except Exception as exc:
        # A rollout's controller reads why its new version cannot serve (server/rollout.py): the status says so.
        if spec.version:
            with contextlib.suppress(Exception):
                await fleet.report_load_error(redis, spec.name, spec.version, f"{type(exc).__name__}: {exc}")
        await redis.aclose()
        raise
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    registry = Registry(redis)
    status = WorkerStatus(os.getpid(), socket.gethostname(), device, model.version, int(time.time()))
    # Its version's lane is read beside the common stream only for a store version (one a rollout can name).
    lane = model.version if model.artifact is not None and model.manifest else ""
    broker = settings.broker
    durable = (Durable(broker.min_replicas_ack, broker.replica_ack_timeout_ms, int(spec.timeout_s * 1000))
               if broker.min_replicas_ack else None)
    queue = ModelQueue(redis, spec.name, worker_id, lane, model.version, durable=durable)
    with contextlib.suppress(Exception):   # a new version's guard is on before its first answer
        await queue.watch_rollout()
    shell = Shell(spec, queue, registry, Cancels(redis, spec.name), worker_id, status, alive_file=settings.alive_file)
    watchdog = Watchdog(spec.name, spec.predict_timeout_s,
                        farewell(redis_url, settings.broker.timeout_s, spec.name, worker_id, lane,
                                 settings.broker.cluster))
    scheduler, info = scheduler_for(shell, spec, model, device, watchdog)
    shell.info = info
    await registry.publish(info)

    def stop() -> None:   # drain, and be gone within the watchdog's drain cap even if a model call hangs
        shell.stop()
        watchdog.stop()

    shell.on_drain_request = stop   # POST /admin/workers/{id}/drain: the same drain as SIGTERM
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    # The framework and the model are millions of long-lived objects: keep the collector from walking them
    # again and again (full collections showed as ~90 ms stalls in latency tails).
    gc.collect()
    gc.freeze()
    log.info("worker ready model=%s version=%s device=%s id=%s", spec.name, model.version, device, worker_id)
    try:
        await shell.serve(scheduler)
    finally:
        await redis.aclose()
        log.info("worker stopped model=%s id=%s batches=%d items=%d", spec.name, worker_id, status.batches,
                 status.items)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (uvicorn[standard] brings it on Linux and macOS), as the gateway's uvicorn
    picks it; asyncio's own otherwise. A lone request turns the worker's loop several times: with uvloop the worker
    spent ~9% less CPU per request at concurrency 1 (bench/profile_serving.py, 7 alternating pairs)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferline worker", description="Serve one model replica.")
    parser.add_argument("model", nargs="?", help="model name in the config (or INFERLINE_MODEL_SPEC)")
    parser.add_argument("--config", help="config file (default: INFERLINE_CONFIG or ./inferline.toml)")
    parser.add_argument("--replica", type=int, default=int(os.environ.get("INFERLINE_REPLICA", "0")),
                        help="replica index, for device=auto round-robin")
    parser.add_argument("--version", help="serve this store version (a rollout's), not the configured one")
    args = parser.parse_args(argv)
    try:
        logs.configure()
    except ValueError as exc:
        print(f"inferline worker: {exc}", file=sys.stderr)
        return 2
    try:
        tracing.setup("inferline-worker")
        spec = spec_from_env()
        settings = Settings.load(args.config)
        if spec is None:
            if not args.model or args.model not in settings.models:
                raise ConfigError(f"model {args.model!r} is not in the config; configured: {sorted(settings.models)}")
            spec = settings.models[args.model]
        if args.version:
            spec = spec.model_copy(update={"version": args.version})
        if not settings.redis_url:
            raise ConfigError("REDIS_URL is not set: a worker needs the Redis its gateway uses")
        limit_threads(spec.threads)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run(spec, settings, settings.redis_url, args.replica))
    except (ConfigError, tracing.TracingError) as exc:
        print(f"inferline worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
