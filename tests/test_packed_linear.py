"""Prepacked oneDNN linear layers (`engine.packed_linear`): the same products as nn.Linear, kept in step with
trained weights, copyable, switchable back to the stock kernel, and greedy text unchanged on a tiny target."""

import copy

import pytest
import torch
from torch import nn

from engine.packed_linear import ENV, PackedLinear, pack_linears, stock_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 33])
def test_packed_layers_compute_what_stock_ones_do(rows):
    stock, packed = _stack(), _stack()
    assert pack_linears(packed) == 2
    assert all(isinstance(layer, PackedLinear) for layer in (packed[0], packed[2]))
    x = torch.randn(2, rows, 32)
    with torch.inference_mode():
        assert packed[0].packing.packed is None
        torch.testing.assert_close(packed(x), stock(x), rtol=1e-5, atol=1e-5)
        assert packed[0].packing.packed is not None  # the packed kernel ran


def test_a_weight_changed_in_place_is_repacked():
    packed = _stack()
    pack_linears(packed)
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = packed(x)
        packed[0].weight.mul_(2.0)
        after = packed(x)
        expected = packed[2](torch.relu(nn.functional.linear(x, packed[0].weight, packed[0].bias)))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_training_through_packed_layers_uses_the_stock_kernel_and_learns():
    packed = _stack()
    pack_linears(packed)
    x, y = torch.randn(8, 32), torch.randn(8, 16)
    loss = nn.functional.mse_loss(packed(x), y)
    loss.backward()
    assert packed[0].weight.grad is not None and packed[0].weight.grad.abs().sum() > 0
    assert packed[0].packing.packed is None  # nothing was packed for a step that needs gradients


def test_copies_stock_blocks_and_the_off_switch(monkeypatch):
    packed = _stack()
    pack_linears(packed)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        packed(x)
    twin = copy.deepcopy(packed)  # the opaque packed tensor is not copied; the twin repacks on first use
    assert twin[0].packing.packed is None
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), packed(x))
        with stock_linears(packed):
            assert not packed[0].use_packed
            packed(x)
        assert packed[0].use_packed
    monkeypatch.setenv(ENV, "0")
    assert pack_linears(_stack()) == 0


def test_greedy_text_is_unchanged_on_a_tiny_target(tiny_target):
    """The engine's target runs packed; HF generate with the stock kernels gives the same tokens."""
    model = tiny_target.model
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    for prompt in tiny_target.train_prompts[:3]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            packed = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
            with stock_linears(model):
                stock = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert packed.tolist() == stock.tolist()
