"""Small typed values that the engine's phases, the policy and the benchmarks hand each other.

This module holds data only: no torch modules, no decoding logic. `policy/` may import it (and only it) from the
engine, so it stays free of heavy imports: torch only for type checking, so that processes that need just these
values (the shared cache actor) start without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, order=True)
class TreeParams:
    """Shape of one EAGLE-2 draft tree, passed to the engine on every draft/verify step.

    total_tokens: drafted nodes kept after reranking (the root, i.e. the last target token, is extra), so the
        target verifies `total_tokens + 1` positions.
    depth: expansion rounds after the first top_k roots, so the deepest drafted node is at level `depth + 1`
        and one step can gain at most `depth + 2` tokens. Same meaning as the official EAGLE `depth`.
    top_k: children scored per frontier node, and the frontier's width.
    """

    total_tokens: int
    depth: int
    top_k: int

    def __post_init__(self) -> None:
        for name in ("total_tokens", "depth", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TreeParams.{name} must be an int, got {value!r}")
        if self.top_k < 1:
            raise ValueError(f"TreeParams.top_k must be >= 1, got {self.top_k}")
        if self.depth < 0:
            raise ValueError(f"TreeParams.depth must be >= 0, got {self.depth}")
        if self.total_tokens < 1:
            raise ValueError(f"TreeParams.total_tokens must be >= 1, got {self.total_tokens}")
        if self.total_tokens > self.max_nodes:
            raise ValueError(
                f"TreeParams.total_tokens={self.total_tokens} exceeds the {self.max_nodes} nodes that "
                f"top_k={self.top_k} and depth={self.depth} can score (top_k + depth * top_k**2)"
            )

    @property
    def max_nodes(self) -> int:
        """Number of nodes the dynamic tree scores: top_k roots plus top_k**2 candidates per round."""
        return self.top_k + self.depth * self.top_k * self.top_k

    def capped(self, max_step_tokens: int) -> TreeParams:
        """This tree cut so that one step gains at most `max_step_tokens` tokens (a step gains up to depth + 2):
        a shallower depth, and total_tokens no more than that depth can score. Itself when it already fits.

        Example: TreeParams(40, 39, 1).capped(10) == TreeParams(9, 8, 1)
        """
        depth = min(self.depth, max(max_step_tokens - 2, 0))
        if depth == self.depth:
            return self
        return TreeParams(
            min(self.total_tokens, self.top_k + depth * self.top_k * self.top_k), depth, self.top_k
        )

    @property
    def compact(self) -> str:
        """Short text form, e.g. '60/5/10' (total_tokens/depth/top_k)."""
        return f"{self.total_tokens}/{self.depth}/{self.top_k}"

    @classmethod
    def parse(cls, text: str) -> TreeParams:
        """Inverse of `compact`: '60/5/10' -> TreeParams(60, 5, 10)."""
        parts = text.split("/")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"tree params must look like 'total_tokens/depth/top_k', e.g. '60/5/10'; got {text!r}"
            )
        return cls(*(int(p) for p in parts))


# The official EAGLE-2 defaults (total_token=60, depth=5, top_k=10), tuned for GPUs.
EAGLE_DEFAULT_TREE = TreeParams(60, 5, 10)


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen. temperature == 0 means greedy.

    top_p and top_k follow the official EAGLE signature: 0 turns each filter off.
    """

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 disables it), got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class DraftConfidence:
    """Free summaries of how sure the draft head was when it built a tree.

    root_top1_prob: probability of the draft's most likely first token.
    root_entropy: entropy (nats) of the draft's first-token distribution.
    best_path_logprob: cumulative draft log-prob of the best-scored deepest node.
    mean_node_logprob: mean cumulative log-prob of the kept nodes.
    """

    root_top1_prob: float
    root_entropy: float
    best_path_logprob: float
    mean_node_logprob: float


@dataclass(frozen=True)
class StepStats:
    """What one draft/verify step did. Observation and reward for the policy, a benchmark record, and a
    telemetry unit all at once.

    tree_params: the tree drafted, or None for a plain step (no draft: the target decoded one token).
    accepted_length: drafted tokens the target accepted (0..depth+1); the step emits accepted_length + 1 tokens
        (the extra one is the target's own bonus token), fewer only if generation stopped inside the step.
    num_emitted: tokens this step actually appended to the output.
    retrieved_proposed / retrieved_accepted: tokens of a retrieved branch (`engine.suffix`) the step verified,
        and how many of them the target accepted; retrieved_source: where the branch came from ("prompt",
        "actor" or "cluster"), None without one.
    """

    step_index: int
    tree_params: TreeParams | None
    accepted_length: int
    num_emitted: int
    draft_seconds: float
    verify_seconds: float
    confidence: DraftConfidence
    context_length: int
    retrieved_proposed: int = 0
    retrieved_accepted: int = 0
    retrieved_source: str | None = None

    @property
    def step_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds


@dataclass
class GenerationOutput:
    """Result of one generation. `output_ids` is [batch, prompt + new] like HF generate's return value."""

    output_ids: torch.Tensor
    num_prompt_tokens: int
    num_new_tokens: int
    steps: list[StepStats] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "length" | "context" | "stop" (a stop check ended it)
    wall_seconds: float = 0.0

    @property
    def new_token_ids(self) -> list[int]:
        return self.output_ids[0, self.num_prompt_tokens :].tolist()

    @property
    def mean_accepted_tokens(self) -> float:
        """tau: mean tokens gained per draft/verify step (accepted drafts + the bonus token)."""
        if not self.steps:
            return 0.0
        return sum(s.num_emitted for s in self.steps) / len(self.steps)


@dataclass(frozen=True)
class DecodingState:
    """What a controller sees before a step. Cheap by construction: counters the loop already has.
    Richer features (acceptance history, draft confidence) come from the StepStats passed to `observe`."""

    step_index: int
    prompt_length: int
    num_generated: int
    context_length: int
    last_step: StepStats | None
    # The sequence so far (prompt + generated), shared without a copy: read it inside decide(), never keep or
    # mutate it. Lets a controller embed or hash the context without the engine knowing about text.
    token_ids: Sequence[int] = ()


class Controller(Protocol):
    """Chooses TreeParams per step. Static, heuristic and learned controllers implement this.

    The engine calls `decide` before every step, `observe` after it, and `finish` once when the generation ends
    (its new tokens and wall seconds; controllers that keep no wall-time statistics do nothing)."""

    def decide(self, state: DecodingState) -> TreeParams: ...

    def observe(self, stats: StepStats) -> None: ...

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None: ...


class StaticController:
    """The same TreeParams on every step: the baseline, a grid search's candidate, and the policy's fallback."""

    def __init__(self, params: TreeParams) -> None:
        if not isinstance(params, TreeParams):
            raise ValueError(f"StaticController needs a TreeParams, got {params!r}")
        self.params = params

    def decide(self, state: DecodingState) -> TreeParams:
        return self.params

    def observe(self, stats: StepStats) -> None:
        return None

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None


@dataclass(frozen=True)
class BatchState:
    """What a batch planner sees before a batch step: how many rows decode together and how long they are."""

    step_index: int
    num_rows: int
    context_lengths: tuple[int, ...]
    num_queued: int = 0
    # Per row, the retrieved branch on offer: (tokens available, context tokens matched, source), or None.
    offers: tuple[tuple[int, int, str] | None, ...] = ()


@dataclass(frozen=True)
class BatchStepStats:
    """What one batch step did, for the planner: the tree (None: plain decoding), every row's accepted drafts
    and emitted tokens, and the step's two phases' wall seconds (0.0 when untimed)."""

    step_index: int
    tree_params: TreeParams | None
    accepted_lengths: tuple[int, ...]
    num_emitted: tuple[int, ...]
    draft_seconds: float
    verify_seconds: float
    context_lengths: tuple[int, ...]
    # With retrieved branches: the branch budget (a row verifies 1 + max(tree nodes, budget)), and per row the
    # branch's (tokens verified, context tokens matched, tokens accepted, source), or None for a row without one.
    # accepted_lengths then count the tree's own nodes only.
    branch_tokens: int = 0
    branches: tuple[tuple[int, int, int, str] | None, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.accepted_lengths)

    @property
    def step_seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds


class BatchPlanner(Protocol):
    """Chooses the tree of every batch step (None: plain decoding, no draft) for the load: the engine calls
    `decide` before every step and `observe` after it."""

    def decide(self, state: BatchState) -> TreeParams | None: ...

    def observe(self, stats: BatchStepStats) -> None: ...


class BranchPlanner(BatchPlanner, Protocol):
    """A batch planner that also spends tokens on retrieved branches: `plan` returns the step's tree and how
    many branch tokens each row may verify (0: none), for the offers in `state.offers`."""

    def plan(self, state: BatchState) -> tuple[TreeParams | None, int]: ...
