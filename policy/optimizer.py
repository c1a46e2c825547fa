"""The RL inference path: a Controller that puts caches, an adaptive decision interval and a fallback in front of
the learned policy, and keeps honest statistics.

Per step, `decide` does the cheapest thing that yields a decision, in this order:

    0. decision interval: between decisions, keep the current TreeParams (no look-up, counted as a reused step);
    1. decision cache: observation bucket -> TreeParams;
    2. state cache: content hash of the context -> its embedding, computed earlier in the background;
       a known embedding is looked up in the context-aware fuzzy cache, a small `ContextIndex` (cosine >=
       threshold -> reuse that context's decision);
    3. decode cache: every `decode_frequency` steps, the context is detokenised incrementally and handed to the
       background embedder (the generation thread never waits for it);
    4. the full policy (cheap features -> bandit), whose decision then fills the caches.

Anything that fails (policy, embedding, a cache) falls back to static TreeParams for that step and is counted.
The engine's output never depends on any of this: a cached or wrong decision can only cost speed.

The constructor names and defaults are those of the prototype's optimisation suite, so its callers' code runs
unchanged: `RLInferenceOptimizer(cache_size=300, decode_frequency=8, enable_parameter_caching=True,
adaptive_frequency=True)`, `AdaptiveParameterPredictor(history_size=100)`, `ContextAwareCache(max_size=150,
similarity_threshold=0.85)`, `SmartFrequencyAdjuster()`; the predictor's modes are "train", "inference" and
"adaptive" (see `LearnedController`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from engine.types import DecodingState, StepStats, TreeParams
from policy.actions import ActionSet
from policy.caches import DecisionCache, DecodeCache, LRUCache, content_key
from policy.checkpoint import load_policy
from policy.context_index import ContextIndex
from policy.controllers import LearnedController
from policy.embedding import EMBEDDING_DIM, BackgroundEmbedder, load_minilm_encoder
from policy.frequency import SmartFrequencyAdjuster
from policy.latency import LATENCY_NAME, LatencyTable
from policy.observation import FEATURE_NAMES, ObservationBuilder
from policy.stats import OptimizationStats, format_stats

FALLBACK_TREE = TreeParams(8, 4, 2)
EMBEDDING_CONTEXT_CHARS = 512  # the tail of the context that is embedded
DUPLICATE_SIMILARITY = 0.999  # contexts this close share one fuzzy-cache entry


def ContextAwareCache(
    max_size: int = 150, similarity_threshold: float = 0.85, dim: int = EMBEDDING_DIM
) -> ContextIndex:
    """The context-aware fuzzy cache: a `ContextIndex` of at most `max_size` context embeddings, each mapped to
    the decision taken there as {"tree": TreeParams.compact}. No keys (the state cache already matches exact
    contents) and no expiry; LRU eviction, near-duplicate updates and Flat search as in any ContextIndex (an
    insert overwrites an entry at cosine >= 0.999, or >= the threshold when that is higher).
    Named like a class because it keeps the prototype's constructor call working."""
    return ContextIndex(
        dim=dim,
        max_entries=max_size,
        similarity_threshold=similarity_threshold,
        duplicate_similarity=max(DUPLICATE_SIMILARITY, similarity_threshold),
    )


class AdaptiveParameterPredictor:
    """The full policy: a trained LearnedController. `history_size` bounds the transitions kept in adaptive mode."""

    def __init__(
        self,
        checkpoint_path: str | None = None,
        history_size: int = 100,
        mode: str = "inference",
        latency_table: LatencyTable | None = None,
        controller: LearnedController | None = None,
        seed: int = 0,
    ) -> None:
        if controller is None:
            if checkpoint_path is None:
                raise ValueError("AdaptiveParameterPredictor needs checkpoint_path= or controller=")
            checkpoint = load_policy(checkpoint_path, seed=seed)
            table = latency_table or LatencyTable.load(os.path.join(checkpoint_path, LATENCY_NAME))
            controller = LearnedController(
                checkpoint.bandit,
                checkpoint.actions,
                ObservationBuilder(ema_decay=checkpoint.ema_decay),
                table,
                mode=mode,
                seed=seed,
                reference_seconds=checkpoint.reference_seconds,
            )
        self.controller = controller
        self.history_size = history_size

    @property
    def actions(self) -> ActionSet:
        return self.controller.actions

    def features(self, state: DecodingState) -> np.ndarray:
        return self.controller.features(state)

    def choose(self, features: np.ndarray) -> TreeParams:
        return self.controller.choose(features)

    def observe(self, stats: StepStats) -> None:
        self.controller.observe(stats)
        del self.controller.transitions[: -self.history_size or None]


def default_bucket_edges() -> list[np.ndarray]:
    """Fixed bucket edges per feature for the decision cache: coarse on the signals that drive the choice."""
    coarse = {
        "ema_accepted": [0.1, 0.2, 0.3, 0.45, 0.6],
        "ema_accept_ratio": [0.25, 0.5, 0.75],
        "ema_saturated": [0.25, 0.5, 0.75],
        "root_top1_prob": [0.5, 0.8, 0.95],
        "last_depth": [0.3, 0.55, 0.8],
        "last_top_k": [0.15, 0.35, 0.6],
        "suffix_repeat": [0.125, 0.25, 0.5],
        "long_repeat": [0.5],
    }
    return [np.asarray(coarse.get(name, []), dtype=np.float64) for name in FEATURE_NAMES]


class RLInferenceOptimizer:
    """A Controller (decide/observe/finish) for `generate_speculative` / `EaModel.eagenerate(..., rl_policy=...)`.

    decode: token ids -> text (e.g. `tokenizer.decode`); needed only when the embedding path is on.
    use_embedding: turn on the context embedding + fuzzy cache path. Off by default: it costs a decode and an
        embedding every decode_frequency steps and pays only when a fuzzy hit changes a decision, which the
        stats count (`fuzzy_changed_decisions`) and the suggestions report.
    """

    def __init__(
        self,
        predictor: AdaptiveParameterPredictor | None = None,
        cache_size: int = 300,
        decode_frequency: int = 8,
        enable_parameter_caching: bool = True,
        adaptive_frequency: bool = True,
        context_cache: ContextIndex | None = None,
        frequency_adjuster: SmartFrequencyAdjuster | None = None,
        decode: Callable[[list[int]], str] | None = None,
        use_embedding: bool = False,
        encoder: Callable[[str], np.ndarray] | None = None,
        fallback: TreeParams = FALLBACK_TREE,
        bucket_edges: list[np.ndarray] | None = None,
    ) -> None:
        if decode_frequency < 1:
            raise ValueError(f"decode_frequency must be >= 1, got {decode_frequency}")
        if use_embedding and decode is None:
            raise ValueError("use_embedding=True needs decode= (token ids -> text) to embed the context")
        self.predictor = predictor
        self.decode_frequency = decode_frequency
        self.enable_parameter_caching = enable_parameter_caching
        self.adaptive_frequency = adaptive_frequency
        self.fallback = fallback
        self.decision_cache = DecisionCache(max_size=cache_size, enabled=enable_parameter_caching)
        # As tuples of floats: bucketing bisects them on every decision.
        self.bucket_edges = [
            tuple(float(edge) for edge in edges) for edges in bucket_edges or default_bucket_edges()
        ]
        self.state_cache: LRUCache[bytes, np.ndarray] = LRUCache(cache_size, enabled=use_embedding)
        self.decode_cache = (
            DecodeCache(decode, max_size=cache_size, enabled=use_embedding) if decode else None
        )
        self.context_cache = context_cache or ContextAwareCache()
        self.frequency = frequency_adjuster or SmartFrequencyAdjuster()
        self.use_embedding = use_embedding
        self.embedder: BackgroundEmbedder | None = None
        self._encoder = encoder
        self.stats = OptimizationStats()
        self.current: TreeParams | None = None
        self._embedding: np.ndarray | None = None
        self._pending_key: bytes | None = None
        self._observe_started = 0.0
        self._last_decision_seconds = 0.0
        self._step_seconds: list[float] = []

    # ---- the Controller interface ------------------------------------------------------------------------------

    def decide(self, state: DecodingState) -> TreeParams:
        started = time.perf_counter()
        if state.step_index == 0:
            self._start_generation()
        self.stats.num_steps += 1
        if (
            self.adaptive_frequency
            and self.current is not None
            and not self.frequency.should_decide(state.step_index)
        ):
            self.stats.reused_steps += 1
            self.stats.decision_seconds += time.perf_counter() - started
            return self.current
        try:
            decision = self._decide(state)
        except Exception as error:  # any failure costs speed only: count it and use the static tree
            self.stats.record_fallback(type(error).__name__)
            decision = self.fallback
        changed = decision != self.current
        self.stats.decisions += 1
        self.stats.decision_changes += int(changed and self.current is not None)
        self.current = decision
        elapsed = time.perf_counter() - started
        if self.adaptive_frequency:
            # No step timed yet (a generation's first decision): 0 tells the adjuster to skip its overhead rule.
            mean_step = sum(self._step_seconds) / len(self._step_seconds) if self._step_seconds else 0.0
            self.frequency.record_decision(changed, elapsed, mean_step)
            self._step_seconds.clear()
        self.stats.decision_interval = self.frequency.interval if self.adaptive_frequency else 1
        self.stats.decision_seconds += elapsed
        return decision

    def observe(self, stats: StepStats) -> None:
        started = time.perf_counter()
        self.stats.num_emitted_in_steps += stats.num_emitted
        self._step_seconds.append(stats.step_seconds)
        if self.predictor is not None:
            try:
                self.predictor.observe(stats)
            except Exception as error:
                self.stats.record_fallback(f"observe:{type(error).__name__}")
        self.stats.decision_seconds += time.perf_counter() - started

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        """Called by the engine at the end of a generation with its measured wall time."""
        self.stats.num_new_tokens += num_new_tokens
        self.stats.wall_seconds += wall_seconds
        if self.embedder is not None:
            self.stats.background_embedding_seconds = self.embedder.embed_seconds

    # ---- internals ----------------------------------------------------------------------------------------------

    def _start_generation(self) -> None:
        self.stats.num_generations += 1
        self.current = None
        self._embedding = None
        self._pending_key = None
        self._step_seconds.clear()
        if self.predictor is not None and self.predictor.controller.is_learning:
            # Decisions cached before online updates may be stale: start each generation with a fresh cache.
            self.decision_cache.clear()

    def _decide(self, state: DecodingState) -> TreeParams:
        if self.predictor is None:
            raise RuntimeError("no policy loaded")
        features = self.predictor.features(state)
        bucket = None
        if self.enable_parameter_caching:
            bucket = DecisionCache.bucket(features, self.bucket_edges)
            cached = self.decision_cache.get(bucket)
            if cached is not None:
                return cached
        embedding = self._context_embedding(state) if self.use_embedding else None
        if embedding is not None:
            hit = self.context_cache.lookup(embedding)
            if hit is not None:
                value = TreeParams.parse(hit.value["tree"])
                if value != self.current:
                    self.stats.fuzzy_changed_decisions += 1
                return value
        policy_started = time.perf_counter()
        decision = self.predictor.choose(features)
        self.stats.policy_seconds += time.perf_counter() - policy_started
        self.stats.policy_calls += 1
        if bucket is not None:
            self.decision_cache.put(bucket, decision)
        if embedding is not None:
            self.context_cache.insert(embedding, {"tree": decision.compact})
        return decision

    def _context_embedding(self, state: DecodingState) -> np.ndarray | None:
        """The embedding of the latest embedded context, if any; every decode_frequency steps the current context
        is looked up in the state cache by content, and on a miss decoded and queued for the background embedder."""
        started = time.perf_counter()
        if self.embedder is None:
            self.embedder = BackgroundEmbedder(self._encoder or load_minilm_encoder())
        ready = self.embedder.latest()
        if ready is not None and self._pending_key is not None and ready[0] == self._pending_key:
            self.state_cache.put(self._pending_key, ready[1])
            self._embedding, self._pending_key = ready[1], None
        if state.step_index % self.decode_frequency == 0:
            key = content_key(state.token_ids)
            stored = self.state_cache.get(key)
            if stored is not None:
                self._embedding = stored
            else:
                decode_started = time.perf_counter()
                text = self.decode_cache.text(state.token_ids, stream=id(self))
                self.stats.decode_seconds += time.perf_counter() - decode_started
                self._pending_key = key
                self.embedder.submit(text[-EMBEDDING_CONTEXT_CHARS:], tag=key)
        self.stats.embedding_seconds += time.perf_counter() - started
        return self._embedding

    def snapshot(self) -> OptimizationStats:
        """Stats with the caches' own counters (the single source of every hit rate)."""
        stats = self.stats
        stats.set_cache("decision", self.decision_cache.counters)
        stats.set_cache("state", self.state_cache.counters)
        if self.decode_cache is not None:
            stats.set_cache("decode", self.decode_cache.counters)
        stats.set_cache("fuzzy", self.context_cache.counters)
        return stats

    def stats_dict(self) -> dict:
        """The statistics as a dict (counts, hit rates, times per step and as a share of wall, suggestions)."""
        return self.snapshot().to_dict()

    def print_stats(self) -> None:
        print(format_stats(self.snapshot()))

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()


class PrototypeStyleController:
    """The prototype's way, kept only as a benchmark baseline (`learned_unoptimized`): on every step, detokenise
    the whole context and embed it on the generation thread, then ask the policy. Same decisions as the policy
    alone, so any speed difference is overhead."""

    def __init__(
        self,
        predictor: AdaptiveParameterPredictor,
        decode: Callable[[list[int]], str],
        encoder: Callable[[str], np.ndarray] | None = None,
    ) -> None:
        self.predictor = predictor
        self.decode = decode
        self.encoder = encoder or load_minilm_encoder()
        self.decision_seconds = 0.0

    def decide(self, state: DecodingState) -> TreeParams:
        started = time.perf_counter()
        text = self.decode(list(state.token_ids))
        self.encoder(text[-EMBEDDING_CONTEXT_CHARS:])
        decision = self.predictor.choose(self.predictor.features(state))
        self.decision_seconds += time.perf_counter() - started
        return decision

    def observe(self, stats: StepStats) -> None:
        started = time.perf_counter()
        self.predictor.observe(stats)
        self.decision_seconds += time.perf_counter() - started

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        return None
