"""Trains the demo target: a small LLaMA-architecture causal LM on the demo corpus, on CPU, within a time budget.

This module tokenizes documents into one flat id stream, samples random training windows, trains with AdamW under
a warmup + cosine schedule, measures held-out loss and top-1 accuracy, and saves with `save_pretrained` so the
result loads with `AutoModelForCausalLM`/`AutoTokenizer` like any hub model. It does not build the corpus or the
tokenizer, and knows nothing about speculative decoding.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from demo.corpus import Document
from training.fit import PRECISIONS, autocast, resolve_precision

# The final train loss is the mean over this many last steps, to smooth batch noise.
NUM_FINAL_LOSS_STEPS = 10


@dataclass(frozen=True)
class TargetTrainConfig:
    """Model shape and training schedule of the demo target.

    Training stops at `max_steps` or after `time_budget_s` seconds, whichever comes first. The learning rate
    warms up linearly over `warmup_steps`, then follows a cosine from `learning_rate` down to
    `min_learning_rate_ratio * learning_rate`, driven by the larger of the step fraction and the time fraction.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    seq_len: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    time_budget_s: float
    max_steps: int
    seed: int = 0
    # "auto": bf16 autocast where the hardware multiplies bf16 (training.fit.resolve_precision), else fp32. On a
    # CPU without it bf16 is emulated: a tiny-preset step measured 1.1-1.2 s against 0.18 s in fp32 (AVX2 EPYC).
    precision: str = "auto"
    tie_word_embeddings: bool = False
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    num_eval_windows: int = 32
    # None uses every core. Fewer helps when other processes share the machine: PyTorch's worker threads wait
    # for each other, so one descheduled thread stalls every step.
    num_threads: int | None = None

    def __post_init__(self) -> None:
        positive_fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "seq_len",
            "batch_size",
            "max_steps",
            "num_eval_windows",
        )
        for name in positive_fields:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(
                f"seq_len {self.seq_len} exceeds max_position_embeddings {self.max_position_embeddings}"
            )
        if self.learning_rate <= 0 or self.time_budget_s <= 0 or self.warmup_steps < 0:
            raise ValueError(
                "learning_rate and time_budget_s must be positive and warmup_steps non-negative, got "
                f"{self.learning_rate}, {self.time_budget_s}, {self.warmup_steps}"
            )
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be positive or None, got {self.num_threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.min_learning_rate_ratio <= 1.0:
            raise ValueError(f"min_learning_rate_ratio must be in [0, 1], got {self.min_learning_rate_ratio}")


# Deep and narrow: 12 layers, d=192 (3 heads of 64), a 1024-token vocabulary; about 5.7M parameters.
# Chosen for a 2-core CPU and a ~5 minute budget: a small vocabulary makes each token easier to learn from few
# examples (a 4096-token vocabulary stayed near unigram loss after ~150k tokens) and keeps the lm_head, which
# the draft head runs on every tree level, cheap.
FULL_TARGET_CONFIG = TargetTrainConfig(
    vocab_size=1024,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=12,
    num_attention_heads=3,
    max_position_embeddings=2048,
    seq_len=256,
    batch_size=16,
    learning_rate=4e-3,
    warmup_steps=30,
    # A step budget keeps the build deterministic (~1 s a step on 2 idle cores); the time cap is a safety net.
    time_budget_s=600.0,
    max_steps=300,
)

# For tests and smoke runs: same depth class (>= 8 layers), tiny width.
TINY_TARGET_CONFIG = TargetTrainConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=8,
    num_attention_heads=4,
    max_position_embeddings=512,
    seq_len=128,
    batch_size=8,
    learning_rate=3e-3,
    warmup_steps=10,
    time_budget_s=60.0,
    max_steps=150,  # ~14 s on 2 idle cores; the step budget keeps it deterministic
)


def target_preset(name: Literal["full", "tiny"]) -> TargetTrainConfig:
    presets = {"full": FULL_TARGET_CONFIG, "tiny": TINY_TARGET_CONFIG}
    if name not in presets:
        raise ValueError(f"unknown target preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]


@dataclass(frozen=True)
class TargetReport:
    num_parameters: int
    num_steps: int
    num_train_tokens: int
    train_seconds: float
    initial_train_loss: float
    final_train_loss: float
    heldout_loss: float
    heldout_top1_accuracy: float
    tokens_per_second: float
    precision: str  # what the steps ran in: "bf16" (autocast) or "fp32"


def tokenize_corpus(documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """One flat stream of ids, `[bos, *doc_0, eos, bos, *doc_1, eos, ...]`, as int64 of shape [num_tokens]."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs bos and eos tokens")
    # The backend tokenizer skips the long-sequence warning and encodes the batch in parallel.
    encodings = tokenizer.backend_tokenizer.encode_batch(
        [document.text for document in documents], add_special_tokens=False
    )
    stream: list[int] = []
    for encoding in encodings:
        stream.append(tokenizer.bos_token_id)
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


def sample_batch(
    token_ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream: inputs and next-token labels, both [batch_size, seq_len]."""
    num_starts = token_ids.numel() - seq_len
    if num_starts <= 0:
        raise ValueError(
            f"the token stream ({token_ids.numel()} ids) is shorter than seq_len + 1 = {seq_len + 1}"
        )
    starts = torch.randint(0, num_starts, (batch_size,), generator=generator)  # [batch_size]
    offsets = torch.arange(seq_len + 1)  # [seq_len + 1]
    windows = token_ids[starts[:, None] + offsets[None, :]]  # [batch_size, seq_len + 1]
    return windows[:, :-1], windows[:, 1:]


def evaluation_windows(token_ids: torch.Tensor, num_windows: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced windows of `seq_len + 1` ids, [num_windows, seq_len + 1]; the same for every run."""
    num_starts = token_ids.numel() - seq_len
    if num_starts <= 0:
        raise ValueError(f"the held-out stream ({token_ids.numel()} ids) is shorter than seq_len + 1")
    starts = torch.linspace(0, num_starts - 1, num_windows).long()  # [num_windows]
    return token_ids[starts[:, None] + torch.arange(seq_len + 1)[None, :]]


def build_target_model(config: TargetTrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config.vocab_size}")
    model_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def make_optimizer(model: torch.nn.Module, config: TargetTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    decayed = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    not_decayed = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95))


def learning_rate_at(config: TargetTrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup over steps, then cosine decay over the larger of step and time progress."""
    warmup_factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = min(1.0, max(step / config.max_steps, elapsed_s / config.time_budget_s))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    ratio = config.min_learning_rate_ratio
    return config.learning_rate * warmup_factor * (ratio + (1.0 - ratio) * cosine)


def next_token_loss(
    model: LlamaForCausalLM, input_ids: torch.Tensor, label_ids: torch.Tensor
) -> torch.Tensor:
    logits = model(input_ids=input_ids, use_cache=False).logits  # [batch, seq_len, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), label_ids.flatten())


def train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    label_ids: torch.Tensor,
    config: TargetTrainConfig,
    precision: str,
) -> float:
    """One optimiser step; precision: "bf16" or "fp32", as `resolve_precision` settled it once for the run."""
    with autocast(precision, input_ids.device):
        loss = next_token_loss(model, input_ids, label_ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate_target(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean next-token loss and top-1 accuracy over `windows` [num_windows, seq_len + 1], in fp32 eval mode."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    num_correct = 0
    num_tokens = 0
    for batch in windows.split(batch_size):
        input_ids, label_ids = batch[:, :-1], batch[:, 1:]  # [batch, seq_len] each
        logits = model(input_ids=input_ids, use_cache=False).logits.float()  # [batch, seq_len, vocab]
        total_loss += F.cross_entropy(logits.flatten(0, 1), label_ids.flatten(), reduction="sum").item()
        num_correct += (logits.argmax(dim=-1) == label_ids).sum().item()
        num_tokens += label_ids.numel()
    model.train(was_training)
    return total_loss / num_tokens, num_correct / num_tokens


def train_target(
    train_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    config: TargetTrainConfig,
    out_dir: str | os.PathLike[str],
    progress: bool = True,
) -> TargetReport:
    """Train a fresh target on random windows of `train_ids` [num_tokens], evaluate on fixed windows of
    `heldout_ids`, and save model and tokenizer to `out_dir`. Stops at the time budget or `max_steps`.
    `config.num_threads` applies to this call only; the caller's thread count is restored afterwards."""
    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train_target(train_ids, heldout_ids, tokenizer, config, out_dir, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_target(
    train_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    config: TargetTrainConfig,
    out_dir: str | os.PathLike[str],
    progress: bool,
) -> TargetReport:
    torch.manual_seed(config.seed)
    model = build_target_model(config, tokenizer)
    model.train()
    precision = resolve_precision(config.precision, train_ids.device)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    eval_windows = evaluation_windows(heldout_ids, config.num_eval_windows, config.seq_len)
    tokens_per_step = config.batch_size * config.seq_len
    losses: list[float] = []
    bar = tqdm(desc="target", unit="step", total=config.max_steps, disable=not progress)
    start_time = time.perf_counter()
    elapsed_s = 0.0
    while len(losses) < config.max_steps and elapsed_s < config.time_budget_s:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, len(losses), elapsed_s)
        input_ids, label_ids = sample_batch(train_ids, config.batch_size, config.seq_len, generator)
        losses.append(train_step(model, optimizer, input_ids, label_ids, config, precision))
        elapsed_s = time.perf_counter() - start_time
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{len(losses) * tokens_per_step / elapsed_s:.0f}")
    bar.close()
    heldout_loss, heldout_accuracy = evaluate_target(model, eval_windows, config.batch_size)
    save_target(model, tokenizer, out_dir)
    num_train_tokens = len(losses) * tokens_per_step
    return TargetReport(
        num_parameters=sum(parameter.numel() for parameter in model.parameters()),
        num_steps=len(losses),
        num_train_tokens=num_train_tokens,
        train_seconds=elapsed_s,
        initial_train_loss=losses[0],
        final_train_loss=sum(losses[-NUM_FINAL_LOSS_STEPS:]) / len(losses[-NUM_FINAL_LOSS_STEPS:]),
        heldout_loss=heldout_loss,
        heldout_top1_accuracy=heldout_accuracy,
        tokens_per_second=num_train_tokens / elapsed_s,
        precision=precision,
    )


def save_target(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]
) -> None:
    """Save fp32 safetensors weights, config, generation config and tokenizer, loadable offline."""
    model.to(torch.float32).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
