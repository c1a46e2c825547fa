"""Trees chosen for the load: per batch step, the tree (or plain decoding) with the most tokens per second.

A batch step with B rows and tree t costs draft(B, t) + verify(B, width(t)) seconds and emits B * tau(t) tokens.
Verification costs grow with B * width on a CPU, so at high load plain decoding (width 1, tau 1) wins, and at
low load a chain or a small tree does: SGLang's per-batch-size step tables and SmartSpec's goodput rule say the
same. `LoadPlanner` picks argmax B * tau / seconds over its candidates every step:

- seconds come from a `LoadLatencyTable`: measured at start-up on this machine (`engine.load_timing`), cached on
  disk per machine and model, interpolated in rows and width, and moved towards every step's measured time; a
  shape not used yet takes the correction of the nearest one used at the same row count, so a table measured on
  a busier (or idler) day does not keep the planner from trying the shapes it overrates;
- tau per tree is learned online from the rows' accepted lengths (a step of B rows gives B observations), with an
  optimism bonus that shrinks as a tree is tried. Chains share one model of how often each draft position is
  accepted, so a step with one chain tells what every chain would have gained. Plain decoding's tau is 1.

It never loses much to plain batched decoding: plain is always a candidate, and its cost is the table's.

Retrieved branches (`engine.suffix`): when rows offer one, `plan` also picks how many branch tokens a row may
verify (BRANCH_BUDGETS), jointly with the tree: each row verifies 1 + max(tree nodes, budget) nodes, its best
by score from both (`engine.tree.merge_branch`, scored by `branch_scores`), and expects max(tau(tree), 1 +
E[accepted of its branch]) tokens. A branch's acceptance is learned
like the chains', per draft position, separately per source (the row's own prompt, its actor's outputs,
another actor's) and for short, medium and long suffix matches: the cheap observations that say most about
whether a proposal from earlier text is right.
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

FORMAT_VERSION = 2  # 2: interleaved passes, width 2 measured, verify non-decreasing in width
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


BRANCH_BUDGETS = (0, 2, 4, 8, 12, 16)  # branch tokens per row a step may verify
MATCH_BUCKETS = (2, 3, 6)  # suffix matches of 1 token, 2, 3 to 5, and 6 or more learn apart
BRANCH_SOURCES = ("prompt", "actor", "cluster")  # `engine.suffix.Match.source`; others learn with "cluster"


def match_bucket(match_length: int, source: str = "prompt") -> int:
    """The acceptance model a branch learns in: its source, then its match length."""
    by_source = BRANCH_SOURCES.index(source) if source in BRANCH_SOURCES else len(BRANCH_SOURCES) - 1
    return by_source * (len(MATCH_BUCKETS) + 1) + sum(match_length >= edge for edge in MATCH_BUCKETS)


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
    observations: dict[tuple, int] = field(default_factory=dict)  # steps behind each correction

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
        return measured * self.correction(("verify", rows, num_tokens))

    def draft_seconds(self, rows: int, params: TreeParams | None) -> float:
        if params is None:
            return 0.0
        base = self._lookup(self.draft_base, rows, params.top_k)
        measured = base + params.depth * self._lookup(self.draft_round, rows, params.top_k)
        return measured * self.correction(("draft", rows, params.depth, params.top_k))

    def correction(self, key: tuple) -> float:
        """The factor between measured steps and the table for a shape: ("verify", rows, width) or ("draft",
        rows, depth, top_k). A shape not observed yet borrows from the observed shapes of its kind and row
        count: the nearest width (verify), or the nearest depth with its top_k, else with any (draft); ties
        average. 1.0 when that row count has none."""
        if key in self.corrections:
            return self.corrections[key]
        kind, rows = key[0], key[1]
        observed = [k for k in self.corrections if k[0] == kind and k[1] == rows]
        if kind == "draft":
            observed = [k for k in observed if k[3] == key[3]] or observed
        if not observed:
            return 1.0
        distance = {k: abs(k[2] - key[2]) for k in observed}
        nearest = [self.corrections[k] for k in observed if distance[k] == min(distance.values())]
        return sum(nearest) / len(nearest)

    def step_seconds(self, rows: int, params: TreeParams | None) -> float:
        return self.draft_seconds(rows, params) + self.verify_seconds(rows, width(params))

    def observe(
        self,
        rows: int,
        params: TreeParams | None,
        draft_seconds: float,
        verify_seconds: float,
        num_tokens: int | None = None,
    ) -> None:
        """Move the estimates of the shapes this step used towards its measured seconds: a correction factor
        per shape over the start-up table, so that a shape the run uses tracks its real cost (context growth,
        host work, a busy machine) and the others borrow from it (`correction`). The factor starts from what
        the shape borrowed, as one observation, and averages its steps: the n-th weighs 1 / (n + 1) until
        that falls to 0.1, an exponential average from then on.
        num_tokens: tokens per row verified (default: the tree's width)."""
        verified = width(params) if num_tokens is None else num_tokens
        self._correct(("verify", rows, verified), self._lookup(self.verify, rows, verified), verify_seconds)
        if params is not None:
            base = self._lookup(self.draft_base, rows, params.top_k)
            measured = base + params.depth * self._lookup(self.draft_round, rows, params.top_k)
            self._correct(("draft", rows, params.depth, params.top_k), measured, draft_seconds)

    def _correct(self, key: tuple, measured: float, observed: float) -> None:
        if measured <= 0 or observed <= 0:
            return
        seen = self.observations.get(key, 0) + 1
        weight = max(1.0 / (seen + 1), 0.1)
        self.corrections[key] = (1 - weight) * self.correction(key) + weight * observed / measured
        self.observations[key] = seen

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


class _PositionAcceptance:
    """Per draft position j (1-based): how many rows got to try it and how many accepted it."""

    def __init__(self) -> None:
        self.reached: list[int] = []
        self.accepted: list[int] = []

    def add(self, accepted: int, positions: int) -> None:
        """A row that accepted `accepted` of `positions` proposed tokens."""
        while len(self.reached) < positions:
            self.reached.append(0)
            self.accepted.append(0)
        for position in range(1, min(accepted + 1, positions) + 1):
            self.reached[position - 1] += 1
            self.accepted[position - 1] += position <= accepted

    def alpha(self, position: int, prior: float, weight: float) -> float:
        """The chance position `position` is accepted once the one before was; positions never reached take
        the deepest one measured."""
        index = min(position, len(self.reached)) - 1
        if index < 0:
            return prior
        return (self.accepted[index] + prior * weight) / (self.reached[index] + weight)

    @property
    def observations(self) -> int:
        return self.reached[0] if self.reached else 0


class LoadPlanner:
    """A `BatchPlanner`: the candidate with the most expected tokens per second for the batch's rows.

    Chains (top_k 1) share one acceptance model: alpha_j, the share of rows that accept draft position j once
    they accepted position j - 1, counted over every chain step (a row that accepted a tokens of a depth-d chain
    accepted positions 1..a and, when a <= d, was rejected at a + 1). A chain of depth d then expects
    tau = 1 + sum over j <= d + 1 of alpha_1 * ... * alpha_j; a position never reached yet takes the deepest
    measured alpha. Wider trees keep their own running mean, starting from the chain of their depth.
    exploration: an optimism bonus in tokens, divided by sqrt(1 + observations / rows), so a tree is tried a
    few times and then judged by what it did.
    cost_exploration: the same for seconds: a candidate run n times at this row count looks cheaper by the
    factor 1 - cost_exploration / sqrt(1 + n), so a shape the start-up table overrates still gets tried, and
    its measured steps then correct the table.
    switch_margin: the tree of the last step keeps its place unless another candidate expects this much more
    throughput. Switching has a cost the step timings do not show one by one: at 16 rows on the 2-core CPU,
    alternating plain and 1/0/1 steps ran 67.0 tokens/s against 73.0 for plain and 72.5 for 1/0/1 alone, every
    step of either kind slower after the other.
    """

    PRIOR_ALPHA = 0.5
    PRIOR_WEIGHT = 2.0

    def __init__(
        self,
        latency: LoadLatencyTable,
        candidates: Sequence[TreeParams | None] = DEFAULT_CANDIDATES,
        exploration: float = 0.3,
        cost_exploration: float = 0.2,
        switch_margin: float = 0.05,
    ) -> None:
        if None not in candidates:
            candidates = (None, *candidates)
        self.latency = latency
        self.candidates = tuple(candidates)
        self.exploration = exploration
        self.cost_exploration = cost_exploration
        self.switch_margin = switch_margin
        self.last: TreeParams | None | str = "none yet"  # the last step's tree (None: plain)
        self.runs: dict[tuple[int, TreeParams | None], int] = {}  # steps per (rows, candidate)
        self.acceptance = {params: _Acceptance() for params in self.candidates if params is not None}
        self.chains = _PositionAcceptance()  # every chain step's rows, per draft position
        self.branches = [  # per source and match length: `match_bucket`
            _PositionAcceptance() for _ in range(len(BRANCH_SOURCES) * (len(MATCH_BUCKETS) + 1))
        ]
        self.chosen: dict[str, int] = {}

    @property
    def reached(self) -> list[int]:
        return self.chains.reached

    @property
    def accepted(self) -> list[int]:
        return self.chains.accepted

    def alpha(self, position: int) -> float:
        """The chance a row accepts draft position `position` (1-based) given it accepted the one before."""
        return self.chains.alpha(position, self.PRIOR_ALPHA, self.PRIOR_WEIGHT)

    def branch_gains(self, bucket: int) -> list[float]:
        """Expected accepted tokens of a retrieved branch of n tokens, n = 0..max(BRANCH_BUDGETS), for a
        suffix match in `bucket`."""
        gains, reach, total = [0.0], 1.0, 0.0
        for position in range(1, max(BRANCH_BUDGETS) + 1):
            reach *= self.branches[bucket].alpha(position, self.PRIOR_ALPHA, self.PRIOR_WEIGHT)
            total += reach
            gains.append(total)
        return gains

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
        seconds = self.latency.step_seconds(rows, params)
        if optimistic:
            seconds *= self._cost_optimism(rows, params)
        return rows * self.expected_tau(params, rows, optimistic) / seconds

    def _cost_optimism(self, rows: int, params: TreeParams | None) -> float:
        return 1.0 - self.cost_exploration / math.sqrt(1.0 + self.runs.get((rows, params), 0))

    def _stay(self, params: TreeParams | None) -> float:
        return 1.0 + self.switch_margin if params == self.last else 1.0

    def decide(self, state: BatchState) -> TreeParams | None:
        rows = state.num_rows
        best = max(
            self.candidates,
            key=lambda params: self.throughput(params, rows, optimistic=True) * self._stay(params),
        )
        name = "plain" if best is None else best.compact
        self.chosen[name] = self.chosen.get(name, 0) + 1
        self.last = best
        return best

    def branch_scores(self, match_length: int, length: int, source: str = "prompt") -> list[float]:
        """Log chance that a branch from `source` and a suffix match of `match_length` tokens is right up to
        each of its first `length` tokens: what ranks its tokens against the draft tree's."""
        stats, scores, total = self.branches[match_bucket(match_length, source)], [], 0.0
        for position in range(1, length + 1):
            total += math.log(max(stats.alpha(position, self.PRIOR_ALPHA, self.PRIOR_WEIGHT), 1e-6))
            scores.append(total)
        return scores

    def plan(self, state: BatchState) -> tuple[TreeParams | None, int]:
        """The tree and the branch tokens per row with the most expected tokens per second, for the rows'
        offers (`BatchState.offers`: per row (tokens available, context tokens matched, source) or None)."""
        rows = state.num_rows
        offers = [offer for offer in state.offers if offer is not None]
        if not offers:
            return self.decide(state), 0
        longest = max(offer[0] for offer in offers)
        budgets = sorted({min(budget, longest) for budget in BRANCH_BUDGETS})
        gains = [self.branch_gains(bucket) for bucket in range(len(self.branches))]
        bonus = [
            self.exploration / math.sqrt(1.0 + stats.observations / max(rows, 1)) for stats in self.branches
        ]
        buckets = [(available, match_bucket(matched, source)) for available, matched, source in offers]
        no_offer = rows - len(offers)
        best, best_value = (None, 0), -1.0
        for params in self.candidates:
            tau = self.expected_tau(params, rows, optimistic=True)
            draft_seconds = self.latency.draft_seconds(rows, params)
            optimism = self._cost_optimism(rows, params) / self._stay(params)
            for budget in budgets:
                expected = no_offer * tau
                for available, bucket in buckets:
                    branch = 1.0 + gains[bucket][min(available, budget)] + (bonus[bucket] if budget else 0.0)
                    expected += max(tau, branch)
                seconds = optimism * (
                    draft_seconds + self.latency.verify_seconds(rows, max(width(params), budget + 1))
                )
                if expected / seconds > best_value:
                    best, best_value = (params, budget), expected / seconds
        params, budget = best
        name = ("plain" if params is None else params.compact) + (f"+{budget}r" if budget else "")
        self.chosen[name] = self.chosen.get(name, 0) + 1
        self.last = params
        return best

    def observe(self, stats: BatchStepStats) -> None:
        params = stats.tree_params
        self.runs[(stats.num_rows, params)] = self.runs.get((stats.num_rows, params), 0) + 1
        if stats.draft_seconds or stats.verify_seconds:
            self.latency.observe(
                stats.num_rows,
                params,
                stats.draft_seconds,
                stats.verify_seconds,
                max(width(params), stats.branch_tokens + 1),
            )
        for branch in stats.branches:
            if branch is not None:
                proposed, matched, accepted, source = branch
                self.branches[match_bucket(matched, source)].add(accepted, proposed)
        if params is None:
            return
        # A row that finished inside the step emitted fewer tokens than it accepted: count what it accepted.
        gains = [accepted + 1 for accepted in stats.accepted_lengths]
        self.acceptance.setdefault(params, _Acceptance()).add(sum(gains), len(gains))
        if params.top_k == 1:
            for accepted in stats.accepted_lengths:
                self.chains.add(accepted, params.depth + 1)
