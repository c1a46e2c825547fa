"""Many rows in one KV cache: which slots of each row hold a real position, and the moves that keep it so.

A batched cache is a set of key/value tensors [B, heads, L, head_dim] (the target's DynamicCache layers, or the
draft head's one layer) whose rows hold sequences of different lengths. `SlotCache` keeps a validity mask
[B, L] beside them: a row attends only to its valid slots, and a token's position id is the number of valid
slots before it, never its slot index. So a row may have holes (slots of rejected tree nodes, padding of a
shorter block) and left padding (it joined a longer batch) without any change to what it computes.

Example: row 0 accepts tree nodes [0, 2], row 1 accepts [0] of a 3-node tree appended at slots 5..7. After
`keep_tree(5, [[0, 2], [0]])` the cache is 7 slots long; row 0 holds its nodes 0 and 2 at slots 5 and 6, row 1
holds node 0 at slot 5 and a hole at 6.

Holes cost attention work and memory; `compact` right-aligns every row's valid slots (left padding only) once
they pass a threshold. This module moves cache entries only; it runs no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class KeyValues(Protocol):
    """Anything holding one attention layer's cache as `.keys` and `.values` [B, heads, L, head_dim]."""

    keys: torch.Tensor | None
    values: torch.Tensor | None


class SlotCache:
    """The validity of every slot of a batched cache, and the operations that move its layers' entries.

    layers: the caches' layers (objects with `.keys` / `.values`); their tensors are replaced, never kept
        elsewhere. valid [B, L] bool on the cache's device. counts: valid slots per row, on the host.
    """

    def __init__(self, layers: Sequence[KeyValues], valid: torch.Tensor) -> None:
        self.layers = list(layers)
        self.valid = valid
        self.counts = valid.sum(dim=1).tolist()

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def hole_share(self) -> float:
        """Share of slots that hold nothing (padding and holes)."""
        total = self.num_rows * self.length
        return 0.0 if total == 0 else 1.0 - sum(self.counts) / total

    @property
    def removable_share(self) -> float:
        """Share of the cache's length that `compact` would drop: the longest row's holes. Rows shorter than
        the longest keep their padding, so only this part is worth a copy."""
        return 0.0 if self.length == 0 else 1.0 - max(self.counts, default=0) / self.length

    def prefix_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask of the cached slots for every row [B, 1, 1, L]: 0 where valid, dtype-min elsewhere."""
        mask = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        return mask.masked_fill_(~self.valid, torch.finfo(dtype).min)[:, None, None, :]

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids of new tokens [B, Q]: each row's valid count plus `offsets` [B, Q] (or [Q])."""
        counts = torch.tensor(self.counts, device=offsets.device)
        return counts[:, None] + offsets

    def extend(self, valid_new: torch.Tensor) -> None:
        """Record the Q slots a forward just appended to every layer: valid_new [B, Q] bool."""
        self.valid = torch.cat((self.valid, valid_new.to(self.valid.device)), dim=1)
        self.counts = [c + n for c, n in zip(self.counts, valid_new.sum(dim=1).tolist(), strict=True)]

    def crop(self, length: int) -> None:
        """Drop every slot from `length` on (scratch entries such as a draft tree's)."""
        for layer in self.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self.valid = self.valid[:, :length]
        self.counts = self.valid.sum(dim=1).tolist()

    def keep_tree(self, start: int, kept: Sequence[Sequence[int]]) -> None:
        """Of the tree slots from `start` on, row b keeps `start + kept[b][i]` at `start + i`, in order; the
        region is cut to the longest row's, and the shorter rows' tail slots become holes."""
        device = self.valid.device
        width = max(len(nodes) for nodes in kept)
        index = torch.tensor(
            [[*nodes, *[nodes[-1]] * (width - len(nodes))] for nodes in kept], device=device
        )  # [B, width], tree-relative
        for layer in self.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                heads, dim = tensor.shape[1], tensor.shape[3]
                gathered = tensor[:, :, start:].gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))
                tensor[:, :, start : start + width] = gathered
                setattr(layer, name, tensor[:, :, : start + width])
        lengths = torch.tensor([len(nodes) for nodes in kept], device=device)
        region = torch.arange(width, device=device)[None] < lengths[:, None]
        self.valid = torch.cat((self.valid[:, :start], region), dim=1)
        self.counts = self.valid.sum(dim=1).tolist()

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order."""
        index = torch.tensor(list(rows), device=self.valid.device, dtype=torch.long)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.counts = [self.counts[row] for row in rows]

    def compact(self) -> None:
        """Right-align every row's valid slots, so the cache is as long as its longest row (left padding only)."""
        length = max(self.counts, default=0)
        # A stable sort on validity puts each row's invalid slots first and its valid ones last, in order.
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, self.length - length :]
        for layer in self.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                heads, dim = tensor.shape[1], tensor.shape[3]
                setattr(layer, name, tensor.gather(2, order[:, None, :, None].expand(-1, heads, -1, dim)))
        counts = torch.tensor(self.counts, device=self.valid.device)
        self.valid = torch.arange(length, device=self.valid.device)[None] >= (length - counts)[:, None]

    def append_rows(self, others: Sequence[SlotCache]) -> None:
        """Add the rows of `others` (caches with the same layer count) after this cache's, in one copy,
        left-padding the shorter ones."""
        caches = [self, *others]
        length = max(cache.length for cache in caches)
        for layer_index, mine in enumerate(self.layers):
            for name in ("keys", "values"):
                parts = [_left_pad(getattr(cache.layers[layer_index], name), length) for cache in caches]
                setattr(mine, name, torch.cat(parts, dim=0))
        self.valid = torch.cat([_left_pad_valid(cache.valid, length) for cache in caches])
        self.counts = [count for cache in caches for count in cache.counts]


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat((pad, tensor), dim=2)


def _left_pad_valid(valid: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - valid.shape[1]
    if missing == 0:
        return valid
    return torch.cat((valid.new_zeros(valid.shape[0], missing), valid), dim=1)
