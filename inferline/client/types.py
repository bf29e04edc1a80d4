"""The typed results of every call (pydantic). Each mirrors the gateway's answer (../../README.md, "The API");
fields the server adds later are kept (extra="allow") rather than refused, so an older client keeps working."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

M = TypeVar("M", bound=BaseModel)


class Result(BaseModel):
    """Base of every result: `request_id` is the id the gateway answered under (x-request-id)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    _request_id: str = PrivateAttr(default="")

    @property
    def request_id(self) -> str:
        return self._request_id


class Label(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str
    score: float


class ImageClassification(Result):
    """/classify-image: labels sorted by score, best first."""

    model: str
    version: str
    predictions: list[Label]


class Forecast(Result):
    model: str
    version: str
    forecast: list[float]


class TextClassification(Result):
    """/sentiment and /classify-text: one Label per text sent, in order (`label` and `score` are the first's)."""

    model: str
    version: str
    results: list[Label]

    @property
    def label(self) -> str:
        return self.results[0].label

    @property
    def score(self) -> float:
        return self.results[0].score


class Token(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class GenerationDetails(BaseModel):
    model_config = ConfigDict(extra="allow")
    finish_reason: str                          # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None = None
    prefill: list[dict[str, Any]] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class Generation(Result):
    """/generate (TGI format)."""

    generated_text: str
    details: GenerationDetails | None = None


class StreamDetails(BaseModel):
    model_config = ConfigDict(extra="allow")
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class StreamToken(Result):
    """One event of /generate_stream. The last carries `generated_text` (the whole text) and `details`. A special
    token (end of sequence) is not part of the text: the texts of the others add up to generated_text."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    text: str
    finish_reason: str | None = None


class Completion(Result):
    """/v1/completions (OpenAI format)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(Result):
    """/v1/chat/completions (OpenAI format)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def content(self) -> str:
        return self.choices[0].message.content or ""


class Prediction(Result):
    """/v1/models/{name}/predict: the model's own answer (its fields are attributes too), with model and version."""

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
    """/v2/models/{name}/infer: the output tensors as numpy arrays, by name."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, protected_namespaces=())
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    """One served model as /v1/models lists it."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    id: str
    version: str | None = None
    task: str | None = None
    kind: str | None = None
    replicas: int = 0
    live_replicas: int = 0
    devices: list[str] = Field(default_factory=list)
    queue_depth: int = 0


class ModelList(Result):
    data: list[ModelCard]

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


class Health(Result):
    """/readyz: ready when Redis answers and every configured model has a live worker; `missing` says what not."""

    ready: bool
    missing: list[str] = Field(default_factory=list)


class ModelMetadata(Result):
    """/v2/models/{name}: the Open Inference Protocol tensors a model takes and gives."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str = ""
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[dict[str, Any]] = Field(default_factory=list)
