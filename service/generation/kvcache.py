"""The running batch's KV cache, owned by the engine (not a transformers Cache object).

Layout: per layer, keys and values of shape [rows, heads, width, head_dim]. Rows are left-padded: row i's real tokens
are its last `lengths[i]` columns, every row ends at the newest column, padding columns are zeros (not junk: masked
columns still go through the attention matmul, and NaN * 0 = NaN). Row i is the engine's running request i.

A step appends each row's new tokens (one for a decoding row, a whole prompt for a newcomer) and keeps the layout:
`extend` rebuilds each layer with one gather when rows grow by different amounts, or appends one column when every
row grows by one (the common decode step, a plain torch.cat as DynamicCache does). `select_rows` drops finished rows
and then the leading columns that are padding in every row, so memory follows the live sequences.
"""

from __future__ import annotations

import torch


class RowCache:
    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.num_layers = num_layers
        self.device = device
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)   # real tokens per row

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    @property
    def width(self) -> int:
        k = self.keys[0]
        return int(k.shape[2]) if k is not None else 0

    def layer(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[index], self.values[index]

    def set_layer(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[index], self.values[index] = keys, values

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows at `keep` (1-D long tensor), in that order, then trim all-padding leading columns."""
        self.lengths = self.lengths[keep]
        if self.rows == 0:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
            return
        drop = self.width - int(self.lengths.max().item())
        for i in range(self.num_layers):
            k, v = self.keys[i], self.values[i]
            if k is None or v is None:
                continue
            # Views: the next step's cat or gather copies them into fresh, compact tensors and frees the old ones.
            self.keys[i], self.values[i] = k[keep][:, :, drop:, :], v[keep][:, :, drop:, :]


def extend(old: torch.Tensor | None, old_lengths: torch.Tensor, new: torch.Tensor, new_counts: list[int],
           plan: AppendPlan) -> torch.Tensor:
    """One layer's [rows, heads, width', dim] after appending `new` ([tokens, heads, dim], rows' tokens packed in row
    order, new_counts[i] of them for row i; rows beyond `old`'s are newcomers with no cached tokens)."""
    rows = len(new_counts)
    heads, dim = new.shape[1], new.shape[2]
    if plan.all_single and old is not None and old.shape[0] == rows:
        return torch.cat([old, new.view(rows, heads, 1, dim)], dim=2)
    # Source columns: [zero | old cache (or nothing) | this step's tokens, right-aligned per row in a block].
    block = new.new_zeros(rows, plan.block, heads, dim)
    block[plan.token_row, plan.token_col] = new
    parts = [new.new_zeros(rows, 1, heads, dim)]
    if old is not None:
        old_rows = old.shape[0]
        old_t = old.transpose(1, 2)
        if old_rows < rows:
            old_t = torch.cat([old_t, old_t.new_zeros(rows - old_rows, *old_t.shape[1:])])
        parts.append(old_t)
    parts.append(block)
    source = torch.cat(parts, dim=1)                          # [rows, 1 + width + block, heads, dim]
    gathered = source[plan.row_index, plan.source_col]         # [rows, width', heads, dim]
    return gathered.transpose(1, 2).contiguous()


class AppendPlan:
    """Index arithmetic shared by every layer of one step: where each new token lands and which source column each
    column of the rebuilt cache reads. Built once per step, on the cache's device."""

    def __init__(self, old_width: int, old_lengths: torch.Tensor, new_counts: list[int], device: torch.device) -> None:
        rows = len(new_counts)
        self.all_single = all(n == 1 for n in new_counts)
        self.block = max(new_counts)
        counts = torch.tensor(new_counts, dtype=torch.long, device=device)
        old = torch.zeros(rows, dtype=torch.long, device=device)
        old[: old_lengths.numel()] = old_lengths
        self.new_lengths = old + counts
        self.width = int(self.new_lengths.max().item())
        self.token_row = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        self.offset = torch.arange(int(counts.sum().item()), device=device) - starts[self.token_row]  # within its row
        self.token_col = (self.block - counts)[self.token_row] + self.offset   # right-aligned in the block
        # Column c of row r holds its content item j = c - (width - new_length); j < 0 is padding (source col 0).
        col = torch.arange(self.width, device=device).view(1, -1)
        j = col - (self.width - self.new_lengths).view(-1, 1)
        from_old = 1 + (old_width - old).view(-1, 1) + j
        from_new = 1 + old_width + (self.block - counts).view(-1, 1) + (j - old.view(-1, 1))
        self.source_col = torch.where(j < 0, torch.zeros_like(j), torch.where(j < old.view(-1, 1), from_old, from_new))
        self.row_index = torch.arange(rows, device=device).view(-1, 1)
