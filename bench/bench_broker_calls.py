"""The broker's hot path alone, in one process, on one Redis or a Redis Cluster: CPU µs per request of a gateway's
enqueue (TickBatcher, one tick of `--tick` concurrent requests) and of a worker's read + reply + ack of a batch.

    python bench/bench_broker_calls.py                    # one Redis (a private redis-server on loopback TCP)
    python bench/bench_broker_calls.py --cluster          # a private 3 + 3 Redis Cluster, cluster mode
    PYTHONPATH=/other/checkout python bench/bench_broker_calls.py   # the same against another version's broker

CPU is this process's (time.process_time): Redis runs in its own processes and is not counted. Requests go to
--models models (names spread over the cluster's shards) and their replies to one gateway stream. Several rounds are
run and each one's figure printed: compare medians of alternating runs (the machine is shared)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))   # after PYTHONPATH: another checkout may be measured

from inferline.server.broker.client import connect  # noqa: E402
from inferline.server.broker.consumer import ModelQueue  # noqa: E402
from inferline.server.broker.enqueue import Enqueuer  # noqa: E402
from inferline.server.broker.replies import ReplyInbox  # noqa: E402
from inferline.server.protocol import Envelope, Reply, now_ms  # noqa: E402

MODELS = ("sentiment", "cnn", "lstm", "transformer")   # slots 2586, 7058, 13621, 15869: all three shards
PAYLOAD = b"x" * 4500   # about the 784-float v2 body


async def rounds(url: str, cluster: bool, n_rounds: int, per_round: int, tick: int,
                 models: tuple[str, ...] = MODELS) -> list[tuple[float, float]]:
    """(gateway-side, worker-side) CPU µs per request, one pair per round."""
    kwargs = {"cluster": True} if cluster else {}
    redis = connect(url, **kwargs)
    inbox = ReplyInbox(redis, "bench")
    enqueuer = Enqueuer(redis)
    queues = [ModelQueue(redis, m, "w") for m in models]
    out = []
    try:
        await inbox.create()
        for q in queues:
            await q.ensure_group()
        for _ in range(n_rounds):
            gateway = worker = 0.0
            for start in range(0, per_round, tick):
                t0 = time.process_time()
                await asyncio.gather(*[enqueuer.enqueue(models[i % len(models)], Envelope(
                    f"r{start + i}", inbox.stream, now_ms() + 60_000, "v2"), PAYLOAD, 100_000, 60_000)
                    for i in range(tick)])
                t1 = time.process_time()
                for q in queues:
                    got = await q.read(tick, None)
                    await q.reply_and_ack([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in got], got)
                t2 = time.process_time()
                gateway += t1 - t0
                worker += t2 - t1
                await inbox.read(0.01)
                await inbox.trim()
            out.append((gateway / per_round * 1e6, worker / per_round * 1e6))
    finally:
        for q in queues:
            await q.close()
        await redis.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", action="store_true", help="a private 3 + 3 Redis Cluster, in cluster mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4096, help="per round")
    parser.add_argument("--tick", type=int, default=32, help="requests enqueued in one tick")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated; the reply stream ('bench', slot 2213) shares sentiment's shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        if args.cluster:
            from tests.redis_cluster import redis_cluster

            url = stack.enter_context(redis_cluster(tmp / "cluster")).url
        else:
            from inferline.server.broker.embedded import free_port

            port = free_port()
            proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no"], stdout=subprocess.DEVNULL)
            stack.callback(proc.kill)
            time.sleep(0.5)
            url = f"redis://127.0.0.1:{port}"
        results = asyncio.run(rounds(url, args.cluster, args.rounds, args.requests, args.tick,
                                     tuple(args.models.split(","))))
    mode = "cluster" if args.cluster else "single"
    for g, w in results:
        print(f"{mode} tick={args.tick}: CPU µs/request gateway-side {g:.1f}, worker-side {w:.1f}")
    print(json.dumps({"mode": mode, "models": args.models,
                      "gateway_us": round(statistics.median(g for g, _ in results), 1),
                      "worker_us": round(statistics.median(w for _, w in results), 1)}))


if __name__ == "__main__":
    main()
