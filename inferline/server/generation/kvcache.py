"""The running batch's KV cache, owned by the engine (not a transformers Cache object).

Layout: per layer, keys and values of shape [rows, heads, width, head_dim]. Rows are left-padded: row i's real tokens
are its last `lengths[i]` columns, every row ends at the newest column, padding columns are zeros (not junk: masked
columns still go through the attention matmul, and NaN * 0 = NaN). Row i is the engine's running request i.

A step appends each row's new tokens (one for a decoding row, a whole prompt for a newcomer) and keeps the layout:
`append_one` adds a column (the common decode step, a plain torch.cat as DynamicCache does), `append_with_newcomers`
also adds the newcomers' rows, right-aligned. `select_rows` drops finished rows and then the leading columns that are
padding in every row, so memory follows the live sequences.
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


def append_one(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The decode step: every row brings one token ([rows, heads, dim]); it becomes the newest column."""
    return torch.cat([old, new.unsqueeze(2)], dim=2)


def append_with_newcomers(old: torch.Tensor | None, new: torch.Tensor, width: int, rows: int,
                          newcomer_rows: torch.Tensor, newcomer_cols: torch.Tensor) -> torch.Tensor:
    """A step that admits requests. `new` packs [tokens, heads, dim]: first one token per old row, then the
    newcomers' prompt tokens; newcomer token i goes to row old_rows + newcomer_rows[i], column newcomer_cols[i].
    Returns [rows (old and new), heads, width, dim] (width >= the old width + 1): old rows shifted right to end one
    column before the last, their new token in the last column, everything else zero. One copy of the old cache,
    as a plain append costs."""
    r = 0 if old is None else old.shape[0]
    out = new.new_zeros(rows, new.shape[1], width, new.shape[2])
    if old is not None and r:
        w = old.shape[2]
        out[:r, :, width - 1 - w : width - 1] = old
        out[:r, :, width - 1] = new[:r]
    out[r + newcomer_rows, :, newcomer_cols] = new[r:]
    return out
