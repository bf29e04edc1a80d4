"""The typed results of every call (pydantic). Each answer's shape is the gateway's own wire model
(inferline.server.schemas.responses: the one the routes document and /openapi.json shows); a result here is that
model with the request id added, and a few conveniences (`Completion.text`, `ModelList["gpt2"]`). Top-level fields the
server adds later are kept (extra="allow") rather than refused, so an older client keeps working; nested objects are
the wire models themselves.

responses.py imports pydantic alone, so the client still needs only the core install (tests/test_layering.py)."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from inferline.server.schemas import responses as wire

M = TypeVar("M", bound=BaseModel)

# The nested shapes, by the names the client has always given them.
Label = wire.Label
Token = wire.Token
PrefillToken = wire.PrefillToken
GenerationDetails = wire.Details
StreamDetails = wire.StreamDetails
Usage = wire.Usage
CompletionChoice = wire.CompletionChoice
ChatMessage = wire.ChatMessage
ChatChoice = wire.ChatChoice
ModelCard = wire.ModelEntry       # one served model as /v1/models lists it
TensorMetadata = wire.V2TensorMeta


class Result(BaseModel):
    """Base of every result: `request_id` is the id the gateway answered under (x-request-id)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    _request_id: str = PrivateAttr(default="")

    @property
    def request_id(self) -> str:
        return self._request_id


class ImageClassification(Result, wire.ImageClassification):
    """/classify-image: labels sorted by score, best first."""


class Forecast(Result, wire.Forecast):
    """/forecast: `horizon` values."""


class TextClassification(Result, wire.TextLabels):
    """/sentiment and /classify-text: one Label per text sent, in order (`label` and `score` are the first's). One
    text's answer {model, version, label, score} is read into this shape too (api.read_labels)."""

    @property
    def label(self) -> str:
        return self.results[0].label

    @property
    def score(self) -> float:
        return self.results[0].score


class Generation(Result, wire.Generation):
    """/generate (TGI format)."""


class StreamToken(Result, wire.StreamEvent):
    """One event of /generate_stream. The last carries `generated_text` (the whole text) and `details`. A special
    token (end of sequence) is not part of the text: the texts of the others add up to generated_text."""


class Completion(Result, wire.Completion):
    """/v1/completions (OpenAI format)."""

    @property
    def text(self) -> str:
        return self.choices[0].text


class ChatCompletion(Result, wire.ChatCompletion):
    """/v1/chat/completions (OpenAI format)."""

    @property
    def content(self) -> str:
        return self.choices[0].message.content or ""


class Prediction(Result):
    """/v1/models/{name}/predict: the model's own answer (its fields are attributes too), with model and version.
    Not a wire model: each served model answers its own response type, documented per model at request time."""

    model: str
    version: str

    @property
    def output(self) -> dict[str, Any]:
        """The model's answer without model and version."""
        return dict(self.model_extra or {})

    def parse(self, answer_type: type[M]) -> M:
        """The answer as the model's own response type."""
        return answer_type.model_validate(self.output)


class InferResult(Result):
    """/v2/models/{name}/infer: the output tensors as numpy arrays, by name. The decoded view of
    wire.V2InferResponse (tensors.decode_response turns its list of JSON or binary tensors into arrays), so its
    `outputs` is not that model's."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, protected_namespaces=())
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModelList(Result, wire.ModelList):
    """/v1/models: iterate it for the ModelCards, or index it by model name."""

    def __iter__(self) -> Any:   # type: ignore[override]  # iterate the models, not pydantic's fields
        return iter(self.data)

    def __getitem__(self, name: str) -> ModelCard:
        for card in self.data:
            if card.id == name:
                return card
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [card.id for card in self.data]


class Health(Result, wire.Readiness):
    """/readyz: ready when Redis answers and every configured model has a live worker; `missing` says what not
    (always a list here: [] when nothing is)."""

    missing: list[str] = Field(default_factory=list)


class ModelMetadata(Result, wire.V2Metadata):
    """/v2/models/{name}: the Open Inference Protocol tensors a model takes and gives."""
