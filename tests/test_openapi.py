"""The API document as a user's tools read it: /openapi.json passes an OpenAPI 3.1 validator, every `$ref` resolves,
and openapi-core accepts real requests and real responses of every route against it, error answers included (each
family's own body). /docs loads Swagger UI from the gateway itself, never from a CDN."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import numpy as np
import orjson
import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from openapi_spec_validator import OpenAPIV31SpecValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

from inferline.client.tensors import encode_request
from tests.sdk_cluster import Deployment
from tests.zoo_cluster import TEXTS

pytestmark = pytest.mark.timeout(300)
JSON = "application/json"
SERIES = [5.0, 11, 16, 23, 36, 58, 29, 20, 10, 8, 3, 0, 0, 2, 11, 27, 47, 63, 60, 39, 28, 26, 22, 11]


@pytest.fixture(scope="module")
def document(deployment: Deployment) -> dict[str, Any]:
    response = httpx.get(deployment.url + "/openapi.json", timeout=30)
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


@pytest.fixture(scope="module")
def spec(document: dict[str, Any]) -> OpenAPI:
    return OpenAPI.from_dict(document)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} points nowhere (no {part!r})"
        node = node[part]
    return node


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    OpenAPIV31SpecValidator(document).validate()


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    found = list(refs(document))
    assert len(found) > 30
    for ref in found:
        resolve(document, ref)
    assert "$defs" not in orjson.dumps(document).decode()


def test_every_operation_documents_answer_errors_and_examples(document: dict[str, Any],
                                                              deployment: Deployment) -> None:
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    # every model that publishes a request type (all but the generation model) has its own predict operation
    assert {f"/v1/models/{name}/predict" for name in deployment.specs if name != "gpt2"} <= set(document["paths"])
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        ok = op["responses"]["200"].get("content", {})
        assert ok or path == "/health", where   # TGI's /health answers 200 with an empty body
        for spec in ok.values():
            assert "schema" in spec and spec["schema"], where
            assert "example" in spec, where
        if "requestBody" in op:
            assert op["requestBody"]["content"], where
        errors = {status: r for status, r in op["responses"].items() if status.startswith(("4", "5"))}
        for status, response in errors.items():
            schema = response["content"]["application/json"]["schema"]
            assert "HTTPValidationError" not in str(schema), f"{where} {status}: FastAPI's default error body"
    by_path = document["paths"]
    assert list(by_path["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(by_path["/generate_stream"]["post"]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert "text/event-stream" in by_path["/v1/completions"]["post"]["responses"]["200"]["content"]
    for path in ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):
        body = by_path[path]["post"]["requestBody"]["content"]
        assert {"application/json", "application/octet-stream"} <= set(body), path
    families = {"/forecast": "TaskError", "/v1/completions": "OpenAIError", "/v2/models/{model}/infer": "V2Error",
                "/v1/models/echo/predict": "OpenAIError"}
    for path, model in families.items():
        (op,) = by_path[path].values()
        assert op["responses"]["422"]["content"]["application/json"]["schema"] == \
            {"$ref": f"#/components/schemas/{model}"}, path


@dataclass
class WireRequest:
    """An httpx request as openapi-core reads one."""

    request: httpx.Request
    parameters: RequestParameters = field(init=False)

    def __post_init__(self) -> None:
        url = urlsplit(str(self.request.url))
        self.parameters = RequestParameters(query=ImmutableMultiDict(parse_qsl(url.query)),
                                            header=Headers(list(self.request.headers.items())))

    @property
    def host_url(self) -> str:
        url = urlsplit(str(self.request.url))
        return f"{url.scheme}://{url.netloc}"

    @property
    def path(self) -> str:
        return urlsplit(str(self.request.url)).path

    @property
    def full_url_pattern(self) -> str:
        return self.host_url + self.path

    @property
    def method(self) -> str:
        return self.request.method.lower()

    @property
    def body(self) -> bytes | None:
        return self.request.content or None

    @property
    def content_type(self) -> str:
        return self.request.headers.get("content-type", "application/json").lower()


@dataclass
class WireResponse:
    response: httpx.Response

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "").lower()

    @property
    def headers(self) -> Headers:
        return Headers(list(self.response.headers.items()))

    @property
    def data(self) -> bytes:
        return self.response.content


def exchange(spec: OpenAPI, client: httpx.Client, method: str, path: str, status: int, valid: bool = True,
             **kwargs: Any) -> httpx.Response:
    """Send one real request; openapi-core validates its real answer, which must have `status`, and the request
    itself: it passes when `valid`, and fails (the document says it is bad, as the gateway did) when not."""
    request = client.build_request(method, path, **kwargs)
    request.read()
    response = client.send(request)
    response.read()
    assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text[:300]}"
    if not valid:
        with pytest.raises(OpenAPIError):
            spec.validate_request(WireRequest(request))
    elif "multipart/form-data" not in request.headers.get("content-type", ""):
        spec.validate_request(WireRequest(request))
    spec.validate_response(WireRequest(request), WireResponse(response))
    return response


@pytest.fixture(scope="module")
def png() -> bytes:
    from sklearn.datasets import load_digits

    from inferline.zoo.cnn.imaging import digit_png

    return digit_png(load_digits().images[3])


def test_real_traffic_of_every_route_validates(spec: OpenAPI, deployment: Deployment, png: bytes) -> None:
    gen = {"inputs": "The module", "parameters": {"max_new_tokens": 4, "details": True}}
    x = np.array([[0.5, 1.5]], np.float32)
    binary, binary_headers = encode_request({"x": x}, None, None, True, "q-1")
    v2_json = {"id": "q-2", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}]}
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v2", "/v2/health/live", "/v2/health/ready",
                     "/v2/models/echo", "/v2/models/echo/versions/1", "/v2/models/echo/ready",
                     "/v2/models/echo/versions/1/ready"):
            exchange(spec, client, "GET", path, 200)
        exchange(spec, client, "POST", "/classify-image", 200, params={"top_k": 3}, content=png,
                 headers={"content-type": "image/png"})
        exchange(spec, client, "POST", "/classify-image", 200, json={"image": base64.b64encode(png).decode()})
        exchange(spec, client, "POST", "/classify-image", 200, files={"file": ("d.png", png, "image/png")})
        exchange(spec, client, "POST", "/forecast", 200, json={"series": SERIES, "horizon": 3})
        exchange(spec, client, "POST", "/sentiment", 200, json={"text": TEXTS[0]})
        exchange(spec, client, "POST", "/sentiment", 200, json={"texts": TEXTS})
        exchange(spec, client, "POST", "/classify-text", 200, json={"texts": TEXTS[:2]})
        exchange(spec, client, "POST", "/generate", 200, json=gen)
        streamed = exchange(spec, client, "POST", "/generate_stream", 200, json=gen)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        exchange(spec, client, "POST", "/", 200, json=gen)
        exchange(spec, client, "POST", "/", 200, json={**gen, "stream": True})
        exchange(spec, client, "POST", "/v1/completions", 200, json={"model": "gpt2", "prompt": "The", "max_tokens": 3})
        exchange(spec, client, "POST", "/v1/completions", 200,
                 json={"model": "gpt2", "prompt": "The", "max_tokens": 3, "stream": True})
        chat = {"model": "gpt2", "messages": [{"role": "user", "content": "The module"}], "max_tokens": 3}
        exchange(spec, client, "POST", "/v1/chat/completions", 200, json=chat)
        exchange(spec, client, "POST", "/v1/chat/completions", 200, json={**chat, "stream": True})
        exchange(spec, client, "GET", "/info", 200)
        exchange(spec, client, "GET", "/health", 200)
        exchange(spec, client, "POST", "/tokenize", 200, json={"inputs": "The module"})
        exchange(spec, client, "POST", "/v1/models/echo/predict", 200, json={"x": [1.0], "tag": "a"})
        exchange(spec, client, "POST", "/v2/models/echo/infer", 200, json=v2_json)
        exchange(spec, client, "POST", "/v2/models/echo/versions/1/infer", 200, json=v2_json)
        exchange(spec, client, "POST", "/v2/models/echo/infer", 200, content=binary, headers=binary_headers)
        # the management API (loopback, no key: allowed), but for load and unload, which would stop this deployment
        exchange(spec, client, "GET", "/admin/deployments", 200)
        exchange(spec, client, "POST", "/v2/repository/index", 200, json={"ready": True})
        exchange(spec, client, "GET", "/admin/models/echo/dead-letters", 200, params={"limit": 10})
        exchange(spec, client, "POST", "/admin/models/echo/dead-letters/replay", 200, json={"ids": ["0-1"]})
        exchange(spec, client, "POST", "/admin/models/echo/dead-letters/purge", 200, json={"ids": ["0-1"]})


def test_real_errors_of_each_family_validate(spec: OpenAPI, deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=60) as client:
        bad = exchange(spec, client, "POST", "/forecast", 422, valid=False,
                       content=orjson.dumps({"series": SERIES, "horizon": 0}), headers={"content-type": JSON})
        assert bad.json()["field"] == "horizon"
        exchange(spec, client, "POST", "/generate", 400, valid=False, content=b"{not json", headers={"content-type":
                                                                                          "application/json"})
        exchange(spec, client, "POST", "/sentiment", 422, valid=False, content=b'{"texts": []}',
                 headers={"content-type": "application/json"})
        exchange(spec, client, "POST", "/classify-image", 422, content=b"not an image",
                 headers={"content-type": "image/png"})
        exchange(spec, client, "POST", "/v1/completions", 404, json={"model": "nope", "prompt": "x"})
        exchange(spec, client, "POST", "/v1/chat/completions", 404, json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]})
        exchange(spec, client, "POST", "/v1/models/echo/predict", 422, json={"reject": True})
        missing = exchange(spec, client, "POST", "/v2/models/nope/infer", 404, json={"inputs": []})
        assert set(missing.json()) == {"error"}
        exchange(spec, client, "GET", "/v2/models/echo/versions/9", 404)
        exchange(spec, client, "GET", "/v2/models/nope", 404)


def test_docs_work_offline(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
        for asset in assets:
            got = client.get(asset)
            assert got.status_code == 200 and got.content, asset
        assert "/openapi.json" in page.text
