"""The three classic models served end to end: a real gateway and one real worker per model on a real Redis, quick
real builds. Every answer is compared with the model's own prediction, computed in this process by the runtime loaded
exactly as a worker loads it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferline.server.protocol import now_ms
from inferline.zoo.cnn.imaging import digit_png
from tests.conftest import Cluster, live_workers, wait_for
from tests.zoo_cluster import (
    MODELS,
    TEXTS,
    Direct,
    assert_close,
    direct,
    predict_task,
    predict_v2,
    v2_expected,
)

pytestmark = pytest.mark.timeout(240)


# Fixtures ------------------------------------------------------------------------------------------------------------

def require_request_id(response: httpx.Response) -> None:
    assert response.headers.get("x-request-id"), f"{response.request.method} {response.request.url} has no x-request-id"


@pytest.fixture(scope="module")
def http(zoo: Cluster) -> Iterator[httpx.Client]:
    """Every response in this module is checked for an x-request-id header."""
    with httpx.Client(base_url=zoo.url, timeout=30, event_hooks={"response": [require_request_id]}) as client:
        yield client


@pytest.fixture(scope="module")
def runtimes(quick_store: Path) -> dict[str, Direct]:
    return {name: direct(quick_store, name) for name in MODELS}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    images: np.ndarray = load_digits().images
    return images


@pytest.fixture(scope="module")
def sunspots() -> list[float]:
    from inferline.zoo.lstm.data import load_sunspots

    return [float(v) for v in load_sunspots().values]


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


# Task routes ---------------------------------------------------------------------------------------------------------

def test_classify_image_every_body_form_matches_the_model(http: httpx.Client, runtimes: dict[str, Direct],
                                                           digits: np.ndarray) -> None:
    cnn = runtimes["cnn"]
    for i, sample in enumerate(digits[:4]):
        png = digit_png(sample, size=28 if i % 2 else None)   # 8x8 and 28x28 files
        default = predict_task(cnn, {}, png)
        assert len(default["predictions"]) == 5
        assert default["version"] == cnn.version
        scores = [p["score"] for p in default["predictions"]]
        assert scores == sorted(scores, reverse=True)

        assert_close(ok(http.post("/classify-image", files={"file": ("digit.png", png, "image/png")})), default)
        assert_close(ok(http.post("/classify-image", files={"file": ("digit.png", png, "image/png")},
                                  data={"top_k": "3"})), predict_task(cnn, {"top_k": 3}, png))
        assert_close(ok(http.post("/classify-image", json={"image": base64.b64encode(png).decode(), "top_k": 2})),
                     predict_task(cnn, {"top_k": 2}, png))
        assert_close(ok(http.post("/classify-image", json={"image": base64.b64encode(png).decode()})), default)
        assert_close(ok(http.post("/classify-image?top_k=10", content=png, headers={"content-type": "image/png"})),
                     predict_task(cnn, {"top_k": 10}, png))
        assert_close(ok(http.post("/classify-image?top_k=1", content=png, headers={"content-type": "image/png"})),
                     predict_task(cnn, {"top_k": 1}, png))


def test_forecast_matches_the_model(http: httpx.Client, runtimes: dict[str, Direct],
                                    sunspots: list[float]) -> None:
    lstm = runtimes["lstm"]
    window, max_horizon = int(lstm.manifest["window"]), int(lstm.manifest["max_horizon"])
    cases = [(sunspots[:window], 1), (sunspots[-100:], 12), (sunspots, max_horizon), (sunspots[50:50 + window + 3], 5)]
    for series, horizon in cases:
        want = predict_task(lstm, {"series": series, "horizon": horizon})
        got = ok(http.post("/forecast", json={"series": series, "horizon": horizon}))
        assert len(got["forecast"]) == horizon
        assert_close(got, want)
    # horizon defaults to 1
    assert_close(ok(http.post("/forecast", json={"series": sunspots[:40]})),
                 predict_task(lstm, {"series": sunspots[:40], "horizon": 1}))


def test_sentiment_one_text_and_a_list(http: httpx.Client, runtimes: dict[str, Direct]) -> None:
    sentiment = runtimes["sentiment"]
    for text in TEXTS:
        want = predict_task(sentiment, {"texts": [text], "single": True})
        got = ok(http.post("/sentiment", json={"text": text}))
        assert got["label"] in ("positive", "negative") and 0.5 <= got["score"] <= 1.0
        assert_close(got, want)
    got = ok(http.post("/sentiment", json={"texts": TEXTS}))
    assert_close(got, predict_task(sentiment, {"texts": TEXTS, "single": False}))
    assert len(got["results"]) == len(TEXTS)


# Open Inference Protocol ---------------------------------------------------------------------------------------------

def v2_case(name: str, digits: np.ndarray, sunspots: list[float]) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                                           dict[str, Any]]:
    """(request body, the same tensors as arrays, parameters) for one model."""
    if name == "cnn":
        from inferline.zoo.cnn.imaging import ImageFormat, digit_image, image_to_array

        x = np.stack([image_to_array(digit_image(s), ImageFormat()) for s in digits[:3]])
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
        return body, {"input": x}, {}
    if name == "lstm":
        x = np.array([sunspots[:30], sunspots[100:130]], dtype=np.float32)
        body = {"inputs": [{"name": "series", "shape": [2, 30], "datatype": "FP32",
                            "data": [float(v) for v in x.reshape(-1)]}], "parameters": {"horizon": 4}}
        return body, {"series": x}, {"horizon": 4}
    x = np.array([t.encode() for t in TEXTS[:3]], dtype=object)
    body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS[:3]}]}
    return body, {"text": x}, {}


@pytest.mark.parametrize("name", MODELS)
def test_v2_infer_matches_the_model(name: str, http: httpx.Client, runtimes: dict[str, Direct],
                                    digits: np.ndarray, sunspots: list[float]) -> None:
    runtime = runtimes[name]
    body, tensors, parameters = v2_case(name, digits, sunspots)
    outputs = predict_v2(runtime, tensors, parameters)
    got = ok(http.post(f"/v2/models/{name}/infer", json={**body, "id": f"req-{name}"}))
    assert_close(got, v2_expected(name, runtime.version, outputs, f"req-{name}"))
    # the versioned form, and a body sent as text/plain (the protocol says: JSON whatever the Content-Type)
    got = ok(http.post(f"/v2/models/{name}/versions/{runtime.version}/infer", content=json.dumps(body),
                       headers={"content-type": "text/plain"}))
    assert_close(got, v2_expected(name, runtime.version, outputs))
    # asking for one output returns only that one
    first = runtime.signature.outputs[0].name
    got = ok(http.post(f"/v2/models/{name}/infer", json={**body, "outputs": [{"name": first}]}))
    assert_close(got, v2_expected(name, runtime.version, {first: outputs[first]}))


# Concurrency and batching --------------------------------------------------------------------------------------------

def test_concurrent_requests_equal_one_by_one_and_form_batches(zoo: Cluster, http: httpx.Client,
                                                               digits: np.ndarray, sunspots: list[float]) -> None:
    n = 64
    requests: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(n):
        requests.append(("cnn", "/classify-image?top_k=3", {"content": digit_png(digits[i]),
                                                            "headers": {"content-type": "image/png"}}))
        requests.append(("lstm", "/forecast", {"json": {"series": sunspots[i:i + 24 + i % 7], "horizon": 1 + i % 9}}))
        requests.append(("sentiment", "/sentiment", {"json": {"text": f"{TEXTS[i % len(TEXTS)]} {i}"}}))

    one_by_one = [ok(http.post(path, **kw)) for _, path, kw in requests]
    before = {m: counters(zoo, m, since_ms=now_ms()) for m in MODELS}

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=zoo.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*[client.post(path, **kw) for _, path, kw in requests])

    together = [ok(r) for r in asyncio.run(all_at_once())]
    for (model, path, _), single, batched in zip(requests, one_by_one, together, strict=True):
        assert_close(batched, single, f"{model} {path}")

    done = now_ms()
    for model in MODELS:
        after = counters(zoo, model, since_ms=done)
        items, batches = after["items"] - before[model]["items"], after["batches"] - before[model]["batches"]
        assert items == n
        assert batches < items, f"{model}: {items} requests ran in {batches} batches of one"
        assert after["max_batch"] > 1


def counters(zoo: Cluster, model: str, since_ms: int) -> dict[str, int]:
    """The worker's counters from its first heartbeat after since_ms: a worker counts a batch before it replies,
    and beats once a second, so these include every request answered before since_ms."""
    def beat() -> dict[str, str] | None:
        (worker,) = live_workers(zoo.client, model)
        return worker if int(worker["beat"]) > since_ms else None

    worker = wait_for(beat, 10, f"{model} heartbeat")
    return {k: int(worker[k]) for k in ("items", "batches", "max_batch")}


# Status routes -------------------------------------------------------------------------------------------------------

def test_models_list_and_health(zoo: Cluster, http: httpx.Client, runtimes: dict[str, Direct]) -> None:
    listing = ok(http.get("/v1/models"))
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert set(by_id) == set(MODELS)
    for name in MODELS:
        entry = by_id[name]
        assert entry["object"] == "model"
        assert entry["version"] == runtimes[name].version
        assert entry["live_replicas"] == 1 and entry["devices"] == ["cpu"]
        assert entry["queue_depth"] == 0

    assert ok(http.get("/readyz"))["ready"] is True
    assert ok(http.get("/healthz"))["status"] == "ok"
    assert ok(http.get("/v2/health/ready")) == {"ready": True}
    assert ok(http.get("/v2/health/live")) == {"live": True}
    server = ok(http.get("/v2"))
    assert server["name"] == "inferline" and "binary_tensor_data" in server["extensions"]

    for name in MODELS:
        runtime = runtimes[name]
        meta = ok(http.get(f"/v2/models/{name}"))
        assert meta == {"name": name, "versions": [runtime.version], "platform": runtime.platform,
                        "inputs": [t.to_json() for t in runtime.signature.inputs],
                        "outputs": [t.to_json() for t in runtime.signature.outputs]}
        assert ok(http.get(f"/v2/models/{name}/versions/{runtime.version}")) == meta
        assert ok(http.get(f"/v2/models/{name}/ready"))["ready"] is True
        assert ok(http.get(f"/v2/models/{name}/versions/{runtime.version}/ready"))["ready"] is True
        for path in (f"/v2/models/{name}/versions/0", f"/v2/models/{name}/versions/0/ready"):
            missing = http.get(path)
            assert missing.status_code == 404 and set(missing.json()) == {"error"}
            assert "version" in missing.json()["error"]


# Request ids, metrics, docs ------------------------------------------------------------------------------------------

def test_request_ids_are_echoed_or_made(http: httpx.Client, sunspots: list[float]) -> None:
    body = {"series": sunspots[:30], "horizon": 2}
    echoed = http.post("/forecast", json=body, headers={"x-request-id": "client-abc_123"})
    assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "client-abc_123"
    for insane in ("has spaces in it", "x" * 65, "semi;colon"):
        made = http.post("/forecast", json=body, headers={"x-request-id": insane})
        assert made.status_code == 200 and made.headers["x-request-id"] not in ("", insane)
    first, second = http.get("/healthz"), http.get("/healthz")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    # an error body carries the same id as the header
    bad = http.post("/forecast", json={"series": []}, headers={"x-request-id": "trace-7"})
    assert bad.status_code == 422 and bad.json()["request_id"] == "trace-7" == bad.headers["x-request-id"]


def test_concurrent_requests_with_the_same_request_id_get_their_own_answers(
        zoo: Cluster, runtimes: dict[str, Direct], sunspots: list[float]) -> None:
    """A client that reuses one x-request-id (a retrying proxy, a fixed trace id) must still get, for each request,
    the answer to that request."""
    bodies = [{"series": sunspots[i * 20:i * 20 + 30], "horizon": 3} for i in range(6)]

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=zoo.url, timeout=20) as client:
            return await asyncio.gather(*[client.post("/forecast", json=b, headers={"x-request-id": "same-id"})
                                          for b in bodies])

    for body, response in zip(bodies, asyncio.run(send()), strict=True):
        assert response.headers["x-request-id"] == "same-id"
        assert_close(ok(response), predict_task(runtimes["lstm"], body))


def test_metrics_docs_and_openapi(http: httpx.Client, sunspots: list[float]) -> None:
    ok(http.post("/forecast", json={"series": sunspots[:30]}))
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert "# TYPE inferline_requests_total counter" in text
    assert 'inferline_requests_total{model="lstm",route="/forecast",status="200"}' in text
    assert 'inferline_live_workers{model="cnn"} 1.0' in text
    assert 'inferline_queue_depth{model="lstm"} 0.0' in text

    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = ok(http.get("/openapi.json"))
    for path in ("/classify-image", "/forecast", "/sentiment", "/v2/models/{model}/infer", "/v1/models", "/readyz"):
        assert path in spec["paths"], path
