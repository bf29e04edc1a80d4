"""Serve the transformer classifier through the public model contract: one text in, its label and score out.

Written against `inferline.Model` (notes/contract.md): the worker validates each row as a TextRow, calls predict once
per batch, and sends each Label back. This module is imported by workers only, so torch is imported at the top.

No `from __future__ import annotations`: the contract reads the request and response types from predict's hints, which
stay real classes here rather than strings to resolve.
"""

import numpy as np
import torch
from pydantic import BaseModel, Field

from inferline import Model
from inferline.zoo.sentiment.tokenizer import PAD, Vocab
from inferline.zoo.transformer.model import TransformerClassifier, load_classifier, trim

# The same bound as the gateway's text task routes. Only the first max_len tokens are used anyway; this bounds the
# tokenizer's work per row.
MAX_TEXT_CHARS = 10_000


class TextRow(BaseModel):
    """One text to classify."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class Label(BaseModel):
    """The most probable label and its probability (0..1)."""

    label: str
    score: float


class TextClassifier(Model):
    """The store's transformer text classifier (inferline/zoo/transformer/train.py builds it)."""

    platform = "pytorch"
    max_batch_size = 32
    max_batch_delay_ms = 5

    def setup(self, device: str) -> None:
        """Load the artifact (its version directory and manifest, as the worker resolved them) onto `device` in eval
        mode, with `self.threads` torch threads, and run one warm-up batch.

        Raises FileNotFoundError when there is no artifact or no built version in it."""
        if self.artifact is None or not self.manifest:
            raise FileNotFoundError("the transformer model needs an artifact: build it with "
                                    "`python -m inferline.zoo.build transformer`")
        path = self.artifact   # the worker resolved the version directory and read its manifest (self.manifest)
        self.labels: list[str] = [str(label) for label in self.manifest["labels"]]
        self.max_len = int(self.manifest["max_len"])
        self.vocab = Vocab.load(path / self.manifest["files"]["vocab"])
        prior = [float(p) for p in self.manifest["class_prior"]]
        self.prior = Label(label=self.labels[int(np.argmax(prior))], score=max(prior))
        # Each worker gets its own core budget; torch's default (all cores) collapses under contention.
        torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.model: TransformerClassifier = load_classifier(path, self.manifest, self.device)
        self.predict([TextRow(text="warm up")])

    def predict(self, batch: list[TextRow]) -> list[Label]:
        """One Label per row, in order: every row is tokenized into one padded array and scored in one forward pass.

        A text in which the tokenizer finds no token at all ("...", only emoji) gives the network nothing to read: it
        gets the training prior (the most frequent class and its share), not whatever the network makes of padding."""
        ids = trim(self.vocab.encode([row.text for row in batch], self.max_len))
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids.astype(np.int64)).to(self.device))
            scores, best = torch.softmax(logits, dim=-1).max(dim=-1)
        empty = (ids == PAD).all(axis=1).tolist()
        return [self.prior if blank else Label(label=self.labels[i], score=s)
                for i, s, blank in zip(best.tolist(), scores.tolist(), empty, strict=True)]
