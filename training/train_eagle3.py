"""Train an EAGLE-3 draft head with the training-time test (TTT).

Data: each sequence's three feature layers (`engine.eagle3_head.eagle3_feature_layers`), concatenated [T, 3H],
the target's last hidden states [T, H] (its distribution, taken over the draft vocabulary) and its argmax [T].

TTT unrolls the head the way the tree uses it. Step 0 at position j reads (fc(features_j), x_{j+1}) and predicts
x_{j+2}. Step i >= 1 at position j reads (the head's own step i-1 output at j-1, x_{j+1}), and attends to step 0's
keys at positions <= j-i (what real features produced) plus one key of each step 1..i (its own chain), exactly
what draft round i sees at inference. Loss: soft cross-entropy against the target's distribution restricted to
the draft vocabulary, weighted `ttt_decay`**i, over positions whose target argmax the draft vocabulary holds. No
feature regression.

Token ids in, head out; the loop, schedule and evaluation are `training.train_draft`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from engine.draft_head import DraftKVCache
from engine.eagle3_head import Eagle3Head, Eagle3HeadConfig, eagle3_feature_layers
from engine.target import TargetModel
from training.fit import autocast, fit

if TYPE_CHECKING:
    from training.train_draft import DraftTrainConfig

Eagle3Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # ids, features, last, argmax


@torch.inference_mode()
def eagle3_examples(
    model: PreTrainedModel, sequences: list[list[int]], progress: bool = True, precision: str = "fp32"
) -> list[Eagle3Example]:
    """One forward per sequence: (ids [T], features [T, 3H], last hidden [T, H], target argmax [T]), on the CPU;
    with precision "bf16" computed under bf16 autocast and kept in bf16 (`training.fit`)."""
    target = TargetModel(model, eagle3_feature_layers(model.config.num_hidden_layers))
    keep = torch.bfloat16 if precision == "bf16" else torch.float32
    examples = []
    for sequence in tqdm(sequences, desc="EAGLE-3 data: target features", disable=not progress):
        ids = torch.tensor([sequence], device=target.device)
        with autocast(precision, target.device):
            last, features = target.run_backbone(input_ids=ids)
            argmax = target.lm_head(last[0]).argmax(-1)
        examples.append((ids[0].cpu(), features[0].to(keep).cpu(), last[0].to(keep).cpu(), argmax.cpu()))
    return examples


def ttt_mask(length: int, step: int) -> torch.Tensor:
    """Which keys query position j of TTT step `step` sees: [length, (step+1)*length] bool, keys ordered by step.

    Example, length 3, step 1: j=2 sees step 0's keys 0..1 and step 1's key 2."""
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None]
    blocks = [key <= query - step]
    blocks += [key == query - (step - s) for s in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def eagle3_losses(
    head: Eagle3Head,
    target_rows: torch.nn.Linear,
    batch: tuple[torch.Tensor, ...],
    steps: int,
    decay: float,
) -> torch.Tensor:
    """batch: ids [B, T], features [B, T, 3H], last [B, T, H], in_vocab [B, T], valid [B, T] -> scalar loss."""
    ids, features, last, in_vocab, valid = batch
    tokens = ids[:, 1:]  # x_{j+1}
    width = tokens.shape[1]
    with torch.no_grad():
        target_probs = torch.softmax(target_rows(last[:, 1:]), dim=-1)  # the target at j+1 ranks x_{j+2}
    weight = (valid[:, 1:] & in_vocab[:, 1:]).float()  # [B, T-1]
    positions = torch.arange(width)[None].expand_as(tokens)
    cache = DraftKVCache()
    minimum = torch.finfo(torch.float32).min
    hidden = head.fc(features[:, :-1])
    total = torch.zeros(())
    norm = sum(decay**i for i in range(steps))
    for step in range(steps):
        if step > 0:  # position j reads the head's own output at j-1
            hidden = torch.cat((torch.zeros_like(hidden[:, :1]), hidden[:, :-1]), dim=1)
        mask = torch.zeros(width, (step + 1) * width).masked_fill_(~ttt_mask(width, step), minimum)
        hidden = head.midlayer(head.embed_tokens(tokens), hidden, positions, mask[None, None], cache)
        log_probs = torch.log_softmax(head.lm_head(head.norm(hidden)), dim=-1)
        step_weight = weight.clone()
        step_weight[:, :step] = 0  # no chain of `step` earlier positions there
        loss = (-(target_probs * log_probs).sum(-1) * step_weight).sum() / step_weight.sum().clamp(min=1)
        total = total + (decay**step / norm) * loss
    return total


def eagle3_batches(examples: list, batch_size: int, generator: torch.Generator):
    """Padded batches (ids, features, last, in_vocab, valid) of examples (ids, features, last, in_vocab)."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(ids.shape[0] for ids, *_ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        features = torch.zeros(len(chunk), width, chunk[0][1].shape[1])
        last = torch.zeros(len(chunk), width, chunk[0][2].shape[1])
        in_vocab = torch.zeros(len(chunk), width, dtype=torch.bool)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, (row_ids, row_features, row_last, row_in_vocab) in enumerate(chunk):
            length = row_ids.shape[0]
            ids[row, :length], features[row, :length], last[row, :length] = row_ids, row_features, row_last
            in_vocab[row, :length], valid[row, :length] = row_in_vocab, True
        yield ids, features, last, in_vocab, valid


def new_eagle3_head(model: PreTrainedModel, draft_vocab: torch.Tensor | None) -> Eagle3Head:
    """A fresh head for `model`: its embeddings (frozen), its lm_head rows for the draft vocabulary and its final
    norm as the starting point of the head's own lm_head and norm."""
    config = Eagle3HeadConfig.for_target(
        model.config, None if draft_vocab is None else int(draft_vocab.numel())
    )
    head = Eagle3Head(config, eagle3_feature_layers(model.config.num_hidden_layers))
    if draft_vocab is not None and head.reduced_vocab:
        head.set_draft_vocab(draft_vocab)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(model.get_input_embeddings().weight.detach().float().cpu())
        rows = model.get_output_embeddings().weight.detach().float().cpu()
        head.lm_head.weight.copy_(rows[head.draft_token_ids])
        final_norm = getattr(model.base_model, "norm", None)
        if final_norm is not None:
            head.norm.weight.copy_(final_norm.weight.detach().float().cpu())
    head.embed_tokens.weight.requires_grad_(False)
    return head


def target_rows(model: PreTrainedModel, head: Eagle3Head) -> torch.nn.Linear:
    """The target's lm_head restricted to the head's draft vocabulary, frozen, fp32 on the CPU."""
    weight = model.get_output_embeddings().weight.detach().float().cpu()[head.draft_token_ids]
    rows = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    rows.weight.data.copy_(weight)
    return rows.requires_grad_(False)


def train_eagle3_head(
    model: PreTrainedModel,
    examples: list[Eagle3Example],
    draft_vocab: torch.Tensor | None,
    config: DraftTrainConfig,
    progress: bool = True,
) -> tuple[Eagle3Head, list[float], float]:
    """Fit a fresh EAGLE-3 head over `draft_vocab` (sorted target ids; None: the whole vocabulary) with the
    training-time test. Returns (head, losses, seconds)."""
    if config.ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {config.ttt_steps}")
    torch.manual_seed(config.seed)
    head = new_eagle3_head(model, draft_vocab)
    rows = target_rows(model, head)
    examples = [(ids, features, last, head.t2d[argmax]) for ids, features, last, argmax in examples]
    return fit(
        head,
        examples,
        lambda batch: eagle3_losses(head, rows, batch, config.ttt_steps, config.ttt_decay),
        config,
        eagle3_batches,
        progress,
    )
