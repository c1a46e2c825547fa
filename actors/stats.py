"""What one generation actor reports: `ActorStats`, cumulative since the actor's process started.

An actor reports its whole `ActorStats` after every batch (the latest report replaces the previous one), so a
lost report costs nothing that the next does not carry again. Reports travel, and are kept on disk, as
`to_dict()` (JSON-able plain data): the stats collector stores them without importing this module, and the
job summary reads them back with `from_dict`. The summary adds up `totals` field by field
(`GenerationTotals.merge`), the optimizer's stats with `OptimizationStats.merge`, and the prompt decisions'
counters field by field.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

from actors.decisions import DecisionCounters
from policy.stats import OptimizationStats


@dataclass
class GenerationTotals:
    """The counts and times that add up across actors (and across incarnations of one actor)."""

    rows_ok: int = 0
    rows_error: int = 0
    # rows_ok by their finish_reason column (common.columns.FINISH_REASONS): stop + length + context = rows_ok
    finish_stop: int = 0  # an end-of-sequence token
    finish_length: int = 0  # max_new_tokens reached
    finish_context: int = 0  # the model's context filled up first: fewer than max_new_tokens
    input_tokens: int = 0  # prompt tokens of the rows generated
    generated_tokens: int = 0
    steps: int = 0  # draft/verify steps
    emitted_in_steps: int = 0  # tokens those steps emitted: tau = emitted_in_steps / steps
    generation_seconds: float = 0.0  # wall time the actor's engine was busy (rows decode together)
    batch_seconds: float = 0.0  # wall time of whole batches (tokenizing, deciding, detokenizing included)
    num_batches: int = 0
    decision_seconds: float = 0.0  # the optimizer's deciding, a part of generation_seconds
    stats_report_failures: int = 0  # reports that did not reach the collector (later ones carried the totals)
    planner_failures: int = 0  # batch steps whose load planner raised (they decoded plainly)
    # Cross-request drafts (actors.cross_drafts): retrieved branch tokens verified and accepted, per source
    retrieved_proposed_prompt: int = 0  # from the row's own prompt and output
    retrieved_proposed_actor: int = 0  # from this actor's earlier outputs
    retrieved_proposed_cluster: int = 0  # from another actor's outputs, through the cache actor
    retrieved_accepted_prompt: int = 0
    retrieved_accepted_actor: int = 0
    retrieved_accepted_cluster: int = 0
    retrieval_seconds: float = 0.0  # embedding prompts and fetching similar outputs
    outputs_fetched: int = 0
    outputs_published: int = 0
    retrieval_failures: int = 0  # fetches or publishes that failed (local-only drafting for those rows)
    proposal_failures: int = 0  # branch look-ups that raised inside the engine (the step drafted without)

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_error

    @property
    def finish_reasons(self) -> dict[str, int]:
        """Generated rows by finish_reason: {"stop": n, "length": n, "context": n}."""
        return {"stop": self.finish_stop, "length": self.finish_length, "context": self.finish_context}

    def count_finish(self, reason: str) -> None:
        """Count one generated row that finished for `reason` ("stop", "length" or "context")."""
        name = f"finish_{reason}"
        assert hasattr(self, name), f"unknown finish reason {reason!r}"
        setattr(self, name, getattr(self, name) + 1)

    def count_retrieved(self, source: str, proposed: int, accepted: int) -> None:
        """Count one step's retrieved branch from `source` ("prompt", "actor" or "cluster")."""
        assert hasattr(self, f"retrieved_proposed_{source}"), f"unknown retrieval source {source!r}"
        setattr(
            self, f"retrieved_proposed_{source}", getattr(self, f"retrieved_proposed_{source}") + proposed
        )
        setattr(
            self, f"retrieved_accepted_{source}", getattr(self, f"retrieved_accepted_{source}") + accepted
        )

    def merge(self, other: GenerationTotals) -> None:
        """Add `other` into this one."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass
class ActorStats:
    """One actor process's report. `optimizer` is set with a learned policy, `decisions` with a learned policy
    and the shared cache on (the prompt-level decision caches)."""

    actor_id: str  # the Ray actor's id (its unique part); a restarted actor keeps it
    pid: int
    device: str  # "cuda" or "cpu"
    node_id: str | None  # None outside Ray
    num_threads: int  # torch intra-op threads
    policy: str  # GenerateConfig.policy_kind
    init_seconds: float  # loading the models and building the controller
    first_batch_started_at: float | None  # wall clock (time.time()), comparable with the driver's
    last_batch_finished_at: float | None
    totals: GenerationTotals = field(default_factory=GenerationTotals)
    optimizer: OptimizationStats | None = None
    decisions: DecisionCounters | None = None
    batch_trees: dict[str, int] = field(
        default_factory=dict
    )  # the load planner's choices: tree -> batch steps

    def to_dict(self) -> dict:
        """Plain, JSON-able data (a copy): what travels to the collector and is kept in its file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ActorStats:
        """The inverse of `to_dict`."""
        values = copy.deepcopy(data)
        values["totals"] = GenerationTotals(**values["totals"])
        if values["optimizer"] is not None:
            values["optimizer"] = OptimizationStats(**values["optimizer"])
        if values["decisions"] is not None:
            values["decisions"] = DecisionCounters(**values["decisions"])
        return cls(**values)
