"""Side-by-side generation benchmark: several methods, the same prompts, one process, interleaved.

Each repeat runs every method on prompt 1, then every method on prompt 2, and so on, so that drift in a shared
machine's speed hits all methods alike. Per method it reports tokens/s (median over repeats), the speedup over the
baseline method, tau (mean tokens per draft/verify step, where the method has steps) and the fraction of outputs
token-identical to the baseline. Nothing is estimated: every figure is a measured time or a counted token.

Methods are small objects (`BenchMethod`); the jobs decide which to run. This module also holds the grid search
that finds the best static TreeParams on a calibration slice of the same prompts.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from engine.draft_head import DraftHead
from engine.generate import generate_speculative
from engine.packed_linear import stock_linears
from engine.target import TargetModel
from engine.types import Controller, StaticController, TreeParams


@dataclass(frozen=True)
class RunRecord:
    """One method's output for one prompt: new token ids, and draft/verify steps where the method has them."""

    new_token_ids: list[int]
    num_steps: int | None = None
    extra_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchMethod:
    """A named way to generate. `run(prompt_ids, max_new_tokens)` returns a RunRecord."""

    name: str
    run: Callable[[list[int], int], RunRecord]
    tree_params: str | None = None


@dataclass
class MethodResult:
    name: str
    tokens_per_s: float
    speedup: float
    mean_accepted_tokens: float | None
    identical_fraction: float
    tree_params: str | None
    num_new_tokens: int
    seconds: float
    tokens_per_s_per_repeat: list[float]
    extra_fractions: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def hf_method(
    model: PreTrainedModel,
    name: str = "hf_greedy",
    eos_token_ids: Sequence[int] = (),
    packed: bool = False,
    **generate_kwargs,
) -> BenchMethod:
    """HF `generate`, greedy, one prompt at a time, stopping at `eos_token_ids` (default: the generation
    config's); extra kwargs such as prompt_lookup_num_tokens=10. packed: on the prepacked linear layers the
    engine gave the model (`engine.packed_linear`); by default the stock kernels, as HF alone runs them."""
    if eos_token_ids:
        generate_kwargs["eos_token_id"] = list(eos_token_ids)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

    @torch.inference_mode()
    def run(prompt_ids: list[int], max_new_tokens: int) -> RunRecord:
        ids = torch.tensor([prompt_ids], device=model.device)
        with contextlib.nullcontext() if packed else stock_linears(model):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                **generate_kwargs,
            )
        return RunRecord(out[0, len(prompt_ids) :].tolist())

    return BenchMethod(name=name, run=run)


def eagle_method(
    name: str,
    target: TargetModel,
    head: DraftHead,
    controller_factory: Callable[[], Controller],
    tree_params: str | None = None,
    decision_seconds: Callable[[], float] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> BenchMethod:
    """Speculative decoding with the controller `controller_factory` returns for each prompt (a fresh one, or the
    same long-lived one), stopping at `eos_token_ids` as HF generate stops at the generation config's. The
    `draft` and `verify` shares of wall time come from the steps' own timings; `decision_seconds`, if given,
    reads the controller's cumulative time spent deciding on the generation thread, reported as `decision`."""

    def run(prompt_ids: list[int], max_new_tokens: int) -> RunRecord:
        before = decision_seconds() if decision_seconds else 0.0
        out = generate_speculative(
            target,
            head,
            prompt_ids,
            controller_factory(),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(eos_token_ids) or None,
        )
        extra = {
            "draft": sum(step.draft_seconds for step in out.steps),
            "verify": sum(step.verify_seconds for step in out.steps),
        }
        if decision_seconds:
            extra["decision"] = decision_seconds() - before
        return RunRecord(out.new_token_ids, num_steps=len(out.steps), extra_seconds=extra)

    return BenchMethod(name=name, run=run, tree_params=tree_params)


def static_eagle_method(
    name: str, target: TargetModel, head: DraftHead, params: TreeParams, eos_token_ids: Sequence[int] = ()
) -> BenchMethod:
    controller = StaticController(params)
    return eagle_method(
        name, target, head, lambda: controller, tree_params=params.compact, eos_token_ids=eos_token_ids
    )


def run_benchmark(
    methods: Sequence[BenchMethod],
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    repeats: int = 1,
    baseline: str | None = None,
    progress: bool = True,
) -> dict[str, MethodResult]:
    """Run all methods on all prompts, interleaved, `repeats` times. The first method is the baseline unless
    `baseline` names another. Returns results keyed by method name, in the given order."""
    if not methods or not prompts:
        raise ValueError("run_benchmark needs at least one method and one prompt")
    baseline = baseline or methods[0].name
    for method in methods:  # warm-up: first-call allocations and lazy inits stay out of the timings
        method.run(prompts[0], min(8, max_new_tokens))

    seconds = {m.name: [0.0] * repeats for m in methods}
    tokens = {m.name: [0] * repeats for m in methods}
    steps = {m.name: 0 for m in methods}
    extra = {m.name: {} for m in methods}
    outputs: dict[str, list[list[int]]] = {m.name: [] for m in methods}
    bar = tqdm(total=repeats * len(prompts) * len(methods), desc="bench", disable=not progress)
    for repeat in range(repeats):
        for prompt in prompts:
            for method in methods:
                started = time.perf_counter()
                record = method.run(prompt, max_new_tokens)
                seconds[method.name][repeat] += time.perf_counter() - started
                tokens[method.name][repeat] += len(record.new_token_ids)
                if repeat == 0:
                    outputs[method.name].append(record.new_token_ids)
                    if record.num_steps is not None:
                        steps[method.name] += record.num_steps
                    for key, value in record.extra_seconds.items():
                        extra[method.name][key] = extra[method.name].get(key, 0.0) + value
                bar.update(1)
    bar.close()

    rates = {name: [tokens[name][r] / seconds[name][r] for r in range(repeats)] for name in seconds}
    base_rate = statistics.median(rates[baseline])
    results = {}
    for method in methods:
        name = method.name
        identical = sum(a == b for a, b in zip(outputs[name], outputs[baseline], strict=True))
        total_seconds_first = seconds[name][0]
        results[name] = MethodResult(
            name=name,
            tokens_per_s=statistics.median(rates[name]),
            speedup=statistics.median(rates[name]) / base_rate,
            mean_accepted_tokens=(tokens[name][0] / steps[name]) if steps[name] else None,
            identical_fraction=identical / len(prompts),
            tree_params=method.tree_params,
            num_new_tokens=tokens[name][0],
            seconds=total_seconds_first,
            tokens_per_s_per_repeat=rates[name],
            extra_fractions={k: v / total_seconds_first for k, v in extra[name].items()},
        )
    return results


def default_grid() -> list[TreeParams]:
    """A small grid of CPU-sized static trees, from chains (top_k=1) to bushy trees. GPU-sized trees such as the
    official 60/5/10 are measured separately as `eagle_defaults`."""
    chains = ["3/2/1", "4/3/1", "5/4/1", "6/5/1", "8/7/1", "10/9/1"]
    trees = ["6/3/2", "8/4/2", "10/5/2", "12/5/3", "16/5/4", "24/6/4"]
    return [TreeParams.parse(shape) for shape in chains + trees]


def grid_search(
    target: TargetModel,
    head: DraftHead,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    grid: Sequence[TreeParams],
    progress: bool = True,
    eos_token_ids: Sequence[int] = (),
) -> tuple[TreeParams, dict[str, float]]:
    """Tokens/s of each static TreeParams on `prompts`; returns the best and the whole table.

    Every tree runs on a prompt before the next prompt starts, in an order that rotates from prompt to prompt,
    so that a machine that speeds up or slows down during the search favours no tree (timing one tree after
    another over all prompts lets such drift pick the winner).
    """
    grid = list(grid)
    seconds = dict.fromkeys((params.compact for params in grid), 0.0)
    generated = dict.fromkeys(seconds, 0)
    bar = tqdm(total=len(grid) * len(prompts), desc="grid search", disable=not progress)
    for index, prompt in enumerate(prompts):
        shift = index % len(grid)
        for params in grid[shift:] + grid[:shift]:
            started = time.perf_counter()
            output = generate_speculative(
                target,
                head,
                prompt,
                StaticController(params),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos_token_ids) or None,
            )
            seconds[params.compact] += time.perf_counter() - started
            generated[params.compact] += output.num_new_tokens
            bar.update(1)
    bar.close()
    table = {name: generated[name] / seconds[name] for name in seconds}
    best = max(table, key=table.get)
    return TreeParams.parse(best), table
