"""KV caches that append in place: keys and values are views of a preallocated buffer with spare room.

A stock `DynamicCache` appends a step's keys by `torch.cat`, which copies every layer's whole cache on every
forward. On a CPU that copy is bound by memory bandwidth, and a batch's cache is megabytes per layer: profiled
at 4 rows of SmolLM2 it was 40-50% of a plain decode step. Here a layer writes the new entries into the free
tail of its buffer and exposes `buffer[:, :, :length]`; the buffer grows by half again (and at least
`MIN_SPARE` slots) when full, so appends cost amortised O(new entries).

The engine also moves cache entries itself (`engine.slots.SlotCache`, `TargetModel.keep_accepted`): in-place
writes and cuts keep the tensors views of the buffer; `index_select`, `gather` and `cat` make new tensors. An
append checks which case it is in (same storage, same strides, room left) and re-buffers when the tensor is no
longer a view of the buffer, so nothing those operations do is lost or aliased.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 64


def append_in_place(
    current: torch.Tensor | None, buffer: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`current` [B, H, n, D] with `new` [B, H, q, D] appended along dim 2, as (view [B, H, n + q, D], buffer).

    Writes into `buffer` when `current` is a prefix view of it with room for `new`; else copies `current` into a
    fresh buffer with spare room. Example: a buffer of 8 slots, `current` its first 5, `new` 2 slots -> slots 5
    and 6 are written and the view of the first 7 returned; with `new` 4 slots, a buffer of 73 slots is made.
    Under autograd (training unrolls the head through its cache) it concatenates: an in-place write would
    invalidate the views earlier steps saved for backward."""
    if current is None or current.dim() != 4:  # an empty cache (DynamicLayer starts with a 1-D empty tensor)
        current = new[:, :, :0]
    if torch.is_grad_enabled() and (new.requires_grad or current.requires_grad):
        return torch.cat((current, new), dim=2), None
    length, added = current.shape[2], new.shape[2]
    if not _is_prefix_view(current, buffer) or length + added > buffer.shape[2]:
        capacity = length + added + max(MIN_SPARE, (length + added) // 2)
        batch, heads, _, dim = new.shape
        fresh = new.new_empty(batch, heads, capacity, dim)
        fresh[:, :, :length] = current
        buffer = fresh
    buffer[:, :, length : length + added] = new
    return buffer[:, :, : length + added], buffer


def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    return (
        buffer is not None
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.shape[3] == buffer.shape[3]
        and tensor.dtype == buffer.dtype
    )


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` (one attention layer of a `DynamicCache`) whose appends write in place."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.key_buffer = append_in_place(self.keys, self.key_buffer, key_states)
        self.values, self.value_buffer = append_in_place(self.values, self.value_buffer, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def buffered_cache(config) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers append in place (sliding ones stay stock)."""
    cache = DynamicCache(config=config)
    cache.layers = [BufferedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
