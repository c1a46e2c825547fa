"""Optimisation statistics of one or more generations, and tuning suggestions drawn only from them.

Every figure here is a count or a measured time. Hit rates are hits / look-ups as the caches counted them.
Suggestions are rules over these figures; none is an estimate of a speedup. This module records and reports;
it does not decide (see `optimizer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CACHE_LEVELS = ("decision", "state", "decode", "fuzzy")


@dataclass
class OptimizationStats:
    """Counters and timers of the RL inference path. Seconds are wall time on the generation thread unless
    named `background_*` (the embedding thread)."""

    num_generations: int = 0
    num_steps: int = 0
    num_new_tokens: int = 0
    num_emitted_in_steps: int = 0
    wall_seconds: float = 0.0
    decisions: int = 0  # steps where a decision was taken (by a cache or the policy)
    reused_steps: int = 0  # steps that kept the previous decision because of the decision interval
    policy_calls: int = 0
    decision_changes: int = 0
    fuzzy_changed_decisions: int = 0  # fuzzy-cache hits whose decision differed from the one in use
    fallbacks: int = 0
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    cache_lookups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CACHE_LEVELS, 0))
    cache_hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CACHE_LEVELS, 0))
    decision_interval: int = 1
    policy_seconds: float = 0.0
    decode_seconds: float = 0.0
    embedding_seconds: float = 0.0  # submitting/collecting embeddings on the generation thread
    background_embedding_seconds: float = 0.0
    decision_seconds: float = 0.0  # everything decide() spent, policy + caches + decode + embedding hand-off

    def record_fallback(self, reason: str) -> None:
        self.fallbacks += 1
        self.fallback_reasons[reason] = self.fallback_reasons.get(reason, 0) + 1

    def set_cache(self, level: str, counters) -> None:
        """Copy a cache's own counters (lookups, hits): the caches are the single source of every hit rate."""
        self.cache_lookups[level] = counters.lookups
        self.cache_hits[level] = counters.hits

    def hit_rate(self, level: str) -> float:
        lookups = self.cache_lookups[level]
        return self.cache_hits[level] / lookups if lookups else 0.0

    @property
    def decision_overhead_fraction(self) -> float:
        return self.decision_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.num_emitted_in_steps / self.num_steps if self.num_steps else 0.0

    def merge(self, other: OptimizationStats) -> None:
        """Add `other`'s counts and times into this one (the interval is the latest one)."""
        for name, value in vars(other).items():
            if isinstance(value, dict):
                mine = getattr(self, name)
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            elif name == "decision_interval":
                self.decision_interval = value
            else:
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict:
        wall = self.wall_seconds
        share = (lambda s: s / wall) if wall > 0 else (lambda s: 0.0)
        per_step = (lambda s: s / self.num_steps) if self.num_steps else (lambda s: 0.0)
        return {
            "generations": self.num_generations,
            "steps": self.num_steps,
            "new_tokens": self.num_new_tokens,
            "decisions": self.decisions,
            "reused_steps": self.reused_steps,
            "policy_calls": self.policy_calls,
            "decision_changes": self.decision_changes,
            "decision_interval": self.decision_interval,
            "fallbacks": self.fallbacks,
            "fallback_reasons": dict(self.fallback_reasons),
            "caches": {
                level: {
                    "lookups": self.cache_lookups[level],
                    "hits": self.cache_hits[level],
                    "hit_rate": self.hit_rate(level),
                }
                for level in CACHE_LEVELS
            },
            "fuzzy_changed_decisions": self.fuzzy_changed_decisions,
            "seconds": {
                "wall": wall,
                "decision": self.decision_seconds,
                "policy": self.policy_seconds,
                "decode": self.decode_seconds,
                "embedding": self.embedding_seconds,
                "background_embedding": self.background_embedding_seconds,
            },
            "seconds_per_step": {
                "decision": per_step(self.decision_seconds),
                "policy": per_step(self.policy_seconds),
                "decode": per_step(self.decode_seconds),
                "embedding": per_step(self.embedding_seconds),
            },
            "share_of_wall": {
                "decision": share(self.decision_seconds),
                "policy": share(self.policy_seconds),
                "decode": share(self.decode_seconds),
                "embedding": share(self.embedding_seconds),
            },
            "steps_per_s": self.num_steps / wall if wall > 0 else 0.0,
            "tokens_per_s": self.num_new_tokens / wall if wall > 0 else 0.0,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "suggestions": suggestions(self),
        }


def suggestions(stats: OptimizationStats, min_evidence: int = 50) -> list[str]:
    """Tuning advice from measured counts only; silent until there are `min_evidence` decisions."""
    advice: list[str] = []
    if stats.decisions >= min_evidence:
        change_rate = stats.decision_changes / stats.decisions
        if change_rate < 0.1:
            advice.append(
                f"decisions changed in {change_rate:.0%} of {stats.decisions} decisions: raise the decision interval "
                f"(now {stats.decision_interval})"
            )
        fuzzy_hits = stats.cache_hits["fuzzy"]
        if stats.cache_lookups["fuzzy"] >= min_evidence and stats.fuzzy_changed_decisions == 0:
            advice.append(
                f"the context embedding changed no decision in {fuzzy_hits} fuzzy hits of "
                f"{stats.cache_lookups['fuzzy']} look-ups: turn the embedding off"
            )
    for level in CACHE_LEVELS:
        if stats.cache_lookups[level] >= min_evidence and stats.hit_rate(level) < 0.05:
            advice.append(
                f"the {level} cache hit {stats.cache_hits[level]} of {stats.cache_lookups[level]} look-ups "
                f"({stats.hit_rate(level):.1%}): turn it off"
            )
    if stats.decision_overhead_fraction > 0.01:
        advice.append(
            f"deciding took {stats.decision_overhead_fraction:.1%} of wall time: raise decode_frequency or the "
            "decision interval"
        )
    if stats.fallbacks:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(stats.fallback_reasons.items()))
        advice.append(
            f"{stats.fallbacks} fallbacks to static TreeParams ({reasons}): check the policy and models"
        )
    return advice


def format_stats(stats: OptimizationStats) -> str:
    """The printable "RL Inference Optimization Stats" block, every figure a count or a measured time."""
    data = stats.to_dict()
    lines = [
        "RL Inference Optimization Stats (measured)",
        f"  generations {data['generations']}, steps {data['steps']}, new tokens {data['new_tokens']}, "
        f"tau {data['mean_accepted_tokens']:.2f}",
        f"  steps/s {data['steps_per_s']:.1f}, tokens/s {data['tokens_per_s']:.1f}",
        f"  decisions {data['decisions']} (policy calls {data['policy_calls']}, changes {data['decision_changes']}), "
        f"steps reusing a decision {data['reused_steps']}, interval now {data['decision_interval']}",
    ]
    for level, cache in data["caches"].items():
        lines.append(
            f"  {level:<8} cache: {cache['hits']} hits / {cache['lookups']} look-ups = {cache['hit_rate']:.1%}"
        )
    seconds, share = data["seconds_per_step"], data["share_of_wall"]
    lines.append(
        "  per step: "
        + ", ".join(f"{name} {seconds[name] * 1e6:.0f} us ({share[name]:.2%} of wall)" for name in seconds)
    )
    lines.append(f"  fallbacks {data['fallbacks']} {data['fallback_reasons'] or ''}".rstrip())
    lines.extend(f"  suggestion: {text}" for text in data["suggestions"])
    return "\n".join(lines)
