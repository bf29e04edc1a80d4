"""What a lone round trip between two processes costs in CPU on this machine: the floor under a lone request.

    python bench/pingpong_floor.py [--seconds 3]

Two uvloop processes echo a 200-byte message over loopback TCP (TCP_NODELAY): one message in flight at a time, then
64 at a time. Prints each side's CPU µs per message (from /proc and process_time). A lone served request crosses
processes six times (client, gateway, Redis, worker, Redis, gateway, client): at this floor (~20 µs a side per
crossing here) about a tenth of what the gateway, Redis and the worker spend on it together (bench/profile_serving.py),
so what a lone request costs is mostly the processes' own work, not the kernel's wake-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_serving import cpu_seconds  # noqa: E402
from inferline.server.broker.embedded import free_port  # noqa: E402

MESSAGE = b"x" * 200


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)   # type: ignore[attr-defined]


async def serve(port: int) -> None:
    await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port)
    await asyncio.Event().wait()


async def exchange(port: int, in_flight: int, seconds: float) -> tuple[int, float]:
    """(messages echoed, this process's CPU seconds) sending `in_flight` messages per write for `seconds`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    count, cpu0, ends = 0, time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < ends:
        writer.write(MESSAGE * in_flight)
        await reader.readexactly(len(MESSAGE) * in_flight)
        count += in_flight
    writer.close()
    return count, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    port = free_port()
    pid = os.fork()
    if pid == 0:
        uvloop.run(serve(port))
        os._exit(0)
    try:
        time.sleep(0.5)
        for in_flight in (1, 64, 1, 64):
            server0 = cpu_seconds(pid)
            count, client_s = uvloop.run(exchange(port, in_flight, args.seconds))
            server_s = cpu_seconds(pid) - server0
            print(f"{in_flight:2d} in flight: {count / args.seconds:,.0f} messages/s; CPU µs per message: "
                  f"client {1e6 * client_s / count:.1f}, server {1e6 * server_s / count:.1f}")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
