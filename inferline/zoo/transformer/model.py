"""The network: token + learned position embeddings, a TransformerEncoder, mean over real tokens, a linear head.

Also the two things training, tests and serving must do identically: rebuild the network from a manifest, and turn
token ids into class probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inferline.zoo.sentiment.tokenizer import PAD

CLASS = "inferline.zoo.transformer.model:TransformerClassifier"


class TransformerClassifier(nn.Module):
    """int64 token ids [B, T] (PAD = 0, T <= max_len) -> logits [B, n_labels].

    Padding is masked in attention and left out of the mean, so a row's logits do not depend on how much padding its
    batch gave it (up to float rounding). A row with no tokens at all still gets an answer: its first position is
    unmasked, so it is classified from the padding embedding alone instead of producing NaN."""

    def __init__(self, vocab_size: int, n_labels: int, max_len: int = 64, d_model: int = 64, heads: int = 4,
                 layers: int = 2, ff: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.hyper: dict[str, Any] = {"vocab_size": vocab_size, "n_labels": n_labels, "max_len": max_len,
                                      "d_model": d_model, "heads": heads, "layers": layers, "ff": ff,
                                      "dropout": dropout}
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, dropout=dropout, batch_first=True)
        # No nested tensors: they change nothing for rows this short and warn in some torch versions.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.hyper["max_len"]:
            raise ValueError(f"sequence length {ids.shape[1]} > max_len {self.hyper['max_len']}")
        pad = ids == PAD
        pad[:, 0] &= ~pad.all(dim=1)          # an all-padding row keeps one position (see the class docstring)
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1)
        return self.head(pooled)


def trim(ids: np.ndarray) -> np.ndarray:
    """Drop the columns that are padding in every row (at least one column stays): attention costs grow with the
    square of the length, and most texts are far shorter than max_len."""
    used = np.flatnonzero((ids != PAD).any(axis=0))
    return ids[:, : int(used[-1]) + 1 if used.size else 1]


def probabilities(model: nn.Module, ids: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """float32 [n, n_labels]: softmax of the model's logits for right-padded token ids [n, max_len], in chunks.

    The model must already be in eval mode and on the CPU; training and the tests both score through here, so a
    reloaded model reproduces the manifest's metrics exactly."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            chunk = torch.from_numpy(trim(ids[i:i + batch_size]).astype(np.int64))
            out.append(torch.softmax(model(chunk), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_classifier(version_dir: Path, manifest: dict[str, Any], device: str | torch.device = "cpu"
                    ) -> TransformerClassifier:
    """The trained network of a store version, on `device`, in eval mode.

    Raises FileNotFoundError when the weights file is missing and RuntimeError when it does not fit the manifest's
    network (a store edited by hand, or a version built by other code)."""
    net = {k: v for k, v in manifest["network"].items() if k != "class"}
    model = TransformerClassifier(**net)
    state = torch.load(version_dir / manifest["files"]["model"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
