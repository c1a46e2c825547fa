"""Train a LearnedController by online contextual-bandit RL on real generation steps.

`train_policy` measures (or loads) the machine's latency table, then runs the real speculative engine over the
training prompts for a few epochs with the controller in "train" mode: before each step the bandit picks a tree
(Thompson sampling), after it the step's reward updates the bandit at once. It logs per-epoch mean reward and
measured tokens/s, and writes the checkpoint (policy.safetensors + policy.json), latency.json and
learning_curve.png to `out_dir`.

`generate_fn` (the engine's `generate_speculative` unless given) runs one generation. Evaluation against static
trees is the benchmark's job, not this module's.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from engine.generate import generate_speculative
from policy.actions import DEFAULT_ACTIONS, ActionSet
from policy.bandit import LinearBandit
from policy.checkpoint import save_policy
from policy.controllers import LearnedController
from policy.latency import LATENCY_NAME, LatencyTable, latency_signature
from policy.observation import NUM_FEATURES, ObservationBuilder
from training.step_timing import measure_latency_table

CURVE_NAME = "learning_curve.png"
REPORT_NAME = "train_report.json"


@dataclass(frozen=True)
class PolicyTrainConfig:
    epochs: int = 3
    max_new_tokens: int = 128
    exploration: float = (
        2.0  # Thompson scale in normalised reward units; a small scale settles on one tree early
    )
    ridge_lambda: float = 1.0
    seed: int = 0
    latency_repeats: int = 5
    algorithm: str = "thompson"
    ema_decay: float = 0.7
    reward_kind: str = "rate"
    actions: tuple[str, ...] = tuple(DEFAULT_ACTIONS.compact)

    def __post_init__(self) -> None:
        for name in ("epochs", "max_new_tokens", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"PolicyTrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class EpochSummary:
    epoch: int
    num_steps: int
    num_new_tokens: int
    seconds: float
    tokens_per_s: float  # measured: new tokens / wall seconds of the epoch's generations
    mean_reward: float  # tokens per modelled second, averaged over steps
    mean_accepted_tokens: float  # tau
    action_counts: dict[str, int]


@dataclass
class PolicyTrainReport:
    out_dir: str
    epochs: list[EpochSummary]
    num_transitions: int
    latency_table: dict
    train_seconds: float
    final_action_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _measure_prompt(prompts: list[list[int]], limit: int = 256) -> list[int]:
    longest = max(prompts, key=len)
    return longest[:limit] if len(longest) >= 2 else [0, *longest]


def train_policy(
    target,
    head,
    prompts: list[list[int]],
    config: PolicyTrainConfig,
    out_dir: str,
    progress: bool = True,
    generate_fn: Callable = generate_speculative,
    latency_table: LatencyTable | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> PolicyTrainReport:
    """Train on `prompts` (token id lists) with the real engine, each generation stopping at `eos_token_ids` (a
    chat model's end of turn) or after max_new_tokens; write the checkpoint and curve to `out_dir`."""
    if not prompts:
        raise ValueError("train_policy needs at least one prompt")
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    actions = ActionSet.parse(config.actions)
    if latency_table is None:
        signature = latency_signature(target.config.to_dict(), str(target.device))
        latency_table = LatencyTable.load_or_measure(
            os.path.join(out_dir, LATENCY_NAME),
            signature,
            lambda: measure_latency_table(
                target, head, _measure_prompt(prompts), list(actions), config.latency_repeats
            ),
        )
    bandit = LinearBandit(
        len(actions), NUM_FEATURES, config.ridge_lambda, config.exploration, config.algorithm, config.seed
    )
    controller = LearnedController(
        bandit,
        actions,
        ObservationBuilder(config.ema_decay),
        latency_table,
        mode="train",
        seed=config.seed,
        reward_kind=config.reward_kind,
    )
    rng = np.random.default_rng(config.seed)
    summaries: list[EpochSummary] = []
    bar = tqdm(total=config.epochs * len(prompts), desc="train policy", disable=not progress)
    for epoch in range(config.epochs):
        first = len(controller.transitions)
        num_tokens, seconds = 0, 0.0
        for index in rng.permutation(len(prompts)):
            output = generate_fn(
                target,
                head,
                prompts[index],
                controller,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=list(eos_token_ids) or None,
            )
            num_tokens += output.num_new_tokens
            seconds += output.wall_seconds
            bar.update(1)
        epoch_steps = controller.transitions[first:]
        summary = EpochSummary(
            epoch=epoch,
            num_steps=len(epoch_steps),
            num_new_tokens=num_tokens,
            seconds=seconds,
            tokens_per_s=num_tokens / max(seconds, 1e-9),
            mean_reward=float(np.mean([t.reward for t in epoch_steps])) if epoch_steps else 0.0,
            mean_accepted_tokens=float(np.mean([t.num_emitted for t in epoch_steps])) if epoch_steps else 0.0,
            action_counts=_action_counts(actions, epoch_steps),
        )
        summaries.append(summary)
        bar.set_postfix(reward=f"{summary.mean_reward:.0f}", tok_s=f"{summary.tokens_per_s:.0f}")
        if progress:
            tqdm.write(
                f"epoch {epoch}: mean reward {summary.mean_reward:.1f} tok/s (modelled), "
                f"measured {summary.tokens_per_s:.1f} tok/s, tau {summary.mean_accepted_tokens:.2f}"
            )
    bar.close()

    report = PolicyTrainReport(
        out_dir=out_dir,
        epochs=summaries,
        num_transitions=len(controller.transitions),
        latency_table=latency_table.to_json(),
        train_seconds=time.perf_counter() - started,
        final_action_counts=summaries[-1].action_counts,
    )
    save_policy(
        out_dir,
        bandit,
        actions,
        reference_seconds=controller.reference_seconds,
        ema_decay=config.ema_decay,
        training_summary={
            "config": asdict(config),
            "epochs": [asdict(s) for s in summaries],
            "num_prompts": len(prompts),
        },
    )
    latency_table.save(os.path.join(out_dir, LATENCY_NAME))
    with open(os.path.join(out_dir, REPORT_NAME), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    plot_learning_curve(controller, summaries, os.path.join(out_dir, CURVE_NAME))
    return report


def _action_counts(actions: ActionSet, transitions) -> dict[str, int]:
    counts = Counter(t.action for t in transitions)
    return {actions[i].compact: counts[i] for i in sorted(counts)}


def plot_learning_curve(controller: LearnedController, summaries: list[EpochSummary], path: str) -> None:
    """Reward per step (moving average) and measured tokens/s per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = np.array([t.reward for t in controller.transitions], dtype=np.float64)
    window = max(1, min(200, len(rewards) // 10))
    smoothed = np.convolve(rewards, np.ones(window) / window, mode="valid") if len(rewards) else rewards
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(np.arange(len(smoothed)) + window - 1, smoothed)
    left.set_xlabel("step")
    step = 0
    for summary in summaries:  # each epoch's mean reward as a flat segment over its steps
        left.hlines(summary.mean_reward, step, step + summary.num_steps, colors="tab:red", linewidth=2)
        step += summary.num_steps
    left.set_ylabel("tokens / modelled s")
    left.set_title(f"reward per step (moving average of {window}; red: epoch mean)")
    right.bar([s.epoch for s in summaries], [s.tokens_per_s for s in summaries])
    right.set_xlabel("epoch")
    right.set_ylabel("measured tokens/s")
    right.set_title("generation speed per epoch (with exploration)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
