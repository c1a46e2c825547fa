"""Tree-shape controllers behind the engine's `Controller` protocol (`decide`, `observe`, `finish`).

- `engine.types.StaticController` (not here): one TreeParams for every step, the baseline and the fallback.
- `HeuristicController`: moving average of the accepted length with hysteresis; a baseline and test double.
- `LearnedController`: a linear contextual bandit (`bandit.py`) over an ActionSet, fed by `ObservationBuilder`
  features and rewarded with tokens per modelled second of step time (`latency.py`).

All of them return only members of their action set. None of them touches the engine or the text: a wrong
decision costs speed, never output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.types import DecodingState, StepStats, TreeParams
from policy.actions import ActionSet
from policy.bandit import LinearBandit
from policy.latency import LatencyTable
from policy.observation import ObservationBuilder

MODES = ("inference", "train", "adaptive")
REWARD_KINDS = ("rate", "advantage")


def _default_cost(params: TreeParams) -> float:
    """Rough CPU step cost when no latency table is given: verify width plus draft work."""
    return params.total_tokens + 1 + 0.25 * (params.depth + 1) * params.top_k


class HeuristicController:
    """Pick the cheapest action deep enough for the recent acceptance, switching only on a persistent signal.

    needed_levels = EMA(accepted_length) + margin. The current action is kept while
    depth+1 - band <= needed_levels <= depth+1; outside that band for `patience` consecutive steps, it switches
    to the cheapest action whose depth+1 >= needed_levels (or the deepest one). Example (margin 1, band 1,
    patience 2) on a chain 4/3/1 (4 levels): EMA 3.4 -> needed 4.4 > 4 twice in a row -> a 5-level action.
    """

    def __init__(
        self,
        actions: ActionSet,
        latency_table: LatencyTable | None = None,
        ema_decay: float = 0.6,
        margin: float = 1.0,
        band: float = 1.0,
        patience: int = 2,
        initial: TreeParams | None = None,
    ) -> None:
        if patience < 1 or margin < 0 or band < 0 or not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                f"need patience >= 1, margin >= 0, band >= 0, 0 <= ema_decay < 1; got {patience}, {margin}, "
                f"{band}, {ema_decay}"
            )
        self.actions = actions
        cost = latency_table.step_seconds if latency_table is not None else _default_cost
        self.by_cost = sorted(actions, key=lambda p: (cost(p), p))
        self.ema_decay, self.margin, self.band, self.patience = ema_decay, margin, band, patience
        if initial is not None:
            actions.index(initial)
        self.initial = initial if initial is not None else self._cheapest_with_levels(3.0)
        self.reset()

    def reset(self) -> None:
        self.current = self.initial
        self.ema: float | None = None
        self.outside_steps = 0

    def _cheapest_with_levels(self, levels: float) -> TreeParams:
        for params in self.by_cost:
            if params.depth + 1 >= levels:
                return params
        return max(self.actions, key=lambda p: (p.depth, -p.total_tokens))

    def decide(self, state: DecodingState) -> TreeParams:
        if state.step_index == 0:
            self.reset()
        return self.current

    def observe(self, stats: StepStats) -> None:
        accepted = float(stats.accepted_length)
        d = self.ema_decay
        self.ema = accepted if self.ema is None else d * self.ema + (1.0 - d) * accepted
        needed = self.ema + self.margin
        levels = self.current.depth + 1
        if levels - self.band <= needed <= levels:
            self.outside_steps = 0
            return
        self.outside_steps += 1
        if self.outside_steps >= self.patience:
            self.current = self._cheapest_with_levels(math.ceil(needed - 1e-9))
            self.outside_steps = 0

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None  # keeps no wall-time statistics


@dataclass(frozen=True)
class Transition:
    """One bandit sample. reward: tokens per modelled second (num_emitted / latency_table.step_seconds);
    wall_seconds: the step's measured draft + verify time, reported beside it."""

    features: np.ndarray
    action: int
    reward: float
    wall_seconds: float
    num_emitted: int


class LearnedController:
    """Linear contextual bandit controller.

    mode "train": Thompson/UCB exploration and an online update after every step, recording `transitions`;
    "inference": greedy, no updates; "adaptive": greedy plus online updates (keeps adapting in deployment).

    Reward (`reward_kind`), with t = latency_table.step_seconds(params):
    - "rate": num_emitted / t, regressed as num_emitted * reference_seconds / t, where reference_seconds
      defaults to the cheapest action's modelled step time: O(1) values that keep the ridge prior meaningful.
    - "advantage": num_emitted - rho * t, with rho the throughput achieved so far (running sum of tokens over
      sum of modelled seconds, or `reward_rate` if given). Maximising it per step maximises total tokens over total
      time (a Dinkelbach / average-reward argument), whereas the per-step ratio overvalues cheap steps.

    `features(state)` and `choose(features)` are exposed separately so a caching wrapper can reuse decisions;
    `observe` credits whichever action in the set the step actually used, with the last computed features.
    """

    def __init__(
        self,
        bandit: LinearBandit,
        actions: ActionSet,
        observation_builder: ObservationBuilder,
        latency_table: LatencyTable,
        mode: str = "inference",
        seed: int = 0,
        reference_seconds: float | None = None,
        reward_kind: str = "rate",
        reward_rate: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if reward_kind not in REWARD_KINDS:
            raise ValueError(f"reward_kind must be one of {REWARD_KINDS}, got {reward_kind!r}")
        if bandit.num_actions != len(actions):
            raise ValueError(f"bandit has {bandit.num_actions} actions, the action set {len(actions)}")
        self.bandit = bandit
        self.actions = actions
        self.observation_builder = observation_builder
        self.latency_table = latency_table
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        if mode == "train":
            self.bandit.rng = self.rng
        self.reference_seconds = (
            reference_seconds
            if reference_seconds is not None
            else min(latency_table.step_seconds(p) for p in actions)
        )
        self.reward_kind = reward_kind
        self.reward_rate = reward_rate
        self._sum_emitted, self._sum_seconds = 0.0, 0.0
        self.transitions: list[Transition] = []
        self._last_features: np.ndarray | None = None

    @property
    def is_learning(self) -> bool:
        return self.mode in ("train", "adaptive")

    def features(self, state: DecodingState) -> np.ndarray:
        self._last_features = self.observation_builder.features(state)
        return self._last_features

    def choose(self, features: np.ndarray) -> TreeParams:
        return self.actions[self.bandit.select(features, explore=self.mode == "train")]

    def decide(self, state: DecodingState) -> TreeParams:
        return self.choose(self.features(state))

    def reward(self, stats: StepStats) -> float:
        """Tokens per modelled second of this step's shape (hardware-aware, free of timing noise)."""
        return stats.num_emitted / self.latency_table.step_seconds(stats.tree_params)

    def observe(self, stats: StepStats) -> None:
        self.observation_builder.observe(stats)
        features, self._last_features = self._last_features, None
        if not self.is_learning or features is None or stats.tree_params not in self.actions:
            return
        action = self.actions.index(stats.tree_params)
        reward = self.reward(stats)
        modelled_seconds = self.latency_table.step_seconds(stats.tree_params)
        self._sum_emitted += stats.num_emitted
        self._sum_seconds += modelled_seconds
        if self.reward_kind == "rate":
            target = reward * self.reference_seconds
        else:
            rate = self.reward_rate if self.reward_rate is not None else self._sum_emitted / self._sum_seconds
            target = stats.num_emitted - rate * modelled_seconds
        self.bandit.update(features, action, target)
        self.transitions.append(
            Transition(
                features, action, reward, stats.draft_seconds + stats.verify_seconds, stats.num_emitted
            )
        )

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None  # learns per step, from modelled step times; a generation's wall time adds nothing
