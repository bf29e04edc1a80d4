"""Wire models of what the gateway answers: each route's 200 body and each protocol family's error body. One spelling
per answer: the routes build their answers as these models (gateway/routes/common.py: `build`, `encode`), the API
document (/openapi.json) shows them, and the SDK's result types (inferline/client/types.py) derive from them.

A field a route leaves unset is not sent (encode serialises with exclude_unset): where the wire has a key only
sometimes (`details.top_tokens`, a chunk's `usage`, a chat delta's `role`), the model declares it with a default and
the route sets it when it is sent. Pydantic only (the SDK imports this module with the core install)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class Label(BaseModel):
    label: str
    score: float


class ImageClassification(BaseModel):
    model: str
    version: str
    predictions: list[Label] = Field(description="sorted by score, best first; top_k of them")


class Forecast(BaseModel):
    model: str
    version: str
    forecast: list[float] = Field(description="`horizon` values")


class TextLabel(BaseModel):
    """One text sent as {"text"}: its label beside model and version."""

    model: str
    version: str
    label: str
    score: float


class TextLabels(BaseModel):
    """A list sent as {"texts"}: one label per text, in order."""

    model: str
    version: str
    results: list[Label]


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = Field(None, description="only with parameters.top_n_tokens: per "
                                                  "generated token, its most likely alternatives, best first")


class Generation(BaseModel):
    """/generate: `details` only when parameters.details is true."""

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None


class StreamEvent(BaseModel):
    """One `data:` event of /generate_stream; the last carries generated_text and details. No [DONE] line."""

    index: int
    token: Token
    top_tokens: list[Token] | None = Field(None, description="with parameters.top_n_tokens: this token's most "
                                           "likely alternatives, best first; else null")
    generated_text: str | None = None
    details: StreamDetails | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """/v1/completions; streamed, each `data:` chunk has this shape (usage only in the last, when asked) and the
    stream ends with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class RolloutWindow(BaseModel):
    requests: int
    seconds: float
    max_failure_rate: float
    closed: bool = Field(description="the window ended within the threshold: the guard is off")


class RolloutState(BaseModel):
    """A model's current or last rollout. States: starting (the new version's workers start; no traffic to it),
    canary, rolling (all traffic to it; its window open), draining (old workers finish and exit), done;
    rolling_back, rolled_back (`reason` says why; `automatic_rollback` when it rolled back by itself)."""

    model: str
    state: str
    from_version: str
    to_version: str
    canary_percent: int
    weights: dict[str, int] = Field(description="percent of the requests each version gets now")
    live_replicas: dict[str, int]
    requests: dict[str, int] = Field(description="answers per version since the rollout began")
    failures: dict[str, int] = Field(description="5xx-type failures and dead letters per version")
    dead_lettered: dict[str, int]
    window: RolloutWindow
    automatic_rollback: bool
    retired_version_may_stop: bool = Field(description="draining or rolling back: the version leaving gets no more "
                                           "requests and its lane is answered; its workers may stop now (under "
                                           "Kubernetes: scale its Deployment to 0)")
    reason: str | None
    started_ms: int
    finished_ms: int | None


class ScaleAnswer(BaseModel):
    model: str
    version: str
    replicas: int
    live_replicas: int


class VersionEntry(BaseModel):
    """One version of a deployment in /v1/models."""

    version: str
    replicas: int = Field(description="workers wanted of it (the supervisor's target)")
    live_replicas: int
    weight: int = Field(description="percent of the requests it gets now")
    live: bool


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str | None
    live_replicas: int
    replicas: int
    devices: list[str]
    queue_depth: int
    kind: str | None
    task: str | None
    versions: list[VersionEntry] = Field(default_factory=list, description="each version running or wanted, live "
                                         "or not, with its replicas and share of the traffic")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class Healthz(BaseModel):
    status: Literal["ok"]


class ModelReadiness(BaseModel):
    """One model in /readyz: servable when a worker beats and its consumer group exists."""

    ready: bool
    live_workers: int
    reason: str | None = None


class Readiness(BaseModel):
    """/readyz: 200 when Redis answers and some model is servable, else 503 naming what is missing (`error`). Each
    model's state is in `models`: one without a live worker answers 503 on its own routes without making the
    gateway unready."""

    ready: bool
    redis: str | None = None     # "ok" | "unreachable: <error>"
    models: dict[str, ModelReadiness] | None = None
    error: str | None = None
    error_type: str | None = None
    missing: list[str] | None = None


class V2Server(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2Metadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent with binary_data_size")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """The JSON part of an infer request (with the binary-data extension, the JSON header of
    Inference-Header-Content-Length bytes, then the tensors' bytes)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class TaskError(BaseModel):
    """The error body of the TGI-style and task routes."""

    error: str = Field(description="what went wrong, naming the field, its bound and the value given")
    error_type: str = Field(description="validation | not_found | auth | forbidden | rate_limited | overloaded | "
                                        "unavailable | timeout | dead_letter | generation | internal")
    request_id: str
    field: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The error body of the OpenAI routes (/v1/...)."""

    error: OpenAIErrorDetail


class V2Error(BaseModel):
    """The error body of the Open Inference Protocol routes (/v2/...)."""

    error: str


class StreamError(BaseModel):
    """An error after a stream started: an event of its own (TGI routes)."""

    error: str
    error_type: str


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    """/v1/chat/completions; streamed, `chat.completion.chunk` objects (ChatChunk) ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    """What one chunk adds to its choice's message: the role (first chunk), then content; {} for a token that adds
    no text (an end-of-sequence token)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatChunk(BaseModel):
    """One `data:` chunk of a streamed chat completion. With stream_options.include_usage every chunk has `usage`,
    null but in the last (whose `choices` is []); without it, no chunk has it."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TGIInfo(BaseModel):
    """TGI's /info: the generate deployment's model and limits."""

    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    model_sha: str | None = None
    model_version: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = Field(None, description="the live workers' device types, comma-separated")
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int | None = Field(None, description="the deployment's queue_cap: past it, requests "
                                                "are refused as overloaded")
    max_best_of: int | None = None
    max_stop_sequences: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_client_batch_size: int | None = None
    router: str | None = None
    version: str
    sha: str | None = None
    docker_label: str | None = None


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int
    stop: int
