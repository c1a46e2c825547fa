"""The optimisation loop both head trainers share: AdamW, warm-up, cosine decay fitted to a time budget.

It knows nothing of heads or losses: it takes the parameters' module, the examples, a batching function and a
loss function.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from training.train_draft import DraftTrainConfig

PACE_STEPS = 10  # steps timed to fit the learning-rate schedule to a time budget


def fit(
    head: torch.nn.Module,
    examples: list,
    loss_of: Callable[[tuple], torch.Tensor],
    config: DraftTrainConfig,
    batches: Callable,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[float], float]:
    """AdamW over `head`'s trainable parameters for `config.epochs` passes over `examples`, batched by
    `batches(examples, batch_size, generator)`, with warm-up and cosine decay (fitted to `time_budget_s` when
    one is set). Returns (head in eval mode, losses, seconds)."""
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    # With a time budget, the cosine decay is fitted to the steps the budget allows (estimated from the first
    # steps' pace), so a budgeted run still ends at the low learning rate instead of being cut off at a high one.
    planned = {"steps": total_steps}

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, planned["steps"] - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_fraction)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="draft head: train", disable=not progress)
    head.train()
    for _ in range(config.epochs):
        for batch in batches(examples, config.batch_size, generator):
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if config.time_budget_s is not None and len(losses) == PACE_STEPS:
                pace = (time.perf_counter() - started) / PACE_STEPS
                planned["steps"] = min(total_steps, max(PACE_STEPS + 1, int(config.time_budget_s / pace)))
                bar.total = planned["steps"]
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if config.time_budget_s is not None and time.perf_counter() - started > config.time_budget_s:
                break
        else:
            continue
        break
    bar.close()
    return head.eval(), losses, time.perf_counter() - started
