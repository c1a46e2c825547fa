"""The RL inference path: identical output with every controller, exact counters, fallback, stats and advice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.generate import generate_speculative
from engine.types import DecodingState, StaticController
from policy.actions import DEFAULT_ACTIONS, ActionSet
from policy.bandit import LinearBandit
from policy.context_index import ContextIndex
from policy.controllers import HeuristicController, LearnedController
from policy.latency import LatencyTable
from policy.observation import NUM_FEATURES, ObservationBuilder
from policy.optimizer import (
    FALLBACK_TREE,
    AdaptiveParameterPredictor,
    ContextAwareCache,
    PrototypeStyleController,
    RLInferenceOptimizer,
)
from policy.stats import OptimizationStats, format_stats, suggestions

TINY_VOCAB = 96  # the vocabulary of the conftest tiny models
ACTIONS = ActionSet.parse(["4/3/1", "6/3/2", "8/4/2", "16/5/4"])


def latency_table(actions: ActionSet) -> LatencyTable:
    # A fixed table: cost grows with depth and width, as on a CPU.
    draft = {p.compact: 1e-3 * (p.depth + 1) * (1 + 0.1 * p.top_k) for p in actions}
    verify = {p.compact: 5e-3 + 1e-4 * p.total_tokens for p in actions}
    return LatencyTable(draft, verify)


def predictor(
    mode: str = "inference", seed: int = 0, actions: ActionSet = ACTIONS
) -> AdaptiveParameterPredictor:
    bandit = LinearBandit(len(actions), NUM_FEATURES, exploration=0.5, seed=seed)
    rng = np.random.default_rng(seed)
    # Random but fixed preferences, so different observations pick different actions.
    bandit.theta[:] = rng.normal(size=bandit.theta.shape)
    controller = LearnedController(
        bandit, actions, ObservationBuilder(), latency_table(actions), mode=mode, seed=seed
    )
    return AdaptiveParameterPredictor(controller=controller)


class FailingPredictor(AdaptiveParameterPredictor):
    def __init__(self) -> None:
        super().__init__(controller=predictor().controller)

    def choose(self, features: np.ndarray):
        raise RuntimeError("policy exploded")


def fake_encoder(text: str) -> np.ndarray:
    """Deterministic unit vectors from text content (a stand-in for MiniLM in logic tests)."""
    seed = sum(text.encode()) % (2**32)
    vector = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_every_controller_gives_identical_greedy_output(tiny_llama, prompt_factory) -> None:
    target, head = tiny_llama.target, tiny_llama.head
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731 - a byte-free stand-in tokenizer
    controllers = {
        "static": lambda: StaticController(FALLBACK_TREE),
        "heuristic": lambda: HeuristicController(ACTIONS),
        "learned": lambda: RLInferenceOptimizer(predictor()),
        "learned_no_caches": lambda: RLInferenceOptimizer(
            predictor(), enable_parameter_caching=False, adaptive_frequency=False
        ),
        "learned_embedding": lambda: RLInferenceOptimizer(
            predictor(), decode=decode, use_embedding=True, encoder=fake_encoder, decode_frequency=2
        ),
        "adaptive": lambda: RLInferenceOptimizer(predictor(mode="adaptive")),
        "prototype": lambda: PrototypeStyleController(predictor(), decode, fake_encoder),
        "failing": lambda: RLInferenceOptimizer(FailingPredictor()),
    }
    for prompt in prompt_factory(6, TINY_VOCAB, 4, 30, 11):
        reference = tiny_llama.model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=24,
            attention_mask=torch.ones(1, len(prompt)),
        )
        for name, make in controllers.items():
            controller = make()
            output = generate_speculative(target, head, prompt, controller, max_new_tokens=24)
            assert output.output_ids.tolist() == reference.tolist(), name
            for step in output.steps:
                assert step.tree_params in ACTIONS or step.tree_params == FALLBACK_TREE, name


def test_hit_rates_equal_the_caches_own_counts_on_a_scripted_run(tiny_llama, prompt_factory) -> None:
    optimizer = RLInferenceOptimizer(predictor(), adaptive_frequency=False)
    prompts = prompt_factory(3, TINY_VOCAB, 4, 30, 5)
    for prompt in prompts + prompts:  # the second pass repeats observations, so the decision cache must hit
        generate_speculative(tiny_llama.target, tiny_llama.head, prompt, optimizer, max_new_tokens=16)
    stats = optimizer.snapshot()
    counters = optimizer.decision_cache.counters
    assert stats.cache_lookups["decision"] == counters.lookups == stats.decisions
    assert stats.cache_hits["decision"] == counters.hits > 0
    assert stats.policy_calls == counters.lookups - counters.hits  # every miss went to the policy
    data = stats.to_dict()
    assert data["caches"]["decision"]["hit_rate"] == counters.hits / counters.lookups
    printed = f"{counters.hits} hits / {counters.lookups} look-ups = {counters.hits / counters.lookups:.1%}"
    assert printed in format_stats(stats)
    assert data["steps"] == stats.num_steps > 0 and stats.num_generations == 6


def test_decision_interval_reuses_decisions_and_counts_them(tiny_llama, prompt_factory) -> None:
    optimizer = RLInferenceOptimizer(predictor())
    for prompt in prompt_factory(3, TINY_VOCAB, 4, 30, 6):
        generate_speculative(tiny_llama.target, tiny_llama.head, prompt, optimizer, max_new_tokens=32)
    stats = optimizer.snapshot()
    assert stats.decisions + stats.reused_steps == stats.num_steps
    assert stats.reused_steps > 0
    assert stats.decision_interval == optimizer.frequency.interval


def test_failing_policy_falls_back_and_counts(tiny_llama, prompt_factory) -> None:
    optimizer = RLInferenceOptimizer(
        FailingPredictor(), adaptive_frequency=False, enable_parameter_caching=False
    )
    prompt = prompt_factory(1, TINY_VOCAB, 4, 30, 7)[0]
    output = generate_speculative(tiny_llama.target, tiny_llama.head, prompt, optimizer, max_new_tokens=16)
    assert all(step.tree_params == FALLBACK_TREE for step in output.steps)
    stats = optimizer.snapshot()
    assert stats.fallbacks == len(output.steps) == stats.fallback_reasons["RuntimeError"]
    assert any("fallbacks to static" in line for line in suggestions(stats))


def test_no_policy_at_all_falls_back() -> None:
    optimizer = RLInferenceOptimizer(None)
    state = DecodingState(0, 5, 1, 6, None)
    assert optimizer.decide(state) == FALLBACK_TREE
    assert optimizer.stats.fallbacks == 1


def test_embedding_path_uses_state_decode_and_fuzzy_caches(tiny_llama, prompt_factory) -> None:
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    optimizer = RLInferenceOptimizer(
        predictor(),
        decode=decode,
        use_embedding=True,
        encoder=fake_encoder,
        decode_frequency=1,
        enable_parameter_caching=False,
        adaptive_frequency=False,
    )
    prompt = prompt_factory(1, TINY_VOCAB, 4, 30, 8)[0]
    for _ in range(2):  # the second run sees the same contexts: state cache hits, fuzzy hits
        generate_speculative(tiny_llama.target, tiny_llama.head, prompt, optimizer, max_new_tokens=12)
        optimizer.embedder.wait_idle()
    stats = optimizer.snapshot()
    assert stats.cache_lookups["decode"] == optimizer.decode_cache.counters.lookups > 0
    assert stats.cache_lookups["state"] == optimizer.state_cache.counters.lookups > 0
    assert stats.cache_hits["state"] > 0
    fuzzy = optimizer.context_cache.counters
    assert stats.cache_lookups["fuzzy"] == fuzzy.lookups and stats.cache_hits["fuzzy"] == fuzzy.hits > 0
    # Every decision came from exactly one source: a fuzzy hit reused a stored decision, or the policy decided.
    assert stats.cache_hits["fuzzy"] + stats.policy_calls + stats.fallbacks == stats.decisions
    assert stats.fallbacks == 0 and len(optimizer.context_cache) > 0
    assert stats.background_embedding_seconds >= 0.0 and optimizer.embedder.num_embedded > 0
    optimizer.close()


def test_use_embedding_requires_a_decoder() -> None:
    with pytest.raises(ValueError, match="decode="):
        RLInferenceOptimizer(predictor(), use_embedding=True)
    with pytest.raises(ValueError, match="decode_frequency"):
        RLInferenceOptimizer(predictor(), decode_frequency=0)


def test_prototype_names_and_defaults() -> None:
    optimizer = RLInferenceOptimizer(predictor())
    assert (optimizer.decode_frequency, optimizer.enable_parameter_caching, optimizer.adaptive_frequency) == (
        8,
        True,
        True,
    )
    cache = ContextAwareCache()  # the in-process fuzzy cache is the one similarity index, configured small
    assert isinstance(cache, ContextIndex) and isinstance(optimizer.context_cache, ContextIndex)
    assert (cache.config.max_entries, cache.config.similarity_threshold, cache.config.dim) == (150, 0.85, 384)
    assert AdaptiveParameterPredictor(controller=predictor().controller).history_size == 100
    assert DEFAULT_ACTIONS  # the default action set covers CPU- and GPU-sized trees
    assert (
        min(p.total_tokens for p in DEFAULT_ACTIONS) <= 4
        and max(p.total_tokens for p in DEFAULT_ACTIONS) >= 60
    )


def test_suggestions_follow_the_measured_figures() -> None:
    stats = OptimizationStats(decisions=100, decision_changes=2, decision_interval=4, wall_seconds=1.0)
    stats.decision_seconds = 0.05
    advice = suggestions(stats)
    assert any("raise the decision interval" in line for line in advice)
    assert any("5.0% of wall time" in line for line in advice)
    quiet = OptimizationStats(decisions=100, decision_changes=50, wall_seconds=1.0, decision_seconds=0.001)
    assert suggestions(quiet) == []
    stats.cache_lookups["fuzzy"], stats.cache_hits["fuzzy"] = 80, 60
    assert any("turn the embedding off" in line for line in suggestions(stats))
    stats.fuzzy_changed_decisions = 3
    assert not any("turn the embedding off" in line for line in suggestions(stats))


def test_stats_merge_adds_counts() -> None:
    a = OptimizationStats(num_steps=3, decisions=2, wall_seconds=1.0)
    a.cache_lookups["decision"], a.cache_hits["decision"] = 4, 1
    b = OptimizationStats(num_steps=5, decisions=1, wall_seconds=2.0, decision_interval=8)
    b.cache_lookups["decision"], b.cache_hits["decision"] = 6, 3
    a.merge(b)
    assert (a.num_steps, a.decisions, a.wall_seconds, a.decision_interval) == (8, 3, 3.0, 8)
    assert a.hit_rate("decision") == 0.4


def test_observe_feeds_the_predictor_in_adaptive_mode(tiny_llama, prompt_factory) -> None:
    optimizer = RLInferenceOptimizer(predictor(mode="adaptive"), adaptive_frequency=False)
    before = optimizer.predictor.controller.bandit.counts.sum()
    generate_speculative(
        tiny_llama.target,
        tiny_llama.head,
        prompt_factory(1, TINY_VOCAB, 4, 30, 9)[0],
        optimizer,
        max_new_tokens=16,
    )
    assert optimizer.predictor.controller.bandit.counts.sum() > before
    assert optimizer.stats.num_steps > 0


def test_real_minilm_encoder_embeds_offline_in_the_background() -> None:
    from policy.embedding import BackgroundEmbedder, load_minilm_encoder

    encode = load_minilm_encoder()
    code_a = encode("def parse(line):\n    return line.split(',')")
    code_b = encode("def parse_row(text):\n    return text.split(';')")
    prose = encode("The weather in the mountains was cold and clear all week.")
    assert code_a.shape == (384,) and abs(float(np.linalg.norm(code_a)) - 1.0) < 1e-4
    assert float(code_a @ code_b) > float(code_a @ prose)
    embedder = BackgroundEmbedder(encode)
    embedder.submit("hello world", tag=7)
    assert embedder.wait_idle(30.0)
    tag, vector = embedder.latest()
    assert tag == 7 and np.allclose(vector, encode("hello world"), atol=1e-5)
    embedder.close()


def test_background_embedder_drops_stale_requests_and_counts_failures() -> None:
    import threading
    import time

    from policy.embedding import BackgroundEmbedder

    gate = threading.Event()

    def slow_encoder(text: str) -> np.ndarray:
        gate.wait(5.0)
        return fake_encoder(text)

    embedder = BackgroundEmbedder(slow_encoder)
    embedder.submit("first", tag=1)
    while not embedder._busy:  # wait until the worker has taken "first" and is blocked in the encoder
        time.sleep(0.001)
    embedder.submit("second", tag=2)
    embedder.submit("third", tag=3)  # replaces "second", which never ran
    gate.set()
    assert embedder.wait_idle(10.0)
    assert (embedder.num_submitted, embedder.num_embedded, embedder.num_dropped) == (3, 2, 1)
    assert embedder.latest()[0] == 3
    embedder.close()

    def broken_encoder(text: str) -> np.ndarray:
        raise OSError("model files missing")

    failing = BackgroundEmbedder(broken_encoder)
    failing.submit("x")
    assert failing.wait_idle(10.0)
    assert failing.num_failed == 1 and failing.latest() is None and "OSError" in failing.last_error
    failing.close()
