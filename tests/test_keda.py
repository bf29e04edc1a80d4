"""KEDA on Kubernetes, checked offline (deploy/k8s/autoscaling.yaml, and deploy/k8s-redis-sentinel's
redis-sentinel-streams variant of it): one ScaledObject per worker Deployment, its
trigger on exactly the streams the broker writes (keys.model_streams) at exactly the Redis the workers reach (the
host and port of their REDIS_URL, which the redis Service serves and the TLS certificate names), with the bounds of
the deployment's [models.NAME.autoscale] in the gateway's config, and only the fields KEDA documents for the trigger
and its TriggerAuthentication. `kubectl kustomize` renders them (test_deploy.test_kustomize_renders_the_k8s_manifests
counts every document)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from inferline.server.broker import keys
from inferline.server.config import Settings
from tests.test_deploy import K8S, REDIS_DIR, configured_models, k8s_docs, load_yaml, require, run_tool

# The trigger metadata KEDA documents, per trigger type (https://keda.sh/docs/2.14/scalers/redis-streams/,
# .../redis-sentinel-streams/, .../redis-cluster-streams/; KEDA's pkg/scalers/redis_streams_scaler.go reads the same
# names, and compares every mode's count with activationLagCount to activate from zero).
STREAMS_COMMON = {"usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
                  "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex"}
TRIGGER_FIELDS = {
    "redis-streams": STREAMS_COMMON | {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv"},
    "redis-sentinel-streams": STREAMS_COMMON | {"addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv",
                                                "portsFromEnv", "sentinelUsernameFromEnv", "sentinelPasswordFromEnv",
                                                "sentinelMaster", "sentinelMasterFromEnv"},
    "redis-cluster-streams": STREAMS_COMMON | {"addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv",
                                               "portsFromEnv"},
}
# TriggerAuthentication parameters of those scalers (same pages, "Using TriggerAuthentication").
AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword", "sentinelUsername",
                   "sentinelPassword"}


def docs_of(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The gateway's config, as its pods read it (the inferline-config ConfigMap)."""
    (configmap,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap" and "inferline.toml" in d["data"]]
    path = tmp_path_factory.mktemp("keda") / "inferline.toml"
    path.write_text(configmap["data"]["inferline.toml"])
    with pytest.MonkeyPatch.context() as mp:
        configured_models(mp)   # a clean environment
        mp.setenv("INFERLINE_CONFIG", str(path))
        return Settings.load()


def test_every_worker_deployment_has_one_scaled_object_with_its_bounds(config: Settings) -> None:
    workers = {name: d for name, d in docs_of("Deployment").items()
               if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}
    scaled = docs_of("ScaledObject")
    assert workers and {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == set(workers)
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = workers[spec["scaleTargetRef"]["name"]]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        model = target["metadata"]["labels"]["inferline.dev/model"]
        bounds = config.models[model].autoscale
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (bounds.min_replicas, bounds.max_replicas), name
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60, name   # no model reload on every dip
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
        if bounds.min_replicas == 0:   # scale to zero: woken by one entry, put to sleep after a quiet spell
            assert all(t["metadata"]["activationLagCount"] == "0" for t in spec["triggers"]), name
            assert spec["cooldownPeriod"] >= 60
        # the drain: Kubernetes waits for the worker to finish the batch in hand (SIGTERM drains)
        assert target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    gpu = [s for s in scaled.values() if "nvidia.com/gpu" in str(workers[s["spec"]["scaleTargetRef"]["name"]])]
    assert gpu and all(s["spec"]["minReplicaCount"] == 0 for s in gpu), "the GPU worker scales to zero"


def test_triggers_read_the_brokers_streams_at_the_workers_redis() -> None:
    workers = docs_of("Deployment")
    (service,) = [s for s in docs_of("Service").values() if s["metadata"]["name"] == "redis"]
    service_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "redis")
    san = re.search(r'^san="([^"]*)"', (REDIS_DIR / "make-tls.sh").read_text(), re.M)
    assert san
    for obj in docs_of("ScaledObject").values():
        target = workers[obj["spec"]["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["inferline.dev/model"]
        env = env_of(worker_container(target))
        url = urlsplit(env["REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", "p"))
        assert url.hostname == service["metadata"]["name"] and url.port == service_port
        triggers = obj["spec"]["triggers"]
        assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(keys.model_streams(model))
        for trigger in triggers:
            meta = trigger["metadata"]
            assert set(meta) <= TRIGGER_FIELDS[trigger["type"]], set(meta) - TRIGGER_FIELDS[trigger["type"]]
            assert trigger["type"] == "redis-streams"
            # the Service by its cluster name: KEDA's operator runs in its own namespace
            host = f"{url.hostname}.{service['metadata']['namespace']}.svc.cluster.local"
            assert meta["address"] == f"{host}:{url.port}"
            assert f"DNS:{host}" in san.group(1).split(","), "the Redis certificate must name the address KEDA uses"
            assert "consumerGroup" not in meta and int(meta["streamLength"]) > 0   # XLEN = waiting + in flight
            assert "enableTLS" not in meta   # TLS through the TriggerAuthentication (KEDA refuses both)
            assert trigger["authenticationRef"]["name"] in docs_of("TriggerAuthentication")


def test_trigger_authentication_is_the_worker_user_over_tls() -> None:
    (auth,) = docs_of("TriggerAuthentication").values()
    params = {p["parameter"]: p for p in auth["spec"].get("secretTargetRef", []) + auth["spec"].get("env", [])}
    assert set(params) <= AUTH_PARAMETERS and {"username", "password", "tls", "ca"} <= set(params)
    for obj in docs_of("ScaledObject").values():
        container = worker_container(docs_of("Deployment")[obj["spec"]["scaleTargetRef"]["name"]])
        env = env_of(container)
        user = urlsplit(env["REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", "p")).username
        assert env[params["username"]["name"]]["value"] == user
        assert env[params["tls"]["name"]]["value"] == "enable"
        secret = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (params["password"]["name"], params["password"]["key"]) == (secret["name"], secret["key"])
        volumes = {v["name"]: v for v in docs_of("Deployment")[obj["spec"]["scaleTargetRef"]["name"]]["spec"][
            "template"]["spec"]["volumes"]}
        mount = next(m for m in container["volumeMounts"]
                     if m["mountPath"] == str(Path(env["REDIS_CA_FILE"]["value"]).parent))
        ca = volumes[mount["name"]]["secret"]
        assert params["ca"]["name"] == ca["secretName"] and params["ca"]["key"] == Path(env["REDIS_CA_FILE"][
            "value"]).name
    # the worker user may run what the trigger runs (XLEN on the request streams)
    acl = next(line for line in (REDIS_DIR / "users.acl").read_text().splitlines()
               if line.startswith("user inferline-worker "))
    assert "+xlen" in acl.split() and "~inferline:req:*" in acl.split()


def test_kustomize_renders_the_scaled_objects() -> None:
    kubectl = require("kubectl", "kubectl renders kustomizations offline")
    rendered = [d for d in yaml.safe_load_all(run_tool(kubectl, "kustomize", str(K8S)).stdout) if d]
    kinds = [d["kind"] for d in rendered]
    assert kinds.count("ScaledObject") == len(docs_of("ScaledObject")) >= 4
    assert kinds.count("TriggerAuthentication") == 1
    assert "autoscaling.yaml" in load_yaml(K8S / "kustomization.yaml")[0]["resources"]


def test_the_sentinel_variant_scales_on_the_same_streams_through_the_sentinels() -> None:
    """deploy/k8s-redis-sentinel, rendered: each ScaledObject's triggers are KEDA's redis-sentinel-streams on exactly
    the broker's streams, at exactly the sentinels and master name of the worker's REDIS_URL (parsed by the broker's
    own parser), with only the fields KEDA documents; the TriggerAuthentication adds the sentinels' password from
    the Secret the workers read it from."""
    from inferline.server.broker.client import parse_sentinel_url
    from tests.test_deploy_sentinel import by_kind, rendered_overlay

    kinds = by_kind(rendered_overlay())
    (auth,) = kinds["TriggerAuthentication"].values()
    params = {p["parameter"]: p for p in auth["spec"].get("secretTargetRef", []) + auth["spec"].get("env", [])}
    assert set(params) <= AUTH_PARAMETERS and {"username", "password", "tls", "ca", "sentinelPassword"} <= set(params)
    assert set(kinds["ScaledObject"]) == set(docs_of("ScaledObject"))
    for obj in kinds["ScaledObject"].values():
        target = kinds["Deployment"][obj["spec"]["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["inferline.dev/model"]
        env = env_of(worker_container(target))
        addresses, master, _, user, _ = parse_sentinel_url(env["REDIS_URL"]["value"].replace("$(REDIS_PASSWORD)", "p"))
        assert user == env[params["username"]["name"]]["value"]
        secret = env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        wanted = params["sentinelPassword"]
        assert (wanted["name"], wanted["key"]) == (secret["name"], secret["key"])
        triggers = obj["spec"]["triggers"]
        assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(keys.model_streams(model))
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-sentinel-streams"
            assert set(meta) <= TRIGGER_FIELDS[trigger["type"]], set(meta) - TRIGGER_FIELDS[trigger["type"]]
            assert meta["addresses"] == ",".join(f"{host}:{port}" for host, port in addresses)
            assert meta["sentinelMaster"] == master
            assert "consumerGroup" not in meta and int(meta["streamLength"]) > 0 and "enableTLS" not in meta
            assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
