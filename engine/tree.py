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
    parents = [-1, *tree_parents.tolist()]

    num_nodes = num_keep + 1
    depths = np.zeros(num_nodes, dtype=np.int64)
    ancestor_mask = np.zeros((num_nodes, num_nodes), dtype=bool)
    ancestor_mask[0, 0] = True
    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(1, num_nodes):
        parent = parents[node]
        depths[node] = depths[parent] + 1
        ancestor_mask[node] = ancestor_mask[parent]
        ancestor_mask[node, node] = True
        children[parent].append(node)

    # Siblings come out in descending draft score: candidates of one parent are stored in top-k order.
    kept_scores = candidates.scores[torch.from_numpy(kept)]

    leaves = [node for node in range(num_nodes) if not children[node]]
    max_depth = int(depths.max())
    paths = np.full((len(leaves), max_depth + 1), -1, dtype=np.int64)
    for row, leaf in enumerate(leaves):
        node = leaf
        while node != -1:
            paths[row, depths[node]] = node
            node = parents[node]

    token_ids = torch.cat((torch.tensor([root_token_id]), candidates.token_ids[torch.from_numpy(kept)]))
    return DraftTree(
        token_ids=token_ids[None],
        parents=parents,
        depths=torch.from_numpy(depths),
        ancestor_mask=torch.from_numpy(ancestor_mask),
        paths=torch.from_numpy(paths),
        children=children,
        scores=torch.cat((torch.zeros(1), kept_scores.float())),
    )


def additive_mask(allowed: torch.Tensor, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean [Q, K] visibility matrix over new positions into the 4D additive mask
    [1, 1, Q, prefix_length + K] that stock attention takes: 0 where visible, dtype-min elsewhere.
    Every new position sees the whole prefix."""
    num_queries, num_keys = allowed.shape
    mask = torch.zeros(1, 1, num_queries, prefix_length + num_keys, dtype=dtype, device=allowed.device)
    mask[0, 0, :, prefix_length:].masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask
