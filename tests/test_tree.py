"""Tree bookkeeping (`engine.tree`) against hand-computed trees and random dynamic trees, and the drafter that
grows the tree (`engine.draft`) against a cache-free recomputation with the same head."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.draft import Drafter, PendingDraftInput
from engine.draft_head import DraftHead, DraftHeadConfig
from engine.tree import ScoredCandidates, additive_mask, select_tree
from engine.types import TreeParams

ROOT = 7


def candidates(tokens: list[int], parents: list[int], scores: list[float]) -> ScoredCandidates:
    return ScoredCandidates(
        token_ids=torch.tensor(tokens), scores=torch.tensor(scores), parents=torch.tensor(parents)
    )


def ancestor_rows(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_select_tree_matches_the_docstring_example() -> None:
    # a..f = 11..16; top_k=2, depth=1, total_tokens=3 (engine/tree.py module docstring).
    scored = candidates(
        tokens=[11, 12, 13, 14, 15, 16],
        parents=[-1, -1, 0, 0, 1, 1],
        scores=[-0.1, -1.0, -0.3, -2.5, -1.2, -3.0],
    )
    tree = select_tree(ROOT, scored, total_tokens=3)

    assert tree.num_nodes == 4
    assert tree.token_ids.tolist() == [[ROOT, 11, 12, 13]]  # root, a, b, c
    assert tree.parents == [-1, 0, 0, 1]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.paths.tolist() == [[0, 2, -1], [0, 1, 3]]
    assert tree.children == [[1, 2], [3], [], []]
    assert ancestor_rows(tree.ancestor_mask) == [{0}, {0, 1}, {0, 2}, {0, 1, 3}]
    assert tree.ancestor_mask.dtype == torch.bool
    assert torch.allclose(tree.scores, torch.tensor([0.0, -0.1, -1.0, -0.3]))


def test_select_tree_keeps_everything_when_total_exceeds_candidates() -> None:
    scored = candidates(tokens=[11, 12, 13], parents=[-1, -1, 1], scores=[-0.2, -0.4, -0.9])
    tree = select_tree(ROOT, scored, total_tokens=50)
    assert tree.token_ids.tolist() == [[ROOT, 11, 12, 13]]
    assert tree.parents == [-1, 0, 0, 2]
    assert tree.paths.tolist() == [[0, 1, -1], [0, 2, 3]]


@pytest.mark.parametrize("total_tokens, expected_tokens", [(2, [ROOT, 11, 12]), (3, [ROOT, 11, 12, 15])])
def test_select_tree_tie_keeps_the_parent_first(total_tokens: int, expected_tokens: list[int]) -> None:
    # Candidate 4 (token 15) has log-prob 0 under its parent 1 (token 12): both score -1.0. With room for only one
    # of them, the parent must win, or the kept set would not be a tree.
    scored = candidates(
        tokens=[11, 12, 13, 14, 15, 16],
        parents=[-1, -1, 0, 0, 1, 1],
        scores=[-0.5, -1.0, -2.0, -3.0, -1.0, -4.0],
    )
    tree = select_tree(ROOT, scored, total_tokens=total_tokens)
    assert tree.token_ids[0].tolist() == expected_tokens
    for node, parent in enumerate(tree.parents[1:], start=1):
        assert 0 <= parent < node


def test_select_tree_tie_chain_of_zero_logprob_children() -> None:
    # A chain where every child is certain: all three deep nodes tie with the first-level node.
    scored = candidates(
        tokens=[11, 12, 13, 14, 15, 16],
        parents=[-1, -1, 0, 1, 2, 4],
        scores=[-1.0, -0.5, -1.0, -3.0, -1.0, -1.0],
    )
    tree = select_tree(ROOT, scored, total_tokens=4)
    assert tree.token_ids[0].tolist() == [ROOT, 11, 12, 13, 15]
    assert tree.parents == [-1, 0, 0, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 3]


def test_additive_mask_values_and_shape() -> None:
    allowed = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])
    mask = additive_mask(allowed, prefix_length=2, dtype=torch.float32)
    minimum = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 3, 5)
    assert mask.dtype == torch.float32
    assert (mask[0, 0, :, :2] == 0).all()  # every query sees the whole prefix
    expected = torch.tensor([[0, minimum, minimum], [0, 0, minimum], [0, minimum, 0]])
    assert torch.equal(mask[0, 0, :, 2:], expected)


def test_additive_mask_half_precision_and_empty_prefix() -> None:
    allowed = torch.tensor([[True, False], [True, True]])
    mask = additive_mask(allowed, prefix_length=0, dtype=torch.bfloat16)
    assert mask.shape == (1, 1, 2, 2) and mask.dtype == torch.bfloat16
    assert mask[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min
    assert mask[0, 0, 1].tolist() == [0.0, 0.0]


# ---- property test over random dynamic trees -------------------------------------------------------------------

LOG_PROBS = [0.0, -0.25, -0.5, -1.0, -2.0]  # a small set, so ties (including zero log-probs) are common


@st.composite
def dynamic_tree_candidates(draw):
    """ScoredCandidates shaped exactly like `Drafter.draft` builds them; token id == candidate index."""
    top_k = draw(st.integers(1, 3))
    depth = draw(st.integers(0, 3))

    def sorted_log_probs() -> list[float]:  # one top-k draw: non-increasing log-probs <= 0
        values = draw(st.lists(st.sampled_from(LOG_PROBS), min_size=top_k, max_size=top_k))
        return sorted(values, reverse=True)

    scores = sorted_log_probs()
    parents = [-1] * top_k
    frontier = list(range(top_k))
    for _ in range(depth):
        start = len(scores)
        for node in frontier:
            scores += [scores[node] + value for value in sorted_log_probs()]
            parents += [node] * top_k
        new = list(range(start, len(scores)))
        # the global top_k of this round (stable, like torch.topk on distinct-enough values) become the frontier
        frontier = sorted(new, key=lambda index: -scores[index])[:top_k]
    total_tokens = draw(st.integers(1, len(scores) + 3))
    scored = candidates(list(range(len(scores))), parents, scores)
    return scored, total_tokens


@settings(max_examples=60, deadline=None, database=None)
@given(dynamic_tree_candidates())
def test_select_tree_invariants_on_random_dynamic_trees(case) -> None:
    scored, total_tokens = case
    tree = select_tree(ROOT, scored, total_tokens)
    num_candidates = scored.scores.shape[0]
    num_drafted = min(total_tokens, num_candidates)
    assert tree.num_nodes == num_drafted + 1

    candidate_of = [None, *tree.token_ids[0, 1:].tolist()]  # token id == candidate index
    candidate_parents = scored.parents.tolist()
    # The kept nodes are the best-scored ones and are listed in level order.
    kept_scores = sorted(scored.scores[candidate_of[1:]].tolist(), reverse=True)
    best_scores = sorted(scored.scores.tolist(), reverse=True)[:num_drafted]
    assert kept_scores == best_scores
    assert candidate_of[1:] == sorted(candidate_of[1:])

    for node in range(1, tree.num_nodes):
        parent = tree.parents[node]
        assert 0 <= parent < node  # the parent is kept and precedes the child
        expected_parent = candidate_parents[candidate_of[node]]
        assert (candidate_of[parent] if parent > 0 else -1) == expected_parent
        assert tree.depths[node] == tree.depths[parent] + 1
        assert math.isclose(float(tree.scores[node]), float(scored.scores[candidate_of[node]]))

    for node, kids in enumerate(tree.children):
        assert all(tree.parents[kid] == node for kid in kids)
        kid_scores = [float(tree.scores[kid]) for kid in kids]
        assert kid_scores == sorted(kid_scores, reverse=True)
    assert sum(len(kids) for kids in tree.children) == tree.num_nodes - 1

    leaves = [node for node in range(tree.num_nodes) if not tree.children[node]]
    assert tree.paths.shape == (len(leaves), int(tree.depths.max()) + 1)
    for row, leaf in zip(tree.paths.tolist(), leaves, strict=True):
        real = [node for node in row if node >= 0]
        assert row[len(real) :] == [-1] * (len(row) - len(real))  # padding only at the end
        assert real[-1] == leaf and real[0] == 0
        assert [int(tree.depths[node]) for node in real] == list(range(len(real)))
        assert all(tree.parents[child] == parent for parent, child in pairwise(real))

    for node, on_path in enumerate(ancestor_rows(tree.ancestor_mask)):
        expected = set()
        walker = node
        while walker != -1:
            expected.add(walker)
            walker = tree.parents[walker]
        assert on_path == expected


# ---- the drafter --------------------------------------------------------------------------------------------------

HIDDEN = 32
VOCAB = 40


@pytest.fixture(scope="module")
def random_head() -> tuple[DraftHead, torch.nn.Linear]:
    torch.manual_seed(3)
    config = DraftHeadConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    head = DraftHead(config).eval()
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        lm_head.weight.mul_(20.0)  # spread the draft logits so top-k choices are not near-ties
    return head, lm_head.eval()


def pending(length: int, seed: int) -> PendingDraftInput:
    generator = torch.Generator().manual_seed(seed)
    return PendingDraftInput(
        features=torch.randn(1, length, HIDDEN, generator=generator),
        token_ids=torch.randint(0, VOCAB, (1, length), generator=generator),
    )


@pytest.mark.parametrize(
    "params", [TreeParams(1, 0, 1), TreeParams(4, 2, 2), TreeParams(10, 3, 3), TreeParams(21, 4, 3)]
)
def test_drafter_tree_shape_and_cache_is_cropped(random_head, params: TreeParams) -> None:
    head, lm_head = random_head
    drafter = Drafter(head, lm_head)
    first = pending(6, seed=1)
    result = drafter.draft(first, params)
    tree = result.tree
    assert tree.num_nodes == params.total_tokens + 1
    assert int(tree.depths.max()) <= params.depth + 1
    assert tree.token_ids[0, 0] == first.token_ids[0, -1]  # the root is the last pending token
    assert drafter.cache.length == 6  # tree entries were scratch
    assert (tree.scores[1:] <= 0).all()
    assert 0.0 < result.confidence.root_top1_prob <= 1.0

    more = pending(3, seed=2)
    tree = drafter.draft(more, params).tree
    assert drafter.cache.length == 9
    assert tree.num_nodes == params.total_tokens + 1


def test_drafter_matches_cache_free_recomputation(random_head) -> None:
    """With every candidate kept (total_tokens = max_nodes, depth 1), the first level must be the head's top-k
    after the pending pairs, and each first-level node's children the top-k after appending that node, both
    computed here from scratch without a cache or a tree mask."""
    head, lm_head = random_head
    params = TreeParams(2 + 2 * 2, 1, 2)
    inputs = pending(5, seed=4)
    tree = Drafter(head, lm_head).draft(inputs, params).tree

    positions = torch.arange(5)[None]
    with torch.inference_mode():
        hidden = head(inputs.token_ids, inputs.features, positions)  # causal, no cache
        log_probs = torch.log_softmax(lm_head(hidden[0, -1]), -1)
        first = torch.topk(log_probs, 2)
        assert [tree.token_ids[0, kid].item() for kid in tree.children[0]] == first.indices.tolist()
        assert torch.allclose(tree.scores[tree.children[0]], first.values, atol=1e-5)
        for node in tree.children[0]:
            token_ids = torch.cat((inputs.token_ids, tree.token_ids[:, node : node + 1]), dim=1)
            features = torch.cat((inputs.features, hidden[:, -1:]), dim=1)
            deeper = head(token_ids, features, torch.arange(6)[None])
            child_log_probs = torch.log_softmax(lm_head(deeper[0, -1]), -1)
            expected = torch.topk(child_log_probs, 2)
            kids = tree.children[node]
            assert [tree.token_ids[0, kid].item() for kid in kids] == expected.indices.tolist()
            assert torch.allclose(tree.scores[kids], tree.scores[node] + expected.values, atol=1e-4)


def test_drafter_incremental_reading_equals_reading_at_once(random_head) -> None:
    """Reading pending pairs over two steps (with a tree drafted and cropped in between) gives the same tree as a
    fresh drafter reading all pairs at once: the cache keeps only real positions."""
    head, lm_head = random_head
    params = TreeParams(10, 3, 3)
    whole = pending(9, seed=5)
    stepwise = Drafter(head, lm_head)
    stepwise.draft(PendingDraftInput(whole.features[:, :5], whole.token_ids[:, :5]), params)
    late = stepwise.draft(PendingDraftInput(whole.features[:, 5:], whole.token_ids[:, 5:]), params).tree
    fresh = Drafter(head, lm_head).draft(whole, params).tree
    assert late.token_ids.tolist() == fresh.token_ids.tolist()
    assert late.parents == fresh.parents
    assert torch.allclose(late.scores, fresh.scores, atol=1e-4)


@pytest.mark.parametrize(
    ("params", "max_step_tokens", "expected"),
    [
        (TreeParams(40, 39, 1), 10, TreeParams(9, 8, 1)),  # a step gains up to depth + 2 tokens
        (TreeParams(40, 39, 1), 41, TreeParams(40, 39, 1)),  # fits: itself
        (TreeParams(60, 5, 10), 3, TreeParams(60, 1, 10)),  # 60 <= 10 + 1 * 100 nodes
        (TreeParams(16, 5, 2), 3, TreeParams(6, 1, 2)),  # total cut to the 2 + 1 * 4 nodes depth 1 scores
        (TreeParams(4, 3, 1), 1, TreeParams(1, 0, 1)),  # one token left: the smallest tree there is
    ],
)
def test_tree_params_capped(params: TreeParams, max_step_tokens: int, expected: TreeParams) -> None:
    assert params.capped(max_step_tokens) == expected
