"""Loading a draft head of either kind from a folder: EAGLE-1/2 (`DraftHead`) or EAGLE-3 (`Eagle3Head`).

The kind is read from the checkpoint (EAGLE-3 has a `midlayer` and a fused 3-layer `fc`); a caller that states it
(`use_eagle3=`) is checked against it. Both kinds get the target's embeddings when the checkpoint has none, and
an EAGLE-3 head learns which target layers it reads from the target's depth.
"""

from __future__ import annotations

import os

from transformers import PreTrainedModel

from engine.draft_head import SAFETENSORS_NAME, DraftHead, load_state_dict, read_head_config
from engine.eagle3_head import Eagle3Head, eagle3_feature_layers, is_eagle3_checkpoint
from engine.packed_linear import pack_linears

AnyDraftHead = DraftHead | Eagle3Head


def checkpoint_is_eagle3(path: str) -> bool:
    """Whether the head folder at `path` holds an EAGLE-3 head (its config and weight keys decide)."""
    config = read_head_config(path)
    if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)):
        from safetensors import safe_open  # reads the key list only, not the weights

        with safe_open(os.path.join(path, SAFETENSORS_NAME), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        keys = list(load_state_dict(path))
    return is_eagle3_checkpoint(config, (k.removeprefix("model.") for k in keys))


def load_draft_head(path: str, model: PreTrainedModel, use_eagle3: bool | None = None) -> AnyDraftHead:
    """The head in `path` for target `model`, on the model's device and dtype.

    use_eagle3: None detects the kind; True or False must agree with the checkpoint (ValueError naming both).
    On a CPU its linear layers compute on prepacked weights (`engine.packed_linear`; repacked if it is trained)."""
    eagle3 = checkpoint_is_eagle3(path)
    if use_eagle3 is not None and bool(use_eagle3) != eagle3:
        found = "an EAGLE-3 head" if eagle3 else "an EAGLE-1/2 head"
        raise ValueError(f"use_eagle3={use_eagle3} but {path!r} holds {found}")
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()
    config = model.config
    if eagle3:
        head = Eagle3Head.from_pretrained(
            path, target_embeddings=embeddings, feature_layers=eagle3_feature_layers(config.num_hidden_layers)
        )
        layer = head.config.layer
        checks = [
            ("target_hidden_size", head.config.target_hidden_size, config.hidden_size),
            ("vocab_size", layer.vocab_size, config.vocab_size),
        ]
    else:
        head = DraftHead.from_pretrained(path, target_embeddings=embeddings)
        checks = [("hidden_size", head.config.hidden_size, config.hidden_size)]
    for name, got, want in checks:
        if got != want:
            raise ValueError(f"draft head {path!r}: {name} {got} does not match the target's {want}")
    head = head.to(device=model.device, dtype=model.dtype).eval()
    pack_linears(head)
    return head
