"""Train an EAGLE-1/2 draft head on a target's own continuations (an EAGLE-3 one: `training.train_eagle3`).

1. collect: the target greedily continues each prompt (HF generate, batched), then one forward pass captures its
   post-norm last hidden states (the features) along prompt + continuation.
2. train: the head reads (feature f_j, token x_{j+1}) and predicts f_{j+1}. Loss = SmoothL1 on the feature plus
   cross-entropy of the head's logits against the target's distribution softmax(lm_head(f_{j+1})). A second
   unrolled pass feeds the head its own predicted features, as the tree does beyond the first level. With
   `draft_vocab_size`, both distributions are taken over the draft vocabulary only (the most frequent tokens of
   the training sequences, saved with the head): the loss then costs a fraction of the full vocabulary's, and
   the drafter proposes from the same tokens it was trained on.
3. evaluate: speculative generation on held-out prompts, reporting tau (tokens per step).

With `eagle3`, steps 1-2 are EAGLE-3's (three feature layers, the training-time test; `training.train_eagle3`)
and the head is saved in the official EAGLE-3 layout.

Token ids in, head out; prompts come tokenized. Saving uses the official layout (draft_head.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from engine.draft_head import DraftHead, DraftHeadConfig
from engine.generate import generate_speculative
from engine.target import TargetModel
from engine.types import StaticController, TreeParams
from training.fit import autocast, fit, resolve_precision
from training.train_eagle3 import eagle3_examples, train_eagle3_head


@dataclass(frozen=True)
class DraftTrainConfig:
    max_prompt_tokens: int = 192
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    epochs: int = 6
    batch_size: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    feature_loss_weight: float = 1.0
    token_loss_weight: float = 0.1
    feature_noise: float = 0.1
    unroll_passes: int = 2
    draft_vocab_size: int | None = None  # None: the target's whole vocabulary
    eagle3: bool = False  # train an EAGLE-3 head (training-time test) instead of an EAGLE-1/2 one
    ttt_steps: int = 5  # EAGLE-3: unrolled steps of the training-time test
    ttt_decay: float = 0.8  # EAGLE-3: loss weight of step i is ttt_decay**i
    time_budget_s: float | None = None
    precision: str = "fp32"  # "fp32", "bf16" (mixed precision) or "auto" (`training.fit.resolve_precision`)
    eval_tree: TreeParams = TreeParams(24, 5, 4)
    eval_max_new_tokens: int = 96
    seed: int = 0


@dataclass
class DraftTrainReport:
    num_train_sequences: int
    num_train_tokens: int
    collect_seconds: float
    train_seconds: float
    num_steps: int
    final_loss: float
    eval_mean_accepted_tokens: float
    eval_tree: str
    eval_num_prompts: int
    precision: str = "fp32"
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def target_continuations(
    model: PreTrainedModel,
    prompts: list[list[int]],
    config: DraftTrainConfig,
    eos_token_ids: tuple[int, ...] = (),
    progress: bool = True,
) -> list[list[int]]:
    """Each prompt (cut to its last `max_prompt_tokens`) followed by the target's greedy continuation, which ends
    after the first end token (`eos_token_ids`, or the model's eos). Prompts are batched by length so little is
    padded; the result keeps the order of `prompts`."""
    pad_id = model.config.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    stops = set(eos_token_ids) or _eos_ids(model)
    prompts = [p[-config.max_prompt_tokens :] for p in prompts if len(p) > 0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sequences: list[list[int] | None] = [None] * len(prompts)
    device = model.device
    batches = range(0, len(order), config.generation_batch_size)
    for start in tqdm(batches, desc="draft data: target continuations", disable=not progress):
        rows = order[start : start + config.generation_batch_size]
        batch = [prompts[i] for i in rows]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=config.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=sorted(stops) if stops else None,
        )
        for position, (row, prompt) in enumerate(zip(rows, batch, strict=True)):
            continuation = out[position, width:].tolist()
            end = next((j for j, token in enumerate(continuation) if token in stops), None)
            sequences[row] = prompt + (continuation if end is None else continuation[: end + 1])
    return sequences


def _eos_ids(model: PreTrainedModel) -> set[int]:
    eos = model.config.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


@torch.inference_mode()
def sequence_features(
    model: PreTrainedModel, sequences: list[list[int]], progress: bool = True, precision: str = "fp32"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass per sequence: (token_ids [T], features [T, H]) on the CPU, the target's post-norm last
    hidden states; with precision "bf16" computed under bf16 autocast and kept in bf16 (half the memory)."""
    target = TargetModel(model)
    keep = torch.bfloat16 if precision == "bf16" else torch.float32
    examples = []
    for sequence in tqdm(sequences, desc="draft data: target features", disable=not progress):
        ids = torch.tensor([sequence], device=target.device)
        with autocast(precision, target.device):
            features = target.backbone(input_ids=ids).last_hidden_state[0]
        examples.append((ids[0].cpu(), features.to(keep).cpu()))
    return examples


def collect_features(
    model: PreTrainedModel, prompts: list[list[int]], config: DraftTrainConfig, progress: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy continuations plus features: a list of (token_ids [T], features [T, H]) on the CPU."""
    return sequence_features(model, target_continuations(model, prompts, config, progress=progress), progress)


def choose_draft_vocab(
    examples: list[tuple[torch.Tensor, torch.Tensor]], size: int, vocab_size: int
) -> torch.Tensor:
    """The `size` most frequent token ids of the training sequences, sorted ([size] int64); ties by id."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab_size}], got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids, *_ in examples:
        counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=torch.float64))
    order = torch.argsort(-counts, stable=True)  # most frequent first; equal counts keep id order
    return order[:size].sort().values


def draft_losses(
    head: DraftHead,
    lm_head: torch.nn.Module,
    token_ids: torch.Tensor,
    features: torch.Tensor,
    valid: torch.Tensor,
    config: DraftTrainConfig,
) -> torch.Tensor:
    """token_ids [B, T], features [B, T, H], valid [B, T-1] bool -> scalar loss over `unroll_passes` passes."""
    inputs_ids = token_ids[:, 1:]  # x_{j+1}
    targets = features[:, 1:]  # f_{j+1}
    input_features = features[:, :-1]  # f_j
    if config.feature_noise > 0:
        input_features = input_features + (torch.rand_like(input_features) - 0.5) * 2 * config.feature_noise
    with torch.no_grad():
        target_log_probs = torch.log_softmax(lm_head(targets), dim=-1)
    positions = torch.arange(inputs_ids.shape[1])[None].expand_as(inputs_ids)
    weight = valid.float()
    total = torch.zeros(())
    for _ in range(config.unroll_passes):
        predicted = head(inputs_ids, input_features, positions)
        feature_loss = (F.smooth_l1_loss(predicted, targets, reduction="none").mean(-1) * weight).sum()
        log_probs = torch.log_softmax(lm_head(predicted), dim=-1)
        token_loss = (-(target_log_probs.exp() * log_probs).sum(-1) * weight).sum()
        loss = (
            config.feature_loss_weight * feature_loss + config.token_loss_weight * token_loss
        ) / weight.sum()
        total = total + loss / config.unroll_passes
        # Next pass: position j reads the head's own prediction of f_j (shifted by one), as deeper tree levels do.
        input_features = torch.cat((input_features[:, :1], predicted[:, :-1]), dim=1)
    return total


def _batches(examples, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(ids.shape[0] for ids, _ in chunk)
        hidden = chunk[0][1].shape[1]
        token_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        features = torch.zeros(len(chunk), width, hidden)
        valid = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for row, (ids, feats) in enumerate(chunk):
            token_ids[row, : ids.shape[0]] = ids
            features[row, : ids.shape[0]] = feats
            valid[row, : ids.shape[0] - 1] = True
        yield token_ids, features, valid


def train_head(
    model: PreTrainedModel,
    examples: list[tuple[torch.Tensor, torch.Tensor]],
    config: DraftTrainConfig,
    head_config: DraftHeadConfig | None = None,
    progress: bool = True,
    init: DraftHead | None = None,
) -> tuple[DraftHead, list[float], float]:
    """Fit a head: a fresh one, or with `init` a copy of that head trained further (its draft vocabulary kept).
    Embeddings and lm_head are the target's, frozen. Returns (head, losses, seconds)."""
    torch.manual_seed(config.seed)
    head = _initial_head(model, config, head_config, init)
    head.embed_tokens.weight.data.copy_(model.get_input_embeddings().weight.detach().float().cpu())
    head.embed_tokens.weight.requires_grad_(False)
    lm_head = _frozen_copy(model.get_output_embeddings())
    if init is None and config.draft_vocab_size is not None:
        head.set_draft_vocab(choose_draft_vocab(examples, config.draft_vocab_size, head.config.vocab_size))
    if head.draft_vocab is not None:
        lm_head = _rows(lm_head, head.draft_vocab)
    return fit(
        head,
        examples,
        lambda batch: draft_losses(head, lm_head, *batch, config),
        config,
        _batches,
        progress,
    )


def _initial_head(
    model: PreTrainedModel,
    config: DraftTrainConfig,
    head_config: DraftHeadConfig | None,
    init: DraftHead | None,
) -> DraftHead:
    if init is None:
        return DraftHead(head_config or DraftHeadConfig.for_target(model.config))
    if not isinstance(init, DraftHead) or init.config.vocab_size != model.config.vocab_size:
        raise ValueError("the head to train further must be an EAGLE-1/2 head over the target's vocabulary")
    if init.config.hidden_size != model.config.hidden_size:
        raise ValueError(
            f"the head to train further has hidden size {init.config.hidden_size}, the target "
            f"{model.config.hidden_size}"
        )
    if config.draft_vocab_size is not None and config.draft_vocab_size != init.num_proposal_tokens:
        raise ValueError(
            f"draft_vocab_size {config.draft_vocab_size} contradicts the head to train further, which drafts over "
            f"{init.num_proposal_tokens} tokens (leave it unset to keep the head's)"
        )
    head = DraftHead(init.config)
    head.load_state_dict({k: v.detach().float().cpu() for k, v in init.state_dict().items()})
    head.set_draft_vocab(init.draft_vocab)
    return head


def _rows(module: torch.nn.Linear, token_ids: torch.Tensor) -> torch.nn.Linear:
    """A frozen lm_head over `token_ids` only: its logits are the full head's at those ids."""
    rows = torch.nn.Linear(module.in_features, token_ids.shape[0], bias=module.bias is not None)
    rows.weight.data.copy_(module.weight.data[token_ids])
    if module.bias is not None:
        rows.bias.data.copy_(module.bias.data[token_ids])
    return rows.requires_grad_(False)


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    copy = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    copy.load_state_dict({k: v.detach().float().cpu() for k, v in module.state_dict().items()})
    return copy.requires_grad_(False)


def evaluate_head(
    model: PreTrainedModel,
    head: DraftHead,
    prompts: list[list[int]],
    config: DraftTrainConfig,
    progress: bool = True,
    eos_token_ids: tuple[int, ...] = (),
) -> float:
    """Mean tokens per step (tau) of greedy speculative decoding over `prompts`, each stopping at an end token."""
    target = TargetModel(model)
    emitted = steps = 0
    for prompt in tqdm(prompts, desc="draft head: held-out acceptance", disable=not progress):
        out = generate_speculative(
            target,
            head,
            prompt[-config.max_prompt_tokens :],
            StaticController(config.eval_tree),
            max_new_tokens=config.eval_max_new_tokens,
            eos_token_id=list(eos_token_ids) or None,
        )
        emitted += sum(s.num_emitted for s in out.steps)
        steps += len(out.steps)
    return emitted / max(1, steps)


def train_draft_head(
    model: PreTrainedModel,
    train_prompts: list[list[int]],
    eval_prompts: list[list[int]],
    out_dir: str | None,
    config: DraftTrainConfig = DraftTrainConfig(),
    progress: bool = True,
    sequences: list[list[int]] | None = None,
    eos_token_ids: tuple[int, ...] = (),
    init_head: DraftHead | None = None,
) -> tuple[DraftHead, DraftTrainReport]:
    """collect -> train -> evaluate -> save (official layout) for any target the engine supports.

    The head learns from `train_prompts` continued by the target, or from ready `sequences` (token ids, e.g.
    prompt plus a dataset's answer) when those are given. With `init_head` (EAGLE-1/2 only) training goes on from
    that head instead of a fresh one."""
    TargetModel(model)  # refuses unsupported targets before any work
    if not train_prompts and not sequences:
        raise ValueError("train_draft_head needs at least one training prompt or sequence")
    if init_head is not None and config.eagle3:
        raise ValueError("training further from an existing head is for EAGLE-1/2 heads only, not eagle3")
    if init_head is not None:
        _initial_head(model, config, None, init_head)  # refuses a mismatched head before any work
    config = replace(config, precision=resolve_precision(config.precision, model.device))
    started = time.perf_counter()
    if sequences is None:
        sequences = target_continuations(model, train_prompts, config, eos_token_ids, progress)
    if config.eagle3:
        examples = eagle3_examples(model, sequences, progress, config.precision)
        vocab = None
        if config.draft_vocab_size is not None:
            vocab = choose_draft_vocab(examples, config.draft_vocab_size, model.config.vocab_size)
        collect_seconds = time.perf_counter() - started
        head, losses, train_seconds = train_eagle3_head(model, examples, vocab, config, progress=progress)
    else:
        examples = sequence_features(model, sequences, progress, config.precision)
        collect_seconds = time.perf_counter() - started
        head, losses, train_seconds = train_head(model, examples, config, progress=progress, init=init_head)
    head = head.to(device=model.device, dtype=model.dtype)
    tau = (
        evaluate_head(model, head, eval_prompts, config, progress, eos_token_ids)
        if eval_prompts
        else float("nan")
    )
    report = DraftTrainReport(
        num_train_sequences=len(examples),
        num_train_tokens=sum(example[0].shape[0] for example in examples),
        collect_seconds=collect_seconds,
        train_seconds=train_seconds,
        num_steps=len(losses),
        final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
        eval_mean_accepted_tokens=tau,
        eval_tree=config.eval_tree.compact,
        eval_num_prompts=len(eval_prompts),
        precision=config.precision,
        losses=losses,
    )
    if out_dir is not None:
        head.save_pretrained(out_dir)
    return head, report
