"""Packed grouped-query attention (`engine.gqa_attention`): the same attention as HF's `repeat_kv` path for
tree masks, used by the target only where it applies, and stock `sdpa` everywhere else."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from engine.gqa_attention import TREE_ATTENTION, can_pack, packed_attention
from engine.target import TargetModel


def _masked(_batch: int, queries: int, length: int, mask_batch: int) -> torch.Tensor:
    mask = torch.zeros(mask_batch, 1, queries, length)
    mask[torch.rand(mask.shape) < 0.4] = torch.finfo(torch.float32).min
    mask[..., 0] = 0.0  # every query sees at least one key
    return mask


@pytest.mark.parametrize(
    ("heads", "kv_heads", "batch", "queries", "length", "mask_batch"),
    [(9, 3, 1, 9, 50, 1), (9, 3, 4, 2, 300, 4), (4, 2, 3, 5, 77, 1), (8, 2, 2, 1, 40, 2)],
)
def test_packed_attention_equals_repeated_keys(heads, kv_heads, batch, queries, length, mask_batch):
    torch.manual_seed(0)
    query = torch.randn(batch, heads, queries, 16)
    key, value = torch.randn(batch, kv_heads, length, 16), torch.randn(batch, kv_heads, length, 16)
    mask = _masked(batch, queries, length, mask_batch)
    groups = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask
    )
    assert can_pack(query, key, mask)
    torch.testing.assert_close(packed_attention(query, key, value, mask), expected, rtol=1e-5, atol=1e-6)


def test_cases_it_does_not_pack():
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 6, 8)
    assert not can_pack(query, key, None)  # several queries and no mask: causal, not packable
    assert not can_pack(query, key, torch.ones(1, 1, 3, 6, dtype=torch.bool))  # HF's own bool masks
    assert not can_pack(query, query, torch.zeros(1, 1, 3, 3))  # no groups
    assert can_pack(query[:, :, :1], key, None)


def test_the_target_switches_sdpa_models_and_its_tree_logits_match_sdpa(tiny_lm_factory):
    model = tiny_lm_factory("llama", seed=3, num_heads=4, num_kv_heads=2)
    stock = copy.deepcopy(model)
    target = TargetModel(model)
    assert model.config._attn_implementation == TREE_ATTENTION
    assert stock.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 96, (2, 7))
    mask = _masked(2, 7, 7, 2)
    positions = torch.arange(7)[None].expand(2, -1)
    with torch.inference_mode():
        ours = target.forward_tree(ids, positions, mask, target.new_cache()).logits
        theirs = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        prompt = torch.randint(0, 96, (1, 9))  # no mask: the stock path, exactly
        assert torch.equal(model(prompt).logits, stock(prompt).logits)


def test_an_eager_target_stays_eager(tiny_lm_factory):
    model = tiny_lm_factory("llama", seed=4)
    model.set_attn_implementation("eager")
    TargetModel(model)
    assert model.config._attn_implementation == "eager"
