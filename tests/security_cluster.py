"""Helpers for the security tests: gateways started with [security] settings (several may share one Redis),
and API keys created through the same key store the CLI uses."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from inferline.server.auth.keys import ApiKey, new_key
from inferline.server.broker import embedded, keystore
from inferline.server.broker.client import connect
from tests.conftest import ROOT, Cluster, child_env, toml_value, wait_for

ECHO = "tests.runtimes:Echo"


def toml_lines(section: str, values: dict[str, Any]) -> list[str]:
    return [f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]   # tables inline


def start_gateway(cluster: Cluster, name: str = "gw", security: dict[str, Any] | None = None,
                  gateway: dict[str, Any] | None = None, redis_url: str | None = None,
                  env: dict[str, str] | None = None, verify: ssl.SSLContext | bool = True) -> str:
    """Start one more gateway process for `cluster`'s models (killed with the cluster's workers). Returns its
    base URL once /healthz answers; https when gateway sets tls_certfile."""
    lines = toml_lines("gateway", gateway or {}) + toml_lines("security", security or {})
    for model, spec in cluster.specs.items():
        lines += toml_lines(f"models.{model}", {k: v for k, v in spec.items() if k != "name"})
    config = cluster.tmp / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    port = embedded.free_port()
    log = cluster.tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", "gateway", "--port", str(port)],
                                env=child_env(REDIS_URL=redis_url or cluster.redis_url, INFERLINE_CONFIG=str(config),
                                              **(env or {})),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    cluster.workers.append(proc)   # Cluster.close() kills these too
    scheme = "https" if (gateway or {}).get("tls_certfile") else "http"
    url = f"{scheme}://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/healthz", timeout=1, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, f"gateway {name} up")
    return url


def create_key(redis_url: str, cluster: bool = False, **options: Any) -> tuple[str, ApiKey]:
    """A key stored the way `inferline keys create` stores it: (the full key, its record). cluster: redis_url names
    a node of a Redis Cluster."""
    key, record = new_key(**options)

    async def save() -> None:
        redis = connect(redis_url, cluster=cluster)
        try:
            await keystore.save(redis, record.key_id, record.to_fields())
        finally:
            await redis.aclose()

    asyncio.run(save())
    return key, record


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def v2_body(value: float, **params: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}], "parameters": params}


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate, with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=inferline test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", str(ext))
    return {n: directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
