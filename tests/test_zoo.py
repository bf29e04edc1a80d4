"""The classic model zoo end to end: quick builds of cnn, lstm and sentiment into a temporary store, each model
loaded the way a worker loads it (the dotted path in the manifest) and run through the worker's own codec, then its
task and v2 contracts.

Real models, no mocks. The builds are tiny (seconds each) but real: trained, evaluated, saved and reloaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from inferline.server.protocol import OP_PREDICT, OP_V2
from inferline.zoo import build
from inferline.zoo import store as model_store
from tests.zoo_cluster import Direct, direct, predict_v2, task_payload, v2_request

# The session fixture trains three models in its first test: allow for it on a busy 2-core machine.
pytestmark = pytest.mark.timeout(180)

ZOO = ("cnn", "lstm", "sentiment")
REQUIRED_FIELDS = {"name", "version", "runtime", "framework", "metrics", "quick"}


# Fixtures ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def zoo(quick_store: Path) -> dict[str, Path]:
    built = build.build_missing(quick_store, ZOO, quick=True)   # already built: the shared session store
    assert set(built) == set(ZOO)
    return built


@pytest.fixture(scope="session")
def cnn(zoo: dict[str, Path]) -> Direct:
    return direct(zoo["cnn"].parent.parent, "cnn")


@pytest.fixture(scope="session")
def lstm(zoo: dict[str, Path]) -> Direct:
    return direct(zoo["lstm"].parent.parent, "lstm")


@pytest.fixture(scope="session")
def sentiment(zoo: dict[str, Path]) -> Direct:
    return direct(zoo["sentiment"].parent.parent, "sentiment")


@pytest.fixture(scope="session")
def digits() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    yield data.images, data.target


@pytest.fixture(scope="session")
def sunspots() -> list[float]:
    from inferline.zoo.lstm.data import load_sunspots

    return [float(v) for v in load_sunspots().values]


@dataclass
class TaskRequest:
    """A task route's request as the worker receives it: small params and, for images, the file's bytes."""

    params: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""


def run_task(model: Direct, requests: list[TaskRequest]) -> list[dict[str, Any]]:
    """What the worker does for one batch of task requests."""
    replies = model.replies([(OP_PREDICT, task_payload(r.params, r.blob), r.blob) for r in requests])
    assert all(r.ok for r in replies), [r.body for r in replies]
    return [orjson.loads(r.body) for r in replies]


def run_v2(model: Direct, tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None
           ) -> dict[str, np.ndarray]:
    return predict_v2(model, tensors, parameters)


def task_error(model: Direct, request: TaskRequest) -> tuple[str, str, str]:
    """(error type, message, field) of a request the worker refuses."""
    (reply,) = model.replies([(OP_PREDICT, task_payload(request.params, request.blob), request.blob)])
    return error_of(reply.error_type, reply.body)


def v2_error(model: Direct, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> tuple[str, str, str]:
    (reply,) = model.replies([(OP_V2, {"header_length": None}, v2_request(tensors, parameters))])
    return error_of(reply.error_type, reply.body)


def error_of(error_type: str, body: bytes) -> tuple[str, str, str]:
    assert error_type in ("validation", "bad_request"), body
    data = orjson.loads(body)
    return error_type, data["error"], data.get("field", "")


# Build and manifests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ZOO)
def test_manifest_fields(zoo: dict[str, Path], name: str) -> None:
    manifest = model_store.read_manifest(zoo[name])
    assert REQUIRED_FIELDS <= set(manifest)
    assert manifest["name"] == name and manifest["version"] == zoo[name].name and manifest["quick"] is True
    assert manifest["framework"] in ("tensorflow", "pytorch")
    assert manifest["metrics"]["n_train"] > 0 and manifest["metrics"]["n_test"] > 0
    for file in manifest["files"].values():
        assert (zoo[name] / file).is_file()
    assert model_store.latest(zoo[name].parent.parent, name) == zoo[name]


def test_manifests_name_a_model_class_on_the_contract(zoo: dict[str, Path], cnn: Direct, lstm: Direct,
                                                       sentiment: Direct) -> None:
    for model in (cnn, lstm, sentiment):
        assert model.manifest["runtime"] == f"{type(model.model).__module__}:{type(model.model).__name__}"
        assert model.signature.request is not None and model.signature.inputs and model.signature.outputs


def test_quick_models_beat_their_baselines(zoo: dict[str, Path]) -> None:
    """Quick models are small, but still models: each does better than its trivial baseline."""
    cnn_m, lstm_m, sent_m = (model_store.read_manifest(zoo[n])["metrics"] for n in ZOO)
    assert cnn_m["accuracy"] > cnn_m["baseline_accuracy"] + 0.3
    assert lstm_m["mae"] < lstm_m["naive_mae"]
    assert sent_m["accuracy"] > sent_m["baseline_accuracy"]


def test_build_skips_complete_versions(zoo: dict[str, Path]) -> None:
    store = zoo["cnn"].parent.parent
    assert build.build_missing(store, ZOO, quick=True) == zoo
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
    from inferline.zoo.cnn.imaging import digit_png

    return TaskRequest(params=params, blob=digit_png(images[i]))


def test_cnn_task_contract(cnn: Direct, digits: tuple[np.ndarray, np.ndarray]) -> None:
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


def test_cnn_batch_equals_one_by_one(cnn: Direct, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    requests = [digit_request(images, i, top_k=10) for i in range(12)]
    batched = run_task(cnn, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(cnn, [request])
        assert [p["label"] for p in alone["predictions"]] == [p["label"] for p in together["predictions"]]
        np.testing.assert_allclose([p["score"] for p in alone["predictions"]],
                                   [p["score"] for p in together["predictions"]], atol=1e-5)


def test_cnn_v2_matches_task(cnn: Direct, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    request = digit_request(images, 7, top_k=10)
    (task,) = run_task(cnn, [request])
    task_probs = {p["label"]: p["score"] for p in task["predictions"]}
    pixels = cnn.model.decode(request.blob, {}).input[None]     # [1, 28, 28, 1], as decoded from the PNG
    for shaped in (pixels, pixels[0]):   # with its batch dimension, or one row without it
        probs = run_v2(cnn, {"input": shaped})["probabilities"]
        assert probs.shape == (1, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs[0], [task_probs[str(d)] for d in range(10)], atol=1e-5)
    for reshaped in (pixels.reshape(1, 784), pixels.reshape(1, 28, 28), pixels.reshape(1, 56, 14, 1)):
        kind, message, field = v2_error(cnn, {"input": reshaped}, {})   # never silently reshaped
        assert (kind, field) == ("validation", "input") and "[-1, 28, 28, 1]" in message, message
    rows = np.stack([cnn.model.decode(digit_request(images, i).blob, {}).input for i in range(3)])
    assert run_v2(cnn, {"input": rows})["probabilities"].shape == (3, 10)


def test_cnn_inverts_light_backgrounds(cnn: Direct, digits: tuple[np.ndarray, np.ndarray]) -> None:
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
    ({}, b"not an image", "file"),
    ({}, "PNG-TRUNCATED", "file"),
    ({"top_k": 0}, None, "top_k"),
    ({"top_k": 11}, None, "top_k"),
    ({"top_k": True}, None, "top_k"),
    ({"top_k": 2.5}, None, "top_k"),
])
def test_cnn_bad_task_input(cnn: Direct, digits: tuple[np.ndarray, np.ndarray], params: dict[str, Any],
                            blob: bytes | str | None, field: str) -> None:
    good = digit_request(digits[0], 0).blob
    data = good if blob is None else good[: len(good) // 2] if blob == "PNG-TRUNCATED" else blob
    assert isinstance(data, bytes) and data
    _, message, named = task_error(cnn, TaskRequest(params=params, blob=data)) if data else ("", "", "")
    assert named == field and field in message


def test_cnn_empty_upload_is_refused(cnn: Direct) -> None:
    (reply,) = cnn.replies([(OP_PREDICT, {"row": {}}, b"")])
    _, message, named = error_of(reply.error_type, reply.body)
    assert named == "input" and "required" in message


@pytest.mark.parametrize(("tensors", "field"), [
    ({"input": np.zeros((1, 27, 28, 1), np.float32)}, "input"),
    ({"input": np.zeros((784,), np.float32)}, "input"),
    ({"input": np.zeros((0, 784), np.float32)}, "input"),
    ({"input": np.full((1, 28, 28, 1), np.nan, np.float32)}, "input"),
    ({"input": np.full((2, 28, 28, 1), np.inf, np.float32)}, "input"),
    ({}, "inputs"),
    ({"input": np.array([[b"a"] * 784], dtype=object)}, "input"),
    ({"input": np.zeros((1, 784), np.int32)}, "input"),
    ({"input": np.zeros((1, 784), np.float64)}, "input"),
    ({"top_k": np.ones(1, np.int64)}, "input"),
    ({"input": np.zeros((1, 28, 28, 1), np.float32), "image": np.zeros((1, 784), np.float32)}, "image"),
])
def test_cnn_bad_v2_input(cnn: Direct, tensors: dict[str, np.ndarray], field: str) -> None:
    _, message, named = v2_error(cnn, tensors, {})
    assert named.split(".")[0] == field and field in message


def test_v2_datatype_other_than_declared_is_refused_naming_both(cnn: Direct) -> None:
    """As Triton does: INT32 data for an FP32 tensor is a 400 naming the tensor and both datatypes, never a cast."""
    error_type, message, named = v2_error(cnn, {"input": np.zeros((1, 784), np.int32)}, {})
    assert error_type == "bad_request" and named == "input" and "INT32" in message and "FP32" in message


# lstm ----------------------------------------------------------------------------------------------------------------

def test_lstm_task_contract(lstm: Direct, sunspots: list[float]) -> None:
    (body,) = run_task(lstm, [TaskRequest(params={"series": sunspots[:250], "horizon": 11})])
    assert body["model"] == "lstm" and body["version"] == lstm.version
    assert len(body["forecast"]) == 11 and all(isinstance(v, float) and math.isfinite(v) for v in body["forecast"])
    # Original units: sunspot numbers, not z-scores.
    assert -50 < min(body["forecast"]) and max(body["forecast"]) < 300 and np.ptp(body["forecast"]) > 5
    (default,) = run_task(lstm, [TaskRequest(params={"series": sunspots[:30]})])
    assert len(default["forecast"]) == 1


def test_lstm_mixed_horizons_batch_equals_one_by_one(lstm: Direct, sunspots: list[float]) -> None:
    window = lstm.manifest["window"]
    requests = [TaskRequest(params={"series": sunspots[: window + 7 * i], "horizon": h})
                for i, h in enumerate([1, 5, 64, 2, 17])]
    batched = run_task(lstm, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(lstm, [request])
        assert len(together["forecast"]) == request.params["horizon"]
        np.testing.assert_allclose(alone["forecast"], together["forecast"], rtol=1e-4, atol=1e-3)


def test_lstm_v2_matches_task(lstm: Direct, sunspots: list[float]) -> None:
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
def test_lstm_bad_task_input(lstm: Direct, params: dict[str, Any], field: str) -> None:
    _, message, named = task_error(lstm, TaskRequest(params=params))
    assert named.split(".")[0] == field and field in message


@pytest.mark.parametrize(("tensors", "parameters", "field"), [
    ({"series": np.zeros((1, 10), np.float32)}, {}, "series"),
    ({"series": np.zeros((1, 30, 1), np.float32)}, {}, "series"),
    ({"series": np.zeros((0, 30), np.float32)}, {}, "series"),
    ({"series": np.array([[np.nan] * 30], np.float32)}, {}, "series"),
    ({"series": np.array([[b"a"] * 30], dtype=object)}, {}, "series"),
    ({}, {}, "inputs"),
    ({"series": np.zeros((1, 30), np.float32), "x": np.zeros(1)}, {}, "x"),
    ({"series": np.zeros((1, 30), np.float32)}, {"horizon": 0}, "parameters.horizon"),
    ({"series": np.zeros((1, 30), np.float32)}, {"horizon": 1000}, "horizon"),   # the model's own bound
])
def test_lstm_bad_v2_input(lstm: Direct, tensors: dict[str, np.ndarray], parameters: dict[str, Any],
                           field: str) -> None:
    _, message, named = v2_error(lstm, tensors, parameters)
    assert named.split(".")[0] == field.split(".")[0] and named.startswith(field) and field in message


# sentiment -----------------------------------------------------------------------------------------------------------

TEXTS = ["I love this, works wonders!", "terrible idea, I hate it", "self driving cars are the future",
         "My allergies are gone, thank you Claritin :)", "never again. worst service ever"]


def test_sentiment_task_contract(sentiment: Direct) -> None:
    single, many = run_task(sentiment, [TaskRequest(params={"texts": [TEXTS[0]], "single": True}),
                                        TaskRequest(params={"texts": TEXTS})])
    assert single["model"] == "sentiment" and single["version"] == sentiment.version
    assert single["label"] in ("positive", "negative") and 0.5 <= single["score"] <= 1.0
    assert "results" not in single and "label" not in many
    assert len(many["results"]) == len(TEXTS)
    assert all(r["label"] in ("positive", "negative") and 0.5 <= r["score"] <= 1.0 for r in many["results"])
    assert many["results"][0] == {"label": single["label"], "score": pytest.approx(single["score"], abs=1e-5)}


def test_sentiment_batch_equals_one_by_one(sentiment: Direct) -> None:
    requests = [TaskRequest(params={"texts": [t], "single": True}) for t in TEXTS]
    requests.append(TaskRequest(params={"texts": TEXTS[:2]}))
    batched = run_task(sentiment, requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = run_task(sentiment, [request])
        for a, b in zip(alone.get("results", [alone]), together.get("results", [together]), strict=True):
            assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_sentiment_v2_matches_task(sentiment: Direct) -> None:
    (task,) = run_task(sentiment, [TaskRequest(params={"texts": TEXTS})])
    for tensor in (np.array([t.encode() for t in TEXTS], dtype=object),
                   np.array([[t.encode()] for t in TEXTS], dtype=object),
                   np.array(TEXTS, dtype=object)):
        out = run_v2(sentiment, {"text": tensor})
        assert out["label"].shape == (len(TEXTS),) and out["score"].dtype == np.float32
        assert [lab.decode() for lab in out["label"]] == [r["label"] for r in task["results"]]
        np.testing.assert_allclose(out["score"], [r["score"] for r in task["results"]], atol=1e-5)


@pytest.mark.parametrize(("payload", "field"), [
    ({"rows": []}, "rows"),
    ({"rows": [{"text": ""}]}, "rows[0].text"),
    ({"rows": [{"text": "fine"}, {"text": "   "}]}, "rows[1].text"),
    ({"rows": [{"text": "fine"}, {"text": 3}]}, "rows[1].text"),
    ({"rows": None}, "rows"),
    ({"row": {}}, "text"),
    ({"row": {"text": ""}}, "text"),
    ({"row": {"text": "x" * 100_001}}, "text"),
])
def test_sentiment_bad_task_input(sentiment: Direct, payload: dict[str, Any], field: str) -> None:
    (reply,) = sentiment.replies([(OP_PREDICT, payload, b"")])
    _, message, named = error_of(reply.error_type, reply.body)
    assert named == field and field in message


@pytest.mark.parametrize(("tensors", "field"), [
    ({"text": np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)}, "text"),
    ({"text": np.array([], dtype=object)}, "text"),
    ({"text": np.array([b""], dtype=object)}, "text"),
    ({}, "inputs"),
    ({"text": np.array([b"ok"], dtype=object), "texts": np.array([b"ok"], dtype=object)}, "texts"),
])
def test_sentiment_bad_v2_input(sentiment: Direct, tensors: dict[str, np.ndarray], field: str) -> None:
    _, message, named = v2_error(sentiment, tensors, {})
    assert named == field and field in message
