"""EAGLE-2 dynamic tree bookkeeping: rerank scored draft nodes, keep the best, and describe the kept tree.

Pure tensor/array logic with no model calls, so the invariants can be checked against hand-computed values.
The drafting loop that produces the scored candidates lives in `draft.py`.

Worked example (top_k=2, depth=1, total_tokens=3), candidates in level order with cumulative log-probs:

    candidate:   0      1      2      3      4      5
    token:       a      b      c      d      e      f
    parent:     root   root    0      0      1      1
    score:     -0.1   -1.0   -0.3   -2.5   -1.2   -3.0

The best three scores are a(-0.1), c(-0.3), b(-1.0). Kept in level order with the root at index 0:

    tree index:  0     1  2  3
    token:       root  a  b  c
    parent:     -1     0  0  1
    depth:       0     1  1  2
    paths:      [0, 2, -1], [0, 1, 3]   (one per leaf, in leaf order)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ScoredCandidates:
    """Every node the dynamic tree scored, in level order (a parent always precedes its children).

    token_ids [M]: drafted token of each candidate.
    scores [M]: cumulative draft log-prob from the root.
    parents [M]: index of the parent candidate, -1 for first-level nodes (children of the root).
    """

    token_ids: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor


@dataclass(frozen=True)
class DraftTree:
    """The tree the target verifies. Index 0 is the root: the last token the target chose, not yet verified
    into its KV cache.

    token_ids [1, N+1]: root first, then kept drafted tokens in level order.
    parents: N+1 ints, -1 for the root.
    depths [N+1]: 0 for the root; the position offset of each node.
    ancestor_mask [N+1, N+1] bool: row i is True at i and at each ancestor of i.
    paths [num_leaves, max_depth+1]: root-to-leaf tree indices, padded with -1.
    children: N+1 lists of child tree indices, in descending draft score.
    scores [N+1]: cumulative draft log-prob (0 for the root).
    """

    token_ids: torch.Tensor
    parents: list[int]
    depths: torch.Tensor
    ancestor_mask: torch.Tensor
    paths: torch.Tensor
    children: list[list[int]]
    scores: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.parents)


def select_tree(root_token_id: int, candidates: ScoredCandidates, total_tokens: int) -> DraftTree:
    """Keep the `total_tokens` best-scored candidates and build the tree the target verifies.

    A child's score never exceeds its parent's (it adds a log-prob <= 0). Ties are broken towards the earlier
    candidate, which is the parent, so the kept set is always closed under parents.
    """
    num_candidates = candidates.scores.shape[0]
    num_keep = min(total_tokens, num_candidates)
    order = torch.sort(candidates.scores, descending=True, stable=True).indices[:num_keep]
    kept = np.sort(order.numpy())  # candidate indices in level order
    parents_of_kept = candidates.parents.numpy()[kept]

    # Candidate index -> tree index (root is tree index 0, kept candidates 1..N).
    tree_index = np.full(num_candidates, -1, dtype=np.int64)
    tree_index[kept] = np.arange(1, num_keep + 1)
    tree_parents = np.where(parents_of_kept < 0, 0, tree_index[np.maximum(parents_of_kept, 0)])
    assert (tree_parents >= 0).all(), "dynamic tree kept a node without its parent"
    # Siblings come out in descending draft score: candidates of one parent are stored in top-k order.
    kept_scores = candidates.scores[torch.from_numpy(kept)]
    token_ids = torch.cat((torch.tensor([root_token_id]), candidates.token_ids[torch.from_numpy(kept)]))
    return build_tree(
        token_ids, [-1, *tree_parents.tolist()], torch.cat((torch.zeros(1), kept_scores.float()))
    )


def build_tree(token_ids: torch.Tensor, parents: list[int], scores: torch.Tensor) -> DraftTree:
    """The DraftTree of nodes token_ids [N+1] (root first) with these parents (-1 for the root; every parent
    comes before its children) and scores [N+1]."""
    num_nodes = len(parents)
    depths = np.zeros(num_nodes, dtype=np.int64)
    ancestor_mask = np.zeros((num_nodes, num_nodes), dtype=bool)
    ancestor_mask[0, 0] = True
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(1, num_nodes):
        parent = parents[node]
        assert 0 <= parent < node, f"node {node} has parent {parent}: parents must come first"
        depths[node] = depths[parent] + 1
        ancestor_mask[node] = ancestor_mask[parent]
        ancestor_mask[node, node] = True
        children[parent].append(node)

    leaves = [node for node in range(num_nodes) if not children[node]]
    max_depth = int(depths.max())
    paths = np.full((len(leaves), max_depth + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        node = leaf
        while node != -1:
            paths[row, depths[node]] = node
            node = parents[node]

    return DraftTree(
        token_ids=token_ids.reshape(1, -1),
        parents=list(parents),
        depths=torch.from_numpy(depths),
        ancestor_mask=torch.from_numpy(ancestor_mask),
        paths=torch.from_numpy(paths),
        children=children,
        scores=scores,
    )


def merge_branch(
    tree: DraftTree, branch: list[int], branch_scores: list[float], num_nodes: int
) -> tuple[DraftTree, list[int], list[bool]]:
    """The best `num_nodes` nodes (root included) of `tree` and the chain `branch` hung from its root, ranked
    by score as EAGLE-2 ranks its own candidates, verified as one tree. branch_scores[i]: the estimated log
    chance that the branch is right up to token i (non-increasing). The branch follows the tree's nodes while
    their tokens agree (a shared node keeps the higher score) and goes on as new nodes from there. Fewer nodes
    are padded with leaves under the root: a batch step verifies one width on every row, and a pad is one
    more guess, as exact as any drafted node. Returns the tree, the node of each branch token kept (in
    order), and per node whether it is one of `tree`'s.

    Example: tree root -> a -> b, branch [a, c]: a is shared, c becomes a child of a; with num_nodes 3 the
    lower-scored of b and c is dropped."""
    tokens = tree.token_ids[0].tolist()
    parents = list(tree.parents)
    scores = tree.scores.tolist()
    children = [list(nodes) for nodes in tree.children]
    node, path = 0, []
    for token, score in zip(branch, branch_scores, strict=True):
        child = next((c for c in children[node] if tokens[c] == token), None)
        if child is None:
            child = len(tokens)
            tokens.append(token)
            parents.append(node)
            scores.append(score)
            children.append([])
            children[node].append(child)
        else:
            scores[child] = max(scores[child], score)
        path.append(child)
        node = child
    # Scores never rise along a path, so the best nodes (ties to the earlier, the parent) are closed under
    # parents; the root always stays.
    ranked = sorted(range(1, len(tokens)), key=lambda n: (-scores[n], n))[: num_nodes - 1]
    kept = [0, *sorted(ranked)]
    renumber = {old: new for new, old in enumerate(kept)}
    kept_tokens = [tokens[n] for n in kept]
    kept_parents = [-1, *(renumber[parents[n]] for n in kept[1:])]
    kept_scores = [scores[n] for n in kept]
    while len(kept_tokens) < num_nodes:
        kept_tokens.append(kept_tokens[0])
        kept_parents.append(0)
        kept_scores.append(float("-inf"))
    merged = build_tree(
        torch.tensor(kept_tokens), kept_parents, torch.tensor(kept_scores, dtype=torch.float32)
    )
    branch_nodes = []
    for n in path:
        if n not in renumber:
            break
        branch_nodes.append(renumber[n])
    from_tree = [n < tree.num_nodes for n in kept] + [False] * (num_nodes - len(kept))
    return merged, branch_nodes, from_tree


def chain_tree(root_token_id: int) -> DraftTree:
    """The tree of the root alone (a step that verifies only a retrieved branch starts from it)."""
    return build_tree(torch.tensor([root_token_id]), [-1], torch.zeros(1))


def additive_mask(allowed: torch.Tensor, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean [Q, K] visibility matrix over new positions into the 4D additive mask
    [1, 1, Q, prefix_length + K] that stock attention takes: 0 where visible, dtype-min elsewhere.
    Every new position sees the whole prefix."""
    num_queries, num_keys = allowed.shape
    mask = torch.zeros(1, 1, num_queries, prefix_length + num_keys, dtype=dtype, device=allowed.device)
    mask[0, 0, :, prefix_length:].masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask
