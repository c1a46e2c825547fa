"""Adaptive decision frequency: how many draft/verify steps keep one TreeParams decision.

`SmartFrequencyAdjuster` lengthens the interval when decisions cost too much, or keep coming out the same while
deciding costs enough to be worth saving, and shortens it when a decision changes. It is deterministic: it only reacts to what `record_decision` reports. It
does not decide TreeParams and does not time anything itself (the caller measures and reports the seconds).
"""

from __future__ import annotations

import math


class SmartFrequencyAdjuster:
    """Decide every `interval` steps, with the interval adapted between `min_interval` and `max_interval`.

    After each decision, `record_decision(changed, decision_seconds, step_seconds)`:
    - overhead = decision_seconds / (interval * step_seconds), the decision's cost spread over the steps it
      covers, where step_seconds is the mean step time over the interval. Above `target_overhead_fraction` the
      interval doubles. This is a budget, so it wins over a change.
    - otherwise a changed decision halves the interval;
    - otherwise, after `stable_decisions_to_grow` consecutive unchanged decisions, the interval doubles, but
      only while the overhead is at least `worth_saving_fraction`: a decision that costs less than that is not
      worth skipping. Growing on stability alone would keep many steps on an older decision to save time that
      was never significant.
    Doubling and halving are clamped to [min_interval, max_interval].

    Example with the defaults (interval 8, grow after 3 stable): with decisions at 0.6% of the step time they
    cover (worth saving), unchanged x3 -> 16; changed -> 8; changed -> 4. With decisions at 0.1% a stable run
    keeps the interval, and changes bring it down to 1.
    """

    def __init__(
        self,
        initial_interval: int = 8,
        min_interval: int = 1,
        max_interval: int = 32,
        target_overhead_fraction: float = 0.01,
        stable_decisions_to_grow: int = 3,
        worth_saving_fraction: float = 0.005,
    ) -> None:
        if not 1 <= min_interval <= initial_interval <= max_interval:
            raise ValueError(
                "need 1 <= min_interval <= initial_interval <= max_interval, got "
                f"{min_interval}, {initial_interval}, {max_interval}"
            )
        if not target_overhead_fraction > 0:
            raise ValueError(f"target_overhead_fraction must be > 0, got {target_overhead_fraction!r}")
        if not 0 <= worth_saving_fraction <= target_overhead_fraction:
            raise ValueError(
                f"worth_saving_fraction must be in [0, target_overhead_fraction], got {worth_saving_fraction!r}"
            )
        if stable_decisions_to_grow < 1:
            raise ValueError(f"stable_decisions_to_grow must be >= 1, got {stable_decisions_to_grow}")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.target_overhead_fraction = target_overhead_fraction
        self.stable_decisions_to_grow = stable_decisions_to_grow
        self.worth_saving_fraction = worth_saving_fraction
        self._interval = initial_interval
        self._last_decision_step: int | None = None
        self._num_stable = 0  # consecutive unchanged decisions since the interval last moved
        self.last_overhead_fraction = 0.0
        self.decisions = 0  # steps where should_decide returned True
        self.skipped_steps = 0  # steps where it returned False (the previous decision was kept)
        self.changes = 0  # decisions reported as changed

    @property
    def interval(self) -> int:
        return self._interval

    def should_decide(self, step_index: int) -> bool:
        """True on step 0 (or when a new generation restarts the step count) and then once `interval` steps
        have passed since the last decision. Call it once per step; a True marks that step as a decision step."""
        last = self._last_decision_step
        if last is None or step_index == 0 or step_index < last or step_index - last >= self._interval:
            self._last_decision_step = step_index
            self.decisions += 1
            return True
        self.skipped_steps += 1
        return False

    def record_decision(self, changed: bool, decision_seconds: float, step_seconds: float) -> None:
        """Report the decision just taken: whether it differs from the previous one, what it cost, and the mean
        seconds per step over the interval it ends (0 when unknown, e.g. at step 0: the overhead rule is then
        skipped)."""
        for name, value in (("decision_seconds", decision_seconds), ("step_seconds", step_seconds)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        grown = min(self.max_interval, 2 * self._interval)
        shrunk = max(self.min_interval, self._interval // 2)
        if step_seconds > 0:
            self.last_overhead_fraction = decision_seconds / (self._interval * step_seconds)
        if changed:
            self.changes += 1
        if step_seconds > 0 and self.last_overhead_fraction > self.target_overhead_fraction:
            self._interval, self._num_stable = grown, 0
        elif changed:
            self._interval, self._num_stable = shrunk, 0
        else:
            self._num_stable += 1
            is_worth_saving = step_seconds > 0 and self.last_overhead_fraction >= self.worth_saving_fraction
            if self._num_stable >= self.stable_decisions_to_grow and is_worth_saving:
                self._interval, self._num_stable = grown, 0

    def to_dict(self) -> dict[str, int | float]:
        return {
            "interval": self._interval,
            "decisions": self.decisions,
            "skipped_steps": self.skipped_steps,
            "changes": self.changes,
            "last_overhead_fraction": self.last_overhead_fraction,
        }
