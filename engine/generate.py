"""The speculative decoding loop: prefill, then draft -> verify -> accept until a stop condition.

Every step takes its TreeParams from a controller (or a fixed value) and returns a StepStats. The output never
depends on the controller: only tokens the target itself would emit are accepted. Plain autoregressive decoding
with the same stop rules (`generate_plain`) is the reference the speculative loop is tested against.

Token ids in, token ids out: no tokenizer, no prompts, no Ray here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead
from engine.target import TargetModel
from engine.tree import additive_mask
from engine.types import Controller, DecodingState, GenerationOutput, SamplingParams, StepStats, TreeParams
from engine.verify import sample_token, verify_greedy, verify_sampling


class GenerationTimeout(RuntimeError):
    """A generation ran past its deadline (`generate_speculative(..., deadline=...)`)."""


class FixedTreeController:
    """The same TreeParams on every step."""

    def __init__(self, params: TreeParams) -> None:
        self.params = params

    def decide(self, state: DecodingState) -> TreeParams:
        return self.params

    def observe(self, stats: StepStats) -> None:
        return None


@dataclass(frozen=True)
class StopRules:
    max_new_tokens: int
    context_limit: int
    eos_token_ids: frozenset[int]


def as_batch(input_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """Validate a single prompt and return it as [1, T] (the batch dimension is kept for later batching)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [T] or [1, T], got shape {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise ValueError(
            f"input_ids has batch size {ids.shape[0]}; this engine generates one sequence per call"
        )
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty; a prompt needs at least one token")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    return ids.long()


def stop_rules(
    target: TargetModel, prompt_length: int, max_new_tokens: int, max_length: int | None, eos
) -> StopRules:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = target.context_limit if max_length is None else min(max_length, target.context_limit)
    if prompt_length >= limit:
        raise ValueError(
            f"prompt has {prompt_length} tokens, which leaves no room within the context limit of {limit} tokens"
        )
    if eos is None:
        eos = target.config.eos_token_id
    eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    return StopRules(max_new_tokens=max_new_tokens, context_limit=limit, eos_token_ids=eos_ids)


def append_tokens(
    output: list[int], new_tokens: list[int], rules: StopRules, prompt_length: int
) -> str | None:
    """Append as many of `new_tokens` as the stop rules allow. Returns the finish reason if generation ends."""
    for token in new_tokens:
        output.append(token)
        if token in rules.eos_token_ids:
            return "eos"
        if len(output) - prompt_length >= rules.max_new_tokens:
            return "length"
        if len(output) >= rules.context_limit:
            return "context"
    return None


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate_speculative(
    target: TargetModel,
    head: DraftHead,
    input_ids: torch.Tensor | list[int],
    controller: Controller | TreeParams,
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    max_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
) -> GenerationOutput:
    """EAGLE-2 generation of one sequence. Returns ids [1, prompt + new] and one StepStats per step.

    deadline: a time.perf_counter() value; a step that would start after it raises GenerationTimeout instead
    (a step already running finishes first, so a generation overruns it by at most one step)."""
    started = time.perf_counter()
    ids = as_batch(input_ids).to(target.device)
    prompt_length = ids.shape[1]
    rules = stop_rules(target, prompt_length, max_new_tokens, max_length, eos_token_id)
    if isinstance(controller, TreeParams):
        controller = FixedTreeController(controller)
    output = ids[0].tolist()
    if max_new_tokens == 0:
        return GenerationOutput(ids.cpu(), prompt_length, 0, [], "length", time.perf_counter() - started)

    cache = target.new_cache()
    drafter = Drafter(head, target.lm_head)
    prefill = target.prefill(ids, cache)
    first_token = sample_token(prefill.logits[0, -1].cpu(), sampling, generator)  # CPU, like verification
    finish = append_tokens(output, [first_token], rules, prompt_length)
    pending = PendingDraftInput(
        features=prefill.features,
        token_ids=torch.tensor([output[1 : prompt_length + 1]], device=target.device),
    )
    steps: list[StepStats] = []
    last_step = None
    vocab_size = target.lm_head.out_features
    while finish is None:
        if deadline is not None and time.perf_counter() > deadline:
            raise GenerationTimeout(
                f"stopped after {time.perf_counter() - started:.1f} s and {len(output) - prompt_length} new "
                "tokens, past the deadline"
            )
        state = DecodingState(
            len(steps), prompt_length, len(output) - prompt_length, len(output), last_step, token_ids=output
        )
        params = controller.decide(state)
        if params.top_k > vocab_size:
            raise ValueError(
                f"TreeParams.top_k={params.top_k} exceeds the target's vocabulary of {vocab_size}"
            )

        # Never draft past the last token the generation may emit: a deep chain near the end would pay for
        # drafting and verifying tokens that are cut off anyway. The step still records the controller's choice.
        remaining = min(
            rules.max_new_tokens - (len(output) - prompt_length), rules.context_limit - len(output)
        )
        draft_started = _clock(target.device)
        drafted = drafter.draft(pending, params.capped(remaining))
        verify_started = _clock(target.device)
        tree = drafted.tree
        prefix_length = len(output) - 1  # every token but the root is in the target cache
        token_ids = tree.token_ids.to(target.device)
        position_ids = (tree.depths + prefix_length)[None].to(target.device)
        mask = _tree_mask(tree.ancestor_mask, prefix_length, target)
        scored = target.forward_tree(token_ids, position_ids, mask, cache)
        logits = scored.logits[0].cpu()
        if sampling.is_greedy:
            result = verify_greedy(tree, logits)
        else:
            result = verify_sampling(tree, logits, sampling, generator)
        accepted = torch.tensor(result.accepted_nodes, device=target.device)
        TargetModel.keep_accepted(cache, prefix_length, accepted)
        before = len(output)
        finish = append_tokens(
            output, [*result.accepted_token_ids, result.bonus_token_id], rules, prompt_length
        )
        pending = PendingDraftInput(
            features=scored.features[:, accepted],
            token_ids=torch.tensor(
                [[*result.accepted_token_ids, result.bonus_token_id]], device=target.device
            ),
        )
        finished_at = _clock(target.device)

        last_step = StepStats(
            step_index=len(steps),
            tree_params=params,
            accepted_length=result.accepted_length,
            num_emitted=len(output) - before,
            draft_seconds=verify_started - draft_started,
            verify_seconds=finished_at - verify_started,
            confidence=drafted.confidence,
            context_length=before,
        )
        steps.append(last_step)
        controller.observe(last_step)

    result = GenerationOutput(
        output_ids=torch.tensor([output]),
        num_prompt_tokens=prompt_length,
        num_new_tokens=len(output) - prompt_length,
        steps=steps,
        finish_reason=finish,
        wall_seconds=time.perf_counter() - started,
    )
    finish_hook = getattr(controller, "finish", None)  # optional: controllers that keep wall-time statistics
    if finish_hook is not None:
        finish_hook(result.num_new_tokens, result.wall_seconds)
    return result


def _tree_mask(ancestor_mask: torch.Tensor, prefix_length: int, target: TargetModel) -> torch.Tensor:
    return additive_mask(ancestor_mask.to(target.device), prefix_length, target.dtype)


@torch.inference_mode()
def generate_plain(
    target: TargetModel,
    input_ids: torch.Tensor | list[int],
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    max_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Plain autoregressive decoding with the same stop rules: the reference for identity tests."""
    started = time.perf_counter()
    ids = as_batch(input_ids).to(target.device)
    prompt_length = ids.shape[1]
    rules = stop_rules(target, prompt_length, max_new_tokens, max_length, eos_token_id)
    output = ids[0].tolist()
    finish = "length" if max_new_tokens == 0 else None
    cache = target.new_cache()
    step_input = ids
    while finish is None:
        logits = target.prefill(step_input, cache).logits[0, -1]
        token = sample_token(logits, sampling, generator)
        finish = append_tokens(output, [token], rules, prompt_length)
        step_input = torch.tensor([[token]], device=target.device)
    return GenerationOutput(
        output_ids=torch.tensor([output]),
        num_prompt_tokens=prompt_length,
        num_new_tokens=len(output) - prompt_length,
        finish_reason=finish,
        wall_seconds=time.perf_counter() - started,
    )
