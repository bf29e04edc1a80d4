"""Row and column surgery on a transformers 5.x DynamicCache, for continuous batching.

The running batch is one DynamicCache whose rows are left-padded: row i holds `pad_i` junk columns, then its
real tokens, all rows ending at the same (newest) column. The attention mask and position ids hide the
padding (see engine.py). What the engine needs and DynamicCache does not offer:

- merge: stack a freshly prefilled cache under the running one, left-padding the shorter side with zeros;
- trim: drop leading columns that are padding in every row (after the longest row leaves), so memory follows
  the live sequences instead of the longest one ever seen;
- drop rows: `Cache.batch_select_indices`, which DynamicCache does offer.

Each DynamicLayer keeps `keys`/`values` as [batch, heads, seq, head_dim] tensors and grows them with torch.cat
in `update`, so replacing those two attributes is all a merge or trim has to do (cache_utils.py, DynamicLayer).
Layers of any other kind (sliding window, static, quantized, linear attention) keep extra state and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        # Exact type: subclasses (sliding window, indexed) carry state a column trim would desync.
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"continuous batching supports full-attention DynamicLayer caches only, "
                                      f"not {type(layer).__name__}")
        layers.append(layer)
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.keys is None or layer.values is None:
        raise NotImplementedError("cache layer left uninitialised by the forward pass (KV sharing?)")
    return layer.keys, layer.values


def check_supported(cache: DynamicCache) -> None:
    """Raise NotImplementedError unless every layer is a plain, initialised DynamicLayer."""
    for layer in _layers(cache):
        _kv(layer)


def seq_len(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def merge(running: DynamicCache, new: DynamicCache) -> DynamicCache:
    """Append `new`'s rows after `running`'s, in place in `running`. The shorter side is left-padded with zero
    columns (zeros, not garbage: masked columns still go through the attention matmul, and NaN * 0 = NaN)."""
    a_layers, b_layers = _layers(running), _layers(new)
    if len(a_layers) != len(b_layers):
        raise ValueError(f"caches have {len(a_layers)} and {len(b_layers)} layers")
    la, lb = seq_len(running), seq_len(new)
    width = max(la, lb)
    for a, b in zip(a_layers, b_layers, strict=True):
        (ak, av), (bk, bv) = _kv(a), _kv(b)
        a.keys = torch.cat([F.pad(ak, (0, 0, width - la, 0)), F.pad(bk, (0, 0, width - lb, 0))], dim=0)
        a.values = torch.cat([F.pad(av, (0, 0, width - la, 0)), F.pad(bv, (0, 0, width - lb, 0))], dim=0)
    return running


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first `columns` columns of every row (the caller checked they are padding in all rows)."""
    if columns <= 0:
        return
    for layer in _layers(cache):
        keys, values = _kv(layer)
        # A view: the next decode step's torch.cat copies it into a fresh, compact tensor and frees the old one.
        layer.keys = keys[:, :, columns:, :]
        layer.values = values[:, :, columns:, :]


def select_rows(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only the rows at indices `keep` (1-D long tensor), in that order."""
    cache.batch_select_indices(keep)
