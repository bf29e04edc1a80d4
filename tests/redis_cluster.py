"""A real Redis Cluster on loopback for tests: N primaries and N replicas (`redis-server --cluster-enabled yes`, joined
with `redis-cli --cluster create`), each node its own process and directory, nothing kept on disk. Reusable: the
cluster tests share one per module, and a failover test can kill a node (`kill`, SIGKILL) and bring it back
(`restart`) on the same port.

    with redis_cluster(tmp_path) as cluster:
        url = cluster.url           # redis://127.0.0.1:PORT of the first primary (any node works)
        cluster.kill(cluster.primary_of_slot(2586))
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server", path="/usr/bin:/usr/local/bin") or "redis-server"
REDIS_CLI = shutil.which("redis-cli", path="/usr/bin:/usr/local/bin") or "redis-cli"
NODE_TIMEOUT_MS = 1000   # a dead primary is failed over within ~2-3 s


def cluster_support() -> str | None:
    """None when this machine's redis-server and redis-cli can run a cluster (Redis >= 6.2), else why not."""
    if not shutil.which(REDIS_SERVER) or not shutil.which(REDIS_CLI):
        return "redis-server / redis-cli not installed"
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True).stdout
    version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
    if tuple(int(x) for x in version.split(".")[:2]) < (6, 2):
        return f"redis-server {version} is older than 6.2"
    return None


# Cluster nodes listen below Linux's ephemeral range (32768-60999 by default), bus ports (+10000) included, so that
# no outgoing connection or OS-chosen listener can hold a port between its choice and the node's start; each
# pytest-xdist worker draws from its own part of the range.
PORTS = range(20000, 22768)


def free_ports(n: int) -> list[int]:
    """n free loopback ports whose cluster bus ports (+10000) are free too, from this test process's part of PORTS."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), worker + 1)
    share = len(PORTS) // workers
    mine = PORTS[worker * share:(worker + 1) * share]
    ports: list[int] = []
    while len(ports) < n:
        port = random.choice(mine)
        if port in ports or not all(_free(p) for p in (port, port + 10000)):
            continue
        ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    root: Path
    ports: list[int]
    acl: str | None = None
    replicas: int = 1
    tls: dict[str, Path] | None = None   # make_certs()'s files: then every port (client and bus) speaks TLS only
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.ports[0]}"

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (close it after use). Admin commands only: the tests' ACL file, if any,
        has a default user with every right."""
        if self.tls:
            return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, ssl=True,
                               ssl_ca_certs=str(self.tls["ca.pem"]))
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        ports = ["--port", str(port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                     "--tls-cert-file", str(self.tls["server.pem"]), "--tls-key-file", str(self.tls["server.key"]),
                     "--tls-ca-cert-file", str(self.tls["ca.pem"]), "--tls-auth-clients", "no"]
        args = [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--dir", str(d), "--save", "", "--appendonly", "no", "--daemonize", "no",
                # A replica's first sync at once (not after the default 5 s wait for more replicas to share it), and
                # the primary's replication PING every second (default 10): CLUSTER SLOTS lists a replica only once
                # its offset has moved past 0, which on an idle primary only that PING does (wait_ok waited ~10 s).
                "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
                "--logfile", str(d / "redis.log")]
        if self.acl is not None:
            args += ["--aclfile", self.acl]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, port: int) -> None:
        """SIGKILL one node (its slot ownership moves to its replica after ~NODE_TIMEOUT_MS)."""
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, port: int) -> None:
        """Start a killed node again with its nodes.conf: it rejoins (as a replica, if it was failed over)."""
        self.start(port)
        _wait_ping(self.node(port), 10)

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Each primary's port and its slot ranges, as the cluster says now."""
        with contextlib.closing(self.node(self.live()[0])) as r:
            slots = r.execute_command("CLUSTER", "SLOTS")
        out: dict[int, list[tuple[int, int]]] = {}
        for row in slots:
            out.setdefault(int(row[2][1]), []).append((int(row[0]), int(row[1])))
        return out

    def primary_of_slot(self, slot: int) -> int:
        return next(port for port, ranges in self.primaries().items() if any(a <= slot <= b for a, b in ranges))

    def node_id(self, port: int) -> str:
        with contextlib.closing(self.node(port)) as r:
            found = r.execute_command("CLUSTER", "MYID")
        return found.decode() if isinstance(found, bytes) else str(found)

    def move_slot(self, slot: int, to_port: int, batch: int = 10, between: Callable[[], None] | None = None) -> None:
        """Move one slot to primary `to_port` live, as `redis-cli --cluster reshard` does: SETSLOT IMPORTING on the
        target, MIGRATING on the source, MIGRATE its keys `batch` at a time (calling `between` after each batch),
        then SETSLOT NODE on the target, the source and the other primaries. Clients meet ASK while it runs and
        MOVED after."""
        source = self.primary_of_slot(slot)
        if source == to_port:
            return
        source_id, target_id = self.node_id(source), self.node_id(to_port)
        with contextlib.closing(self.node(source)) as src, contextlib.closing(self.node(to_port)) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not names:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *names)
                if between is not None:
                    between()
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.primaries():
            if port not in (source, to_port):
                with contextlib.closing(self.node(port)) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def live(self) -> list[int]:
        return [p for p in self.ports if p in self.procs]

    def wait_ok(self, timeout_s: float = 30, with_replicas: bool = True) -> None:
        """Until every live node says cluster_state:ok and agrees on who serves all 16384 slots (and, with_replicas,
        every primary's replicas are attached: not so after a node was killed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                views = []
                for port in self.live():
                    with contextlib.closing(self.node(port)) as r:
                        info = r.execute_command("CLUSTER", "INFO")
                        text = info.decode() if isinstance(info, bytes) else str(info)
                        if "cluster_state:ok" not in text:
                            raise RuntimeError(f"node {port}: not ok")
                        rows = r.execute_command("CLUSTER", "SLOTS")
                        # each primary's replicas attached
                        if with_replicas and any(len(row) < 3 + self.replicas for row in rows):
                            raise RuntimeError(f"node {port}: replicas not attached yet")
                        views.append(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in rows))
                if all(v == views[0] for v in views) and sum(b - a + 1 for a, b, _ in views[0]) == 16384:
                    return
            except (redis.RedisError, RuntimeError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {self.ports} not ok within {timeout_s} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def _wait_ping(client: redis.Redis, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with contextlib.closing(client):
        while True:
            try:
                client.ping()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def redis_cluster(root: Path, primaries: int = 3, replicas: int = 1, acl: str | None = None,
                  tls: dict[str, Path] | None = None) -> Iterator[Cluster]:
    """Start primaries * (1 + replicas) nodes on free loopback ports and join them; the first `primaries` ports are
    the primaries (slots split evenly in port order: with 3, 0-5460, 5461-10922, 10923-16383). Stopped on exit.
    acl: an ACL file every node loads (users the processes under test connect as). tls: certificates
    (security_cluster.make_certs): clients, the cluster bus and replication then speak TLS only."""
    cluster = Cluster(root, free_ports(primaries * (1 + replicas)), acl, replicas, tls)
    try:
        for port in cluster.ports:
            cluster.start(port)
        for port in cluster.ports:
            _wait_ping(cluster.node(port), 10)
        tls_args = ["--tls", "--cacert", str(tls["ca.pem"])] if tls else []
        subprocess.run([REDIS_CLI, *tls_args, "--cluster", "create", *cluster.addresses, "--cluster-replicas",
                        str(replicas), "--cluster-yes"], check=True, capture_output=True, timeout=60)
        cluster.wait_ok()
        yield cluster
    finally:
        cluster.stop()
