"""The EAGLE-3 draft head: weights, forward pass and the official checkpoint layout.

EAGLE-3 drafts from three of the target's hidden states instead of its last one: those that enter target layers
2, L//2 and L-3 (HF `output_hidden_states` indices), concatenated [3H_t] and fused by `fc` [H, 3H_t] (no bias).
One decoder layer (`midlayer`) reads concat(input_layernorm(token embedding), hidden_norm(hidden)), 2H wide, with
the hidden as its residual; its output is the next hidden, which deeper draft rounds feed back as is (no `fc`),
and `lm_head(norm(hidden))` scores the head's own draft vocabulary. Draft id i is target id i + d2t[i]; `t2d`
marks the target ids the draft vocabulary holds. Both buffers are absent when the two vocabularies are equal.

Keys, as SafeAILab/EAGLE and SpecForge write them: `fc.weight`, `midlayer.{input_layernorm, hidden_norm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}.weight`, `norm.weight`,
`lm_head.weight`, `d2t`, `t2d`, and optionally `embed_tokens.weight` (copied from the target when absent).

This module does not build trees or decode; see `draft.py`. What both head kinds share is in `draft_head.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from engine.draft_head import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    DraftAttention,
    DraftHeadConfig,
    DraftKVCache,
    DraftMLP,
    DraftProjection,
    RMSNorm,
    load_state_dict,
    read_head_config,
)

ARCHITECTURE = "LlamaForCausalLMEagle3"


def eagle3_feature_layers(num_target_layers: int) -> tuple[int, int, int]:
    """The `output_hidden_states` indices EAGLE-3 reads: the inputs of target layers 2, L//2 and L-3."""
    if num_target_layers < 4:
        raise ValueError(f"an EAGLE-3 head needs a target of at least 4 layers, got {num_target_layers}")
    return (2, num_target_layers // 2, num_target_layers - 3)


def is_eagle3_checkpoint(config: dict, keys) -> bool:
    """Whether a head folder's config and weight keys are EAGLE-3's (a `midlayer`, or its architecture name)."""
    return any(k.startswith("midlayer.") for k in keys) or ARCHITECTURE in (config.get("architectures") or [])


@dataclass(frozen=True)
class Eagle3HeadConfig:
    """Shape of an EAGLE-3 head: its layer (`layer`, with the target's vocabulary), the draft vocabulary's size
    and the target's hidden size (what `fc` reads three of)."""

    layer: DraftHeadConfig
    draft_vocab_size: int
    target_hidden_size: int

    @classmethod
    def for_target(
        cls, target_config, draft_vocab_size: int | None = None, intermediate_size: int | None = None
    ) -> Eagle3HeadConfig:
        layer = DraftHeadConfig.for_target(target_config, intermediate_size)
        layer = DraftHeadConfig(**{**layer.__dict__, "fc_bias": False})
        return cls(layer, draft_vocab_size or layer.vocab_size, target_config.hidden_size)

    def to_official_json(self) -> dict:
        data = self.layer.to_official_json()
        data.pop("bias", None)
        return {
            **data,
            "architectures": [ARCHITECTURE],
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
        }

    @classmethod
    def from_official_json(cls, data: dict) -> Eagle3HeadConfig:
        layer = DraftHeadConfig.from_official_json({**data, "bias": False})
        return cls(
            layer,
            int(data.get("draft_vocab_size", layer.vocab_size)),
            int(data.get("target_hidden_size", layer.hidden_size)),
        )


class Eagle3Layer(nn.Module):
    """The `midlayer`: attention over concat(normed embedding, normed hidden), the hidden as residual."""

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config, input_size=2 * config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config)

    def forward(self, embeddings, hidden, position_ids, attention_mask, cache):
        fused = torch.cat((self.input_layernorm(embeddings), self.hidden_norm(hidden)), dim=-1)
        hidden = hidden + self.self_attn(fused, position_ids, attention_mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head. `forward` maps (token ids, target features [.., 3H_t] or its own hiddens [.., H]) to
    the next hiddens; `projection` scores them over the draft vocabulary."""

    kind = "eagle3"

    def __init__(self, config: Eagle3HeadConfig, feature_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        layer = config.layer
        if not 1 <= config.draft_vocab_size <= layer.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, {layer.vocab_size}], got {config.draft_vocab_size}"
            )
        self.config = config
        self.feature_layers = feature_layers  # set from the target's depth when the head meets it
        self.embed_tokens = nn.Embedding(layer.vocab_size, layer.hidden_size)
        self.fc = nn.Linear(3 * config.target_hidden_size, layer.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(layer)
        self.norm = RMSNorm(layer.hidden_size, layer.rms_norm_eps)
        self.lm_head = nn.Linear(layer.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(layer.vocab_size, dtype=torch.bool))
        self._vocab_version = 0

    @property
    def attention(self) -> DraftAttention:
        return self.midlayer.self_attn

    @property
    def hidden_size(self) -> int:
        return self.config.layer.hidden_size

    @property
    def reduced_vocab(self) -> bool:
        return self.config.draft_vocab_size < self.config.layer.vocab_size

    @property
    def draft_token_ids(self) -> torch.Tensor:
        """The target id of each draft id [draft_vocab]: i + d2t[i]."""
        return torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Make draft id i stand for target id token_ids[i] (sorted, distinct, as many as the draft vocabulary)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        vocab_size = self.config.layer.vocab_size
        if ids.numel() != self.config.draft_vocab_size or not torch.equal(ids, ids.unique()):
            raise ValueError(
                f"a draft vocabulary of this head needs {self.config.draft_vocab_size} distinct sorted target ids, "
                f"got {ids.numel()}"
            )
        if int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
            raise ValueError(
                f"draft vocabulary ids must be in [0, {vocab_size}), got {int(ids[0])}..{int(ids[-1])}"
            )
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True
        self._vocab_version += 1

    @property
    def vocabulary_key(self) -> tuple:
        """Changes when the head's lm_head or its draft vocabulary is replaced or moved (keys cached projections)."""
        weight = self.lm_head.weight
        return (weight.data_ptr(), weight.dtype, self.d2t.data_ptr(), self._vocab_version)

    def projection(self, lm_head: nn.Module | None = None) -> DraftProjection:
        """Draft log-probabilities over the head's own lm_head, after its final norm; the target's lm_head is
        not used."""
        del lm_head
        token_ids = self.draft_token_ids if self.reduced_vocab else None
        return DraftProjection(self.lm_head.weight, None, token_ids, norm=self.norm)

    @property
    def num_proposal_tokens(self) -> int:
        return self.config.draft_vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: DraftKVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (token t+1); features [B, T, 3H_t] (the target's, at t) or [B, T, H] (the head's own
        output at t) -> the hidden at t+1 [B, T, H]."""
        hidden = features.to(self.fc.weight.dtype)
        if hidden.shape[-1] == self.fc.in_features:
            hidden = self.fc(hidden)
        elif hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"EAGLE-3 head features are [.., {self.fc.in_features}] (three target layers) or "
                f"[.., {self.hidden_size}] (its own), got [.., {features.shape[-1]}]"
            )
        return self.midlayer(self.embed_tokens(input_ids), hidden, position_ids, attention_mask, cache)

    # ---- checkpoints in the official EAGLE-3 layout -----------------------------------------------------------

    def save_pretrained(self, out_dir: str, include_embeddings: bool = False, as_bin: bool = False) -> None:
        """Write config.json and model.safetensors (or pytorch_model.bin). d2t/t2d are written only for a reduced
        vocabulary, as the official heads do; embeddings (the target's) only when asked."""
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not include_embeddings:
            state.pop("embed_tokens.weight")
        if not self.reduced_vocab:
            state.pop("d2t"), state.pop("t2d")
        for name in (SAFETENSORS_NAME, "pytorch_model.bin"):
            if os.path.isfile(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))  # one weights file, never a stale second one
        if as_bin:
            torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
        else:
            save_file(state, os.path.join(out_dir, SAFETENSORS_NAME))
        with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_official_json(), f, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        target_embeddings: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] | None = None,
    ) -> Eagle3Head:
        """Load an EAGLE-3 head from `path`; `target_embeddings` [vocab, H] fill `embed_tokens` when the
        checkpoint has none."""
        data = read_head_config(path)
        state = {k.removeprefix("model."): v for k, v in load_state_dict(path).items()}
        if "draft_vocab_size" not in data and "lm_head.weight" in state:
            data = {**data, "draft_vocab_size": state["lm_head.weight"].shape[0]}
        if "target_hidden_size" not in data and "fc.weight" in state:
            data = {**data, "target_hidden_size": state["fc.weight"].shape[1] // 3}
        head = cls(Eagle3HeadConfig.from_official_json(data), feature_layers)
        if "embed_tokens.weight" not in state:
            if target_embeddings is None:
                raise ValueError(f"{path!r} has no embed_tokens.weight; pass the target's embeddings to copy")
            state["embed_tokens.weight"] = target_embeddings.detach().float().cpu().clone()
        if head.reduced_vocab and ("d2t" not in state or "t2d" not in state):
            raise ValueError(
                f"EAGLE-3 head {path!r} drafts over {head.config.draft_vocab_size} of "
                f"{head.config.layer.vocab_size} tokens but has no d2t/t2d buffers to map them"
            )
        defaults = head.state_dict()
        state.setdefault("d2t", defaults["d2t"])
        state.setdefault("t2d", defaults["t2d"])
        missing, unexpected = sorted(set(defaults) - set(state)), sorted(set(state) - set(defaults))
        if missing or unexpected:
            raise ValueError(
                f"draft head {path!r} does not match the EAGLE-3 layout: missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in state.items():
            if tensor.shape != defaults[key].shape:
                raise ValueError(
                    f"draft head {path!r}: {key} has shape {tuple(tensor.shape)}, expected {tuple(defaults[key].shape)}"
                )
        state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
        head.load_state_dict(state)
        ids = head.draft_token_ids
        if int(ids.min()) < 0 or int(ids.max()) >= head.config.layer.vocab_size:
            raise ValueError(f"EAGLE-3 head {path!r}: d2t maps draft ids outside the target's vocabulary")
        return head.eval()
