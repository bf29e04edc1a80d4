"""Serve the sentiment classifier: {"texts", "single"} (task route /sentiment) or BYTES `text` (v2 protocol).

Texts are tokenized with the artifact's own vocabulary into fixed-length rows [n, max_len]; predict_batch stacks the
rows of every item and runs one forward pass through KerasRuntime.forward (a tf.function with a fixed input signature).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import store as model_store
from models.sentiment.tokenizer import NAME as TOKENIZER
from models.sentiment.tokenizer import Vocab
from service.runtimes.base import InputError, TaskRequest, TensorSpec, only_input, split_rows, stack_rows
from service.runtimes.keras_rt import KerasRuntime

INPUT = "text"
MAX_TEXTS = 1024            # one request may not monopolise a batch
MAX_CHARS = 100_000         # only the first max_len tokens count anyway; bound the tokenizer's work


@dataclass(frozen=True)
class SentimentItem:
    """One request, decoded: token ids [n, max_len] for its n texts."""

    ids: np.ndarray


class SentimentRuntime(KerasRuntime[SentimentItem, np.ndarray]):
    def __init__(self) -> None:
        super().__init__()
        self.labels: tuple[str, str] = ("negative", "positive")
        self.max_len = 0
        self.threshold = 0.5
        self.vocab = Vocab([])

    def read_artifact(self, artifact: Path) -> Path:
        path = model_store.resolve(artifact)
        self.manifest = model_store.read_manifest(path)
        if self.manifest.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{path} needs tokenizer {self.manifest.get('tokenizer')!r}; this code has {TOKENIZER!r}")
        negative, positive = self.manifest["labels"]
        self.labels = (str(negative), str(positive))
        self.max_len = int(self.manifest["max_len"])
        self.threshold = float(self.manifest.get("threshold", 0.5))
        self.vocab = Vocab.load(path / self.manifest["vocab_file"])
        return path

    def input_spec(self) -> tuple[tuple[int, ...], str]:
        return (self.max_len,), "int32"

    def warm_up_batch(self) -> list[SentimentItem]:
        return [SentimentItem(self.vocab.encode(["warm up"], self.max_len))]

    # Task route ------------------------------------------------------------------------------------------------

    def preprocess(self, request: TaskRequest) -> SentimentItem:
        texts = request.params.get("texts")
        if isinstance(texts, str):
            texts = [texts]          # a caller that sent one string meant one text
        if not isinstance(texts, (list, tuple)) or not texts:
            given = f"{len(texts)} texts" if isinstance(texts, (list, tuple)) else type(texts).__name__
            raise InputError(f"`texts` must be a list of 1 to {MAX_TEXTS} non-empty strings. Given: {given}",
                             field="texts")
        if request.params.get("single") and len(texts) != 1:
            raise InputError(f"`text` must be exactly one string. Given: {len(texts)} texts", field="text")
        return SentimentItem(self.vocab.encode(self._check_texts(texts, "text" if request.params.get("single")
                                                                 else "texts"), self.max_len))

    def postprocess(self, output: np.ndarray, request: TaskRequest) -> dict[str, Any]:
        results = [self._label_score(float(p)) for p in output]
        if request.params.get("single"):
            return {"model": "sentiment", "version": self.version, **results[0]}
        return {"model": "sentiment", "version": self.version, "results": results}

    def predict_batch(self, batch: list[SentimentItem]) -> list[np.ndarray]:
        p_positive = self.forward(stack_rows([item.ids for item in batch]))[:, 0]   # the model's one sigmoid unit
        return split_rows(p_positive, [len(item.ids) for item in batch])

    # Open Inference Protocol -----------------------------------------------------------------------------------

    def v2_inputs(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT, "BYTES", [-1])]

    def v2_outputs(self) -> list[TensorSpec]:
        return [TensorSpec("label", "BYTES", [-1]), TensorSpec("score", "FP32", [-1])]

    def v2_preprocess(self, tensors: dict[str, np.ndarray], parameters: dict[str, Any]) -> SentimentItem:
        x = np.asarray(only_input(tensors, INPUT, "BYTES [-1]"), dtype=object)
        if x.ndim == 2 and x.shape[1] == 1:
            x = x[:, 0]              # [n, 1] is a common way to send n strings
        if x.ndim != 1 or not 1 <= x.shape[0] <= MAX_TEXTS:
            raise InputError(f"`{INPUT}` must have shape [-1] with 1 to {MAX_TEXTS} strings. "
                             f"Given: {list(np.shape(tensors[INPUT]))}", field=INPUT)
        texts: list[str] = []
        for i, value in enumerate(x):
            if isinstance(value, (bytes, bytearray, np.bytes_)):
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"`{INPUT}[{i}]` must be UTF-8 text. Given: {len(value)} undecodable bytes",
                                     field=INPUT) from None
            texts.append(value)
        return SentimentItem(self.vocab.encode(self._check_texts(texts, INPUT), self.max_len))

    def v2_postprocess(self, output: np.ndarray) -> dict[str, np.ndarray]:
        positive = output >= self.threshold
        labels = np.array([self.labels[int(p)].encode() for p in positive], dtype=object)
        scores = np.where(positive, output, 1.0 - output).astype(np.float32)
        return {"label": labels, "score": scores}

    # Helpers ---------------------------------------------------------------------------------------------------

    def _check_texts(self, texts: list[Any] | tuple[Any, ...], field: str) -> list[str]:
        if len(texts) > MAX_TEXTS:
            raise InputError(f"`{field}` must hold at most {MAX_TEXTS} texts. Given: {len(texts)}", field=field)
        for i, text in enumerate(texts):
            name = field if field == "text" else f"{field}[{i}]"
            if not isinstance(text, str):
                raise InputError(f"`{name}` must be a string. Given: {type(text).__name__}", field=field)
            if not text.strip():
                raise InputError(f"`{name}` must be a non-empty string. Given: {text!r}", field=field)
            if len(text) > MAX_CHARS:
                raise InputError(f"`{name}` must be at most {MAX_CHARS} characters. Given: {len(text)}", field=field)
        return list(texts)

    def _label_score(self, p_positive: float) -> dict[str, Any]:
        """The label and the probability of that label (not of "positive")."""
        if p_positive >= self.threshold:
            return {"label": self.labels[1], "score": p_positive}
        return {"label": self.labels[0], "score": 1.0 - p_positive}
