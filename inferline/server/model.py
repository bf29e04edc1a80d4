"""The public model contract: what a user writes to serve a model (`from inferline import Model`).

    class Digits(Model):
        max_batch_size = 32                                   # defaults; a deployment may override them
        def setup(self, device: str) -> None: ...             # load weights once per worker process
        def predict(self, batch: list[Row]) -> list[Answer]:  # once per batch, one output per input, in order

The request and response types come from `predict`'s hints (pydantic models; without hints a row is a plain dict).
From them the worker validates each row (a bad row fails alone, with a 422 naming the field), the gateway's /docs
shows the model's own schemas (the worker publishes them), and the Open Inference Protocol tensors are derived
(server/tensors.py). Optional hooks: `decode` turns raw bytes (an uploaded image) into one row. Language models
subclass `LanguageModel` instead: the continuous-batching engine drives their `model` and `tokenizer`.

Importing this module loads no model framework: the gateway and the CLI import it too.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from inferline.server.errors import InputError
from inferline.server.tensors import TensorSpec, field_tensor

__all__ = ["DEFAULT_CHAT_TEMPLATE", "CausalLM", "InputError", "LanguageModel", "Model", "Signature", "render_chat",
           "signature"]

log = logging.getLogger(__name__)


class Model:
    """One model in one worker process. Subclass it and implement `setup` and `predict`.

    Before `setup` runs, the worker sets `artifact` (the deployment's version directory, or None), `manifest`
    (that directory's manifest.json, or {}), `version` (the manifest's, else "1"), `options` (the deployment's
    free-form options) and `threads` (intra-op threads the model should use)."""

    max_batch_size: ClassVar[int] = 8
    max_batch_delay_ms: ClassVar[float] = 5.0
    platform: ClassVar[str] = "python"     # v2 metadata; e.g. "pytorch", "tensorflow_keras"
    kind: ClassVar[str] = "batch"          # "batch": dynamic batching; "generation": LanguageModel

    def __init__(self) -> None:
        self.artifact: Path | None = None
        self.manifest: dict[str, Any] = {}
        self.version = "1"
        self.options: dict[str, Any] = {}
        self.threads = 1

    def setup(self, device: str) -> None:
        """Load weights onto `device` ("cpu", "cuda:0", ...). Called once, before any predict."""

    def predict(self, batch: list[Any]) -> list[Any]:
        """Run the model once for the whole batch of validated rows. Return exactly one output per row, in order:
        instances of the response type, or dicts it validates. Raise InputError for a row the model cannot take
        (the batch is then retried row by row, so only that request fails)."""
        raise NotImplementedError(f"{type(self).__name__}.predict")

    def decode(self, data: bytes, options: dict[str, Any]) -> Any:
        """Raw request bytes (an uploaded file) and the request's small options -> one row of the request type.
        Raise InputError for bytes the model cannot read."""
        raise InputError(f"{type(self).__name__} takes JSON rows, not raw bytes", field="body")


# For models whose tokenizer has no chat template (the demo gpt2, any base model): one "role: content" line per
# message, then "assistant:" where the answer starts. Plain text, no special tokens, so any tokenizer can take it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def render_chat(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    """Chat messages ([{"role", "content"}]) as one prompt text that ends where the assistant's answer starts.
    `template` (Jinja, transformers' chat-template conventions) wins; else the tokenizer's own; else
    DEFAULT_CHAT_TEMPLATE. Raises InputError(field="messages") when the template refuses the messages (many raise on
    roles that do not alternate)."""
    from jinja2 import TemplateError

    if template is None and not getattr(tokenizer, "chat_template", None):
        template = DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except TemplateError as exc:
        raise InputError(f"`messages` cannot be rendered with this model's chat template: {exc}", "messages") from None
    return str(text)


class LanguageModel(Model):
    """The generative contract: `setup(device)` sets `self.model` (a transformers causal LM, in eval mode on the
    device) and `self.tokenizer`; the continuous-batching engine (server/generation) runs them.

    Chat (/v1/chat/completions) renders messages with, in this order: the deployment's `options.chat_template`, the
    class's `chat_template`, the tokenizer's own template, DEFAULT_CHAT_TEMPLATE (see render_chat). Override
    `render_chat` for anything a Jinja template cannot say."""

    kind: ClassVar[str] = "generation"
    platform: ClassVar[str] = "pytorch_transformers"
    max_batch_size: ClassVar[int] = 32
    chat_template: ClassVar[str | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.model: Any = None
        self.tokenizer: Any = None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat `messages`; raises InputError(field="messages") for messages it cannot take."""
        template = self.options.get("chat_template") or type(self).chat_template
        return render_chat(self.tokenizer, messages, str(template) if template else None)


class CausalLM(LanguageModel):
    """Any checkpoint that transformers' AutoModelForCausalLM loads: `options.source` (a hub id or a save_pretrained
    directory), else the deployment's artifact directory. Where no hub is reachable set HF_HUB_OFFLINE=1, or
    from_pretrained spends ~46 s retrying before it fails."""

    def setup(self, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self.options.get("source") or self.artifact
        if source is None:
            raise ValueError(f"{type(self).__name__} needs options.source (a hub id or directory) or an artifact")
        torch.set_num_threads(self.threads)   # at all cores a worker collapses when another process is busy
        kwargs: dict[str, Any] = {}
        if self.options.get("dtype"):         # opt-in: GPT-2's fp16 activations can overflow
            kwargs["dtype"] = getattr(torch, str(self.options["dtype"]))
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(str(source))
        model.to(device)  # type: ignore[arg-type]
        model.eval()
        model.requires_grad_(False)
        self.model = model
        if not self.manifest:
            self.version = str(self.options.get("version") or source)
        log.info("loaded causal LM source=%s class=%s device=%s params=%d", source, type(model).__name__, device,
                 sum(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class Signature:
    """What a Model class declares through its hints: request and response types, their JSON schemas and the v2
    tensors derived from them (empty when a type has a field with no tensor form)."""

    request: type[BaseModel] | None
    response: type[BaseModel] | None
    inputs: list[TensorSpec] = field(default_factory=list)     # required fields: the v2 metadata's inputs
    optional: list[TensorSpec] = field(default_factory=list)   # fields with defaults, sent as tensors or parameters
    outputs: list[TensorSpec] = field(default_factory=list)

    def schemas(self) -> dict[str, Any]:
        return {"request_schema": self.request.model_json_schema() if self.request else None,
                "response_schema": self.response.model_json_schema(mode="serialization") if self.response else None}


def signature(cls: type[Model]) -> Signature:
    """Read the request and response types from `cls.predict`'s hints: `batch: list[Row]` and `-> list[Answer]`."""
    if issubclass(cls, LanguageModel):
        return Signature(None, None)
    hints = typing.get_type_hints(cls.predict)
    params = [name for name in hints if name != "return"]
    request = _item_type(hints[params[0]]) if params else None
    response = _item_type(hints.get("return"))
    inputs = _tensors(request, inputs=True)
    required = {n for n, f in request.model_fields.items() if f.is_required()} if request else set()
    return Signature(request, response, [t for t in inputs if t.name in required],
                     [t for t in inputs if t.name not in required], _tensors(response, inputs=False))


def _item_type(hint: Any) -> type[BaseModel] | None:
    """Row in list[Row] when Row is a pydantic model; None for anything else (rows stay plain dicts)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (list, typing.Sequence) else ()
    item = args[0] if args else None
    return item if isinstance(item, type) and issubclass(item, BaseModel) else None


def _tensors(model: type[BaseModel] | None, inputs: bool) -> list[TensorSpec]:
    """The fields with a tensor form. A required input without one means the type has no v2 form at all (no
    request could supply it); an optional one comes from the request's `parameters` or its default, and an output
    without one is left out of v2 answers (it still is in JSON answers)."""
    if model is None:
        return []
    specs = []
    for name, info in model.model_fields.items():
        annotation = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        spec = field_tensor(name, annotation)
        if spec is not None:
            specs.append(spec)
        elif inputs and info.is_required():
            return []
    return specs
