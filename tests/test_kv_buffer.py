"""In-place KV appends (`engine.kv_buffer`): the same tensors a `torch.cat` cache holds, through the moves the
engine makes (cuts, in-place writes, row selection, gathers), without copying the cache on every append."""

import torch
from transformers import AutoConfig

from engine.kv_buffer import BufferedLayer, append_in_place, buffered_cache
from engine.slots import SlotCache


def test_appends_match_concatenation_through_cuts_and_row_moves():
    torch.manual_seed(0)
    keys = buffer = None
    reference = torch.zeros(2, 3, 0, 4)
    for step in range(60):
        new = torch.randn(2, 3, step % 5 + 1, 4)
        keys, buffer = append_in_place(keys, buffer, new)
        reference = torch.cat((reference, new), dim=2)
        assert torch.equal(keys, reference)
        if step % 7 == 0:  # a crop: a view of the buffer, appended in place next time
            keys, reference = keys[:, :, :-2], reference[:, :, :-2]
        if step % 11 == 0:  # a row move makes a new tensor: the next append must re-buffer it
            keys, reference = keys.flip(0).contiguous(), reference.flip(0)


def test_appends_write_in_place_while_there_is_room():
    keys, buffer = append_in_place(None, None, torch.randn(1, 2, 5, 4))
    storage = buffer.data_ptr()
    for _ in range(buffer.shape[2] - 5):
        keys, buffer = append_in_place(keys, buffer, torch.randn(1, 2, 1, 4))
    assert buffer.data_ptr() == storage and keys.data_ptr() == storage
    before, last = keys.clone(), torch.randn(1, 2, 1, 4)
    keys, buffer = append_in_place(keys, buffer, last)  # full: grows, copying what it held
    assert buffer.data_ptr() != storage and buffer.shape[2] > keys.shape[2]
    assert torch.equal(keys, torch.cat((before, last), dim=2))


def test_under_autograd_it_concatenates_so_backward_still_works():
    first = torch.randn(1, 2, 3, 4, requires_grad=True)
    keys, buffer = append_in_place(None, None, first)
    assert buffer is None
    second = torch.randn(1, 2, 1, 4, requires_grad=True)
    keys, _ = append_in_place(keys, buffer, second)
    keys.sum().backward()
    assert torch.equal(first.grad, torch.ones_like(first))


class _CatLayer:
    """A layer appending as the stock DynamicLayer does: by concatenation."""

    def __init__(self) -> None:
        self.keys = self.values = torch.zeros(3, 2, 0, 4)

    def update(self, keys, values):
        self.keys, self.values = torch.cat((self.keys, keys), 2), torch.cat((self.values, values), 2)


def test_slot_cache_moves_stay_exact_on_buffered_layers():
    torch.manual_seed(1)
    buffered, stock = BufferedLayer(), _CatLayer()
    caches = [SlotCache([layer], torch.zeros(3, 0, dtype=torch.bool)) for layer in (buffered, stock)]
    for step in range(12):
        keys, values = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
        for layer, slots in zip((buffered, stock), caches, strict=True):
            layer.update(keys, values)
            slots.extend(torch.ones(3, 4, dtype=torch.bool))
            slots.keep_tree(slots.length - 4, [[0, 2], [0], [0, 1, 3]])
            if step == 5:
                slots.select_rows([2, 0, 1])
            if step == 8:
                slots.compact()
            if step == 10:
                slots.crop(slots.length - 1)
        assert torch.equal(buffered.keys, stock.keys) and torch.equal(buffered.values, stock.values)


def test_the_cache_uses_buffered_layers_for_full_attention():
    config = AutoConfig.for_model("llama", num_hidden_layers=3, hidden_size=32, num_attention_heads=2)
    cache = buffered_cache(config)
    assert len(cache.layers) == 3 and all(isinstance(layer, BufferedLayer) for layer in cache.layers)
