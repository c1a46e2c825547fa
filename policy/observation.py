"""Cheap per-step observation features for tree-shape controllers.

`ObservationBuilder` keeps a few running summaries of the StepStats it is fed through `observe` (moving averages
of acceptance, the last tree's draft confidence, the last action) and turns them plus the DecodingState counters
into a fixed-length float32 vector. Plain Python floats and one small numpy array: a call costs a few
microseconds, so it can run before every draft/verify step. It computes no embeddings and calls no model; slower
context signals (sentence embeddings) belong to the caches, off the hot path: an embedding costs milliseconds.

The confidence fields describe the tree built on the previous step, i.e. they lag the decision by one step; the
moving averages carry what persists (code vs prose, boilerplate vs novel text). The repeat features are the one
signal about the step itself: how long a suffix of the context repeats earlier context (`policy.repetition`),
found incrementally in the token ids the engine shares through DecodingState.
"""

from __future__ import annotations

import math

import numpy as np

from engine.types import DecodingState, StepStats
from policy.repetition import SuffixMatcher

FEATURE_NAMES: tuple[str, ...] = (
    "bias",
    "ema_accepted",  # EMA of accepted_length, / 8
    "ema_accept_ratio",  # EMA of accepted_length / (depth + 1)
    "ema_saturated",  # EMA of [accepted_length == depth + 1]: the whole path was accepted, a deeper tree may pay
    "last_accepted",  # / 8
    "root_top1_prob",
    "root_entropy",  # nats / 4, clipped to [0, 2]
    "best_path_token_prob",  # exp(best_path_logprob / (depth + 1)): geometric mean prob per drafted level
    "mean_node_logprob",  # / 8, clipped to [-2, 0]
    "log_context_length",  # log1p(context) / 8
    "log_prompt_length",  # log1p(prompt) / 8
    "is_first_step",
    "last_depth",  # / 8
    "last_top_k",  # / 10
    "suffix_repeat",  # longest suffix of the context that occurs earlier in it, tokens / REPEAT_MAX_LENGTH
    "long_repeat",  # [that suffix is at least LONG_REPEAT tokens]
)
NUM_FEATURES = len(FEATURE_NAMES)
REPEAT_MAX_LENGTH = 32
# A repeat at least this long is flagged: past it, a deep chain tends to be accepted whole (policy.repetition).
LONG_REPEAT = 12


class ObservationBuilder:
    """Turns (DecodingState, observed StepStats history) into a float32 vector of NUM_FEATURES.

    A new sequence starts when `features` sees `state.step_index == 0`; the history is reset then, so one builder
    can serve many generations in turn (not concurrently).
    """

    def __init__(self, ema_decay: float = 0.7) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.repeats = SuffixMatcher(max_length=REPEAT_MAX_LENGTH)
        self.reset()

    def reset(self) -> None:
        self.num_observed = 0
        self.ema_accepted = 0.0
        self.ema_accept_ratio = 0.0
        self.ema_saturated = 0.0
        self.last: StepStats | None = None
        self.repeats.reset()

    def observe(self, stats: StepStats) -> None:
        """Fold one step into the running summaries."""
        levels = stats.tree_params.depth + 1
        accepted = float(stats.accepted_length)
        ratio = accepted / levels
        saturated = 1.0 if stats.accepted_length >= levels else 0.0
        if self.num_observed == 0:
            self.ema_accepted, self.ema_accept_ratio, self.ema_saturated = accepted, ratio, saturated
        else:
            d = self.ema_decay
            self.ema_accepted = d * self.ema_accepted + (1.0 - d) * accepted
            self.ema_accept_ratio = d * self.ema_accept_ratio + (1.0 - d) * ratio
            self.ema_saturated = d * self.ema_saturated + (1.0 - d) * saturated
        self.num_observed += 1
        self.last = stats

    def features(self, state: DecodingState) -> np.ndarray:
        """Feature vector [NUM_FEATURES] float32 for the step about to run."""
        if state.step_index == 0:
            self.reset()
        context = math.log1p(state.context_length) / 8.0
        prompt = math.log1p(state.prompt_length) / 8.0
        last = self.last
        repeat = self.repeats.match_length(state.token_ids)
        repeats = [repeat / REPEAT_MAX_LENGTH, 1.0 if repeat >= LONG_REPEAT else 0.0]
        if last is None:
            out = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, context, prompt, 1.0, 0.0, 0.0, *repeats]
        else:
            params, confidence = last.tree_params, last.confidence
            per_level = confidence.best_path_logprob / (params.depth + 1)
            out = [
                1.0,
                self.ema_accepted / 8.0,
                self.ema_accept_ratio,
                self.ema_saturated,
                last.accepted_length / 8.0,
                confidence.root_top1_prob,
                min(max(confidence.root_entropy / 4.0, 0.0), 2.0),
                math.exp(min(per_level, 0.0)),
                min(max(confidence.mean_node_logprob / 8.0, -2.0), 0.0),
                context,
                prompt,
                0.0,
                params.depth / 8.0,
                params.top_k / 10.0,
                *repeats,
            ]
        assert len(out) == NUM_FEATURES
        return np.array(out, dtype=np.float32)
