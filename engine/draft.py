"""Drafting: advance the draft head over newly accepted tokens, then grow the EAGLE-2 dynamic tree.

Alignment. The draft head at draft position j reads (feature f_j, token x_{j+1}) and predicts f_{j+1}, whose
lm_head logits rank x_{j+2}. With n tokens in the sequence, the target has features f_0..f_{n-2} (the last
token x_{n-1} is the tree's root, not yet verified) and the draft cache holds draft positions 0..n-2 once the
pending pairs are processed. First-level nodes are candidates for x_n; round r's frontier sits at draft
position n-1+r.

This module builds scored candidates only; reranking and tree shape are in `tree.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.draft_head import DraftHead, DraftKVCache, DraftProjection
from engine.eagle3_head import Eagle3Head
from engine.tree import DraftTree, ScoredCandidates, additive_mask, select_tree
from engine.types import DraftConfidence, TreeParams


@dataclass
class PendingDraftInput:
    """Pairs the draft head has not read yet: features [1, m, H] of accepted positions and the tokens
    [1, m] that follow each of them (the last one is the tree's root token)."""

    features: torch.Tensor
    token_ids: torch.Tensor


@dataclass(frozen=True)
class DraftResult:
    tree: DraftTree
    confidence: DraftConfidence


def draft_projection(head: DraftHead | Eagle3Head, lm_head: nn.Module) -> DraftProjection:
    """The head's projection (`projection(lm_head)`), built once and kept on the head; built again when the
    lm_head, the head's weights or its vocabulary are replaced."""
    key = (id(lm_head), lm_head.weight.data_ptr(), lm_head.weight.dtype, head.vocabulary_key)
    cached = getattr(head, "_draft_projection", None)
    if cached is None or cached[0] != key:
        cached = (key, head.projection(lm_head))
        head._draft_projection = cached
    return cached[1]


class Drafter:
    """Runs the draft head with its own KV cache and the target's lm_head (or its draft-vocabulary rows)."""

    def __init__(self, head: DraftHead | Eagle3Head, lm_head: nn.Module) -> None:
        self.head = head
        self.projection = draft_projection(head, lm_head)
        self.cache = DraftKVCache()
        self.dtype = head.fc.weight.dtype

    def reset(self) -> None:
        self.cache = DraftKVCache()

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection.log_probs(hidden)

    def read_pending(self, pending: PendingDraftInput) -> torch.Tensor:
        """Feed the pending pairs; return the draft's predicted feature after the last one [1, 1, H]."""
        start = self.cache.length
        num_new = pending.token_ids.shape[1]
        position_ids = torch.arange(start, start + num_new, device=pending.token_ids.device)[None]
        mask = None
        if start > 0 and num_new > 1:
            causal = torch.ones(num_new, num_new, dtype=torch.bool, device=pending.token_ids.device).tril()
            mask = additive_mask(causal, start, self.dtype).to(pending.token_ids.device)
        hidden = self.head(pending.token_ids, pending.features, position_ids, mask, self.cache)
        return hidden[:, -1:]

    @torch.inference_mode()
    def draft(self, pending: PendingDraftInput, params: TreeParams) -> DraftResult:
        """Read the pending pairs, then grow a dynamic tree of shape `params` rooted at the last pending token."""
        device = pending.token_ids.device
        root_token_id = int(pending.token_ids[0, -1])
        last_hidden = self.read_pending(pending)  # [1, 1, H]
        prefix_length = self.cache.length
        top_k = params.top_k

        root_log_probs = self._log_probs(last_hidden[0, 0])  # [V'] (V' = V without a draft vocabulary)
        first = torch.topk(root_log_probs, top_k)
        first_ids = self.projection.to_target_ids(first.indices)  # [k] target ids
        token_chunks, score_chunks, parent_chunks = (
            [first_ids],
            [first.values],
            [torch.full((top_k,), -1, device=device)],
        )

        frontier_ids = torch.arange(top_k, device=device)  # candidate index of each frontier node
        frontier_scores = first.values  # [k]
        frontier_tokens = first_ids  # [k]
        frontier_features = last_hidden[0].expand(top_k, -1)  # [k, H], the parent's predicted feature
        identity = torch.eye(top_k, dtype=torch.bool, device=device)
        frontier_ancestry = identity  # [k, tree entries in the draft cache so far]
        num_candidates = top_k

        for round_index in range(params.depth):
            positions = torch.full((1, top_k), prefix_length + round_index, device=device)
            mask = additive_mask(frontier_ancestry, prefix_length, self.dtype)
            hidden = self.head(frontier_tokens[None], frontier_features[None], positions, mask, self.cache)
            log_probs = self._log_probs(hidden[0])  # [k, V']
            children = torch.topk(log_probs, top_k, dim=-1)  # [k, k] per frontier node
            children_ids = self.projection.to_target_ids(children.indices).view(-1)  # [k*k] target ids
            cumulative = (frontier_scores[:, None] + children.values).view(-1)  # [k*k]
            token_chunks.append(children_ids)
            score_chunks.append(cumulative)
            parent_chunks.append(frontier_ids.repeat_interleave(top_k))

            best = torch.topk(cumulative, top_k)
            parent_slot = best.indices // top_k  # which frontier node each new frontier node descends from
            frontier_ids = num_candidates + best.indices
            frontier_scores = best.values
            frontier_tokens = children_ids[best.indices]
            frontier_features = hidden[0, parent_slot]
            frontier_ancestry = torch.cat((frontier_ancestry[parent_slot], identity), dim=1)
            num_candidates += top_k * top_k

        self.cache.crop(prefix_length)  # tree entries are scratch; accepted tokens are re-read as pending
        # The M = top_k + depth * top_k**2 candidates go to the host, where the tree is selected and described.
        candidates = ScoredCandidates(
            token_ids=torch.cat(token_chunks).cpu(),
            scores=torch.cat(score_chunks).cpu(),
            parents=torch.cat(parent_chunks).cpu(),
        )
        tree = select_tree(root_token_id, candidates, params.total_tokens)
        return DraftResult(tree=tree, confidence=_confidence(root_log_probs, tree))


def _confidence(root_log_probs: torch.Tensor, tree: DraftTree) -> DraftConfidence:
    """root_log_probs [V'] on the draft's device: reduced there, so only two scalars cross to the host."""
    probs = root_log_probs.exp()
    top1_prob, entropy = torch.stack((probs.max(), -(probs * root_log_probs.clamp(min=-1e9)).sum())).tolist()
    return tree_confidence(top1_prob, entropy, tree)


def tree_confidence(root_top1_prob: float, root_entropy: float, tree: DraftTree) -> DraftConfidence:
    """The confidence record of a drafted tree, given its root distribution's top-1 probability and entropy."""
    drafted = tree.scores[1:]
    deepest = tree.depths[1:] == tree.depths.max()
    return DraftConfidence(
        root_top1_prob=root_top1_prob,
        root_entropy=root_entropy,
        best_path_logprob=float(drafted[deepest].max()) if drafted.numel() else 0.0,
        mean_node_logprob=float(drafted.mean()) if drafted.numel() else 0.0,
    )
