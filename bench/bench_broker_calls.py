"""The broker's hot path alone, in one process, on one Redis or a Redis Cluster: CPU µs per request of a gateway's
enqueue (TickBatcher, one tick of `--tick` concurrent requests) and reply read, and of a worker's read + reply + ack of
a batch (sent as the worker shell sends: not waited for before the next read).

    python bench/bench_broker_calls.py                    # one Redis (a private redis-server on loopback TCP)
    python bench/bench_broker_calls.py --cluster          # a private 3 + 3 Redis Cluster, cluster mode
    python bench/bench_broker_calls.py --alternate --models cnn   # both, rounds alternating: cluster/single ratios
    PYTHONPATH=/other/checkout python bench/bench_broker_calls.py   # the same against another version's broker

CPU is this process's (time.process_time): Redis runs in its own processes and is not counted. Requests go to
--models models (names spread over the cluster's shards) and their replies to one gateway stream. Several rounds are
run and each one's figure printed: compare medians of alternating runs (the machine is shared). A send's replies and
acks are answered while the process goes on (the gateway's reply read included), so part of the worker's cost lands
in the gateway side's figure: compare the sum too."""

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


class Hot:
    """One gateway's enqueuer and reply inbox and one worker queue per model, on one Redis or a Cluster."""

    def __init__(self, url: str, cluster: bool, tick: int, models: tuple[str, ...]) -> None:
        self.redis = connect(url, **({"cluster": True} if cluster else {}))
        self.inbox = ReplyInbox(self.redis, "bench")
        self.enqueuer = Enqueuer(self.redis)
        self.queues = [ModelQueue(self.redis, m, "w") for m in models]
        self.tick, self.models, self.sent = tick, models, 0

    async def start(self) -> None:
        await self.inbox.create()
        for q in self.queues:
            await q.ensure_group()

    async def round(self, per_round: int) -> tuple[float, float]:
        """(gateway-side, worker-side) CPU µs per request over per_round requests."""
        gateway = worker = 0.0
        tick, models = self.tick, self.models
        for _ in range(0, per_round, tick):
            t0 = time.process_time()
            await asyncio.gather(*[self.enqueuer.enqueue(models[i % len(models)], Envelope(
                f"r{self.sent + i}", self.inbox.stream, now_ms() + 60_000, "v2"), PAYLOAD, 100_000, 60_000)
                for i in range(tick)])
            self.sent += tick
            t1 = time.process_time()
            for q in self.queues:   # as worker/shell.py does: a send is not waited for, the next read goes out
                got = await q.read(tick, None)
                await q.send([(d.envelope.reply_to, Reply(d.request_id, b"{}")) for d in got], got)
            t2 = time.process_time()
            await self.inbox.read(0.01)
            gateway += t1 - t0 + time.process_time() - t2
            worker += t2 - t1
        t3 = time.process_time()
        await self.inbox.trim()   # once a round, as the gateway trims now and then (dispatch.TRIM_EVERY_S)
        gateway += time.process_time() - t3
        t3 = time.process_time()
        for q in self.queues:
            await q.drain()
        worker += time.process_time() - t3
        return gateway / per_round * 1e6, worker / per_round * 1e6

    async def close(self) -> None:
        for q in self.queues:
            await q.close()
        await self.redis.aclose()


async def rounds(urls: dict[str, str], n_rounds: int, per_round: int, tick: int,
                 models: tuple[str, ...] = MODELS) -> dict[str, list[tuple[float, float]]]:
    """Per mode ("single", "cluster": its URL in `urls`) one (gateway-side, worker-side) pair per round; with both
    modes their rounds alternate in this one process, so the machine's load falls on both alike."""
    hots = {mode: Hot(url, mode == "cluster", tick, models) for mode, url in urls.items()}
    out: dict[str, list[tuple[float, float]]] = {mode: [] for mode in hots}
    try:
        for hot in hots.values():
            await hot.start()
            await hot.round(per_round // 4)   # warm up: connections, scripts, the slot map
        for _ in range(n_rounds):
            for mode, hot in hots.items():
                out[mode].append(await hot.round(per_round))
    finally:
        for hot in hots.values():
            await hot.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", action="store_true", help="a private 3 + 3 Redis Cluster, in cluster mode")
    parser.add_argument("--alternate", action="store_true",
                        help="both: one Redis and a Cluster, their rounds alternating in one process, and the ratios")
    parser.add_argument("--replicas", type=int, default=1, help="the Cluster's replicas per primary (0: none, as the "
                        "one Redis has none: their replication takes CPU beside the process measured)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4096, help="per round")
    parser.add_argument("--tick", type=int, default=32, help="requests enqueued in one tick")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated; the reply stream ('bench', slot 2213) shares sentiment's shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        urls: dict[str, str] = {}
        if not args.cluster or args.alternate:
            from inferline.server.broker.embedded import free_port

            port = free_port()
            proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no"], stdout=subprocess.DEVNULL)
            stack.callback(proc.kill)
            time.sleep(0.5)
            urls["single"] = f"redis://127.0.0.1:{port}"
        if args.cluster or args.alternate:
            from tests.redis_cluster import redis_cluster

            urls["cluster"] = stack.enter_context(redis_cluster(tmp / "cluster", replicas=args.replicas)).url
        results = asyncio.run(rounds(urls, args.rounds, args.requests, args.tick, tuple(args.models.split(","))))
    summary: dict[str, object] = {"models": args.models}
    for mode, pairs in results.items():
        for g, w in pairs:
            print(f"{mode} tick={args.tick}: CPU µs/request gateway-side {g:.1f}, worker-side {w:.1f}, "
                  f"both {g + w:.1f}")
        summary[mode] = {"gateway_us": round(statistics.median(g for g, _ in pairs), 1),
                         "worker_us": round(statistics.median(w for _, w in pairs), 1),
                         "both_us": round(statistics.median(g + w for g, w in pairs), 1),
                         "both_min_us": round(min(g + w for g, w in pairs), 1)}
    if len(results) == 2:   # cluster / single of each round's pair: the machine's drift cancels within a pair
        pairs = list(zip(results["single"], results["cluster"], strict=True))
        for name, pick in (("gateway", lambda r: r[0]), ("worker", lambda r: r[1]), ("both", lambda r: r[0] + r[1])):
            ratios = sorted(pick(c) / pick(s) for s, c in pairs)
            summary[f"{name}_ratio"] = {"median": round(statistics.median(ratios), 3),
                                        "range": [round(ratios[0], 3), round(ratios[-1], 3)]}
        # the least disturbed round of each mode (other processes only ever add CPU to a round)
        summary["both_min_ratio"] = round(min(g + w for g, w in results["cluster"])
                                          / min(g + w for g, w in results["single"]), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
