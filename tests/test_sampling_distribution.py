"""End to end: speculative sampling emits continuations from the target's own distribution.

A tiny Llama over 12 tokens with a briefly trained draft head (drafts are accepted in roughly a third of the runs).
The empirical distribution of the 2-token continuation over a few thousand seeded runs is compared, with a
chi-square test, to the exact p(a | prompt) * p(b | prompt, a) enumerated with full forward passes: for the
one-sequence loop (rejection sampling) and for the batched engine (keyed sampling, many rows per step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine.batch import GenerationRequest, generate_batch
from engine.generate import generate_speculative
from engine.target import TargetModel
from engine.types import SamplingParams, StaticController, TreeParams
from training.train_draft import DraftTrainConfig, collect_features, train_head

VOCAB = 12
PROMPT = [3, 1, 4]
NUM_RUNS = 3000
TREE = TreeParams(6, 2, 3)
HEAD_TRAINING = DraftTrainConfig(max_new_tokens=24, epochs=10, batch_size=8, warmup_steps=3, seed=0)
SETTINGS = {
    "t1.0": SamplingParams(temperature=1.0),
    "t0.7-top_k5": SamplingParams(temperature=0.7, top_k=5),
}


@pytest.fixture(scope="module")
def small_model(tiny_lm_factory, prompt_factory):
    # weight_scale 6 gives a spread distribution: top token ~0.28, the rest 0.03-0.2
    model = tiny_lm_factory(
        "llama",
        seed=5,
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        weight_scale=6.0,
    )
    # A briefly trained head proposes likely tokens, so acceptance after earlier rejections (where a wrong
    # renormalisation would show) happens often; an untrained head would mostly test the bonus draw.
    examples = collect_features(
        model, prompt_factory(16, VOCAB, 2, 10, seed=3), HEAD_TRAINING, progress=False
    )
    head, _, _ = train_head(model, examples, HEAD_TRAINING, progress=False)
    return model, TargetModel(model), head.requires_grad_(False)


def exact_two_token_distribution(model, temperature: float, top_k: int) -> np.ndarray:
    """[VOCAB, VOCAB] joint p(a, b | PROMPT), from full forward passes, filters applied by hand."""

    def probs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double() / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

    with torch.no_grad():
        first = probs(model(torch.tensor([PROMPT])).logits[0, -1])  # [V]
        extended = torch.tensor([[*PROMPT, a] for a in range(VOCAB)])
        second = probs(model(extended).logits[:, -1])  # [V, V]
    return (first[:, None] * second).numpy()


@pytest.fixture(scope="module", params=list(SETTINGS))
def sampled(request, small_model) -> tuple[str, np.ndarray, int]:
    """(setting, counts [VOCAB, VOCAB] of the 2-token continuation, runs that accepted a drafted token)."""
    _, target, head = small_model
    sampling = SETTINGS[request.param]
    generator = torch.Generator().manual_seed(1234)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    num_accepting = 0
    for _ in range(NUM_RUNS):
        output = generate_speculative(
            target,
            head,
            PROMPT,
            StaticController(TREE),
            sampling=sampling,
            max_new_tokens=2,
            generator=generator,
        )
        a, b = output.new_token_ids
        counts[a, b] += 1
        num_accepting += output.steps[0].accepted_length > 0
    return request.param, counts, num_accepting


def bucketed_chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square p-value, with outcomes expected fewer than `min_expected` times pooled into one bucket."""
    counts, probs = counts.ravel(), probs.ravel()
    impossible = probs == 0
    assert counts[impossible].sum() == 0, "an outcome the target cannot produce was emitted"
    expected = probs * counts.sum()
    common = (expected >= min_expected) & ~impossible
    rare = ~common & ~impossible
    observed, expected_bucketed = counts[common].astype(np.float64), expected[common]
    if expected[rare].sum() >= min_expected:
        observed = np.append(observed, counts[rare].sum())
        expected_bucketed = np.append(expected_bucketed, expected[rare].sum())
    elif rare.any():  # too little mass for a bucket of its own: pool it with the smallest common outcome
        smallest = expected_bucketed.argmin()
        observed[smallest] += counts[rare].sum()
        expected_bucketed[smallest] += expected[rare].sum()
    return float(chisquare(observed, expected_bucketed).pvalue)


def test_two_token_continuation_follows_the_target(sampled, small_model) -> None:
    setting, counts, num_accepting = sampled
    sampling = SETTINGS[setting]
    exact = exact_two_token_distribution(small_model[0], sampling.temperature, sampling.top_k)
    assert counts.sum() == NUM_RUNS
    # both branches of verification happen often: a drafted token accepted, or all rejected and a bonus drawn
    assert 0.1 * NUM_RUNS < num_accepting < 0.9 * NUM_RUNS
    assert bucketed_chi_square(counts, exact) > 1e-3


def test_chi_square_would_detect_a_wrong_distribution(sampled, small_model) -> None:
    """Negative control: the same samples tested against a slightly different temperature fail clearly."""
    setting, counts, _ = sampled
    sampling = SETTINGS[setting]
    wrong = exact_two_token_distribution(small_model[0], sampling.temperature * 1.4, 0)
    assert bucketed_chi_square(counts, wrong) < 1e-6


@pytest.fixture(scope="module", params=list(SETTINGS))
def sampled_in_batches(request, small_model) -> tuple[str, np.ndarray, int]:
    """The same counts from the batched engine: every run a row of its own seed, 16 rows decoding together."""
    _, target, head = small_model
    sampling = SETTINGS[request.param]
    requests = [
        GenerationRequest(PROMPT, 2, StaticController(TREE), sampling=sampling, seed=seed)
        for seed in range(NUM_RUNS)
    ]
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    num_accepting = 0
    for result in generate_batch(target, head, requests, max_batch_size=16):
        a, b = result.output.new_token_ids
        counts[a, b] += 1
        num_accepting += result.output.steps[0].accepted_length > 0
    return request.param, counts, num_accepting


def test_batched_rows_follow_the_target(sampled_in_batches, small_model) -> None:
    """Keyed sampling in a batch: each row's continuation is an exact sample of the target distribution."""
    setting, counts, num_accepting = sampled_in_batches
    sampling = SETTINGS[setting]
    exact = exact_two_token_distribution(small_model[0], sampling.temperature, sampling.top_k)
    assert counts.sum() == NUM_RUNS
    assert 0.1 * NUM_RUNS < num_accepting < 0.9 * NUM_RUNS
    assert bucketed_chi_square(counts, exact) > 1e-3
    wrong = exact_two_token_distribution(small_model[0], sampling.temperature * 1.4, 0)
    assert bucketed_chi_square(counts, wrong) < 1e-6
