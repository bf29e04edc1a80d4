"""deploy/k8s-redis-sentinel: the base deployment on Redis Sentinel (a primary, two replicas, three sentinels; all TLS,
the ACL users of SECURITY.md plus inferline-sentinel). Its scripts run for real here (deploy/k8s/redis/start.sh with
REDIS_SENTINEL=yes, sentinel.sh): inferline's own client reaches the primary through a TLS sentinel that wants its
password (rediss+sentinel://, as the gateway and workers are configured), and a failover run by the sentinel as the
inferline-sentinel user (so its ACL is enough) is followed. The overlay renders with kustomize and is as well-formed
as the base (tests/test_keda.py checks its ScaledObjects)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from inferline.server.broker import keys
from inferline.server.broker.client import connect
from inferline.server.broker.embedded import free_port as free_tcp_port
from tests.conftest import wait_for
from tests.test_deploy import API_VERSIONS, DEMO_MODELS, DEPLOY, REDIS_DIR, require, run_tool

SENTINEL_OVERLAY = DEPLOY / "k8s-redis-sentinel"
USERS = ("gateway", "worker", "admin", "sentinel")


def rendered_overlay() -> list[dict[str, Any]]:
    kubectl = require("kubectl", "kubectl renders kustomizations offline")
    return [d for d in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(SENTINEL_OVERLAY)).stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        found.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return found


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kustomize_renders_the_redis_sentinel_variant() -> None:
    """The single Redis goes; three data nodes (pod 0 the first primary) and three sentinels come, every pod as
    well-formed as the base's; the gateway and every worker reach Redis through the sentinels over TLS, each as its
    own user, with the sentinels' password from the Secret."""
    docs = rendered_overlay()
    kinds = by_kind(docs)
    for doc in docs:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "inferline"
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert "redis" not in kinds["Deployment"] and "redis" not in kinds["Service"]
    nodes, sentinels = kinds["StatefulSet"]["redis-node"], kinds["StatefulSet"]["redis-sentinel"]
    assert nodes["spec"]["replicas"] == 3 and sentinels["spec"]["replicas"] == 3
    for sts in (nodes, sentinels):
        service = kinds["Service"][sts["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (node,) = nodes["spec"]["template"]["spec"]["containers"]
    node_env = env_values(node)
    assert node_env["REDIS_SENTINEL"] == "yes"
    sentinel_secret = {"secretKeyRef": {"name": "inferline-redis-auth", "key": "sentinel-password"}}
    assert node_env["REDIS_SENTINEL_PASSWORD"] == sentinel_secret
    (sentinel,) = sentinels["spec"]["template"]["spec"]["containers"]
    sentinel_env = env_values(sentinel)
    assert sentinel_env["REDIS_SENTINEL_PASSWORD"] == sentinel_secret
    assert sentinel_env["REDIS_PRIMARY"] == "redis-node-0.redis-node.inferline.svc.cluster.local"

    served = [d for name, d in kinds["Deployment"].items() if re.fullmatch(r"inferline-(gateway|worker-.*)", name)]
    assert len(served) == 1 + len(DEMO_MODELS)
    hosts = ",".join(f"redis-sentinel-{i}.redis-sentinel.inferline.svc.cluster.local:26379" for i in range(3))
    for deployment in served:
        env = env_values(deployment["spec"]["template"]["spec"]["containers"][0])
        user = "inferline-gateway" if deployment["metadata"]["name"] == "inferline-gateway" else "inferline-worker"
        assert env["REDIS_URL"] == f"rediss+sentinel://{user}:$(REDIS_PASSWORD)@{hosts}/inferline/0"
        assert env["REDIS_SENTINEL_PASSWORD"] == sentinel_secret
        assert "INFERLINE_BROKER__CLUSTER" not in env

    configs = {d["metadata"]["name"]: d for d in kinds["ConfigMap"].values()}
    for sts in (nodes, sentinels):
        pod = sts["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
        for container in pod["containers"]:
            assert container["resources"]["requests"] and container["securityContext"]["readOnlyRootFilesystem"]
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes or mount["name"] in claims
        for volume in volumes.values():
            if "configMap" in volume:   # the generated (hashed) names
                assert volume["configMap"]["name"] in configs
    (script,) = [c for name, c in configs.items() if name.startswith("inferline-redis-sentinel-")]
    assert script["data"]["sentinel.sh"] == (SENTINEL_OVERLAY / "sentinel.sh").read_text()
    san = re.findall(r"^#   sh deploy/k8s/redis/make-tls.sh tls (.*)$",
                     (SENTINEL_OVERLAY / "kustomization.yaml").read_text(), re.M)
    assert san and {"'*.redis-node.inferline.svc.cluster.local'",
                    "'*.redis-sentinel.inferline.svc.cluster.local'"} <= set(san[0].split())


# --- the scripts, run -----------------------------------------------------------------------------------------------

class Processes:
    """Processes started by a test, each killed at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, script: Path, env: dict[str, str]) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(["sh", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.tmp)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    for name in list(started.procs):
        started.kill(name)


def test_sentinel_scripts_serve_inferline_over_tls_and_fail_over(tmp_path: Path, processes: Processes) -> None:
    server = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else \
        require("redis-server", "apt-get install redis-server (a build with TLS)")
    if not shutil.which("redis-sentinel", path=f"{Path(server).parent}:{os.environ['PATH']}"):
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    require("openssl", "apt-get install openssl")
    tls = tmp_path / "tls"
    run_tool("sh", str(REDIS_DIR / "make-tls.sh"), str(tls))
    passwords = {who: secrets.token_hex(32) for who in USERS}
    common = {"PATH": f"{Path(server).parent}:{os.environ['PATH']}", "REDIS_TLS_DIR": str(tls),
              **{f"REDIS_{who.upper()}_PASSWORD": pw for who, pw in passwords.items()}}
    primary_port, replica_port, sentinel_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    for name, port in (("primary", primary_port), ("replica", replica_port)):
        (tmp_path / name).mkdir()
        processes.start(name, REDIS_DIR / "start.sh", {**common, "REDIS_SENTINEL": "yes", "REDIS_TLS_PORT": str(port),
                                                        "REDIS_ACL_FILE": str(tmp_path / name / "users.acl")})
    # REDIS_REPLICA_OF names the primary's host at the node's own port (in Kubernetes every node has 6379); here
    # the two ports differ, so the replica is pointed at its primary as the sentinels would, as inferline-sentinel.
    admin = {who: redis.Redis(port=p, ssl=True, ssl_ca_certs=str(tls / "ca.crt"), username="inferline-admin",
                              password=passwords["admin"], socket_timeout=5)
             for who, p in (("primary", primary_port), ("replica", replica_port))}
    sentinel_user = {who: redis.Redis(port=p, ssl=True, ssl_ca_certs=str(tls / "ca.crt"),
                                      username="inferline-sentinel", password=passwords["sentinel"], socket_timeout=5)
                     for who, p in (("primary", primary_port), ("replica", replica_port))}

    def pings(client: redis.Redis, name: str) -> bool:
        assert processes.procs[name].poll() is None, processes.log(name)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    for name in ("primary", "replica"):
        wait_for(lambda n=name: pings(admin[n], n), 15, f"{name} up")   # type: ignore[misc]
    sentinel_user["replica"].execute_command("REPLICAOF", "localhost", primary_port)   # the sentinel user may
    wait_for(lambda: sentinel_user["replica"].info("replication")["master_link_status"] == "up", 15, "replicating")

    (tmp_path / "sentinel").mkdir()
    sentinel_env = {**common, "REDIS_SENTINEL_PORT": str(sentinel_port), "REDIS_SENTINEL_DIR": str(
        tmp_path / "sentinel"), "REDIS_PRIMARY": "localhost", "REDIS_PRIMARY_PORT": str(primary_port),
                    "REDIS_QUORUM": "1", "REDIS_DOWN_AFTER_MS": "1000"}
    short = subprocess.run(["sh", str(SENTINEL_OVERLAY / "sentinel.sh")],
                           env={**sentinel_env, "REDIS_SENTINEL_PASSWORD": "short"}, capture_output=True, text=True)
    assert short.returncode == 1 and "REDIS_SENTINEL_PASSWORD" in short.stderr
    processes.start("sentinel", SENTINEL_OVERLAY / "sentinel.sh", sentinel_env)
    ask = redis.Redis(port=sentinel_port, ssl=True, ssl_ca_certs=str(tls / "ca.crt"), password=passwords["sentinel"],
                      socket_timeout=5)
    anonymous = redis.Redis(port=sentinel_port, ssl=True, ssl_ca_certs=str(tls / "ca.crt"), socket_timeout=5)

    def replicas_known() -> bool:
        assert processes.procs["sentinel"].poll() is None, processes.log("sentinel")
        try:
            return bool(ask.sentinel_slaves("inferline"))
        except redis.ConnectionError:
            return False

    wait_for(replicas_known, 30, "the sentinel knows the replica")
    with pytest.raises(redis.AuthenticationError):
        anonymous.sentinel_masters()

    url = f"rediss+sentinel://inferline-worker:{passwords['worker']}@localhost:{sentinel_port}/inferline/0"
    stream = keys.request_stream("m")

    async def worker_writes(entry: str) -> bytes:
        client = connect(url, timeout_s=5)
        try:
            await client.xadd(stream, {"e": entry})
            return bytes((await client.xrevrange(stream, count=1))[0][1][b"e"])
        finally:
            await client.aclose()
            for asked in client.connection_pool.sentinel_manager.sentinels:   # type: ignore[union-attr]
                await asked.aclose()

    env_before = {k: os.environ.get(k) for k in ("REDIS_CA_FILE", "REDIS_SENTINEL_PASSWORD")}
    os.environ.update(REDIS_CA_FILE=str(tls / "ca.crt"), REDIS_SENTINEL_PASSWORD=passwords["sentinel"])
    try:
        assert asyncio.run(worker_writes("before")) == b"before"
        processes.kill("primary")   # the sentinel promotes the replica, as inferline-sentinel
        def promoted() -> bool:
            state = ask.sentinel_master("inferline")
            return bool(int(state["port"]) == replica_port and not state["is_sdown"] and
                        "failover_in_progress" not in state["flags"])

        wait_for(promoted, 60, "the replica promoted, the failover over")
        wait_for(lambda: sentinel_user["replica"].info("replication")["role"] == "master", 30, "the replica is primary")
        assert asyncio.run(worker_writes("after")) == b"after"   # the client followed the failover
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for c in (*admin.values(), *sentinel_user.values(), ask, anonymous):
            c.close()
