"""Verification: which drafted tokens the target accepts, and the target's own bonus token.

Greedy: the longest root-to-leaf path whose tokens equal the target's argmax at their parents.
Sampling: multi-candidate recursive rejection. At a node, try its children (the draft chose them
deterministically, by top-k): accept child x with probability p(x); on rejection set p(x) = 0 and renormalise;
if every child is rejected, or the node is a leaf, draw the bonus token from what is left of p. Each emitted
token is therefore an exact sample from the target distribution p (see tests/test_sampling_distribution.py).

This module decides acceptance only; it does not touch caches or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.tree import DraftTree
from engine.types import SamplingParams


@dataclass(frozen=True)
class VerifyResult:
    """accepted_nodes: tree indices of the kept path, root first ([0] when nothing drafted was accepted).
    accepted_token_ids: the drafted tokens accepted (len(accepted_nodes) - 1).
    bonus_token_id: the target's own token after the accepted path."""

    accepted_nodes: list[int]
    accepted_token_ids: list[int]
    bonus_token_id: int

    @property
    def accepted_length(self) -> int:
        return len(self.accepted_token_ids)


def target_probabilities(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Turn logits [..., V] into the distribution sampling draws from: temperature, then top-k, then top-p
    (the order HF generate uses). Tokens outside the filters get probability 0."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < sampling.top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V]: argmax when greedy, else a draw from `target_probabilities`."""
    if sampling.is_greedy:
        return int(logits.argmax())
    probs = target_probabilities(logits, sampling)
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> VerifyResult:
    """logits [N+1, V] of the tree nodes -> the longest path the target's argmax agrees with."""
    predicted = logits.argmax(-1)  # [N+1] the target's choice after each node
    paths = tree.paths  # [L, D+1]
    node_tokens = tree.token_ids[0]
    children = paths[:, 1:]
    is_real = children >= 0
    child_tokens = node_tokens[children.clamp(min=0)]
    parent_choice = predicted[paths[:, :-1].clamp(min=0)]
    matches = (child_tokens == parent_choice) & is_real  # [L, D]
    accepted_per_path = matches.long().cumprod(dim=1).sum(dim=1)  # [L]
    best = int(accepted_per_path.argmax())
    num_accepted = int(accepted_per_path[best])
    nodes = paths[best, : num_accepted + 1].tolist()
    return VerifyResult(
        accepted_nodes=nodes,
        accepted_token_ids=node_tokens[nodes[1:]].tolist(),
        bonus_token_id=int(predicted[nodes[-1]]),
    )


def verify_sampling(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> VerifyResult:
    """Recursive rejection over the tree's children, node by node; see the module docstring."""
    node_tokens = tree.token_ids[0].tolist()
    node = 0
    nodes = [0]
    while True:
        probs = target_probabilities(logits[node], sampling)
        accepted_child = None
        for child in tree.children[node]:
            token = node_tokens[child]
            if float(torch.rand((), generator=generator)) < float(probs[token]):
                accepted_child = child
                break
            probs[token] = 0.0
            total = probs.sum()
            if total <= 0:  # numerically nothing left; the next draw below would be undefined
                break
            probs /= total
        if accepted_child is None:
            bonus = (
                int(torch.multinomial(probs, 1, generator=generator))
                if probs.sum() > 0
                else int(logits[node].argmax())
            )
            return VerifyResult(nodes, [node_tokens[n] for n in nodes[1:]], bonus)
        node = accepted_child
        nodes.append(node)
