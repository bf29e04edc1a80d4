"""Least privilege and TLS towards Redis: a real redis-server with TLS (a CA and certificates made here with
openssl) and exactly the ACL lines of SECURITY.md; and the private Redis of `inferline up`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from inferline.server.broker import embedded, keys
from tests.conftest import ROOT, Cluster, child_env, wait_for
from tests.security_cluster import ECHO, bearer, make_certs, start_gateway, v2_body

pytestmark = pytest.mark.timeout(120)
SYSTEM_REDIS = "/usr/bin/redis-server"   # Debian's is built with TLS (scripts/test.sh installs it)
PASSWORDS = {"GATEWAY_PASSWORD": "gw-" + "g" * 20, "WORKER_PASSWORD": "wk-" + "w" * 20,
             "ADMIN_PASSWORD": "ad-" + "a" * 20}


def acl_lines() -> list[str]:
    """The ACL block of SECURITY.md, passwords filled in."""
    text = (ROOT / "SECURITY.md").read_text()
    block = text.split("<!-- acl:begin -->", 1)[1].split("<!-- acl:end -->", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("user ")]
    assert len(lines) == 4
    return [re.sub(r">(\w+_PASSWORD)", lambda m: ">" + PASSWORDS[m.group(1)], ln) for ln in lines]


def tls_redis_available() -> bool:
    if not (os.access(SYSTEM_REDIS, os.X_OK) and shutil.which("openssl")):
        return False
    out = subprocess.run([SYSTEM_REDIS, "--version"], capture_output=True, text=True, timeout=10).stdout
    return "v=6.2" in out or bool(re.search(r"v=[7-9]\.", out))


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    if not tls_redis_available():
        pytest.skip(f"needs {SYSTEM_REDIS} with TLS and openssl (scripts/test.sh installs them)")
    certs = make_certs(tmp_path / "certs")
    port = embedded.free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text("\n".join([
        "port 0", f"tls-port {port}", "bind 127.0.0.1", f"tls-cert-file {certs['server.pem']}",
        f"tls-key-file {certs['server.key']}", f"tls-ca-cert-file {certs['ca.pem']}", "tls-auth-clients optional",
        'save ""', "appendonly no", f"dir {tmp_path}", f"logfile {tmp_path / 'redis.log'}", *acl_lines()]) + "\n")
    proc = subprocess.Popen([SYSTEM_REDIS, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = redis.Redis.from_url(url("inferline-admin", "ADMIN_PASSWORD", port, certs))

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return bool(admin.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, 10, "TLS redis up")
        admin.close()
        yield port, certs
    finally:
        proc.kill()
        proc.wait(timeout=10)


def url(user: str, password: str, port: int, certs: dict[str, Path], client_cert: bool = False) -> str:
    query = f"ssl_ca_certs={certs['ca.pem']}"
    if client_cert:
        query += f"&ssl_certfile={certs['client.pem']}&ssl_keyfile={certs['client.key']}"
    return f"rediss://{user}:{PASSWORDS[password]}@127.0.0.1:{port}/0?{query}"


def test_gateway_and_worker_over_tls_with_their_own_acl_users(tls_redis: tuple[int, dict[str, Path]],
                                                                tmp_path: Path) -> None:
    port, certs = tls_redis
    admin_url = f"rediss://inferline-admin:{PASSWORDS['ADMIN_PASSWORD']}@127.0.0.1:{port}/0"
    made = subprocess.run([sys.executable, "-m", "inferline.server.cli", "keys", "create", "--model", "echo"], cwd=ROOT,
                          env=child_env(REDIS_URL=admin_url, REDIS_CA_FILE=str(certs["ca.pem"])),
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    # the worker presents a client certificate (optional here); the gateway verifies the server only
    cluster = Cluster(url("inferline-worker", "WORKER_PASSWORD", port, certs, client_cert=True), tmp_path)
    try:
        cluster.spec("echo", runtime=ECHO, cache={"ttl_s": 60, "max_bytes": 1 << 20})   # its script as the gateway
        cluster.start_worker("echo")
        gateway_url = f"rediss://inferline-gateway:{PASSWORDS['GATEWAY_PASSWORD']}@127.0.0.1:{port}/0"
        base = start_gateway(cluster, security={"auth": "required"}, redis_url=gateway_url,
                             env={"REDIS_CA_FILE": str(certs["ca.pem"])})
        for i in range(3):
            r = httpx.post(base + "/v2/models/echo/infer", json=v2_body(i), headers=bearer(key), timeout=30)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0 * i], r.text
        again = httpx.post(base + "/v2/models/echo/infer", json=v2_body(0), headers=bearer(key), timeout=30)
        assert again.status_code == 200 and again.headers["x-cache"] == "hit", again.headers
        assert httpx.post(base + "/v2/models/echo/infer", json=v2_body(1)).status_code == 401
        ready = httpx.get(base + "/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        # the gateway user reads the broker's health (streams, pending, dead letters, stats) and the worker user
        # adds its counters: /metrics shows Redis up and the worker's served requests (folded at its heartbeat)
        wait_for(lambda: "inferline_served_requests_total{model=\"echo\"} 3.0" in
                 httpx.get(base + "/metrics", timeout=10).text, 15, "the worker's counters on /metrics")
        assert "inferline_redis_up 1.0" in httpx.get(base + "/metrics", timeout=10).text

        key_record = keys.api_key(key[3:19])
        worker = cluster.client
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.hgetall(key_record)                    # the worker cannot read API keys
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                worker.execute_command(*command)
        gateway = redis.Redis.from_url(url("inferline-gateway", "GATEWAY_PASSWORD", port, certs))
        try:
            assert gateway.hgetall(key_record)            # the gateway can
            for command in (("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"), ("KEYS", "*")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    gateway.execute_command(*command)
        finally:
            gateway.close()
    finally:
        cluster.close()


def test_redis_refuses_clients_without_tls_or_a_user(tls_redis: tuple[int, dict[str, Path]]) -> None:
    port, certs = tls_redis
    anonymous = redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['ca.pem']}")
    with pytest.raises(redis.exceptions.AuthenticationError):   # `default` is off
        anonymous.ping()
    anonymous.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:   # plain TCP to the TLS port
        s.sendall(b"PING\r\n")
        s.settimeout(5)
        try:
            assert not s.recv(64).startswith(b"+PONG")
        except (ConnectionResetError, TimeoutError):
            pass


def test_private_redis_of_up_has_no_open_tcp_port(tmp_path: Path) -> None:
    """What `inferline up` starts: a unix socket only its owner can open, no TCP port, maxmemory set; and where
    the socket path is too long, a TCP port that refuses a client without the generated password."""
    proc, private_url = embedded.start(tmp_path / "r")
    try:
        assert private_url.startswith("unix://")
        client = redis.Redis.from_url(private_url)
        assert client.config_get("port")["port"] == "0"
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1024**3
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
        assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "r" / "url").stat().st_mode) == 0o600
        assert embedded.read_url(tmp_path / "r") == private_url
    finally:
        proc.kill()
        proc.wait()
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    proc, tcp_url = embedded.start(deep)
    try:
        port = int(tcp_url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(64).startswith(b"-NOAUTH")
        with redis.Redis.from_url(tcp_url) as authed:
            assert authed.ping()
        password = tcp_url.split("@")[0].split(":")[-1]
        assert "***" in embedded.redacted(tcp_url) and password not in embedded.redacted(tcp_url)
        # what the supervisor and the CLI print goes through this one function; every place a password can sit
        for url, shown in ((f"rediss://inferline-gateway:{password}@redis:6379/0?ssl_ca_certs=/ca.crt",
                            "rediss://inferline-gateway:***@redis:6379/0?ssl_ca_certs=/ca.crt"),
                           (f"unix:///run/redis.sock?db=0&password={password}", "unix:///run/redis.sock?db=0&password=***"),
                           ("redis://redis:6379/0", "redis://redis:6379/0")):
            assert embedded.redacted(url) == shown
    finally:
        proc.kill()
        proc.wait()
