"""The public model contract served end to end: the README's own example through `inferline serve`, the transformer
zoo model on its task route and v2, and a transformers causal LM built here (no hub) streaming through the TGI route.
Real processes, a real Redis, the real clients."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from inferline.server.broker import embedded
from tests.conftest import ROOT, Cluster, child_env
from tests.served import cli_process, wait_ready
from tests.zoo_cluster import Direct, direct, predict_v2

pytestmark = pytest.mark.timeout(240)


def readme_example() -> str:
    """The python block under the README's readme-example marker, verbatim."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its example"
    return match.group(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`inferline serve digits.py:TinyCNN` in a fresh directory: its own private Redis, gateway and worker. Beside the
    model file lies a package of the user's own named `models` (as in a Django app or most ML repositories): inferline
    installs nothing at top level but `inferline`, so it never imports that package (which refuses to load)."""
    where = tmp_path_factory.mktemp("serve")
    (where / "digits.py").write_text(readme_example())
    (where / "models").mkdir()
    (where / "models" / "__init__.py").write_text('raise ImportError("inferline imported the user\'s own models")\n')
    port = embedded.free_port()
    log = where / "serve.log"
    with cli_process(["serve", "digits.py:TinyCNN", "--port", str(port)], where, child_env(PYTHONPATH=str(ROOT)),
                     log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, log, [url])
        yield url


def tiny_cnn() -> Any:
    """The README's model, loaded in this process to compute what the server must answer."""
    namespace: dict[str, Any] = {"__name__": "readme_digits"}
    exec(compile(readme_example(), "digits.py", "exec", dont_inherit=True), namespace)   # our own README
    model = namespace["TinyCNN"]()
    model.setup("cpu")
    return model, namespace["Digit"]


def test_the_readme_example_serves_on_its_generic_route_and_v2(served: str) -> None:
    model, digit = tiny_cnn()
    images = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    want = model.predict([digit(pixels=x) for x in images])
    for image, guess in zip(images, want, strict=True):
        got = httpx.post(served + "/v1/models/tinycnn/predict", json={"pixels": image.tolist()}, timeout=30)
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["model"] == "tinycnn" and body["version"] == "1" and body["label"] == guess.label
        assert body["score"] == pytest.approx(guess.score, rel=1e-5)

    client = triton.InferenceServerClient(served.removeprefix("http://"))
    meta = client.get_model_metadata("tinycnn")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 28, 28]}]
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                               {"name": "score", "datatype": "FP32", "shape": [-1]}]
    for binary in (False, True):
        tensor = triton.InferInput("pixels", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        result = client.infer("tinycnn", [tensor])
        assert result.as_numpy("label").tolist() == [g.label for g in want]
        np.testing.assert_allclose(result.as_numpy("score"), [g.score for g in want], rtol=1e-5)
    client.close()


def test_the_readme_example_documents_and_validates_its_own_fields(served: str) -> None:
    spec = httpx.get(served + "/openapi.json", timeout=10).json()
    operation = spec["paths"]["/v1/models/tinycnn/predict"]["post"]
    request = operation["requestBody"]["content"]["application/json"]["schema"]
    assert request["required"] == ["pixels"] and request["properties"]["pixels"]["type"] == "array"
    answer = json.dumps(operation["responses"]["200"])
    assert '"label"' in answer and '"score"' in answer

    # /v1/... routes answer errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
    bad = httpx.post(served + "/v1/models/tinycnn/predict", json={"pixels": [[1.0] * 27] * 28}, timeout=10)
    error = bad.json()["error"]
    assert bad.status_code == 422 and error["param"] == "pixels" and "28" in error["message"]
    missing = httpx.post(served + "/v1/models/tinycnn/predict", json={"pixel": []}, timeout=10)
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "pixels"


def test_a_v2_datatype_other_than_declared_is_refused_naming_tensor_and_both(served: str) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "INT32", "data": [0] * 784}]}
    refused = httpx.post(served + "/v2/models/tinycnn/infer", json=body, timeout=10)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]
    assert "pixels" in message and "INT32" in message and "FP32" in message


def test_a_tensor_only_row_checked_per_column_still_names_a_bad_row(served: str) -> None:
    """TinyCNN's row holds only a Tensor: a v2 request's rows are checked per column, not validated one by one. A
    non-finite value anywhere in the batch still fails that request with the per-row validation's 422."""
    model, digit = tiny_cnn()
    images = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    client = triton.InferenceServerClient(served.removeprefix("http://"))
    tensor = triton.InferInput("pixels", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    got = client.infer("tinycnn", [tensor])
    assert got.as_numpy("label").tolist() == [g.label for g in model.predict([digit(pixels=x) for x in images])]
    images[2, 5, 7] = np.inf
    tensor.set_data_from_numpy(images, binary_data=True)
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("tinycnn", [tensor])
    client.close()
    assert refused.value.status() == "422" and "finite" in str(refused.value.message()), refused.value
    assert "pixels" in str(refused.value.message())


# The transformer zoo model, written only against the contract -------------------------------------------------------

def test_transformer_on_its_task_route_and_v2(deployment: Cluster, quick_store: Path) -> None:
    """On the shared SDK deployment (tests/conftest.py), which serves it as start_zoo does."""
    model: Direct = direct(quick_store, "transformer")
    metrics = model.manifest["metrics"]
    assert metrics["accuracy"] > metrics["majority_baseline"]
    texts = ["I love this, what a wonderful day", "worst service ever, never again", "thanks so much"]
    with httpx.Client(base_url=deployment.url, timeout=30) as http:
        one = http.post("/classify-text", json={"text": texts[0]}).json()
        (want,) = model.model.predict([model.signature.request(text=texts[0])])   # type: ignore[misc]
        assert one == {"model": "transformer", "version": model.version, "label": want.label,
                       "score": pytest.approx(want.score, rel=1e-5)}
        many = http.post("/classify-text", json={"texts": texts}).json()
        assert [r["label"] for r in many["results"]] == [w.label for w in model.model.predict(
            [model.signature.request(text=t) for t in texts])]   # type: ignore[misc]
        v2 = http.post("/v2/models/transformer/infer", json={"inputs": [
            {"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}).json()
        outputs = {o["name"]: o["data"] for o in v2["outputs"]}
        local = predict_v2(model, {"text": np.array([t.encode() for t in texts], dtype=object)})
        assert outputs["label"] == [x.decode() for x in local["label"]]
        np.testing.assert_allclose(outputs["score"], local["score"], rtol=1e-5)
        blank = http.post("/classify-text", json={"text": ""})
        assert blank.status_code == 422 and blank.json()["field"] == "text"


# A transformers causal LM built here, served through the generative contract ----------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(quick_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with random weights and the demo tokenizer, saved like any checkpoint: no hub involved."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from inferline.server.store import resolve

    tokenizer = AutoTokenizer.from_pretrained(str(resolve(quick_gpt2 / "gpt2")))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_causal_lm_built_here_streams_through_the_tgi_route(cluster: Cluster, tiny_llama: Path) -> None:
    cluster.spec("llama", model="inferline:CausalLM", task="generate", options={"source": str(tiny_llama)},
                 max_batch_size=4, timeout_s=60)
    url = cluster.start_gateway()
    cluster.start_worker("llama")
    body = {"inputs": "The function returns", "parameters": {"max_new_tokens": 12, "details": True}}
    whole = httpx.post(url + "/generate", json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    events = []
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events and events[-1]["details"]["generated_tokens"] == len(events)
    streamed = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert streamed == events[-1]["generated_text"] == whole.json()["generated_text"]
    meta = httpx.get(url + "/v2/models/llama", timeout=10).json()
    assert meta["platform"] == "pytorch_transformers"
