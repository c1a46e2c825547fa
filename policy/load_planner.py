"""Trees chosen for the load: per batch step, the tree (or plain decoding) with the most tokens per second.

A batch step with B rows and tree t costs draft(B, t) + verify(B, width(t)) seconds and emits B * tau(t) tokens.
Verification costs grow with B * width on a CPU, so at high load plain decoding (width 1, tau 1) wins, and at
low load a chain or a small tree does: SGLang's per-batch-size step tables and SmartSpec's goodput rule say the
same. `LoadPlanner` picks argmax B * tau / seconds over its candidates every step:

- seconds come from a `LoadLatencyTable`: measured at start-up on this machine (`engine.load_timing`), cached on
  disk per machine and model, interpolated in rows and width, and moved towards every step's measured time;
- tau per tree is learned online from the rows' accepted lengths (a step of B rows gives B observations), with an
  optimism bonus that shrinks as a tree is tried. Chains share one model of how often each draft position is
  accepted, so a step with one chain tells what every chain would have gained. Plain decoding's tau is 1.

It never loses much to plain batched decoding: plain is always a candidate, and its cost is the table's.
This module holds decisions and JSON only; it runs no model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.types import BatchState, BatchStepStats, TreeParams

FORMAT_VERSION = 1
# Plain decoding, chains, and two small trees: on a CPU the width a step verifies is what batching competes for.
DEFAULT_CANDIDATES: tuple[TreeParams | None, ...] = (
    None,
    TreeParams(1, 0, 1),
    TreeParams(2, 1, 1),
    TreeParams(3, 2, 1),
    TreeParams(4, 3, 1),
    TreeParams(6, 5, 1),
    TreeParams(6, 3, 2),
    TreeParams(8, 4, 2),
)


def width(params: TreeParams | None) -> int:
    """Tokens per row a step verifies: the root plus the drafted nodes."""
    return 1 if params is None else params.total_tokens + 1


def _interpolate(points: dict[float, float], x: float) -> float:
    """Piecewise-linear in x through measured points; proportional beyond the largest one."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    if x >= xs[-1]:
        return points[xs[-1]] * (x / xs[-1]) if len(xs) > 1 else points[xs[-1]]
    return float(np.interp(x, xs, [points[k] for k in xs]))


@dataclass
class LoadLatencyTable:
    """Seconds of a batch step's parts: verify[(rows, width)], draft_base[(rows, top_k)], draft_round[(rows,
    top_k)]. Measured shapes are exact; others interpolate (width first, then rows)."""

    verify: dict[tuple[int, int], float]
    draft_base: dict[tuple[int, int], float]
    draft_round: dict[tuple[int, int], float]
    signature: dict = field(default_factory=dict)
    context: int = 0
    corrections: dict[tuple, float] = field(default_factory=dict)  # this run's: observed / table, per shape

    @classmethod
    def from_measurements(cls, measured: dict, signature: dict | None = None) -> LoadLatencyTable:
        """From `engine.load_timing.measure_batch_latency`'s result."""
        return cls(
            verify={(int(r), int(w)): float(s) for r, w, s in measured["verify"]},
            draft_base={(int(r), int(k)): float(s) for r, k, s in measured["draft_base"]},
            draft_round={(int(r), int(k)): float(s) for r, k, s in measured["draft_round"]},
            signature=dict(signature or {}),
            context=int(measured.get("context", 0)),
        )

    def _lookup(self, table: dict[tuple[int, int], float], rows: int, second: int) -> float:
        if (rows, second) in table:
            return table[(rows, second)]
        by_rows: dict[float, float] = {}
        for measured_rows in sorted({r for r, _ in table}):
            row_points = {s: v for (r, s), v in table.items() if r == measured_rows}
            by_rows[measured_rows] = _interpolate(row_points, second)
        return _interpolate(by_rows, rows)

    def verify_seconds(self, rows: int, num_tokens: int) -> float:
        measured = self._lookup(self.verify, rows, num_tokens)
        return measured * self.corrections.get(("verify", rows, num_tokens), 1.0)

    def draft_seconds(self, rows: int, params: TreeParams | None) -> float:
        if params is None:
            return 0.0
        base = self._lookup(self.draft_base, rows, params.top_k)
        measured = base + params.depth * self._lookup(self.draft_round, rows, params.top_k)
        return measured * self.corrections.get(("draft", rows, params.depth, params.top_k), 1.0)

    def step_seconds(self, rows: int, params: TreeParams | None) -> float:
        return self.draft_seconds(rows, params) + self.verify_seconds(rows, width(params))

    def observe(
        self, rows: int, params: TreeParams | None, draft_seconds: float, verify_seconds: float
    ) -> None:
        """Move the estimates of the shapes this step used towards its measured seconds: a correction factor
        per shape over the start-up table (an exponential average, weight 0.1), so that a shape the run uses
        tracks its real cost (context growth, host work, a busy machine) and the others keep the table's."""
        self._correct(
            ("verify", rows, width(params)), self._lookup(self.verify, rows, width(params)), verify_seconds
        )
        if params is not None:
            base = self._lookup(self.draft_base, rows, params.top_k)
            measured = base + params.depth * self._lookup(self.draft_round, rows, params.top_k)
            self._correct(("draft", rows, params.depth, params.top_k), measured, draft_seconds)

    def _correct(self, key: tuple, measured: float, observed: float) -> None:
        if measured <= 0 or observed <= 0:
            return
        self.corrections[key] = 0.9 * self.corrections.get(key, 1.0) + 0.1 * observed / measured

    # ---- the per-machine cache file -------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "signature": self.signature,
            "context": self.context,
            "verify": [[r, w, s] for (r, w), s in sorted(self.verify.items())],
            "draft_base": [[r, k, s] for (r, k), s in sorted(self.draft_base.items())],
            "draft_round": [[r, k, s] for (r, k), s in sorted(self.draft_round.items())],
        }

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str, signature: dict) -> LoadLatencyTable | None:
        """The table cached at `path` if it was measured with this signature; None otherwise (or unreadable)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        if data.get("format_version") != FORMAT_VERSION or data.get("signature") != signature:
            return None
        return cls.from_measurements(data, signature)


@dataclass
class _Acceptance:
    """Running mean of tokens emitted per row and step with one tree."""

    total: float = 0.0
    count: int = 0

    def add(self, tokens: float, count: int = 1) -> None:
        self.total += tokens
        self.count += count

    def mean(self, prior: float, prior_weight: float = 4.0) -> float:
        return (self.total + prior * prior_weight) / (self.count + prior_weight)


class LoadPlanner:
    """A `BatchPlanner`: the candidate with the most expected tokens per second for the batch's rows.

    Chains (top_k 1) share one acceptance model: alpha_j, the share of rows that accept draft position j once
    they accepted position j - 1, counted over every chain step (a row that accepted a tokens of a depth-d chain
    accepted positions 1..a and, when a <= d, was rejected at a + 1). A chain of depth d then expects
    tau = 1 + sum over j <= d + 1 of alpha_1 * ... * alpha_j; a position never reached yet takes the deepest
    measured alpha. Wider trees keep their own running mean, starting from the chain of their depth.
    exploration: an optimism bonus in tokens, divided by sqrt(1 + observations / rows), so a tree is tried a
    few times and then judged by what it did.
    """

    PRIOR_ALPHA = 0.5
    PRIOR_WEIGHT = 2.0

    def __init__(
        self,
        latency: LoadLatencyTable,
        candidates: Sequence[TreeParams | None] = DEFAULT_CANDIDATES,
        exploration: float = 0.3,
    ) -> None:
        if None not in candidates:
            candidates = (None, *candidates)
        self.latency = latency
        self.candidates = tuple(candidates)
        self.exploration = exploration
        self.acceptance = {params: _Acceptance() for params in self.candidates if params is not None}
        self.reached: list[int] = []  # per draft position j (index j - 1): chain rows that got to try it
        self.accepted: list[int] = []  # ... and that accepted it
        self.chosen: dict[str, int] = {}

    def alpha(self, position: int) -> float:
        """The chance a row accepts draft position `position` (1-based) given it accepted the one before."""
        index = min(position, len(self.reached)) - 1
        if index < 0:
            return self.PRIOR_ALPHA
        reached, accepted = self.reached[index], self.accepted[index]
        return (accepted + self.PRIOR_ALPHA * self.PRIOR_WEIGHT) / (reached + self.PRIOR_WEIGHT)

    def chain_tau(self, depth: int) -> float:
        tau, reach = 1.0, 1.0
        for position in range(1, depth + 2):
            reach *= self.alpha(position)
            tau += reach
        return tau

    def expected_tau(self, params: TreeParams | None, rows: int = 1, optimistic: bool = False) -> float:
        if params is None:
            return 1.0
        if params.top_k == 1:
            tau, observations = self.chain_tau(params.depth), (self.reached[0] if self.reached else 0)
        else:
            stats = self.acceptance.setdefault(params, _Acceptance())
            tau, observations = stats.mean(self.chain_tau(params.depth)), stats.count
        if optimistic:
            tau += self.exploration / math.sqrt(1.0 + observations / max(rows, 1))
        return min(tau, params.depth + 2.0)

    def throughput(self, params: TreeParams | None, rows: int, optimistic: bool = False) -> float:
        return rows * self.expected_tau(params, rows, optimistic) / self.latency.step_seconds(rows, params)

    def decide(self, state: BatchState) -> TreeParams | None:
        rows = state.num_rows
        best = max(self.candidates, key=lambda params: self.throughput(params, rows, optimistic=True))
        name = "plain" if best is None else best.compact
        self.chosen[name] = self.chosen.get(name, 0) + 1
        return best

    def observe(self, stats: BatchStepStats) -> None:
        params = stats.tree_params
        if stats.draft_seconds or stats.verify_seconds:
            self.latency.observe(stats.num_rows, params, stats.draft_seconds, stats.verify_seconds)
        if params is None:
            return
        # A row that finished inside the step emitted fewer tokens than it accepted: count what it accepted.
        gains = [accepted + 1 for accepted in stats.accepted_lengths]
        self.acceptance.setdefault(params, _Acceptance()).add(sum(gains), len(gains))
        if params.top_k == 1:
            positions = params.depth + 1
            while len(self.reached) < positions:
                self.reached.append(0)
                self.accepted.append(0)
            for accepted in stats.accepted_lengths:
                for position in range(1, min(accepted + 1, positions) + 1):
                    self.reached[position - 1] += 1
                    self.accepted[position - 1] += position <= accepted
