"""One forward pass over a ragged batch: every running row's next token and every newcomer's whole prompt, packed
into one sequence of tokens ([1, N]), so admitting requests costs no second forward (issue 13, item 4).

Everything in a transformer but attention is per token, so a packed sequence runs through embeddings, MLPs and the LM
head with no padding at all. Attention is the one place rows must be told apart: the model runs with this module's
attention function (registered with transformers' AttentionInterface), which receives the packed queries, keys and
values of a layer, appends the keys and values to the engine's RowCache (kvcache.py), and attends per row:
  - the running rows (one query each, the first R rows) in one SDPA call against their cache rows, a view;
  - the newcomers (rows R.., several queries each, right-aligned in a small block) in a second SDPA call,
    causal within the prompt.
No row ever attends to another row's columns, and a row's positions count its own tokens only, so a row's result
does not depend on its batch-mates beyond float rounding (tests/test_engine.py measures it).

The function falls back to PyTorch SDPA when called without a step (model.generate() on the same model object), and
refuses models whose attention it cannot see into (a transformers Cache passed in, sliding windows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from inferline.server.generation.kvcache import RowCache, append_one, append_with_newcomers

ATTENTION = "inferline_ragged"


class RaggedStep:
    """The packing of one step, and the index arithmetic every layer shares. Rows 0..R-1 (R = rows already in
    `cache`) bring one token each; rows R.. are newcomers and bring new_counts[i] prompt tokens. Tokens are packed in
    row order. After the forward, the cache's lengths are `new_lengths`."""

    def __init__(self, cache: RowCache, new_counts: list[int]) -> None:
        device = cache.device
        self.cache = cache
        self.old_rows = r = cache.rows
        if len(new_counts) < r or any(n != 1 for n in new_counts[:r]):
            raise ValueError("every running row brings exactly one token per step")
        self.counts = new_counts
        self.num_tokens = sum(new_counts)
        newcomers = new_counts[r:]
        self.block = max(newcomers, default=0)   # the newcomers' query grid is [rows, block]
        # Old rows end one column before the last (their new token is the last); newcomers end at the last.
        self.width = max(cache.width + 1 if r else 0, self.block)
        lengths = [cache.lengths + 1]
        positions = [cache.lengths]
        if newcomers:
            counts = torch.tensor(newcomers, device=device)
            self.newcomer_rows = torch.repeat_interleave(torch.arange(len(newcomers), device=device), counts,
                                                         output_size=self.num_tokens - r)   # no device sync
            offset = torch.arange(self.num_tokens - r, device=device) - (torch.cumsum(counts, 0) - counts)[
                self.newcomer_rows]
            self.newcomer_cols = self.width - counts[self.newcomer_rows] + offset    # right-aligned in the cache
            self.newcomer_slots = self.newcomer_cols - (self.width - self.block)     # right-aligned in the grid
            lengths.append(counts)
            # GPT-2 learns absolute positions, RoPE models rotate by them: either way, a row's own token count.
            positions.append(offset)
        self.new_lengths = torch.cat(lengths)
        self.positions = torch.cat(positions)
        # Masks are the same for every layer: built once per step. True = may attend.
        cols = torch.arange(self.width, device=device)
        self.decode_mask = (cols.view(1, -1) >= (self.width - 1 - cache.lengths).view(-1, 1)).view(r, 1, 1, self.width)
        if newcomers:
            # Grid slot i of a newcomer row is column width - block + i: it sees its row's columns up to its own.
            at = self.width - self.block + torch.arange(self.block, device=device)
            first = (self.width - counts).view(-1, 1, 1)
            visible = (cols.view(1, 1, -1) >= first) & (cols.view(1, 1, -1) <= at.view(1, -1, 1))
            # Empty slots (a prompt shorter than the block) see one column, so no softmax row is all -inf (NaN).
            empty = torch.arange(self.block, device=device).view(1, -1) < (self.block - counts).view(-1, 1)
            self.newcomer_mask = (visible | (empty.unsqueeze(-1) & (cols == self.width - 1).view(1, 1, -1)))[:, None]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """query/key/value [1, heads, N, dim] -> attention output [1, N, heads, dim]; appends key/value to the cache."""
        old_k, old_v = self.cache.layer(layer)
        k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)   # [N, heads, dim]
        q = query[0].transpose(0, 1)
        r = self.old_rows
        gqa = query.shape[1] != key.shape[1]   # grouped-query attention (Llama-style): fewer KV heads than queries
        if not self.block:   # decode only
            assert old_k is not None and old_v is not None
            keys, values = append_one(old_k, k_new), append_one(old_v, v_new)
            self.cache.set_layer(layer, keys, values)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=self.decode_mask,
                                               scale=scaling, enable_gqa=gqa)
            return o.transpose(1, 2).reshape(1, r, *q.shape[1:])
        where = (self.width, len(self.counts), self.newcomer_rows, self.newcomer_cols)
        keys, values = append_with_newcomers(old_k, k_new, *where), append_with_newcomers(old_v, v_new, *where)
        self.cache.set_layer(layer, keys, values)
        out = torch.empty_like(q)   # [N, heads, dim]
        if r:
            o = F.scaled_dot_product_attention(q[:r].unsqueeze(2), keys[:r], values[:r], attn_mask=self.decode_mask,
                                               scale=scaling, enable_gqa=gqa)
            out[:r] = o[:, :, 0, :]
        grid = q.new_zeros(keys.shape[0] - r, self.block, *q.shape[1:])
        grid[self.newcomer_rows, self.newcomer_slots] = q[r:]
        o = F.scaled_dot_product_attention(grid.transpose(1, 2), keys[r:], values[r:], attn_mask=self.newcomer_mask,
                                           scale=scaling, enable_gqa=gqa)   # [rows, heads, block, dim]
        out[r:] = o.transpose(1, 2)[self.newcomer_rows, self.newcomer_slots]
        return out.unsqueeze(0)


def ragged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface. With `ragged_step=RaggedStep` (the engine's forward): packed attention over
    the engine's cache. Without (anything else using the model): PyTorch SDPA, as if this function were not here."""
    step: RaggedStep | None = kwargs.pop("ragged_step", None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise NotImplementedError(f"{type(module).__name__} has no layer_idx: cannot map it to a cache layer")
    if getattr(module, "sliding_window", None):
        raise NotImplementedError("sliding-window attention is not supported by the ragged engine")
    return step.attend(layer, query, key, value, scaling), None


AttentionInterface.register(ATTENTION, ragged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)   # masks for the SDPA fallback


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through ragged_attention (SDPA whenever no RaggedStep is passed)."""
    model.set_attn_implementation(ATTENTION)


def forward(model: PreTrainedModel, step: RaggedStep, input_ids: torch.Tensor,
            logits_at: torch.Tensor | None) -> torch.Tensor:
    """Run the packed tokens ([N] ids) and return the logits at the packed positions `logits_at` ([K, vocab]), or at
    every position when None."""
    # A 4-D mask is taken as prepared: transformers then builds none (ours live in RaggedStep).
    dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids.view(1, -1), position_ids=step.positions.view(1, -1), attention_mask=dummy_mask,
                use_cache=False, logits_to_keep=0 if logits_at is None else logits_at, ragged_step=step)
    step.cache.lengths = step.new_lengths
    logits: torch.Tensor = out.logits[0]
    return logits
