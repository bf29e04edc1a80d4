"""Seeing inside requests, with real processes: the counts on /metrics match the traffic that was sent (requests,
items per batch, tokens streamed, redeliveries and dead letters after a kill -9 and a poison request); broker values
vanish while Redis is away; one request's gateway and worker spans share the caller's trace id; the logs hold every
request id and no payload. The deploy files read against a real Prometheus are in test_prometheus_* below."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferline.server.broker import embedded, keys
from tests.conftest import Cluster, wait_for
from tests.test_deploy import PROMETHEUS, alert_rules, dashboard_exprs

ECHO = "tests.runtimes:Echo"
V2_ROUTE = "/v2/models/{model}/infer"


def v2_body(value: float, **params: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}], "parameters": params}


async def post_all(url: str, bodies: list[dict[str, Any]], timeout: float = 60,
                   headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*[client.post(url, json=b, headers=headers) for b in bodies])


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`; -1 when there is none."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else -1


def scrape_until(url: str, check: Any, timeout_s: float, what: str) -> dict[tuple[str, frozenset[tuple[str, str]]],
                                                                          float]:
    """The first scrape for which check(samples) holds (bounded wait)."""
    found: list[Any] = []

    def ok() -> bool:
        found[:] = [scrape(url)]
        return bool(check(found[0]))

    wait_for(ok, timeout_s, what)
    return found[0]


def promtool_checks_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return   # test_promtool_passes_on_a_live_metrics_page says so, with a skip
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- counts ----------------------------------------------------------------------------------------------------

def test_metrics_count_requests_items_redeliveries_and_dead_letters(cluster: Cluster) -> None:
    cluster.spec("echo", model=ECHO, max_batch_size=8, max_batch_delay_ms=20, visibility_timeout_s=1.0, max_tries=2,
                 timeout_s=60)
    cluster.spec("poison", model=ECHO, visibility_timeout_s=1.0, max_tries=1, timeout_s=60)
    url = cluster.start_gateway()
    echo_url = url + "/v2/models/echo/infer"
    victim = cluster.start_worker("echo")
    poison_worker = cluster.start_worker("poison")

    n = 40
    responses = asyncio.run(post_all(echo_url, [v2_body(i, sleep_s=0.01) for i in range(n)]))
    assert [r.status_code for r in responses] == [200] * n
    batches = {r.json()["outputs"][0]["data"][0] for r in responses}   # Echo: y = 2x, so read batch sizes below
    assert len(batches) == n

    # the worker folds its batch histogram into Redis with each heartbeat (1 s)
    s = scrape_until(url, lambda m: total(m, "inferline_batch_size_sum", model="echo") == n, 20,
                     "batch sizes folded into the gateway's metrics")
    assert total(s, "inferline_requests_total", model="echo", route=V2_ROUTE, status="200") == n
    assert total(s, "inferline_batch_size_bucket", model="echo", le="+Inf") == \
        total(s, "inferline_batch_size_count", model="echo")
    assert 1 <= total(s, "inferline_batch_size_count", model="echo") <= n
    assert total(s, "inferline_queue_wait_seconds_count", model="echo") == n
    assert total(s, "inferline_compute_seconds_count", model="echo") == n
    assert total(s, "inferline_compute_seconds_sum", model="echo") >= n * 0.01 / 8   # each batch slept 10 ms
    assert total(s, "inferline_request_seconds_count", model="echo", route=V2_ROUTE) == n
    assert total(s, "inferline_live_workers", model="echo") == 1
    assert total(s, "inferline_live_replicas", model="echo", device="cpu") == 1
    assert total(s, "inferline_configured_replicas", model="echo") == 1
    assert total(s, "inferline_worker_resident_memory_bytes", model="echo") > 10_000_000
    assert total(s, "inferline_redis_up") == 1
    assert total(s, "inferline_build_info") == 1
    for name in ("inferline_redeliveries_total", "inferline_dead_letters_total", "inferline_dead_letter_length",
                 "inferline_rejected_total"):
        assert total(s, name, model="echo") == 0, name   # there from the start: panels read 0, not "No data"
    promtool_checks_metrics(httpx.get(url + "/metrics").text)

    async def kill_9_mid_request() -> list[httpx.Response]:
        sending = asyncio.create_task(post_all(echo_url, [v2_body(1, sleep_s=2)]))
        stream = keys.request_stream("echo")
        await asyncio.to_thread(wait_for, lambda: cluster.client.xpending(stream, keys.GROUP)["pending"] > 0, 20,
                                "the victim holds the request")
        os.kill(victim.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        await asyncio.to_thread(cluster.start_worker, "echo")
        return await sending

    (redelivered,) = asyncio.run(kill_9_mid_request())
    assert redelivered.status_code == 200

    async def poison() -> list[httpx.Response]:
        sending = asyncio.create_task(post_all(url + "/v2/models/poison/infer", [v2_body(1, kill=True)]))
        await asyncio.to_thread(poison_worker.wait, 60)
        await asyncio.to_thread(cluster.start_worker, "poison", False)   # it reclaims the poison and dead-letters it
        return await sending

    (dead,) = asyncio.run(poison())
    assert dead.status_code == 500 and "dead-letter" in dead.json()["error"]

    s = scrape_until(url, lambda m: total(m, "inferline_batch_size_sum", model="echo") >= n + 1, 20,
                     "the new worker's batch folded in")
    assert total(s, "inferline_redeliveries_total", model="echo") == 1
    assert total(s, "inferline_reclaimed_total", model="echo") == 1
    assert total(s, "inferline_dead_letters_total", model="echo") == 0
    assert total(s, "inferline_redeliveries_total", model="poison") == 0
    assert total(s, "inferline_reclaimed_total", model="poison") == 1
    assert total(s, "inferline_dead_letters_total", model="poison") == 1
    assert total(s, "inferline_dead_letter_length", model="poison") == 1
    # the worker killed with -9 took its counts with it, and still no counter went backwards
    assert total(s, "inferline_batch_size_sum", model="echo") == n + 1
    assert total(s, "inferline_requests_total", model="poison", status="500") == 1


def test_generation_counts_the_tokens_it_streamed(cluster: Cluster, quick_gpt2: Path) -> None:
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=8, timeout_s=120)
    url = cluster.start_gateway()
    cluster.start_worker("gpt2")
    prompts = ["The function returns", "Note that", "A string is", "If the file"]

    async def generate() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(prompt: str, n: int) -> int:
                r = await client.post(url + "/generate", json={"inputs": prompt, "parameters": {
                    "max_new_tokens": n, "details": True}})
                assert r.status_code == 200, r.text
                return int(r.json()["details"]["generated_tokens"])

            async def streamed(prompt: str, n: int) -> int:
                count = 0
                async with client.stream("POST", url + "/generate_stream",
                                         json={"inputs": prompt, "parameters": {"max_new_tokens": n}}) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        count += line.startswith("data:")
                return count

            return await asyncio.gather(*[one(p, 5 + 3 * i) for i, p in enumerate(prompts)],
                                        streamed("Return", 9))

    tokens = asyncio.run(generate())
    s = scrape(url)
    assert total(s, "inferline_generated_tokens_total", model="gpt2") == sum(tokens)
    assert total(s, "inferline_prompt_tokens_total", model="gpt2") >= len(tokens)
    assert total(s, "inferline_time_to_first_token_seconds_count", model="gpt2") == len(tokens)
    assert total(s, "inferline_time_per_output_token_seconds_count", model="gpt2") == sum(t > 1 for t in tokens)
    assert total(s, "inferline_compute_seconds_count", model="gpt2") == len(tokens)
    assert total(s, "inferline_running_sequences", model="gpt2") >= 0

    def logged() -> list[int]:   # access lines reach the log within AccessLog.FLUSH_EVERY_S of their request
        log = (cluster.tmp / "gateway.log").read_text()
        return sorted(int(t) for t in re.findall(r"route=/generate\S* model=gpt2 status=200 .* tokens=(\d+)", log))

    assert wait_for(lambda: len(logged()) >= len(tokens), 10, "access lines") and logged() == sorted(tokens)


def test_metrics_drop_broker_values_while_redis_is_unreachable(tmp_path: Path) -> None:
    proc, redis_url = embedded.start(tmp_path / "redis", open_tcp=True)
    cluster = Cluster(redis_url, tmp_path)
    try:
        cluster.spec("echo", model=ECHO)
        url = cluster.start_gateway()
        cluster.start_worker("echo")
        s = scrape(url)
        assert total(s, "inferline_redis_up") == 1 and total(s, "inferline_live_workers", model="echo") == 1
        proc.kill()
        proc.wait(timeout=10)
        s = scrape_until(url, lambda m: total(m, "inferline_redis_up") == 0, 30, "the gateway sees Redis gone")
        for name in ("inferline_live_workers", "inferline_live_replicas", "inferline_queue_depth",
                     "inferline_batch_size_count", "inferline_dead_letters_total",
                     "inferline_worker_resident_memory_bytes"):
            assert total(s, name) == -1, f"{name} is served while Redis is unreachable"
        assert total(s, "inferline_configured_replicas", model="echo") == 1   # config, not Redis: still known
    finally:
        cluster.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# --- traces ----------------------------------------------------------------------------------------------------

def spans_in(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_request_yields_gateway_and_worker_spans_in_the_callers_trace(cluster: Cluster) -> None:
    pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed (pip install -e .[test])")
    traces = cluster.tmp / "traces"
    traces.mkdir()
    cluster.spec("echo", model=ECHO)
    cluster.env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100",
                   "INFERLINE_TRACES_FILE": str(traces / "gateway.jsonl")}
    url = cluster.start_gateway()
    cluster.env["INFERLINE_TRACES_FILE"] = str(traces / "worker.jsonl")
    cluster.start_worker("echo")

    trace_id, caller_span = os.urandom(16).hex(), os.urandom(8).hex()
    r = httpx.post(url + "/v2/models/echo/infer", json=v2_body(2), timeout=30,
                   headers={"traceparent": f"00-{trace_id}-{caller_span}-01", "x-request-id": "traced-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "traced-1"

    def mine(path: Path) -> list[dict[str, Any]]:
        return [s for s in spans_in(path) if s["context"]["trace_id"] == "0x" + trace_id]

    gateway = wait_for(lambda: mine(traces / "gateway.jsonl"), 30, "the gateway's span exported")
    worker = wait_for(lambda: mine(traces / "worker.jsonl"), 30, "the worker's span exported")
    (server,) = gateway
    assert server["name"] == f"POST {V2_ROUTE}" and server["parent_id"] == "0x" + caller_span
    assert server["attributes"]["inferline.request_id"] == "traced-1"
    assert server["attributes"]["http.response.status_code"] == 200
    (in_worker,) = worker
    assert in_worker["name"] == "worker echo" and in_worker["parent_id"] == server["context"]["span_id"]
    assert in_worker["attributes"]["inferline.batch_size"] == 1
    # the batch's own span (a trace of its own) links to every request's gateway span
    batches = wait_for(lambda: [s for s in spans_in(traces / "worker.jsonl") if s["name"] == "batch echo"
                                and any(link["context"]["trace_id"] == "0x" + trace_id for link in s["links"])],
                       30, "the batch span exported")
    assert batches[0]["links"][0]["context"]["span_id"] == server["context"]["span_id"]
    assert in_worker["links"][0]["context"]["span_id"] == batches[0]["context"]["span_id"]


# --- logs ------------------------------------------------------------------------------------------------------

def test_logs_hold_every_request_id_and_no_payload(cluster: Cluster, quick_gpt2: Path) -> None:
    secret_text = "zebra-quartz-" + os.urandom(6).hex()
    secret_prompt = "marmalade " + os.urandom(6).hex()
    cluster.env = {"INFERLINE_LOG_FORMAT": "json"}
    cluster.spec("echo", model=ECHO, max_batch_size=4)
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", timeout_s=120)
    url = cluster.start_gateway()
    cluster.start_worker("echo")
    cluster.start_worker("gpt2")
    predict = url + "/v1/models/echo/predict"

    async def traffic() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(
                *[client.post(predict, json={"text": secret_text, "i": i}) for i in range(6)],
                client.post(predict, json={"text": secret_text, "reject": True}),             # 422 from the model
                client.post(predict, json={"text": secret_text, "raise": True}),              # 500: the model raised
                client.post(predict, json={"text": secret_text, "sleep_s": "not a number"}),  # 422 validation
                client.post(predict, content=b"{" + secret_text.encode()),                    # 400 bad JSON
                client.post(url + "/generate", json={"inputs": secret_prompt, "parameters": {"max_new_tokens": 4}}),
                client.post(url + "/generate", json={"inputs": secret_prompt, "parameters": {"top_p": 7}}),
                client.post(predict, json={"text": secret_text}, headers={"x-request-id": "caller-chosen-id"}),
            ))

    responses = asyncio.run(traffic())
    statuses = [r.status_code for r in responses]
    assert statuses[:6] == [200] * 6 and statuses[6:8] == [422, 500] and statuses[10] == 200, statuses
    assert all(400 <= code < 500 for code in (statuses[8], statuses[9], statuses[11])), statuses
    ids = [r.headers["x-request-id"] for r in responses]
    assert ids[-1] == "caller-chosen-id" and len(set(ids)) == len(ids)

    gateway_log = cluster.tmp / "gateway.log"

    def access_lines() -> dict[str, dict[str, Any]]:
        return {line["id"]: line for line in (json.loads(raw) for raw in gateway_log.read_text().splitlines()
                                              if raw.startswith("{") and '"inferline.access"' in raw)}

    # Access lines are written in blocks (server/logs.py AccessLog): each within FLUSH_EVERY_S of its request.
    def every_line() -> dict[str, dict[str, Any]] | None:
        lines = access_lines()
        return lines if set(ids) <= set(lines) else None

    by_id = wait_for(every_line, 10, "access lines")
    for rid, response in zip(ids, responses, strict=True):
        line = by_id[rid]
        assert line["status"] == response.status_code and line["ms"] > 0
    assert by_id[ids[0]]["model"] == "echo" and by_id[ids[0]]["batch"] >= 1 and by_id[ids[0]]["route"] == \
        "/v1/models/{model}/predict"
    assert by_id[ids[10]]["model"] == "gpt2" and 1 <= by_id[ids[10]]["tokens"] <= 4
    time.sleep(1.5)   # let the workers write whatever they would
    logs = [p.read_text() for p in sorted(cluster.tmp.glob("*.log"))]
    assert len(logs) == 3
    for text in logs:
        assert secret_text not in text and secret_prompt not in text
        assert secret_text.split("-")[-1] not in text and secret_prompt.split()[-1] not in text


# --- a real Prometheus -----------------------------------------------------------------------------------------

def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("Debian's prometheus package is not installed (scripts/test.sh installs it: apt-get install "
                    "prometheus)")
    return path


def test_promtool_passes_on_a_live_metrics_page(cluster: Cluster) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    cluster.spec("echo", model=ECHO)
    url = cluster.start_gateway()
    cluster.start_worker("echo")
    asyncio.run(post_all(url + "/v2/models/echo/infer", [v2_body(i) for i in range(5)]))
    scrape_until(url, lambda m: total(m, "inferline_batch_size_count", model="echo") > 0, 20, "batches folded")
    promtool_checks_metrics(httpx.get(url + "/metrics").text)


def as_query(expr: str, rate_window: str = "20s") -> str:
    """A dashboard expression with Grafana's variables filled in: every model and route."""
    expr = expr.replace("$__rate_interval", rate_window).replace("$model", ".*").replace("$route", ".*")
    return re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)", expr)


def as_measure(expr: str) -> str:
    """An alert expression that returns its measure whatever its value: each comparison with a number made `bool`
    (an alert that does not fire returns nothing, which would prove nothing about its metrics)."""
    return re.sub(r"(>=|<=|==|!=|>|<)\s*(-?[0-9.]+)", r"\1 bool \2", expr)


def test_prometheus_reads_every_dashboard_and_alert_expression(cluster: Cluster, quick_gpt2: Path,
                                                               tmp_path: Path) -> None:
    binary = prometheus_binary()
    cluster.spec("echo", model=ECHO, max_batch_size=8, cache={"ttl_s": 60, "max_bytes": 1 << 20})
    cluster.spec("gpt2", artifact=str(quick_gpt2 / "gpt2"), task="generate", max_batch_size=8, timeout_s=120)
    url = cluster.start_gateway()
    cluster.start_worker("echo")
    cluster.start_worker("gpt2")
    gateway_target = url.removeprefix("http://")

    port = embedded.free_port()
    data = tmp_path / "prometheus-data"
    config = tmp_path / "prometheus.yml"
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    config.write_text(json.dumps({   # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "inferline-gateway", "static_configs": [{"targets": [gateway_target]}]}],
    }))
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "prometheus ready")

        values = itertools.count()   # echo's cache: new values miss (and are batched), the one repeated hits

        async def traffic(rounds: int) -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                for _ in range(rounds):
                    await asyncio.gather(
                        *[client.post(url + "/v2/models/echo/infer", json=v2_body(next(values))) for _ in range(8)],
                        client.post(url + "/v2/models/echo/infer", json=v2_body(-1)),
                        client.post(url + "/v2/models/echo/infer", json=v2_body(1, reject=True)),
                        client.post(url + "/v2/models/echo/infer", json=v2_body(1, **{"raise": True})),   # a 500
                        client.post(url + "/generate", json={"inputs": "The function", "parameters": {
                            "max_new_tokens": 6}}))
                    await asyncio.sleep(0.5)

        queries = {f"dashboard: {e}": as_query(e) for e in dashboard_exprs()}
        queries |= {f"alert {r['alert']}: {r['expr']}": as_measure(r["expr"]) for r in alert_rules()}
        empty = dict(queries)
        deadline = time.monotonic() + 90
        while empty and time.monotonic() < deadline:
            asyncio.run(traffic(4))
            for what, query in list(empty.items()):
                answer = httpx.get(api + "/query", params={"query": query}, timeout=10).json()
                assert answer["status"] == "success", f"{what}: {answer}"
                if answer["data"]["result"]:
                    del empty[what]
        assert not empty, "no data from:\n" + "\n".join(empty)
        rules = httpx.get(api + "/rules", timeout=10).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} == {r["alert"] for r in alert_rules()}
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
