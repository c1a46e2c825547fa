"""Acceptance maths (`engine.verify`) on hand-built trees and hand-made logits, plus a statistical check that
recursive rejection sampling over a tree emits tokens from the target distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.tree import DraftTree
from engine.types import SamplingParams
from engine.verify import sample_token, target_probabilities, verify_greedy, verify_sampling

VOCAB = 20


def make_tree(tokens: list[int], parents: list[int]) -> DraftTree:
    """A DraftTree from level-ordered tokens and parents (root first, parent -1)."""
    num_nodes = len(tokens)
    depths = [0] * num_nodes
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(num_nodes):
        if node:
            depths[node] = depths[parents[node]] + 1
            children[parents[node]].append(node)
            mask[node] = mask[parents[node]]
        mask[node, node] = True
    leaves = [node for node in range(num_nodes) if not children[node]]
    paths = torch.full((len(leaves), max(depths) + 1), -1)
    for row, leaf in enumerate(leaves):
        node = leaf
        while node != -1:
            paths[row, depths[node]] = node
            node = parents[node]
    return DraftTree(
        token_ids=torch.tensor([tokens]),
        parents=parents,
        depths=torch.tensor(depths),
        ancestor_mask=mask,
        paths=paths,
        children=children,
        scores=torch.zeros(num_nodes),
    )


# index:     0   1   2   3   4   5   6
# token:    10  11  12  13  16  15  14
# parent:   -1   0   0   1   1   2   3
# leaves 4, 5, 6 -> paths [0,1,4,-1], [0,2,5,-1], [0,1,3,6]
GREEDY_TREE = make_tree([10, 11, 12, 13, 16, 15, 14], [-1, 0, 0, 1, 1, 2, 3])


def logits_with_argmax(choices: list[int], seed: int = 0) -> torch.Tensor:
    """[len(choices), VOCAB] random logits whose row i peaks at choices[i]."""
    logits = torch.randn(len(choices), VOCAB, generator=torch.Generator().manual_seed(seed))
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 10.0
    return logits


@pytest.mark.parametrize(
    "argmax_per_node, nodes, tokens, bonus",
    [
        # whole deepest path matches (it is the last path): bonus is the argmax after the leaf
        ([11, 13, 0, 14, 0, 0, 5], [0, 1, 3, 6], [11, 13, 14], 5),
        # at node 1 the target prefers 16 (node 4): the first path, two tokens, beats one token on the third path
        ([11, 16, 0, 14, 3, 0, 0], [0, 1, 4], [11, 16], 3),
        # mismatch below node 3: stop there, bonus = argmax at node 3
        ([11, 13, 0, 2, 0, 0, 0], [0, 1, 3], [11, 13], 2),
        # second first-level node
        ([12, 13, 15, 14, 0, 19, 0], [0, 2, 5], [12, 15], 19),
        # nothing accepted
        ([9, 13, 15, 14, 0, 19, 0], [0], [], 9),
    ],
)
def test_verify_greedy_takes_longest_matching_path(argmax_per_node, nodes, tokens, bonus) -> None:
    result = verify_greedy(GREEDY_TREE, logits_with_argmax(argmax_per_node))
    assert result.accepted_nodes == nodes
    assert result.accepted_token_ids == tokens
    assert result.bonus_token_id == bonus
    assert result.accepted_length == len(tokens)


def test_verify_greedy_root_only_tree() -> None:
    tree = make_tree([4], [-1])
    result = verify_greedy(tree, logits_with_argmax([17]))
    assert (result.accepted_nodes, result.accepted_token_ids, result.bonus_token_id) == ([0], [], 17)


# ---- target_probabilities ---------------------------------------------------------------------------------------


def test_target_probabilities_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = target_probabilities(logits, SamplingParams(temperature=0.5))
    expected = torch.tensor([4.0, 2.0, 0.0, -2.0]).exp()
    assert torch.allclose(probs, expected / expected.sum(), atol=1e-6)


def test_target_probabilities_top_k() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = target_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    e = torch.tensor(1.0).exp()
    assert torch.allclose(probs, torch.tensor([e * e, e, 0, 0]) / (e * e + e), atol=1e-6)
    unfiltered = target_probabilities(logits, SamplingParams(temperature=1.0, top_k=10))
    assert torch.allclose(unfiltered, logits.softmax(-1), atol=1e-6)


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.75, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (0.4, [1.0, 0, 0, 0]),  # the most likely token always stays
        (0.0, [0.5, 0.3, 0.15, 0.05]),  # 0 disables the filter
        (1.0, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_target_probabilities_top_p(top_p: float, expected: list[float]) -> None:
    # shuffled order, so the filter must map sorted positions back to token ids
    probs_in = torch.tensor([0.15, 0.5, 0.05, 0.3])
    permutation = [1, 3, 0, 2]  # expected is listed in descending probability: tokens 1, 3, 0, 2
    probs = target_probabilities(probs_in.log(), SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.allclose(probs[permutation], torch.tensor(expected), atol=1e-6)


def test_target_probabilities_temperature_then_top_k_then_top_p_by_hand() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = target_probabilities(logits, SamplingParams(temperature=2.0, top_k=3, top_p=0.6))
    scaled = torch.tensor([2.0, 1.5, 1.0]).exp()
    top3 = scaled / scaled.sum()  # ~[0.507, 0.307, 0.186]: mass before token 2 is 0.81 >= 0.6, so drop it
    assert top3[0] < 0.6 <= top3[0] + top3[1]
    kept = top3[:2] / top3[:2].sum()
    assert torch.allclose(probs, torch.tensor([kept[0], kept[1], 0, 0, 0]), atol=1e-6)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.7, 0, 0.0), (1.3, 5, 0.0), (1.0, 0, 0.8), (0.6, 12, 0.9), (1.0, 3, 0.5)]
)
def test_target_probabilities_match_hf_warpers(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)) * 2
    warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p:
        warped = TopPLogitsWarper(top_p)(None, warped)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.allclose(target_probabilities(logits, sampling), warped.softmax(-1), atol=1e-6)


def test_sample_token_greedy_is_argmax_and_sampling_respects_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert sample_token(logits, SamplingParams(), None) == 1
    generator = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=5.0, top_k=2), generator) for _ in range(200)}
    assert draws == {1, 2}


# ---- recursive rejection sampling ----------------------------------------------------------------------------

# index:    0  1  2  3  4  5
# token:    5  0  1  2  3  4
# parent:  -1  0  0  0  1  1      root has 3 children; node 1 (token 0) has 2 children
SAMPLING_TREE = make_tree([5, 0, 1, 2, 3, 4], [-1, 0, 0, 0, 1, 1])
SAMPLING_VOCAB = 6
NODE_PROBS = torch.tensor(
    [
        [0.30, 0.10, 0.15, 0.20, 0.05, 0.20],  # root: children tokens 0, 1, 2
        [0.10, 0.20, 0.05, 0.25, 0.30, 0.10],  # node 1: children tokens 3, 4
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
        [0.05, 0.05, 0.30, 0.30, 0.20, 0.10],
        [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],
    ]
)
NODE_LOGITS = NODE_PROBS.log()


def first_two_emitted(accepted: list[int], bonus: int) -> tuple[int, int | None]:
    emitted = [*accepted, bonus]
    return emitted[0], (emitted[1] if len(emitted) > 1 else None)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value that `counts` were drawn from `probs`; zero-probability outcomes must never occur."""
    probs = np.asarray(probs, dtype=np.float64)
    possible = probs > 0
    assert counts[~possible].sum() == 0, f"impossible outcomes occurred: {counts} vs {probs}"
    expected = probs[possible] / probs[possible].sum() * counts[possible].sum()
    return float(chisquare(counts[possible], expected).pvalue)


def sample_emitted(sampling: SamplingParams, num_draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first emitted token, and of the second one given that the first was token 0 (node 1)."""
    generator = torch.Generator().manual_seed(seed)
    first_counts = np.zeros(SAMPLING_VOCAB, dtype=np.int64)
    second_counts = np.zeros(SAMPLING_VOCAB, dtype=np.int64)
    for _ in range(num_draws):
        result = verify_sampling(SAMPLING_TREE, NODE_LOGITS, sampling, generator)
        assert result.accepted_nodes[0] == 0
        assert [SAMPLING_TREE.token_ids[0, n].item() for n in result.accepted_nodes[1:]] == (
            result.accepted_token_ids
        )
        first, second = first_two_emitted(result.accepted_token_ids, result.bonus_token_id)
        first_counts[first] += 1
        if result.accepted_nodes[1:2] == [1]:
            second_counts[second] += 1
    return first_counts, second_counts


@pytest.mark.parametrize(
    "sampling, num_draws",
    [(SamplingParams(temperature=1.0), 20_000), (SamplingParams(temperature=0.7, top_k=4), 10_000)],
)
def test_verify_sampling_preserves_target_distribution(sampling: SamplingParams, num_draws: int) -> None:
    first_counts, second_counts = sample_emitted(sampling, num_draws, seed=0)
    root_probs = target_probabilities(NODE_LOGITS[0], sampling).numpy()
    child_probs = target_probabilities(NODE_LOGITS[1], sampling).numpy()
    assert first_counts.sum() == num_draws
    assert second_counts.sum() > 0.2 * num_draws  # node 1 is accepted often enough to test the second level
    assert chi_square_p(first_counts, root_probs) > 1e-3
    assert chi_square_p(second_counts, child_probs) > 1e-3


def naive_rejection_counts(num_draws: int, always_accept_first: bool, seed: int) -> np.ndarray:
    """First emitted token of two wrong samplers, simulated directly: (a) always accept the first child; (b) accept
    each child with its *original* probability, without renormalising after a rejection."""
    if always_accept_first:
        counts = np.zeros(SAMPLING_VOCAB, dtype=np.int64)
        counts[0] = num_draws
        return counts
    rng = np.random.default_rng(seed)
    probs = NODE_PROBS[0].numpy().astype(np.float64)
    child_tokens = [0, 1, 2]
    residual = probs.copy()
    residual[child_tokens] = 0
    residual /= residual.sum()
    uniforms = rng.random((num_draws, len(child_tokens)))
    accepted = uniforms < probs[child_tokens]  # [draws, children]
    first_accept = np.where(accepted.any(1), accepted.argmax(1), -1)
    bonus = rng.choice(SAMPLING_VOCAB, size=num_draws, p=residual)
    emitted = np.where(first_accept >= 0, np.array(child_tokens)[first_accept.clip(0)], bonus)
    return np.bincount(emitted, minlength=SAMPLING_VOCAB)


@pytest.mark.parametrize("always_accept_first", [True, False])
def test_chi_square_detects_biased_samplers(always_accept_first: bool) -> None:
    """Negative control: the same check rejects samplers that are wrong, so passing above means something."""
    counts = naive_rejection_counts(20_000, always_accept_first, seed=0)
    assert counts.sum() == 20_000
    assert chi_square_p(counts, NODE_PROBS[0].numpy()) < 1e-12


def test_verify_sampling_certain_child_is_always_accepted() -> None:
    logits = NODE_LOGITS.clone()
    logits[0] = torch.tensor(
        [-1e9, -1e9, 0.0, -1e9, -1e9, -1e9]
    )  # root: all mass on token 2 (node 3, a leaf)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        result = verify_sampling(SAMPLING_TREE, logits, SamplingParams(temperature=1.0), generator)
        assert result.accepted_nodes == [0, 3]
        assert result.accepted_token_ids == [2]


def test_verify_sampling_never_emits_filtered_tokens() -> None:
    # top_k=1 at the root keeps only token 0; the draft proposes 0, 1, 2, so 1 and 2 must always be rejected.
    generator = torch.Generator().manual_seed(0)
    sampling = SamplingParams(temperature=1.0, top_k=1)
    for _ in range(50):
        result = verify_sampling(SAMPLING_TREE, NODE_LOGITS, sampling, generator)
        assert result.accepted_nodes[:2] == [0, 1]
        # below node 1, top_k=1 keeps token 4 (p=0.3), which is node 5
        assert result.accepted_nodes == [0, 1, 5]
        assert result.bonus_token_id == 5
