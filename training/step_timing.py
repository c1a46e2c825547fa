"""Step timing: fill a per-machine `LatencyTable` by timing the engine's own step for each action's shape.

The table (its data, fits and JSON) lives in `policy.latency`; measuring it needs the engine, so it lives here.
Each shape is timed with `engine.step.run_step`, the step the generation loop runs, on one fixed context.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead
from engine.step import StepTimer, run_step
from engine.target import TargetModel
from engine.types import TreeParams
from policy.latency import LatencyTable


@torch.inference_mode()
def measure_latency_table(
    target: TargetModel,
    head: DraftHead,
    prompt_ids: list[int],
    actions: Sequence[TreeParams],
    repeats: int = 5,
    signature: dict | None = None,
) -> LatencyTable:
    """Median draft and verify seconds of one greedy `run_step` per action's shape, after prefilling `prompt_ids`.

    draft: reading one pending pair, growing and selecting the tree. verify: scoring the tree with the target,
    greedy verification and keeping the accepted path. Every repeat crops both KV caches back to the prompt, so
    each timing sees the same context length. Medians over `repeats`, after one untimed warm-up per shape.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if len(prompt_ids) < 2:
        raise ValueError("latency measurement needs a prompt of at least 2 tokens")
    target = target.for_head(head)
    device = target.device
    ids = torch.tensor([prompt_ids], device=device)
    cache = target.new_cache()
    prefill = target.prefill(ids[:, :-1], cache)  # the last prompt token plays the tree root
    prefix_length = ids.shape[1] - 1
    drafter = Drafter(head, target.lm_head)
    drafter.read_pending(PendingDraftInput(features=prefill.features[:, :-1], token_ids=ids[:, 1:-1]))
    draft_length = drafter.cache.length
    pending = PendingDraftInput(features=prefill.features[:, -1:], token_ids=ids[:, -1:])
    no_nodes = torch.zeros(0, dtype=torch.long, device=device)
    timer = StepTimer(device)

    draft_times: dict[str, list[float]] = {params.compact: [] for params in actions}
    verify_times: dict[str, list[float]] = {params.compact: [] for params in actions}
    for repeat in range(repeats + 1):
        for params in actions:
            step = run_step(target, drafter, cache, pending, params, prefix_length, timer=timer)
            TargetModel.keep_accepted(cache, prefix_length, no_nodes)  # crop back to the prompt
            drafter.cache.crop(draft_length)
            if repeat > 0:  # repeat 0 is the warm-up
                draft_times[params.compact].append(step.draft_seconds)
                verify_times[params.compact].append(step.verify_seconds)
    return LatencyTable(
        draft_seconds={key: statistics.median(values) for key, values in draft_times.items()},
        verify_seconds={key: statistics.median(values) for key, values in verify_times.items()},
        signature=dict(signature or {}),
    )
