"""Batch in, batch out: the engine's interface for callers that process many prompts (the Ray generation actor).

`generate_batch` takes a list of `GenerationRequest`s and returns one `RequestResult` per request, in order. Today
it runs the requests one after another through `generate_speculative`; batched speculative decoding can replace
the loop behind this signature without any caller changing. A request that fails (a prompt too long for the
context, a bad parameter) gets its error in its own result and the others go on. Token ids only: no text here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.draft_head import DraftHead
from engine.generate import GenerationTimeout, StopCheck, generate_speculative
from engine.target import TargetModel
from engine.types import Controller, GenerationOutput, SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue.

    controller: the tree policy for this request (wrap a fixed TreeParams in `StaticController`).
    seed: seeds the sampling generator (ignored when greedy), so a row's sample does not depend on its batch.
        The generator lives on the target's device, where sampling draws, so a seed's text is reproducible
        per device type (CPU and CUDA draw different streams).
    timeout_s: if given, the request fails with a GenerationTimeout once it has run this long (checked between
        steps).
    time_steps: whether the steps' StepStats carry draft and verify seconds (see `generate_speculative`).
    eos_token_ids: the tokens that end this generation; None: the target config's eos_token_id.
    stop_check: the caller's own stop rule on the new tokens (`engine.generate.StopCheck`), e.g. stop strings.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    controller: Controller
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    timeout_s: float | None = None
    time_steps: bool | None = None
    eos_token_ids: tuple[int, ...] | None = None
    stop_check: StopCheck | None = None


@dataclass(frozen=True)
class RequestResult:
    """Exactly one of `output` and `error` is set. `error` reads 'ErrorType: message'."""

    output: GenerationOutput | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        assert (self.output is None) != (self.error is None), "a result holds an output or an error, not both"


def generate_batch(
    target: TargetModel,
    head: DraftHead,
    requests: list[GenerationRequest],
    max_length: int | None = None,
    before_request: Callable[[int, GenerationRequest], None] | None = None,
) -> list[RequestResult]:
    """Generate every request; a failing request yields a RequestResult with its error, never an exception.

    before_request(index, request) runs before each request (a hook for callers and tests; it may raise, and
    that request then fails alone)."""
    results: list[RequestResult] = []
    for index, request in enumerate(requests):
        deadline = None if request.timeout_s is None else time.perf_counter() + request.timeout_s
        try:
            if before_request is not None:
                before_request(index, request)
            generator = None
            if not request.sampling.is_greedy:
                generator = torch.Generator(device=target.device).manual_seed(request.seed)
            output = generate_speculative(
                target,
                head,
                request.prompt_ids,
                request.controller,
                sampling=request.sampling,
                max_new_tokens=request.max_new_tokens,
                max_length=max_length,
                generator=generator,
                deadline=deadline,
                time_steps=request.time_steps,
                eos_token_id=None if request.eos_token_ids is None else list(request.eos_token_ids),
                stop_check=request.stop_check,
            )
            results.append(RequestResult(output=output))
        except GenerationTimeout as error:
            results.append(
                RequestResult(error=f"GenerationTimeout: over the {request.timeout_s:g} s limit: {error}")
            )
        except Exception as error:  # one request's failure is that request's result; the batch goes on
            results.append(RequestResult(error=f"{type(error).__name__}: {error}"))
    return results
