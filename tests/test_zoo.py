"""The classic model zoo end to end: quick builds of cnn, lstm and sentiment into a temporary store, each runtime
loaded the way a worker loads it (the dotted path in the manifest), then its task and v2 contracts.

Real models, no mocks. The builds are tiny (seconds each) but real: trained, evaluated, saved and reloaded.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import build
from models import store as model_store
from service.runtimes.base import InputError, Runtime, TaskRequest

# The session fixture trains three models in its first test: allow for it on a busy 2-core machine.
pytestmark = pytest.mark.timeout(180)

REQUIRED_FIELDS = {"name", "version", "runtime", "framework", "inputs", "outputs", "metrics", "quick"}


# Fixtures ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def zoo(quick_store: Path) -> dict[str, Path]:
    built = build.build_missing(quick_store, build.ZOO, quick=True)   # already built: the shared session store
    assert set(built) == set(build.ZOO)
    return built


def load_like_a_worker(version_dir: Path) -> Runtime[Any, Any]:
    manifest = model_store.read_manifest(version_dir)
    module, _, cls_name = manifest["runtime"].partition(":")
    runtime: Runtime[Any, Any] = getattr(importlib.import_module(module), cls_name)()
    runtime.load(version_dir, "cpu", 1)
    return runtime


@pytest.fixture(scope="session")
def cnn(zoo: dict[str, Path]) -> Runtime[Any, Any]:
    return load_like_a_worker(zoo["cnn"])


@pytest.fixture(scope="session")
def lstm(zoo: dict[str, Path]) -> Runtime[Any, Any]:
    return load_like_a_worker(zoo["lstm"])


@pytest.fixture(scope="session")
def sentiment(zoo: dict[str, Path]) -> Runtime[Any, Any]:
    return load_like_a_worker(zoo["sentiment"])


@pytest.fixture(scope="session")
def digits() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    yield data.images, data.target


@pytest.fixture(scope="session")
def sunspots() -> list[float]:
    from models.lstm.data import load_sunspots

    return [float(v) for v in load_sunspots().values]


def run_task(runtime: Runtime[Any, Any], requests: list[TaskRequest]) -> list[dict[str, Any]]:
    """What the worker loop does for one batch of task requests."""
    prepared = [runtime.preprocess(r) for r in requests]
    outputs = runtime.predict_batch(prepared)
    assert len(outputs) == len(requests)
    return [runtime.postprocess(o, r) for o, r in zip(outputs, requests, strict=True)]


def run_v2(runtime: Runtime[Any, Any], tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None
           ) -> dict[str, np.ndarray]:
    prepared = runtime.v2_preprocess(tensors, parameters or {})
    (output,) = runtime.predict_batch([prepared])
    return runtime.v2_postprocess(output)


# Build and manifests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", build.ZOO)
def test_manifest_fields(zoo: dict[str, Path], name: str) -> None:
    manifest = model_store.read_manifest(zoo[name])
    assert REQUIRED_FIELDS <= set(manifest)
    assert manifest["name"] == name and manifest["version"] == zoo[name].name and manifest["quick"] is True
    assert manifest["framework"] in ("tensorflow", "pytorch")
    assert manifest["metrics"]["n_train"] > 0 and manifest["metrics"]["n_test"] > 0
    for file in manifest["files"].values():
        assert (zoo[name] / file).is_file()
    assert model_store.latest(zoo[name].parent.parent, name) == zoo[name]


def test_manifest_schema_matches_runtime(zoo: dict[str, Path], cnn: Runtime[Any, Any], lstm: Runtime[Any, Any],
                                         sentiment: Runtime[Any, Any]) -> None:
    for runtime in (cnn, lstm, sentiment):
        assert [t.to_json() for t in runtime.v2_inputs()] == runtime.manifest["inputs"]
        assert [t.to_json() for t in runtime.v2_outputs()] == runtime.manifest["outputs"]


def test_quick_models_beat_their_baselines(zoo: dict[str, Path]) -> None:
    """Quick models are small, but still models: each does better than its trivial baseline."""
    cnn_m, lstm_m, sent_m = (model_store.read_manifest(zoo[n])["metrics"] for n in build.ZOO)
    assert cnn_m["accuracy"] > cnn_m["baseline_accuracy"] + 0.3
    assert lstm_m["mae"] < lstm_m["naive_mae"]
    assert sent_m["accuracy"] > sent_m["baseline_accuracy"]


def test_build_skips_complete_versions(zoo: dict[str, Path]) -> None:
    store = zoo["cnn"].parent.parent
    assert build.build_missing(store, build.ZOO, quick=True) == zoo
    # A quick build never stands in for a full one.
    assert build.usable_version(store, "cnn", quick=False) is None


def test_build_skips_absent_train_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "KNOWN", (*build.KNOWN, "nosuchmodel"))
    assert build.build_missing(tmp_path, ["nosuchmodel"], quick=True) == {}


def test_build_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bogus"):
        build.build_missing(tmp_path, ["bogus"], quick=True)


# cnn -----------------------------------------------------------------------------------------------------------------

def digit_request(images: np.ndarray, i: int, **params: Any) -> TaskRequest:
    from models.cnn.imaging import digit_png

    return TaskRequest(params=params, blob=digit_png(images[i]))


def test_cnn_task_contract(cnn: Runtime[Any, Any], digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    (body,) = run_task(cnn, [digit_request(images, 0, top_k=3)])
    assert body["model"] == "cnn" and body["version"] == cnn.version
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert all(p["label"] in [str(d) for d in range(10)] and 0.0 <= p["score"] <= 1.0 for p in body["predictions"])
    (default,) = run_task(cnn, [digit_request(images, 0)])
    assert len(default["predictions"]) == 5
    (every,) = run_task(cnn, [digit_request(images, 0, top_k=10)])
    assert math.isclose(sum(p["score"] for p in every["predictions"]), 1.0, rel_tol=1e-4)


def test_cnn_batch_equals_one_by_one(cnn: Runtime[Any, Any], digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    requests = [digit_request(images, i, top_k=10) for i in range(12)]
    batched = run_task(cnn, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(cnn, [request])
        assert [p["label"] for p in alone["predictions"]] == [p["label"] for p in together["predictions"]]
        np.testing.assert_allclose([p["score"] for p in alone["predictions"]],
                                   [p["score"] for p in together["predictions"]], atol=1e-5)


def test_cnn_v2_matches_task(cnn: Runtime[Any, Any], digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    request = digit_request(images, 7, top_k=10)
    (task,) = run_task(cnn, [request])
    task_probs = {p["label"]: p["score"] for p in task["predictions"]}
    pixels = cnn.preprocess(request).pixels                     # [1, 28, 28, 1], as decoded from the PNG
    for shaped in (pixels, pixels.reshape(1, 784), pixels.reshape(1, 28, 28)):
        probs = run_v2(cnn, {"input": shaped})["probabilities"]
        assert probs.shape == (1, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs[0], [task_probs[str(d)] for d in range(10)], atol=1e-5)
    rows = np.concatenate([cnn.preprocess(digit_request(images, i)).pixels for i in range(3)])
    assert run_v2(cnn, {"input": rows})["probabilities"].shape == (3, 10)


def test_cnn_inverts_light_backgrounds(cnn: Runtime[Any, Any], digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Dark ink on white paper reads like the training digits (light ink on black)."""
    import io

    from PIL import Image, ImageOps

    images, _ = digits
    request = digit_request(images, 3, top_k=10)
    buf = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(request.blob)).convert("L")).save(buf, format="PNG")
    light = TaskRequest(params={"top_k": 10}, blob=buf.getvalue())
    dark_body, light_body = run_task(cnn, [request, light])
    assert dark_body["predictions"][0]["label"] == light_body["predictions"][0]["label"]


@pytest.mark.parametrize(("params", "blob", "field"), [
    ({}, b"", "file"),
    ({}, b"not an image", "file"),
    ({}, "PNG-TRUNCATED", "file"),
    ({"top_k": 0}, None, "top_k"),
    ({"top_k": 11}, None, "top_k"),
    ({"top_k": "3"}, None, "top_k"),
    ({"top_k": True}, None, "top_k"),
    ({"top_k": 2.5}, None, "top_k"),
])
def test_cnn_bad_task_input(cnn: Runtime[Any, Any], digits: tuple[np.ndarray, np.ndarray], params: dict[str, Any],
                            blob: bytes | str | None, field: str) -> None:
    good = digit_request(digits[0], 0).blob
    data = good if blob is None else good[: len(good) // 2] if blob == "PNG-TRUNCATED" else blob
    assert isinstance(data, bytes)
    with pytest.raises(InputError) as info:
        cnn.preprocess(TaskRequest(params=params, blob=data))
    assert info.value.field == field and field in info.value.message


@pytest.mark.parametrize(("tensors", "field"), [
    ({"input": np.zeros((1, 27, 28, 1), np.float32)}, "input"),
    ({"input": np.zeros((784,), np.float32)}, "input"),
    ({"input": np.zeros((0, 784), np.float32)}, "input"),
    ({"input": np.full((1, 784), np.nan, np.float32)}, "input"),
    ({"input": np.full((2, 28, 28), np.inf, np.float32)}, "input"),
    ({"input": np.array([["a"] * 784], dtype=object)}, "input"),
    ({}, "input"),
    ({"input": np.zeros((1, 784), np.float32), "image": np.zeros((1, 784), np.float32)}, "image"),
])
def test_cnn_bad_v2_input(cnn: Runtime[Any, Any], tensors: dict[str, np.ndarray], field: str) -> None:
    with pytest.raises(InputError) as info:
        cnn.v2_preprocess(tensors, {})
    assert info.value.field == field and field in info.value.message


# lstm ----------------------------------------------------------------------------------------------------------------

def test_lstm_task_contract(lstm: Runtime[Any, Any], sunspots: list[float]) -> None:
    (body,) = run_task(lstm, [TaskRequest(params={"series": sunspots[:250], "horizon": 11})])
    assert body["model"] == "lstm" and body["version"] == lstm.version
    assert len(body["forecast"]) == 11 and all(isinstance(v, float) and math.isfinite(v) for v in body["forecast"])
    # Original units: sunspot numbers, not z-scores.
    assert -50 < min(body["forecast"]) and max(body["forecast"]) < 300 and np.ptp(body["forecast"]) > 5
    (default,) = run_task(lstm, [TaskRequest(params={"series": sunspots[:30]})])
    assert len(default["forecast"]) == 1


def test_lstm_mixed_horizons_batch_equals_one_by_one(lstm: Runtime[Any, Any], sunspots: list[float]) -> None:
    window = lstm.manifest["window"]
    requests = [TaskRequest(params={"series": sunspots[: window + 7 * i], "horizon": h})
                for i, h in enumerate([1, 5, 64, 2, 17])]
    batched = run_task(lstm, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(lstm, [request])
        assert len(together["forecast"]) == request.params["horizon"]
        np.testing.assert_allclose(alone["forecast"], together["forecast"], rtol=1e-4, atol=1e-3)


def test_lstm_v2_matches_task(lstm: Runtime[Any, Any], sunspots: list[float]) -> None:
    series = sunspots[100:160]
    (task,) = run_task(lstm, [TaskRequest(params={"series": series, "horizon": 9})])
    for tensor in (np.array([series], np.float32), np.array(series, np.float32)):
        out = run_v2(lstm, {"series": tensor}, {"horizon": 9})["forecast"]
        assert out.shape == (1, 9) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], task["forecast"], rtol=1e-4, atol=1e-3)
    rows = np.array([sunspots[i: i + 40] for i in (0, 50, 100)], np.float32)
    assert run_v2(lstm, {"series": rows}, {"horizon": 3})["forecast"].shape == (3, 3)
    assert run_v2(lstm, {"series": rows}, {})["forecast"].shape == (3, 1)


@pytest.mark.parametrize(("params", "field"), [
    ({"series": [1.0] * 23}, "series"),
    ({"series": [1.0] * 30 + [float("nan")]}, "series"),
    ({"series": [1.0] * 30 + [float("inf")]}, "series"),
    ({"series": [1.0] * 30 + [1e300]}, "series"),
    ({"series": [1.0] * 30 + ["x"]}, "series"),
    ({"series": [1.0] * 30 + [True]}, "series"),
    ({"series": "1,2,3"}, "series"),
    ({}, "series"),
    ({"series": [1.0] * 30, "horizon": 0}, "horizon"),
    ({"series": [1.0] * 30, "horizon": 65}, "horizon"),
    ({"series": [1.0] * 30, "horizon": "3"}, "horizon"),
    ({"series": [1.0] * 30, "horizon": 1.5}, "horizon"),
    ({"series": [1.0] * 30, "horizon": True}, "horizon"),
])
def test_lstm_bad_task_input(lstm: Runtime[Any, Any], params: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        lstm.preprocess(TaskRequest(params=params))
    assert info.value.field == field and field in info.value.message


@pytest.mark.parametrize(("tensors", "parameters", "field"), [
    ({"series": np.zeros((1, 10), np.float32)}, {}, "series"),
    ({"series": np.zeros((1, 30, 1), np.float32)}, {}, "series"),
    ({"series": np.zeros((0, 30), np.float32)}, {}, "series"),
    ({"series": np.array([[np.nan] * 30], np.float32)}, {}, "series"),
    ({"series": np.array([["a"] * 30], dtype=object)}, {}, "series"),
    ({}, {}, "series"),
    ({"series": np.zeros((1, 30), np.float32), "x": np.zeros(1)}, {}, "x"),
    ({"series": np.zeros((1, 30), np.float32)}, {"horizon": 0}, "parameters.horizon"),
    ({"series": np.zeros((1, 30), np.float32)}, {"horizon": 1000}, "parameters.horizon"),
])
def test_lstm_bad_v2_input(lstm: Runtime[Any, Any], tensors: dict[str, np.ndarray], parameters: dict[str, Any],
                           field: str) -> None:
    with pytest.raises(InputError) as info:
        lstm.v2_preprocess(tensors, parameters)
    assert info.value.field == field and field in info.value.message


# sentiment -----------------------------------------------------------------------------------------------------------

TEXTS = ["I love this, works wonders!", "terrible idea, I hate it", "self driving cars are the future",
         "My allergies are gone, thank you Claritin :)", "never again. worst service ever"]


def test_sentiment_task_contract(sentiment: Runtime[Any, Any]) -> None:
    single, many = run_task(sentiment, [TaskRequest(params={"texts": [TEXTS[0]], "single": True}),
                                        TaskRequest(params={"texts": TEXTS})])
    assert single["model"] == "sentiment" and single["version"] == sentiment.version
    assert single["label"] in ("positive", "negative") and 0.5 <= single["score"] <= 1.0
    assert "results" not in single and "label" not in many
    assert len(many["results"]) == len(TEXTS)
    assert all(r["label"] in ("positive", "negative") and 0.5 <= r["score"] <= 1.0 for r in many["results"])
    assert many["results"][0] == {"label": single["label"], "score": pytest.approx(single["score"], abs=1e-5)}


def test_sentiment_batch_equals_one_by_one(sentiment: Runtime[Any, Any]) -> None:
    requests = [TaskRequest(params={"texts": [t], "single": True}) for t in TEXTS]
    requests.append(TaskRequest(params={"texts": TEXTS[:2]}))
    batched = run_task(sentiment, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(sentiment, [request])
        for a, b in zip(alone.get("results", [alone]), together.get("results", [together]), strict=True):
            assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_sentiment_v2_matches_task(sentiment: Runtime[Any, Any]) -> None:
    (task,) = run_task(sentiment, [TaskRequest(params={"texts": TEXTS})])
    for tensor in (np.array([t.encode() for t in TEXTS], dtype=object),
                   np.array([[t.encode()] for t in TEXTS], dtype=object),
                   np.array(TEXTS, dtype=object)):
        out = run_v2(sentiment, {"text": tensor})
        assert out["label"].shape == (len(TEXTS),) and out["score"].dtype == np.float32
        assert [lab.decode() for lab in out["label"]] == [r["label"] for r in task["results"]]
        np.testing.assert_allclose(out["score"], [r["score"] for r in task["results"]], atol=1e-5)


@pytest.mark.parametrize(("params", "field"), [
    ({"texts": []}, "texts"),
    ({"texts": [""]}, "texts"),
    ({"texts": ["fine", "   "]}, "texts"),
    ({"texts": ["fine", 3]}, "texts"),
    ({"texts": None}, "texts"),
    ({}, "texts"),
    ({"texts": ["x"] * 1025}, "texts"),
    ({"texts": [""], "single": True}, "text"),
    ({"texts": ["a", "b"], "single": True}, "text"),
])
def test_sentiment_bad_task_input(sentiment: Runtime[Any, Any], params: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        sentiment.preprocess(TaskRequest(params=params))
    assert info.value.field == field and field in info.value.message


@pytest.mark.parametrize(("tensors", "field"), [
    ({"text": np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)}, "text"),
    ({"text": np.array([], dtype=object)}, "text"),
    ({"text": np.array([b"\xff\xfe"], dtype=object)}, "text"),
    ({"text": np.array([b""], dtype=object)}, "text"),
    ({"text": np.array([1.5], dtype=object)}, "text"),
    ({}, "text"),
    ({"text": np.array([b"ok"], dtype=object), "texts": np.array([b"ok"], dtype=object)}, "texts"),
])
def test_sentiment_bad_v2_input(sentiment: Runtime[Any, Any], tensors: dict[str, np.ndarray], field: str) -> None:
    with pytest.raises(InputError) as info:
        sentiment.v2_preprocess(tensors, {})
    assert info.value.field == field and field in info.value.message
