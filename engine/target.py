"""The target model as the engine uses it: a stock Hugging Face causal LM, driven with a 4D additive mask.

It runs the backbone (for the post-norm features EAGLE drafts from) and applies the lm_head only where logits are
needed; it compacts the KV cache to the accepted path. It does not draft, verify or sample.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from engine.gqa_attention import TREE_ATTENTION, register_tree_attention
from engine.kv_buffer import buffered_cache
from engine.packed_linear import pack_linears

# Architectures whose attention takes a custom 4D additive mask plus explicit position_ids and whose
# tree-node logits are tested to match linear decoding (tests/test_engine_identity.py).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
MASKABLE_ATTENTION = ("sdpa", "eager", TREE_ATTENTION)


@dataclass(frozen=True)
class TargetOutput:
    """logits [B, Q, V] for the requested positions; features [B, Q, F], what the draft head reads (the post-norm
    last hidden states, F = H, or several layers' concatenated, `TargetModel.feature_layers`)."""

    logits: torch.Tensor
    features: torch.Tensor


def check_supported(model: PreTrainedModel) -> None:
    """Raise ValueError unless the engine can drive `model` losslessly."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"target {model_type!r} is an encoder-decoder model; only decoder-only causal LMs are supported"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"target architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in MASKABLE_ATTENTION:
        raise ValueError(
            f"target attention {attention!r} cannot take a tree mask; load it with attn_implementation='sdpa'"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)  # Mistral has no flag: a set window is used
    if window and uses_window and window < getattr(config, "max_position_embeddings", window + 1):
        raise ValueError(
            f"target {model_type!r} uses sliding-window attention (window {window}), which tree verification "
            "does not model; use a checkpoint without a sliding window"
        )


class TargetModel:
    """Holds a stock HF causal LM and its KV cache for one generation.

    feature_layers: which hidden states make the draft head's features: None, the last (post-norm) one (EAGLE-1/2);
    else these `output_hidden_states` indices, concatenated (EAGLE-3 reads three).
    On a CPU the model's linear layers are switched to prepacked oneDNN weights, in place
    (`engine.packed_linear`: the same products, several times faster for a few rows), so anything else that runs
    this model object (HF `generate` included) runs them too; `stock_linears(model)` undoes it within a block.
    An `sdpa` model is switched to `engine.gqa_attention`'s function, which differs from `sdpa` only for several
    queries under a float 4D mask (the engine's trees; HF `generate` never passes one)."""

    def __init__(self, model: PreTrainedModel, feature_layers: tuple[int, ...] | None = None) -> None:
        check_supported(model)
        num_layers = model.config.num_hidden_layers
        if feature_layers is not None and not all(0 <= i <= num_layers for i in feature_layers):
            raise ValueError(
                f"feature layers {feature_layers} are outside the target's hidden states 0..{num_layers}"
            )
        self.feature_layers = None if feature_layers is None else tuple(feature_layers)
        pack_linears(model)
        if model.config._attn_implementation == "sdpa":  # the same function, without repeat_kv for trees
            model.set_attn_implementation(register_tree_attention())
        self.model = model
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.config = model.config
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes.
        parameters = inspect.signature(self.backbone.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def for_head(self, head) -> TargetModel:
        """This target producing the features `head` reads (itself when it already does; a view built once)."""
        if head.feature_layers == self.feature_layers:
            return self
        views = self.__dict__.setdefault("_views", {})
        if head.feature_layers not in views:
            views[head.feature_layers] = TargetModel(self.model, head.feature_layers)
        return views[head.feature_layers]

    def run_backbone(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone on `inputs`: (last post-norm hidden [B, Q, H], draft features [B, Q, H or k*H])."""
        if self.feature_layers is None:
            hidden = self.backbone(**inputs).last_hidden_state
            return hidden, hidden
        out = self.backbone(**inputs, output_hidden_states=True)
        features = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        return out.last_hidden_state, features

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def context_limit(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def new_cache(self) -> DynamicCache:
        return buffered_cache(self.config)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache: DynamicCache) -> TargetOutput:
        """Run the prompt [B, T]. Returns logits for the last position only [B, 1, V] and all features [B, T, F]."""
        hidden, features = self.run_backbone(
            input_ids=input_ids, use_cache=True, **{self.cache_argument: cache}
        )
        return TargetOutput(logits=self.lm_head(hidden[:, -1:]).float(), features=features)

    @torch.inference_mode()
    def forward_tree(
        self, token_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> TargetOutput:
        """Score tree nodes [B, Q] at `position_ids` [B, Q] under the additive 4D `mask` [B, 1, Q, past + Q]."""
        hidden, features = self.run_backbone(
            input_ids=token_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        return TargetOutput(logits=self.lm_head(hidden).float(), features=features)

    @staticmethod
    @torch.inference_mode()
    def keep_accepted(cache: DynamicCache, prefix_length: int, node_indices: torch.Tensor) -> None:
        """Keep the cache's first `prefix_length` positions plus the accepted tree nodes, in path order.

        Example: prefix_length=5, tree nodes at cache slots 5..9, accepted nodes [0, 2, 3]
        -> slots 5, 7, 8 move to 5, 6, 7 and the cache is cut to length 8.
        """
        num_kept = node_indices.shape[0]
        slots = node_indices + prefix_length
        for layer in cache.layers:
            # In place: gather the accepted slots into the front of the tree region, then cut (a view, no copy).
            layer.keys[:, :, prefix_length : prefix_length + num_kept] = layer.keys[:, :, slots]
            layer.values[:, :, prefix_length : prefix_length + num_kept] = layer.values[:, :, slots]
            layer.keys = layer.keys[:, :, : prefix_length + num_kept]
            layer.values = layer.values[:, :, : prefix_length + num_kept]

    @staticmethod
    def cache_length(cache: DynamicCache) -> int:
        return cache.get_seq_length()
