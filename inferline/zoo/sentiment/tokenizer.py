"""The sentiment model's own tokenizer: lowercase words, a frequency-ranked vocabulary saved as JSON.

Pure Python, shared by training and serving, so the worker needs no tokenizer package and both sides split text the
same way. Ids: 0 = padding (masked by the network), 1 = out-of-vocabulary, 2.. = vocabulary words by frequency.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

NAME = "lowercase-words-v1"     # stored in the manifest: a change here must not silently serve an old vocabulary
PAD, OOV = 0, 1
_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")
# Words (with inner apostrophes: "don't"), the two placeholders, simple emoticons and !/? which carry sentiment.
_TOKEN = re.compile(r"<url>|<user>|[a-z0-9]+(?:'[a-z]+)?|[:;]-?[()dp]|[!?]")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens; links and @mentions become <url> and <user> (their content says nothing)."""
    text = _USER.sub(" <user> ", _URL.sub(" <url> ", text.lower()))
    return _TOKEN.findall(text)


class Vocab:
    """Word -> id for the `size - 2` most frequent training words."""

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    @property
    def size(self) -> int:
        """Embedding rows needed: the words plus padding and OOV."""
        return len(self.words) + 2

    @classmethod
    def build(cls, texts: Iterable[str], max_words: int, min_count: int = 2) -> Vocab:
        counts = Counter(tok for text in texts for tok in tokenize(text))
        # Sort by count, then alphabetically: the same corpus always gives the same ids.
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[: max_words - 2])

    def encode(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        """int32 [n, max_len]: the first max_len tokens of each text, right-padded with PAD."""
        texts = list(texts)
        out = np.zeros((len(texts), max_len), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.index.get(tok, OOV) for tok in tokenize(text)[:max_len]]
            out[row, : len(ids)] = ids
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"tokenizer": NAME, "pad_id": PAD, "oov_id": OOV, "words": self.words}))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        data = json.loads(path.read_text())
        if data.get("tokenizer") != NAME:
            raise ValueError(f"{path} was built for tokenizer {data.get('tokenizer')!r}, this code is {NAME!r}")
        return cls([str(w) for w in data["words"]])
