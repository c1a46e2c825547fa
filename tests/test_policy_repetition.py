"""The repeat signal of the observation: SuffixMatcher against a brute-force search, and the two features."""

from __future__ import annotations

import random

import pytest

from engine.types import DecodingState
from policy.observation import FEATURE_NAMES, LONG_REPEAT, REPEAT_MAX_LENGTH, ObservationBuilder
from policy.repetition import SuffixMatcher


def brute_force(tokens: list[int], ngram: int, max_length: int) -> int:
    """Longest suffix (ngram..max_length tokens) that also ends at an earlier position, by trying every end."""
    n, best = len(tokens), 0
    for end in range(1, n):
        length = 0
        while (
            length < max_length
            and end - length - 1 >= 0
            and tokens[end - length - 1] == tokens[n - length - 1]
        ):
            length += 1
        if length >= ngram:
            best = max(best, length)
    return best


def test_docstring_example():
    assert SuffixMatcher(ngram=4).match_length([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5]) == 5


@pytest.mark.parametrize("seed", range(6))
def test_incremental_matches_equal_brute_force(seed):
    """Grown a few tokens at a time, like a generation; a small vocabulary makes repeats common."""
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 50])
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
    matcher = SuffixMatcher(ngram=3, max_length=16, max_candidates=10**6)  # keeps every earlier end: exact
    bounded = SuffixMatcher(ngram=3, max_length=16, max_candidates=2)
    for _ in range(40):
        if rng.random() < 0.3 and len(tokens) > 8:  # copy a stretch of the past, as a looping model does
            start = rng.randrange(len(tokens) - 4)
            tokens += tokens[start : start + rng.randrange(1, 12)]
        else:
            tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 5))]
        expected = brute_force(tokens, 3, 16)
        assert matcher.match_length(tokens) == expected
        assert 0 <= bounded.match_length(tokens) <= expected  # fewer candidates may miss an older, longer one


def test_a_shorter_sequence_starts_a_new_index():
    matcher = SuffixMatcher(ngram=2)
    assert matcher.match_length([7, 8, 9, 7, 8]) == 2
    assert matcher.match_length([1, 2, 3]) == 0  # nothing of the earlier sequence is remembered


def test_observation_carries_the_repeat():
    builder = ObservationBuilder()
    index = {name: i for i, name in enumerate(FEATURE_NAMES)}
    novel = list(range(100, 140))
    features = builder.features(DecodingState(0, len(novel), 0, len(novel), None, token_ids=novel))
    assert features[index["suffix_repeat"]] == 0.0 and features[index["long_repeat"]] == 0.0
    looping = novel + novel[:LONG_REPEAT]
    features = builder.features(
        DecodingState(1, len(novel), LONG_REPEAT, len(looping), None, token_ids=looping)
    )
    assert features[index["suffix_repeat"]] == pytest.approx(LONG_REPEAT / REPEAT_MAX_LENGTH)
    assert features[index["long_repeat"]] == 1.0
