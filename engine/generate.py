"""The speculative decoding loop: prefill, then `engine.step.run_step` until a stop condition.

Every step takes its TreeParams from a controller and returns a StepStats. The output never depends on the
controller: only tokens the target itself would emit are accepted. Plain autoregressive decoding with the same
stop rules (`generate_plain`) is the reference the speculative loop is tested against.

Token ids in, token ids out: no tokenizer, no prompts, no Ray here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead
from engine.step import run_step, step_timer
from engine.target import TargetModel
from engine.types import Controller, DecodingState, GenerationOutput, SamplingParams, StepStats
from engine.verify import keyed_choices, sample_token


class GenerationTimeout(RuntimeError):
    """A generation ran past its deadline (`generate_speculative(..., deadline=...)`)."""


@dataclass(frozen=True)
class StopRules:
    """When a generation ends: `max_new_tokens` new tokens, `context_limit` tokens in all, or an eos token."""

    max_new_tokens: int
    context_limit: int
    eos_token_ids: frozenset[int]

    def tokens_left(self, length: int, prompt_length: int) -> int:
        """How many more tokens a sequence of `length` tokens may still emit."""
        return min(self.max_new_tokens - (length - prompt_length), self.context_limit - length)


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


def prepare(
    target: TargetModel,
    input_ids: torch.Tensor | list[int],
    max_new_tokens: int,
    max_length: int | None,
    eos_token_id: int | list[int] | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, StopRules]:
    """Check a generation's arguments; return the prompt as [1, T] on the target's device and its stop rules.

    Sampling draws on the target's device, so a generator must live there (torch.Generator(device=...))."""
    ids = as_batch(input_ids).to(target.device)
    if generator is not None and generator.device.type != target.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the target on {target.device}; sampling draws where "
            "the model runs, so build it with torch.Generator(device=target.device)"
        )
    return ids, stop_rules(target, ids.shape[1], max_new_tokens, max_length, eos_token_id)


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


# A caller's stop rule on the new tokens so far (e.g. stop strings, `actors.stops`): None to go on, or how many of
# them to keep (the generation then ends there, finish reason "stop").
StopCheck = Callable[[list[int]], int | None]


def apply_stop_check(
    output: list[int], prompt_length: int, finish: str | None, stop_check: StopCheck | None
) -> str | None:
    """Run `stop_check` after every step, even one that ended the generation otherwise (a stop inside the step
    comes before its eos or its last allowed token); cut `output` to what it keeps."""
    if stop_check is None:
        return finish
    keep = stop_check(output[prompt_length:])
    if keep is None:
        return finish
    del output[prompt_length + keep :]
    return "stop"


def check_deadline(deadline: float | None, started: float, num_new_tokens: int) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise GenerationTimeout(
            f"stopped after {time.perf_counter() - started:.1f} s and {num_new_tokens} new tokens, past the "
            "deadline"
        )


@torch.inference_mode()
def generate_speculative(
    target: TargetModel,
    head: DraftHead,
    input_ids: torch.Tensor | list[int],
    controller: Controller,
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    max_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    deadline: float | None = None,
    time_steps: bool | None = None,
    stop_check: StopCheck | None = None,
) -> GenerationOutput:
    """EAGLE-2 generation of one sequence. Returns ids [1, prompt + new] and one StepStats per step.

    stop_check: run on the new tokens after every step (`StopCheck`); tokens it cuts off were accepted by the
        target, so the output equals plain decoding with the same check.
    deadline: a time.perf_counter() value; a step that would start after it raises GenerationTimeout instead
        (a step already running finishes first, so a generation overruns it by at most one step).
    time_steps: fill each StepStats' draft and verify seconds. None: on the CPU, where it is free, and not on
        CUDA, where reading a step's time waits for its kernels; untimed steps report 0.0."""
    started = time.perf_counter()
    target = target.for_head(head)
    ids, rules = prepare(target, input_ids, max_new_tokens, max_length, eos_token_id, generator)
    prompt_length = ids.shape[1]
    output = ids[0].tolist()
    if max_new_tokens == 0:
        return GenerationOutput(ids.cpu(), prompt_length, 0, [], "length", time.perf_counter() - started)
    cache, drafter = target.new_cache(), Drafter(head, target.lm_head)
    timer = step_timer(target.device, time_steps)
    prefill = target.prefill(ids, cache)
    first_token = sample_token(prefill.logits[0, -1], sampling, generator)
    finish = append_tokens(output, [first_token], rules, prompt_length)
    finish = apply_stop_check(output, prompt_length, finish, stop_check)
    pending = PendingDraftInput(prefill.features, torch.tensor([output[1:]], device=target.device))
    steps: list[StepStats] = []
    while finish is None:
        check_deadline(deadline, started, len(output) - prompt_length)
        before = len(output)
        state = DecodingState(
            len(steps), prompt_length, before - prompt_length, before, steps[-1] if steps else None, output
        )
        params = controller.decide(state)
        # Never draft past the last token the generation may emit: a deep chain near the end would pay for
        # drafting and verifying tokens that are cut off anyway. The step still records the controller's choice.
        capped = params.capped(rules.tokens_left(before, prompt_length))
        step = run_step(target, drafter, cache, pending, capped, before - 1, sampling, generator, timer)
        finish = append_tokens(output, step.new_token_ids, rules, prompt_length)
        finish = apply_stop_check(output, prompt_length, finish, stop_check)
        pending = step.next_pending
        steps.append(step.stats(len(steps), params, len(output) - before, before))
        controller.observe(steps[-1])
    result = GenerationOutput(
        output_ids=torch.tensor([output]),
        num_prompt_tokens=prompt_length,
        num_new_tokens=len(output) - prompt_length,
        steps=steps,
        finish_reason=finish,
        wall_seconds=time.perf_counter() - started,
    )
    controller.finish(result.num_new_tokens, result.wall_seconds)
    return result


@torch.inference_mode()
def generate_plain(
    target: TargetModel,
    input_ids: torch.Tensor | list[int],
    sampling: SamplingParams = SamplingParams(),
    max_new_tokens: int = 128,
    max_length: int | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    stop_check: StopCheck | None = None,
    noise_seed: int | None = None,
) -> GenerationOutput:
    """Plain autoregressive decoding with the same stop rules: the reference for identity tests.

    noise_seed: sample with keyed noise (`engine.verify.keyed_choices`), as the batched engine does, instead
    of drawing from `generator`; the reference for sampled rows of `engine.batch.generate_batch`."""
    started = time.perf_counter()
    ids, rules = prepare(target, input_ids, max_new_tokens, max_length, eos_token_id, generator)
    prompt_length = ids.shape[1]
    output = ids[0].tolist()
    finish = "length" if max_new_tokens == 0 else None
    cache = target.new_cache()
    step_input = ids
    while finish is None:
        logits = target.prefill(step_input, cache).logits[0, -1]
        if noise_seed is None:
            token = sample_token(logits, sampling, generator)
        else:
            token = int(keyed_choices(logits[None], sampling, noise_seed, [len(output)])[0])
        finish = append_tokens(output, [token], rules, prompt_length)
        finish = apply_stop_check(output, prompt_length, finish, stop_check)
        step_input = torch.tensor([[token]], device=target.device)
    return GenerationOutput(
        output_ids=torch.tensor([output]),
        num_prompt_tokens=prompt_length,
        num_new_tokens=len(output) - prompt_length,
        finish_reason=finish,
        wall_seconds=time.perf_counter() - started,
    )
