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

from service.generation.kvcache import AppendPlan, RowCache, extend

ATTENTION = "inferline_ragged"


class RaggedStep:
    """The packing of one step. Rows 0..R-1 (R = rows already in `cache`) bring one token each; rows R.. are
    newcomers and bring new_counts[i] tokens. Tokens are packed in row order."""

    def __init__(self, cache: RowCache, new_counts: list[int]) -> None:
        device = cache.device
        self.cache = cache
        self.old_rows = cache.rows
        if any(n != 1 for n in new_counts[: self.old_rows]):
            raise ValueError("running rows bring exactly one token per step")
        self.counts = new_counts
        self.old_lengths = cache.lengths
        self.plan = AppendPlan(cache.width, cache.lengths, new_counts, device)
        self.new_lengths = self.plan.new_lengths
        old = torch.zeros(len(new_counts), dtype=torch.long, device=device)
        old[: self.old_rows] = cache.lengths
        # Position of each packed token: its row's cached tokens plus its offset in this step (GPT-2 learns absolute
        # positions, RoPE models rotate by them: either way a row sees the positions it would see alone).
        self.positions = old[self.plan.token_row] + self.plan.offset
        self.ends = torch.cumsum(torch.tensor(new_counts, device=device), 0) - 1   # each row's last packed token
        self.newcomer_block = max(new_counts[self.old_rows :], default=0)

    @property
    def num_tokens(self) -> int:
        return int(self.plan.token_row.numel())

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """query/key/value [1, heads, N, dim] -> attention output [1, N, heads, dim]; appends key/value to the cache."""
        old_k, old_v = self.cache.layer(layer)
        k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)   # [N, heads, dim]
        keys = extend(old_k, self.old_lengths, k_new, self.counts, self.plan)
        values = extend(old_v, self.old_lengths, v_new, self.counts, self.plan)
        self.cache.set_layer(layer, keys, values)
        width = keys.shape[2]
        cols = torch.arange(width, device=keys.device)
        q = query[0].transpose(0, 1)   # [N, heads, dim]
        out = torch.empty_like(q)
        r = self.old_rows
        if r:
            visible = cols.view(1, -1) >= (width - self.new_lengths[:r]).view(-1, 1)       # [R, width]
            o = F.scaled_dot_product_attention(q[:r].unsqueeze(2), keys[:r], values[:r],
                                               attn_mask=visible.view(r, 1, 1, width), scale=scaling)
            out[:r] = o[:, :, 0, :]
        if len(self.counts) > r:
            out[r:] = self._attend_newcomers(q[r:], keys[r:], values[r:], cols, scaling)
        return out.unsqueeze(0)

    def _attend_newcomers(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cols: torch.Tensor,
                          scaling: float | None) -> torch.Tensor:
        """Prompt queries, right-aligned in a [rows, heads, block, dim] block, causal over each row's own columns."""
        r, block, width = self.old_rows, self.newcomer_block, keys.shape[2]
        n_rows = keys.shape[0]
        counts = torch.tensor(self.counts[r:], device=keys.device)
        mine = self.plan.token_row >= r
        rows = self.plan.token_row[mine] - r
        slot = self.plan.token_col[mine]     # the plan's block is this block: newcomers bring the most tokens
        qb = q.new_zeros(n_rows, block, *q.shape[1:])
        qb[rows, slot] = q
        # Query slot i of a row sits at column width - block + i; it sees its row's columns up to its own.
        at = width - block + torch.arange(block, device=keys.device)
        first = (width - self.new_lengths[r:]).view(-1, 1, 1)
        visible = (cols.view(1, 1, -1) >= first) & (cols.view(1, 1, -1) <= at.view(1, -1, 1))
        # Empty slots (a prompt shorter than the block) see one column, so no softmax row is all -inf (NaN).
        empty = torch.arange(block, device=keys.device).view(1, -1) < (block - counts).view(-1, 1)
        visible = visible | (empty.unsqueeze(-1) & (cols == width - 1).view(1, 1, -1))
        o = F.scaled_dot_product_attention(qb.transpose(1, 2), keys, values, attn_mask=visible.unsqueeze(1),
                                           scale=scaling)                      # [rows, heads, block, dim]
        return o.transpose(1, 2)[rows, slot]


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
            logits_at: torch.Tensor) -> torch.Tensor:
    """Run the packed tokens ([N] ids) and return the logits at the packed positions `logits_at` ([K, vocab])."""
    # A 4-D mask is taken as prepared: transformers then builds none (ours live in RaggedStep).
    dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids.view(1, -1), position_ids=step.positions.view(1, -1), attention_mask=dummy_mask,
                use_cache=False, logits_to_keep=logits_at, ragged_step=step)
    step.cache.lengths = step.new_lengths
    logits: torch.Tensor = out.logits[0]
    return logits
