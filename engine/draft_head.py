"""The EAGLE-1/2 draft head: weights, forward pass, its small KV cache, and the official checkpoint layout.

The head is one LLaMA decoder layer over `fc(concat(embed(token), feature))`, where `feature` is the target's
last (post-norm) hidden state. Its output is a predicted next feature, which the *target's* lm_head turns into
draft logits. Layer 0 has no input_layernorm, exactly as in the official checkpoints, so their state dicts load
key for key: `fc.weight` [H, 2H] (+ optional `fc.bias`), `layers.0.*`, `embed_tokens.weight` (optional: copied
from the target when absent).

A head may also carry a draft vocabulary: the target token ids its proposals are drawn from, in a side file
(`draft_vocab.safetensors`, key `token_ids`, int64 [V']) so the weights file stays in the official layout. The
drafter then projects onto those rows of the target's lm_head only, which makes each draft round several times
cheaper when the target's vocabulary is large. It changes what is proposed, never what is accepted.

This module does not build trees or decode; see `tree.py` and `generate.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.gqa_attention import can_pack, packed_attention
from engine.kv_buffer import append_in_place
from engine.packed_linear import PackedWeight

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
DRAFT_VOCAB_NAME = "draft_vocab.safetensors"


@dataclass(frozen=True)
class DraftHeadConfig:
    """Shape of a draft head. Mirrors the fields of the LLaMA config.json that EAGLE ships."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    fc_bias: bool = True
    head_dim: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def for_target(cls, target_config, intermediate_size: int | None = None) -> DraftHeadConfig:
        """A head shaped like the target's layers (what EAGLE trains)."""
        rope = getattr(target_config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0))
        return cls(
            vocab_size=target_config.vocab_size,
            hidden_size=target_config.hidden_size,
            intermediate_size=intermediate_size or target_config.intermediate_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=getattr(
                target_config, "num_key_value_heads", target_config.num_attention_heads
            ),
            rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=target_config.max_position_embeddings,
            head_dim=getattr(target_config, "head_dim", None),
        )

    def to_official_json(self) -> dict:
        """The config.json an official EAGLE-1/2 head carries (a one-layer LLaMA config)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "bias": self.fc_bias,
            **{k: v for k, v in asdict(self).items() if k not in ("fc_bias",) and v is not None},
        }

    @classmethod
    def from_official_json(cls, data: dict) -> DraftHeadConfig:
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"draft head config.json lacks {missing}; it needs {list(required)}")
        if data.get("num_hidden_layers", 1) != 1:
            raise ValueError(
                f"EAGLE-1/2 draft heads have num_hidden_layers=1, got {data['num_hidden_layers']}"
            )
        rope_scaling = data.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"draft head rope_scaling {rope_scaling} is not supported; only default RoPE is")
        rope = data.get("rope_parameters") or {}
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads", data["num_attention_heads"]),
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            max_position_embeddings=data.get("max_position_embeddings", 2048),
            fc_bias=bool(data.get("bias", True)),
            head_dim=data.get("head_dim"),
        )


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DraftKVCache:
    """Keys and values of the head's single attention layer: [batch, kv_heads, length, head_dim] each."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.buffers: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append in place (`engine.kv_buffer`): no copy of the cached entries."""
        self.keys, key_buffer = append_in_place(self.keys, self.buffers[0], keys)
        self.values, value_buffer = append_in_place(self.values, self.buffers[1], values)
        self.buffers = (key_buffer, value_buffer)
        return self.keys, self.values

    def crop(self, length: int) -> None:
        """Drop everything after the first `length` positions (e.g. the nodes of a finished tree)."""
        if self.keys is not None:
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]


class DraftAttention(nn.Module):
    """LLaMA attention over the head's own KV cache. `input_size`: what q/k/v read (EAGLE-3 reads 2H)."""

    def __init__(self, config: DraftHeadConfig, input_size: int | None = None) -> None:
        super().__init__()
        head_dim = config.resolved_head_dim
        input_size = input_size or config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(input_size, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, config.hidden_size, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, 1, T, head_dim]
        angles = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: DraftKVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(position_ids, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(k, v)
        # attention_mask: additive [B, 1, T, kv_len]; None means plain causal over a cache-free call.
        if can_pack(q, k, attention_mask):
            out = packed_attention(q, k, v, attention_mask)
        else:
            if self.num_kv_heads != self.num_heads:
                repeat = self.num_heads // self.num_kv_heads
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
            is_causal = attention_mask is None and length > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DraftMLP(nn.Module):
    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """LLaMA decoder layer without input_layernorm (EAGLE's layer 0)."""

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, position_ids, attention_mask, cache):
        hidden = hidden + self.self_attn(hidden, position_ids, attention_mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DraftProjection:
    """Draft log-probabilities from a head's predicted hiddens: an lm_head's weight (the target's, or only its
    rows for a draft vocabulary, or an EAGLE-3 head's own), after an optional final `norm`, with proposals mapped
    back to target ids by `token_ids` (None: draft id = target id).

    Example: token_ids [2, 7, 9]; the best of the three rows is row 1 -> proposed target id 7."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        norm: nn.Module | None = None,
    ) -> None:
        self.weight, self.bias, self.norm = weight, bias, norm  # weight [V', H]
        self.packing = PackedWeight(weight)  # oneDNN on a CPU: a few rows of hidden states at a time
        self.token_ids = None if token_ids is None else token_ids.to(weight.device)  # [V']

    @classmethod
    def rows_of(cls, lm_head: nn.Module, token_ids: torch.Tensor | None) -> DraftProjection:
        """The rows of `lm_head` for `token_ids` (all of it for None): a copy made once per head and lm_head."""
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
        if token_ids is None:
            return cls(weight, bias)
        token_ids = token_ids.to(weight.device)
        return cls(weight[token_ids], None if bias is None else bias[token_ids], token_ids)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> log-probabilities [..., V'] over the draft vocabulary."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        return torch.log_softmax(self.packing.linear(hidden, self.bias).float(), dim=-1)

    def to_target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        return indices if self.token_ids is None else self.token_ids[indices]


class DraftHead(nn.Module):
    """EAGLE-1/2 draft head. `forward` maps (token ids, target features) to predicted next features."""

    kind = "eagle"
    feature_layers = None  # it reads the target's last (post-norm) hidden state

    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.fc_bias)
        self.layers = nn.ModuleList([DraftLayer(config)])
        self.draft_vocab: torch.Tensor | None = (
            None  # [V'] sorted target ids, or None for the whole vocabulary
        )

    @property
    def attention(self) -> DraftAttention:
        return self.layers[0].self_attn

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_proposal_tokens(self) -> int:
        """How many tokens the head proposes from (its draft vocabulary, or the whole one)."""
        return self.config.vocab_size if self.draft_vocab is None else int(self.draft_vocab.numel())

    @property
    def vocabulary_key(self) -> int | None:
        """Changes when the draft vocabulary is replaced (keys cached projections)."""
        return None if self.draft_vocab is None else id(self.draft_vocab)

    def projection(self, lm_head: nn.Module) -> DraftProjection:
        """Draft log-probabilities over the target's `lm_head`, or its rows for the draft vocabulary."""
        return DraftProjection.rows_of(lm_head, self.draft_vocab)

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Draw proposals from these target token ids only (None: the whole vocabulary)."""
        if token_ids is None:
            self.draft_vocab = None
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted, no repeats
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise ValueError(
                f"a draft vocabulary needs 1..{self.config.vocab_size} token ids in [0, {self.config.vocab_size}), "
                f"got {ids.numel()} ids" + (f" from {int(ids[0])} to {int(ids[-1])}" if ids.numel() else "")
            )
        self.draft_vocab = ids

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: DraftKVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (token t+1), features [B, T, H] (target feature at t) -> predicted feature at t+1."""
        hidden = self.fc(torch.cat((self.embed_tokens(input_ids), features.to(self.fc.weight.dtype)), dim=-1))
        return self.layers[0](hidden, position_ids, attention_mask, cache)

    # ---- checkpoints in the official EAGLE layout -------------------------------------------------------------

    def save_pretrained(self, out_dir: str, include_embeddings: bool = False) -> None:
        """Write config.json + model.safetensors. Embeddings are left out by default, as in the official heads,
        because they are the target's and are copied back at load time."""
        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not include_embeddings:
            state.pop("embed_tokens.weight")
        save_file(state, os.path.join(out_dir, SAFETENSORS_NAME))
        with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_official_json(), f, indent=2)
        vocab_path = os.path.join(out_dir, DRAFT_VOCAB_NAME)
        if self.draft_vocab is not None:
            save_file({"token_ids": self.draft_vocab.cpu().contiguous()}, vocab_path)
        elif os.path.isfile(vocab_path):
            os.remove(vocab_path)  # a stale vocabulary from an earlier head in this folder

    @classmethod
    def from_pretrained(cls, path: str, target_embeddings: torch.Tensor | None = None) -> DraftHead:
        """Load an EAGLE-1/2 head from `path` (config.json plus model.safetensors or pytorch_model.bin).

        `target_embeddings` [vocab, H] fills `embed_tokens` when the checkpoint has none.
        """
        data = read_head_config(path)
        state = load_state_dict(path)
        if any(k.startswith("midlayer.") for k in state):
            raise ValueError(
                f"{path!r} is an EAGLE-3 head (midlayer.*); load it with engine.heads.load_draft_head or "
                "Eagle3Head.from_pretrained"
            )
        state = {k.removeprefix("model."): v for k, v in state.items()}
        data = {**data, "bias": "fc.bias" in state}
        config = DraftHeadConfig.from_official_json(data)
        head = cls(config)
        if "embed_tokens.weight" not in state:
            if target_embeddings is None:
                raise ValueError(f"{path!r} has no embed_tokens.weight; pass the target's embeddings to copy")
            state["embed_tokens.weight"] = target_embeddings.detach().clone()
        expected = set(head.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"draft head {path!r} does not match the EAGLE-1/2 layout: missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in state.items():
            want = head.state_dict()[key].shape
            if tensor.shape != want:
                raise ValueError(
                    f"draft head {path!r}: {key} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
                )
        head.load_state_dict(state)
        vocab_path = os.path.join(path, DRAFT_VOCAB_NAME)
        if os.path.isfile(vocab_path):
            vocab = load_file(vocab_path)
            if set(vocab) != {"token_ids"} or vocab["token_ids"].dtype != torch.int64:
                raise ValueError(f"{vocab_path!r} must hold one int64 tensor named 'token_ids'")
            head.set_draft_vocab(vocab["token_ids"])
        return head.eval()


def read_head_config(path: str) -> dict:
    """The config.json of the head folder at `path`; ValueError when the folder or the file is missing."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(config_path):
        raise ValueError(f"draft head folder {path!r} has no {CONFIG_NAME}")
    with open(config_path) as f:
        return json.load(f)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(path, SAFETENSORS_NAME)
    bin_path = os.path.join(path, BIN_NAME)
    if os.path.isfile(safetensors_path):
        return load_file(safetensors_path)
    if os.path.isfile(bin_path):
        # weights_only=True refuses arbitrary pickled objects: tensors and plain containers only.
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise ValueError(f"draft head folder {path!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")
