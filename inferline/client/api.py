"""Every route of the gateway, once: each method builds the request and says how its answer is read. `Client` and
`AsyncClient` (client.py) inherit these, so the sync and async clients share every line of it."""

from __future__ import annotations

import io
import mimetypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from pydantic import BaseModel

from inferline.client import tensors
from inferline.client.calls import Answer, Call, Request, StreamCall, endpoint, stream_endpoint
from inferline.client.types import (
    ChatCompletion,
    Completion,
    Forecast,
    Generation,
    Health,
    ImageClassification,
    InferResult,
    ModelList,
    ModelMetadata,
    Prediction,
    Result,
    StreamToken,
    TextClassification,
)

R = TypeVar("R", bound=Result)
# A path, the file's bytes, a PIL image, or a numpy array (H x W gray or H x W x 3/4; uint8, or floats in 0..1).
ImageInput = Any


def reader(result: type[R]) -> Any:
    """A parser: the answer's JSON body as `result`, with the request id."""
    def parse(answer: Answer) -> R:
        return with_id(result.model_validate_json(answer.body), answer.request_id)
    return parse


def with_id(result: R, request_id: str) -> R:
    result._request_id = request_id
    return result


def image_body(image: ImageInput) -> tuple[bytes, str]:
    """(bytes, content type) for any ImageInput."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        kind = mimetypes.guess_type(path.name)[0] or ""
        return path.read_bytes(), kind if kind.startswith("image/") else "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream"
    from PIL import Image  # Pillow: part of the core install, loaded only for images given as objects

    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            array = np.clip(np.asarray(array, dtype=np.float64) * (255.0 if array.max() <= 1.0 else 1.0), 0, 255)
            array = array.astype(np.uint8)
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), "image/png"


def texts_body(text: str | Sequence[str]) -> dict[str, Any]:
    return {"text": text} if isinstance(text, str) else {"texts": list(text)}


def read_labels(answer: Answer) -> TextClassification:
    """One text's answer {model, version, label, score} or many's {model, version, results}, as one type."""
    data = answer.json()
    if "results" not in data:
        data = {"model": data.pop("model"), "version": data.pop("version"), "results": [data]}
    return with_id(TextClassification.model_validate(data), answer.request_id)


def tgi_body(prompt: str, max_new_tokens: int, temperature: float | None, top_k: int | None, top_p: float | None,
             repetition_penalty: float | None, do_sample: bool, seed: int | None, stop: Sequence[str],
             details: bool) -> dict[str, Any]:
    parameters = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "repetition_penalty": repetition_penalty, "do_sample": do_sample, "seed": seed,
                  "stop": list(stop), "details": details}
    return {"inputs": prompt, "parameters": {k: v for k, v in parameters.items() if v is not None}}


def row_body(row: Mapping[str, Any] | BaseModel) -> Any:
    return row.model_dump(by_alias=True) if isinstance(row, BaseModel) else dict(row)


def read_infer(answer: Answer) -> InferResult:
    return with_id(InferResult.model_validate(tensors.decode_response(answer.body, answer.headers)),
                   answer.request_id)


def read_health(answer: Answer) -> Health:
    """/readyz's 200 or 503 as Health. A body that is not the gateway's (a proxy's 503) reads as not ready."""
    data = answer.json()
    data = data if isinstance(data, dict) else {}
    health = Health.model_validate({**data, "ready": bool(data.get("ready")), "missing": data.get("missing") or []})
    return with_id(health, answer.request_id)


def stream_token(data: Any, request_id: str) -> StreamToken:
    return with_id(StreamToken.model_validate(data), request_id)


def model_path(model: str, version: str | None = None) -> str:
    base = f"/v2/models/{quote(model, safe='')}"
    return base if version is None else f"{base}/versions/{quote(version, safe='')}"


class API:
    """The routes. Each returns a typed result (see inferline.client.types) or raises an APIError."""

    @endpoint
    def classify_image(self, image: ImageInput, top_k: int = 5) -> Call[ImageClassification]:
        """Classify an image (the `classify-image` deployment): labels by score. `image`: a path, the file's
        bytes, a PIL image, or a numpy array (gray or RGB; uint8, or floats in 0..1)."""
        body, content_type = image_body(image)
        return Call(Request("POST", "/classify-image", content=body, params={"top_k": str(top_k)},
                            headers={"content-type": content_type}), reader(ImageClassification))

    @endpoint
    def forecast(self, series: Sequence[float] | np.ndarray, horizon: int = 1) -> Call[Forecast]:
        """The next `horizon` values of `series` (the `forecast` deployment)."""
        values = np.asarray(series, dtype=np.float64).tolist()
        return Call(Request("POST", "/forecast", json={"series": values, "horizon": horizon}), reader(Forecast))

    @endpoint
    def sentiment(self, text: str | Sequence[str]) -> Call[TextClassification]:
        """Positive or negative for one text or a list of texts (the `sentiment` deployment): one label each."""
        return Call(Request("POST", "/sentiment", json=texts_body(text)), read_labels)

    @endpoint
    def classify_text(self, text: str | Sequence[str]) -> Call[TextClassification]:
        """Label one text or a list of texts (the `classify-text` deployment): one label each."""
        return Call(Request("POST", "/classify-text", json=texts_body(text)), read_labels)

    @endpoint
    def generate(self, prompt: str, max_new_tokens: int = 20, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 do_sample: bool = False, seed: int | None = None, stop: Sequence[str] = (),
                 details: bool = True) -> Call[Generation]:
        """Generate text (TGI /generate; the `generate` deployment). Greedy unless do_sample."""
        body = tgi_body(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed, stop,
                        details)
        return Call(Request("POST", "/generate", json=body), reader(Generation))

    @stream_endpoint
    def generate_stream(self, prompt: str, max_new_tokens: int = 20, *, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float | None = None, do_sample: bool = False, seed: int | None = None,
                        stop: Sequence[str] = ()) -> StreamCall[StreamToken]:
        """Generate text token by token (TGI /generate_stream): StreamTokens, the last with `generated_text` and
        `details`. An error after the first token raises where it happens."""
        body = tgi_body(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed, stop,
                        False)
        return StreamCall(Request("POST", "/generate_stream", json=body, headers={"accept": "text/event-stream"}),
                          stream_token)

    @endpoint
    def complete(self, prompt: str | Sequence[str], model: str, max_tokens: int = 16, *,
                 temperature: float | None = None, top_p: float | None = None, stop: str | Sequence[str] = (),
                 seed: int | None = None, echo: bool = False) -> Call[Completion]:
        """A completion in OpenAI's format (/v1/completions): one choice per prompt."""
        body = {"model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "echo": echo,
                "stop": stop if isinstance(stop, str) else (list(stop) or None)}
        return Call(Request("POST", "/v1/completions", json={k: v for k, v in body.items() if v is not None}),
                    reader(Completion))

    @endpoint
    def chat(self, messages: Sequence[Mapping[str, str]], model: str, max_tokens: int = 16, *,
             temperature: float | None = None, top_p: float | None = None, stop: str | Sequence[str] = (),
             seed: int | None = None) -> Call[ChatCompletion]:
        """A chat completion in OpenAI's format (/v1/chat/completions); messages: [{"role", "content"}, ...]."""
        body = {"model": model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed,
                "stop": stop if isinstance(stop, str) else (list(stop) or None)}
        return Call(Request("POST", "/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}),
                    reader(ChatCompletion))

    @endpoint
    def predict(self, model: str, row: Mapping[str, Any] | BaseModel) -> Call[Prediction]:
        """Run your own model on one request of its request type (/v1/models/{model}/predict). `row`: a dict or
        the model's pydantic request object (numpy arrays allowed). Prediction.parse(AnswerType) gives it typed."""
        return Call(Request("POST", f"/v1/models/{quote(model, safe='')}/predict", json=row_body(row)),
                    reader(Prediction))

    @endpoint
    def infer(self, model: str, inputs: Mapping[str, Any], *, parameters: Mapping[str, Any] | None = None,
              outputs: Sequence[str] | None = None, binary: bool = True, version: str | None = None
              ) -> Call[InferResult]:
        """Open Inference Protocol inference (/v2/models/{model}/infer): `inputs` name -> numpy array (or
        array-like); the result's `outputs` name -> numpy array. Binary tensors by default (binary=False: JSON)."""
        request = Request("POST", model_path(model, version) + "/infer")
        body, headers = tensors.encode_request(inputs, parameters, list(outputs) if outputs else None, binary,
                                               request.request_id)
        return Call(Request("POST", request.path, content=body, headers=headers, request_id=request.request_id),
                    read_infer)

    @endpoint
    def metadata(self, model: str, version: str | None = None) -> Call[ModelMetadata]:
        """A model's Open Inference Protocol metadata: versions, platform, input and output tensors."""
        return Call(Request("GET", model_path(model, version)), reader(ModelMetadata))

    @endpoint
    def models(self) -> Call[ModelList]:
        """The served models: version, task, live replicas, devices and queue depth of each (/v1/models)."""
        return Call(Request("GET", "/v1/models"), reader(ModelList))

    @endpoint
    def health(self) -> Call[Health]:
        """Whether the deployment is ready (/readyz) and, if not, what is missing. Not ready is an answer, not an
        error."""
        return Call(Request("GET", "/readyz"), read_health, results=frozenset({200, 503}))



