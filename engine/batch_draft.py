"""Drafting for many rows at once: the draft head reads every row's pending pairs in one call, then grows the
rows' EAGLE-2 trees together, one [B, top_k] call per round.

The arithmetic is `engine.draft.Drafter`'s, with a batch dimension: every row gets the tree the single-row
drafter would build for it (up to float rounding), and one tree shape (TreeParams) serves the whole step. The
draft cache is a `SlotCache`: a row's pending block shorter than the longest row's leaves holes, which its
later queries never see. Trees are selected on the host, one per row (`engine.tree.select_tree`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.draft import DraftProjection, DraftResult, PendingDraftInput, draft_projection, tree_confidence
from engine.draft_head import DraftHead, DraftKVCache
from engine.eagle3_head import Eagle3Head
from engine.slots import SlotCache
from engine.tree import ScoredCandidates, select_tree
from engine.types import TreeParams


@dataclass
class BatchDraftCache:
    """The draft head's KV cache for the batch's rows, with the validity of its slots."""

    cache: DraftKVCache
    slots: SlotCache

    @classmethod
    def empty(cls, head: DraftHead | Eagle3Head, device: torch.device, num_rows: int = 1) -> BatchDraftCache:
        """A cache of `num_rows` rows and no positions, shaped for `head`."""
        attention = head.attention
        shape = (num_rows, attention.num_kv_heads, 0, attention.head_dim)
        cache = DraftKVCache()
        cache.keys = torch.zeros(shape, dtype=head.fc.weight.dtype, device=device)
        cache.values = torch.zeros(shape, dtype=head.fc.weight.dtype, device=device)
        return cls(cache, SlotCache([cache], torch.zeros(num_rows, 0, dtype=torch.bool, device=device)))


class BatchDrafter:
    """Runs one draft head over a batch: `read` pending pairs, `draft` trees for every row."""

    def __init__(self, head: DraftHead | Eagle3Head, lm_head: torch.nn.Module) -> None:
        self.head = head
        self.projection: DraftProjection = draft_projection(head, lm_head)
        self.dtype = head.fc.weight.dtype

    def read(self, cache: BatchDraftCache, pending: list[PendingDraftInput]) -> torch.Tensor:
        """Feed every row's pending pairs (row b: m_b of them) in one call; returns the predicted feature
        after each row's last pair [B, H]."""
        device = cache.slots.valid.device
        lengths = [p.token_ids.shape[1] for p in pending]
        width = max(lengths)
        tokens = torch.zeros(len(pending), width, dtype=torch.long, device=device)
        features = torch.zeros(
            len(pending), width, pending[0].features.shape[-1], dtype=self.dtype, device=device
        )
        for row, item in enumerate(pending):
            tokens[row, : lengths[row]] = item.token_ids[0]
            features[row, : lengths[row]] = item.features[0].to(self.dtype)
        offsets = torch.arange(width, device=device)
        valid_new = offsets[None] < torch.tensor(lengths, device=device)[:, None]  # [B, M]
        positions = cache.slots.positions(offsets[None])
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = _mask(cache.slots, causal[None].expand(len(pending), -1, -1), self.dtype)
        hidden = self.head(tokens, features, positions, mask, cache.cache)  # [B, M, H]
        cache.slots.extend(valid_new)
        last = torch.tensor(lengths, device=device) - 1
        return hidden[torch.arange(len(pending), device=device), last]

    @torch.inference_mode()
    def draft(
        self, cache: BatchDraftCache, pending: list[PendingDraftInput], params: TreeParams
    ) -> list[DraftResult]:
        """Read the pending pairs, then grow one tree of shape `params` per row, rooted at its last pending
        token. The tree nodes are scratch: the cache holds only the pending pairs afterwards."""
        device = cache.slots.valid.device
        num_rows, top_k = len(pending), params.top_k
        root_ids = [int(p.token_ids[0, -1]) for p in pending]
        last_hidden = self.read(cache, pending)  # [B, H]
        base = cache.slots.length
        root_log_probs = self.projection.log_probs(last_hidden)  # [B, V']
        first = torch.topk(root_log_probs, top_k, dim=-1)
        first_ids = self.projection.to_target_ids(first.indices)  # [B, k]
        token_chunks, score_chunks = [first_ids], [first.values]
        parent_chunks = [torch.full((num_rows, top_k), -1, device=device)]

        frontier_ids = torch.arange(top_k, device=device).expand(num_rows, -1)
        frontier_scores, frontier_tokens = first.values, first_ids
        frontier_features = last_hidden[:, None].expand(-1, top_k, -1)  # [B, k, H]
        identity = torch.eye(top_k, dtype=torch.bool, device=device).expand(num_rows, -1, -1)
        ancestry = identity  # [B, k, tree entries so far]
        num_candidates = top_k
        rows = torch.arange(num_rows, device=device)[:, None]
        for round_index in range(params.depth):
            positions = cache.slots.positions(torch.full((1, top_k), round_index, device=device))
            mask = _mask_with_scratch(cache.slots, base, ancestry, self.dtype)
            hidden = self.head(frontier_tokens, frontier_features, positions, mask, cache.cache)  # [B, k, H]
            children = torch.topk(self.projection.log_probs(hidden), top_k, dim=-1)  # [B, k, k]
            children_ids = self.projection.to_target_ids(children.indices).reshape(num_rows, -1)  # [B, k*k]
            cumulative = (frontier_scores[:, :, None] + children.values).reshape(num_rows, -1)
            token_chunks.append(children_ids)
            score_chunks.append(cumulative)
            parent_chunks.append(frontier_ids.repeat_interleave(top_k, dim=1))
            best = torch.topk(cumulative, top_k, dim=-1)
            parent_slot = best.indices // top_k  # [B, k]
            frontier_ids = num_candidates + best.indices
            frontier_scores = best.values
            frontier_tokens = children_ids.gather(1, best.indices)
            frontier_features = hidden[rows, parent_slot]
            ancestry = torch.cat((ancestry[rows, parent_slot], identity), dim=2)
            num_candidates += top_k * top_k
        cache.cache.crop(base)
        candidates = (
            torch.cat(token_chunks, 1).cpu(),
            torch.cat(score_chunks, 1).cpu(),
            torch.cat(parent_chunks, 1).cpu(),
        )
        trees = [
            select_tree(
                root_ids[row],
                ScoredCandidates(candidates[0][row], candidates[1][row], candidates[2][row]),
                params.total_tokens,
            )
            for row in range(num_rows)
        ]
        probs = root_log_probs.exp()
        entropy = -(probs * root_log_probs.clamp(min=-1e9)).sum(-1)
        roots = torch.stack((probs.max(-1).values, entropy), dim=1).tolist()  # one transfer for all rows
        return [DraftResult(tree, tree_confidence(*roots[row], tree)) for row, tree in enumerate(trees)]


def _mask(slots: SlotCache, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, Q, L + K]: the cached valid slots, then the new block's visibility [B, Q, K]."""
    minimum = torch.finfo(dtype).min
    prefix = slots.prefix_mask(dtype).expand(-1, -1, block.shape[1], -1)
    new = torch.zeros(block.shape, dtype=dtype, device=block.device).masked_fill_(~block, minimum)
    return torch.cat((prefix, new[:, None]), dim=-1)


def _mask_with_scratch(
    slots: SlotCache, base: int, ancestry: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The mask of a tree round: the valid slots of the first `base` (the rows' pairs), then the tree entries
    drafted so far and the new frontier [B, k, entries]."""
    minimum = torch.finfo(dtype).min
    prefix = slots.prefix_mask(dtype)[..., :base].expand(-1, -1, ancestry.shape[1], -1)
    tree = torch.zeros(ancestry.shape, dtype=dtype, device=ancestry.device).masked_fill_(~ancestry, minimum)
    return torch.cat((prefix, tree[:, None]), dim=-1)
