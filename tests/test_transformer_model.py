"""The transformer zoo model: a quick build through the build, its manifest, and its weights reloaded from the store.

Real training (a few seconds), no mocks. Served end to end in tests/test_contract.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inferline.zoo import build
from inferline.zoo import store as model_store
from inferline.zoo.sentiment.tokenizer import Vocab
from inferline.zoo.transformer import data
from inferline.zoo.transformer.model import TransformerClassifier, load_classifier, probabilities

# The module fixture trains once (seconds alone; allow for a busy 2-core machine).
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def built(quick_store: Path) -> Path:
    return build.build_missing(quick_store, ["transformer"], quick=True)["transformer"]   # the session's build


@pytest.fixture(scope="module")
def manifest(built: Path) -> dict[str, Any]:
    return model_store.read_manifest(built)


@pytest.fixture(scope="module")
def reloaded(built: Path, manifest: dict[str, Any]) -> tuple[TransformerClassifier, Vocab]:
    torch.set_num_threads(1)
    return load_classifier(built, manifest), Vocab.load(built / manifest["files"]["vocab"])


@pytest.fixture(scope="module")
def held_out(manifest: dict[str, Any]) -> data.Data:
    return data.load(quick=True, seed=manifest["data"]["seed"])


@pytest.fixture(scope="module")
def held_out_probs(reloaded: tuple[TransformerClassifier, Vocab], manifest: dict[str, Any],
                   held_out: data.Data) -> np.ndarray:
    model, vocab = reloaded
    return probabilities(model, vocab.encode(held_out.test_texts, manifest["max_len"]))


def test_registered_in_build() -> None:
    assert "transformer" in build.KNOWN


def test_manifest(built: Path, manifest: dict[str, Any]) -> None:
    assert manifest["name"] == "transformer" and manifest["version"] == built.name
    assert manifest["framework"] == "pytorch" and manifest["quick"] is True
    assert manifest["runtime"] == "inferline.zoo.transformer.serve:TextClassifier"
    assert manifest["labels"] == list(data.LABELS)
    assert manifest["max_len"] == manifest["network"]["max_len"] > 0
    assert {"d_model", "heads", "layers", "vocab_size", "n_labels"} <= set(manifest["network"])
    for file in manifest["files"].values():
        assert (built / file).is_file()
    assert model_store.resolve(built.parent) == built


def test_quick_build_beats_majority_baseline(manifest: dict[str, Any]) -> None:
    metrics = manifest["metrics"]
    assert 0.5 < metrics["majority_baseline"] < 1
    assert metrics["accuracy"] > metrics["majority_baseline"] + 0.03
    assert metrics["n_test"] > 0 and metrics["n_train"] > 0


def test_reloaded_weights_reproduce_held_out_metrics(manifest: dict[str, Any], held_out: data.Data,
                                                     held_out_probs: np.ndarray) -> None:
    assert len(held_out.test_texts) == manifest["metrics"]["n_test"]
    accuracy = float(np.mean(held_out_probs.argmax(axis=1) == held_out.y_test))
    assert accuracy == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-6)
    _, majority = data.majority_baseline(held_out.y_fit, held_out.y_test)
    assert majority == pytest.approx(manifest["metrics"]["majority_baseline"], abs=1e-6)


def test_reloaded_model_separates_clear_cases(held_out: data.Data, held_out_probs: np.ndarray) -> None:
    """The held-out tweets the model is surest about are mostly what it says: far above the base rate for positive,
    nearly all for negative (the majority class)."""
    positive = data.LABELS.index("positive")
    order = np.argsort(held_out_probs[:, positive])
    surest_positive, surest_negative = order[-20:], order[:20]
    base_rate = float(np.mean(held_out.y_test == positive))
    assert np.mean(held_out.y_test[surest_positive] == positive) >= 2 * base_rate
    assert np.mean(held_out.y_test[surest_negative] != positive) >= 0.9
    assert held_out_probs[surest_positive, positive].min() > 0.5 > held_out_probs[surest_negative, positive].max()


def test_scores_do_not_depend_on_padding(reloaded: tuple[TransformerClassifier, Vocab],
                                         manifest: dict[str, Any], held_out: data.Data) -> None:
    """A text scores the same alone as in a batch padded to a longer text, and a text with no known token gets a
    finite answer rather than NaN."""
    model, vocab = reloaded
    texts = held_out.test_texts[:8]
    ids = vocab.encode(texts, manifest["max_len"])
    together = probabilities(model, ids)
    alone = np.concatenate([probabilities(model, ids[i:i + 1]) for i in range(len(texts))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    empty = probabilities(model, vocab.encode(["..."], manifest["max_len"]))
    assert np.isfinite(empty).all() and empty.sum() == pytest.approx(1.0, abs=1e-5)
