"""The Open Inference Protocol through its own client, `tritonclient.http`, unchanged, against the real gateway and
real workers (cnn and sentiment): metadata, readiness, JSON and binary input tensors, requested outputs, and
errors. Results equal the models' own predictions, computed in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import Cluster
from tests.zoo_cluster import TEXTS, Direct, direct, predict_v2

pytestmark = pytest.mark.timeout(240)

MODELS = ("cnn", "sentiment")


@pytest.fixture(scope="module")
def client(zoo: Cluster) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(zoo.url.removeprefix("http://"), network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def runtimes(quick_store: Path) -> dict[str, Direct]:
    return {name: direct(quick_store, name) for name in MODELS}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from sklearn.datasets import load_digits

    from inferline.zoo.cnn.imaging import ImageFormat, digit_image, image_to_array

    return np.stack([image_to_array(digit_image(s), ImageFormat()) for s in load_digits().images[:5]])


def test_server_and_model_metadata(client: triton.InferenceServerClient,
                                   runtimes: dict[str, Direct]) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "inferline" and "binary_tensor_data" in server["extensions"]
    for name in MODELS:
        runtime = runtimes[name]
        assert client.is_model_ready(name)
        assert client.is_model_ready(name, model_version=runtime.version)
        meta = client.get_model_metadata(name)
        assert meta["name"] == name and meta["versions"] == [runtime.version]
        assert meta["platform"] == runtime.platform
        assert meta["inputs"] == [t.to_json() for t in runtime.signature.inputs]
        assert meta["outputs"] == [t.to_json() for t in runtime.signature.outputs]
        assert client.get_model_metadata(name, model_version=runtime.version) == meta


@pytest.mark.parametrize("binary", [False, True], ids=["json-tensors", "binary-tensors"])
def test_cnn_infer(binary: bool, client: triton.InferenceServerClient, runtimes: dict[str, Direct],
                   images: np.ndarray) -> None:
    want = predict_v2(runtimes["cnn"], {"input": images})["probabilities"]
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    result = client.infer("cnn", [tensor], request_id="triton-1",
                          outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (len(images), 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["model_name"] == "cnn" and response["model_version"] == runtimes["cnn"].version
    assert response["id"] == "triton-1"
    # a flat [-1, 784] tensor is not the declared [-1, 28, 28, 1]: refused as Triton refuses it, never reshaped
    flat = images.reshape(len(images), -1)
    tensor = triton.InferInput("input", list(flat.shape), "FP32")
    tensor.set_data_from_numpy(flat, binary_data=binary)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("cnn", [tensor])
    assert "422" in str(refused.value.status()) and "[-1, 28, 28, 1]" in str(refused.value.message())


@pytest.mark.parametrize("binary", [False, True], ids=["json-tensors", "binary-tensors"])
def test_sentiment_infer_with_requested_outputs(binary: bool, client: triton.InferenceServerClient,
                                                runtimes: dict[str, Direct]) -> None:
    runtime = runtimes["sentiment"]
    texts = np.array([t.encode() for t in TEXTS], dtype=object)
    want = predict_v2(runtime, {"text": texts})
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(texts, binary_data=binary)

    both = client.infer("sentiment", [tensor], model_version=runtime.version)
    assert [x.decode() if isinstance(x, bytes) else x for x in both.as_numpy("label")] == \
        [x.decode() for x in want["label"]]
    np.testing.assert_allclose(both.as_numpy("score"), want["score"], rtol=1e-5, atol=1e-6)

    only_score = client.infer("sentiment", [tensor], outputs=[triton.InferRequestedOutput("score", binary_data=binary)])
    assert [o["name"] for o in only_score.get_response()["outputs"]] == ["score"]
    assert only_score.as_numpy("label") is None
    np.testing.assert_allclose(only_score.as_numpy("score"), want["score"], rtol=1e-5, atol=1e-6)


def test_errors_reach_the_client_as_messages(client: triton.InferenceServerClient, images: np.ndarray) -> None:
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException, match="nope"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="logits"):
        client.infer("cnn", [tensor], outputs=[triton.InferRequestedOutput("logits")])
    wrong = triton.InferInput("pixels", list(images.shape), "FP32")
    wrong.set_data_from_numpy(images)
    with pytest.raises(InferenceServerException, match="pixels"):
        client.infer("cnn", [wrong])
    with pytest.raises(InferenceServerException, match="version"):
        client.get_model_metadata("cnn", model_version="0")
    assert not client.is_model_ready("nope")
