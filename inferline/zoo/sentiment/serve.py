"""The sentiment classifier on the model contract: one text per row (/sentiment sends one row per text; v2 BYTES
`text` rows). Texts are tokenized with the artifact's own vocabulary into fixed-length rows and run in one forward
pass."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field, field_validator

from inferline import Model, keras_forward
from inferline.zoo.sentiment.tokenizer import NAME as TOKENIZER
from inferline.zoo.sentiment.tokenizer import Vocab

MAX_CHARS = 100_000   # only the first max_len tokens count anyway; bound the tokenizer's work


class TextRow(BaseModel):
    text: str = Field(max_length=MAX_CHARS)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


class Label(BaseModel):
    label: str
    score: float   # the probability of this label


class SentimentClassifier(Model):
    platform = "tensorflow_keras"
    max_batch_size = 32

    def setup(self, device: str) -> None:
        if self.artifact is None:
            raise FileNotFoundError("SentimentClassifier needs its artifact (a sentiment store version)")
        m = self.manifest
        if m.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{self.artifact} needs tokenizer {m.get('tokenizer')!r}; this code has {TOKENIZER!r}")
        negative, positive = m["labels"]
        self.labels = (str(negative), str(positive))
        self.max_len = int(m["max_len"])
        self.threshold = float(m.get("threshold", 0.5))
        self.vocab = Vocab.load(self.artifact / m["vocab_file"])
        self.forward = keras_forward(self.artifact / m["files"]["model"], device, self.threads, (self.max_len,),
                                     "int32")
        self.predict([TextRow(text="warm up")])

    def predict(self, batch: list[TextRow]) -> list[Label]:
        ids = self.vocab.encode([row.text for row in batch], self.max_len)
        p_positive = self.forward(ids)[:, 0]   # the model's one sigmoid unit
        return [self._label(float(p)) for p in np.asarray(p_positive)]

    def _label(self, p_positive: float) -> Label:
        if p_positive >= self.threshold:
            return Label(label=self.labels[1], score=p_positive)
        return Label(label=self.labels[0], score=1.0 - p_positive)
