"""One EAGLE-2 step: draft a tree, score it with the target in one forward, verify, keep the accepted path.

`run_step` is the step every caller shares: the generation loop, and the step timing that fills latency tables.
It takes the tree shape as a value (`TreeParams`) and returns a `StepResult`; stop rules, controllers and the
statistics a generation keeps are the caller's.

Everything heavy stays on the target's device. What crosses to the host per step is O(tree): the drafted
candidates (ids, scores and parents, for the tree's bookkeeping), the target's choice per node (greedy) or one
index per visited node (sampling), the accepted ids and two confidence scalars; never the [N+1, V] logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from engine.draft import Drafter, PendingDraftInput
from engine.target import TargetModel
from engine.tree import additive_mask
from engine.types import DraftConfidence, SamplingParams, StepStats, TreeParams
from engine.verify import VerifyResult, verify_greedy, verify_sampling


class StepTimer:
    """Wall time between marks on `device`.

    CPU: `time.perf_counter`, which costs nothing. CUDA: events recorded on the device's current stream. Reading
    an interval waits for the work queued before its end mark, which is little: the step has already waited for
    verification when its accepted ids came to the host. No device-wide synchronisation either way."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.uses_events = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if not self.uses_events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        if not self.uses_events:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def step_timer(device: torch.device, time_steps: bool | None) -> StepTimer | None:
    """The timer a generation uses. time_steps None: time on the CPU, where reading the clock costs nothing, and
    not on CUDA; True or False force it."""
    if time_steps is None:
        time_steps = device.type != "cuda"
    return StepTimer(device) if time_steps else None


@dataclass(frozen=True)
class StepResult:
    """What one step did.

    verify: the accepted tree nodes, the accepted drafted ids and the target's bonus id.
    next_pending: the draft head's input for the next step (features of the accepted path and the tokens after
        them; the bonus token is the next tree's root).
    draft_seconds, verify_seconds: the two phases' wall time, 0.0 when the step was not timed.
    """

    verify: VerifyResult
    next_pending: PendingDraftInput
    confidence: DraftConfidence
    draft_seconds: float
    verify_seconds: float

    @property
    def new_token_ids(self) -> list[int]:
        """The tokens the step emits, in order: accepted drafts, then the bonus token."""
        return [*self.verify.accepted_token_ids, self.verify.bonus_token_id]

    def stats(
        self, step_index: int, tree_params: TreeParams, num_emitted: int, context_length: int
    ) -> StepStats:
        """The step's record; `tree_params` is what the controller chose (the step may have drafted less)."""
        return StepStats(
            step_index=step_index,
            tree_params=tree_params,
            accepted_length=self.verify.accepted_length,
            num_emitted=num_emitted,
            draft_seconds=self.draft_seconds,
            verify_seconds=self.verify_seconds,
            confidence=self.confidence,
            context_length=context_length,
        )


@torch.inference_mode()
def run_step(
    target: TargetModel,
    drafter: Drafter,
    cache: DynamicCache,
    pending: PendingDraftInput,
    params: TreeParams,
    prefix_length: int,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    timer: StepTimer | None = None,
) -> StepResult:
    """Draft a tree of shape `params` from `pending`, verify it, and leave `cache` holding the accepted path.

    prefix_length: tokens in the target's KV cache, i.e. every token of the sequence but the tree's root (the
        last pending token). On return the cache holds prefix_length + len(accepted nodes) positions.
    generator: drives sampling; on the target's device. Unused when `sampling` is greedy.
    timer: times the draft and the verify phase; None leaves both at 0.0.
    """
    vocab_size = target.lm_head.out_features
    if params.top_k > vocab_size:
        raise ValueError(f"TreeParams.top_k={params.top_k} exceeds the target's vocabulary of {vocab_size}")
    assert TargetModel.cache_length(cache) == prefix_length, "the target cache must hold exactly the prefix"
    device = target.device
    started = timer.mark() if timer else 0.0
    drafted = drafter.draft(pending, params)
    drafted_at = timer.mark() if timer else 0.0

    tree = drafted.tree
    position_ids = (tree.depths + prefix_length)[None].to(device)  # [1, N+1]
    mask = additive_mask(tree.ancestor_mask.to(device), prefix_length, target.dtype)  # [1, 1, N+1, P+N+1]
    scored = target.forward_tree(tree.token_ids.to(device), position_ids, mask, cache)
    logits = scored.logits[0]  # [N+1, V], stays on the device
    if sampling.is_greedy:
        result = verify_greedy(tree, logits)
    else:
        result = verify_sampling(tree, logits, sampling, generator)
    accepted = torch.tensor(result.accepted_nodes, device=device)
    TargetModel.keep_accepted(cache, prefix_length, accepted)
    next_pending = PendingDraftInput(
        features=scored.features[:, accepted],
        token_ids=torch.tensor([[*result.accepted_token_ids, result.bonus_token_id]], device=device),
    )
    finished = timer.mark() if timer else 0.0
    return StepResult(
        verify=result,
        next_pending=next_pending,
        confidence=drafted.confidence,
        draft_seconds=timer.seconds(started, drafted_at) if timer else 0.0,
        verify_seconds=timer.seconds(drafted_at, finished) if timer else 0.0,
    )
