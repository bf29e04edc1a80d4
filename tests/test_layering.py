"""The dependency direction holds: the gateway (and the CLI) never load a model framework or model code, and the
worker side never loads the web stack. Each check imports in a fresh interpreter and reads its sys.modules."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import inferline.server.runtimes
import inferline.server.worker
from tests.conftest import ROOT, child_env

FRAMEWORKS = ("torch", "tensorflow", "keras", "transformers", "jax", "tokenizers", "sklearn")
WEB = ("fastapi", "starlette", "uvicorn")


def modules_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after running `code` in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def offenders(loaded: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if m.split(".")[0] in banned)


def test_the_gateway_loads_no_model_framework_or_model_code() -> None:
    loaded = modules_after("from inferline.server.config import Settings\n"
                           "from inferline.server.gateway.app import create_app\n"
                           "create_app(Settings(redis_url='redis://127.0.0.1:1/0', models={'cnn': {}}))")
    assert "fastapi" in loaded and "inferline.server.gateway.app" in loaded   # the probe did import the gateway
    assert offenders(loaded, FRAMEWORKS) == []
    assert sorted(m for m in loaded if m.startswith("inferline.zoo")) == []


@pytest.mark.parametrize("module", ["inferline.server.cli", "inferline.server.remote", "inferline.server.supervisor"])
def test_the_cli_loads_no_model_framework(module: str) -> None:
    loaded = modules_after(f"import {module}")
    assert offenders(loaded, FRAMEWORKS) == []
    assert offenders(loaded, WEB) == []   # `inferline up` itself is a supervisor: the web stack is the gateway's


def worker_side_modules() -> list[str]:
    names = []
    for package in (inferline.server.worker, inferline.server.runtimes):
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return sorted(names)


def test_worker_side_modules_are_all_checked() -> None:
    assert {"inferline.server.worker.main", "inferline.server.worker.shell", "inferline.server.worker.batching",
            "inferline.server.worker.continuous", "inferline.server.runtimes.keras_rt"} <= set(worker_side_modules())


def imports_of(path: Path) -> set[str]:
    """The modules a source file imports (top-level and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


SERVER = ROOT / "inferline" / "server"
SOURCES = sorted(SERVER.rglob("*.py"))


def test_only_the_broker_speaks_redis() -> None:
    speakers = [str(p.relative_to(SERVER)) for p in SOURCES if any(m.split(".")[0] == "redis" for m in imports_of(p))]
    assert speakers and all(s.startswith("broker/") for s in speakers), speakers


def test_the_service_imports_no_model_module() -> None:
    """Deployments name their Model class by dotted path; only the CLI's `models build` reaches into the zoo."""
    importers = [str(p.relative_to(SERVER)) for p in SOURCES
                 if any(m.startswith("inferline.zoo") for m in imports_of(p))]
    assert importers in ([], ["cli.py"]), importers


def test_the_generation_engine_speaks_no_redis_and_no_web() -> None:
    for path in (SERVER / "generation").glob("*.py"):
        assert not any(m.split(".")[0] in ("redis", *WEB) for m in imports_of(path)), path


def test_the_public_contract_loads_no_framework() -> None:
    loaded = modules_after("import inferline\nfrom inferline import Model, Tensor, CausalLM")
    assert "inferline" in loaded and offenders(loaded, FRAMEWORKS + WEB) == []


@pytest.mark.parametrize("module", worker_side_modules())
def test_worker_side_module_loads_no_web_stack(module: str) -> None:
    loaded = modules_after(f"import {module}")
    assert module in loaded
    assert offenders(loaded, WEB) == []


@pytest.mark.parametrize("module", [f"inferline.server.{m}" for m in (
    "protocol", "config", "errors", "schemas.tasks", "broker.enqueue", "broker.consumer", "broker.replies",
    "broker.cancels", "broker.reads", "broker.registry", "broker.embedded")])
def test_shared_modules_load_neither(module: str) -> None:
    loaded = modules_after(f"import {module}")
    assert offenders(loaded, WEB + FRAMEWORKS) == []


def test_the_client_needs_only_the_core_install() -> None:
    """`from inferline.client import Client, AsyncClient` loads httpx, pydantic and numpy: no model framework, no
    web stack, no Redis client."""
    loaded = modules_after("from inferline.client import AsyncClient, Client\nClient('http://127.0.0.1:1').close()")
    assert "inferline.client" in loaded and "httpx" in loaded
    assert offenders(loaded, FRAMEWORKS + WEB + ("redis",)) == []
