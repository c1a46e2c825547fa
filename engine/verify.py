"""Verification: which drafted tokens the target accepts, and the target's own bonus token.

Greedy: the longest root-to-leaf path whose tokens equal the target's argmax at their parents.
Sampling: multi-candidate recursive rejection. At a node, try its children (the draft chose them
deterministically, by top-k): accept child x with probability p(x); on rejection set p(x) = 0 and renormalise;
if every child is rejected, or the node is a leaf, draw the bonus token from what is left of p. Each emitted
token is therefore an exact sample from the target distribution p (see tests/test_sampling_distribution.py).

Both run where the logits are (the model's device): the [N+1, V] logits never leave it, only O(tree) ids do.
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
    """logits [N+1, V] of the tree nodes, on any device -> the longest path the target's argmax agrees with.

    The argmax over the vocabulary runs where the logits are; only its N+1 ids move to the tree's device (the
    host), where the path matching is O(tree)."""
    return verify_choices(tree, logits.argmax(-1).to(tree.paths.device))


def verify_choices(tree: DraftTree, predicted: torch.Tensor) -> VerifyResult:
    """The longest root-to-leaf path whose every token is the target's choice at its parent.

    predicted [N+1] (host): the token the target emits after each node, decided without looking at the tree:
    its argmax (greedy) or its keyed sample (`keyed_choices`)."""
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


# Keyed sampling. The token at sequence index t is argmax(log p_t + g_t), where g_t is Gumbel noise drawn from a
# generator seeded by (seed, t) alone: an exact sample of p_t (the Gumbel-max trick), fixed by the seed and the
# position, whatever tree, batch or step produced the logits. Verification then needs no rejection step: a
# drafted child is accepted when it equals its parent's keyed sample, exactly as in greedy, and a speculative
# row emits the very tokens plain decoding with the same seed emits. The batched engine samples this way, so a
# row's text depends on its seed, never on its batch neighbours or on the trees the policy chose.
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


def keyed_noise(seed: int, position: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The Gumbel noise [V] for sequence index `position` of a generation seeded with `seed`."""
    key = (seed * _SEED_MIX[0] + (position + 1) * _SEED_MIX[1]) % (2**63 - 1)
    generator = torch.Generator(device=device).manual_seed(key)
    uniform = torch.rand(vocab_size, generator=generator, device=device, dtype=torch.float64)
    return (-torch.log(-torch.log(uniform.clamp(min=1e-300)))).float()


def keyed_choices(
    logits: torch.Tensor, sampling: SamplingParams, seed: int, positions: list[int]
) -> torch.Tensor:
    """The target's token after each of Q nodes: logits [Q, V], positions[i] the sequence index node i's token
    goes to. Greedy: the argmax. Else the keyed sample. Returns [Q] on the logits' device."""
    if sampling.is_greedy:
        return logits.argmax(-1)
    noise = {p: keyed_noise(seed, p, logits.shape[-1], logits.device) for p in sorted(set(positions))}
    scores = target_probabilities(logits, sampling).log() + torch.stack([noise[p] for p in positions])
    return scores.argmax(-1)


def verify_sampling(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> VerifyResult:
    """Recursive rejection over the tree's children, node by node; see the module docstring.

    Runs where `logits` [N+1, V] are; `generator`, if given, must be on the same device. At a node with target
    distribution p and children x_1..x_m (in draft order), trying the children one at a time and renormalising
    after each rejection accepts x_i with probability p(x_i) / r_i, where r_i is the mass left once x_1..x_{i-1}
    are zeroed: the tokens that are no child plus p(x_i) + ... + p(x_m). All m tests are drawn at once and the
    first success wins, which is the same distribution. Per visited node one index crosses to the host, and at
    the end the bonus token.

    Example: p = [0.5, 0.3, 0.2], children x = (0, 1): r = (1.0, 0.5), child 0 is accepted with 0.5, else
    child 1 with 0.3 / 0.5 = 0.6, else the bonus is token 2 (the residual [0, 0, 0.2], renormalised).
    """
    device = logits.device
    node_tokens = tree.token_ids[0].tolist()
    nodes = [0]
    while True:
        node = nodes[-1]
        probs = target_probabilities(logits[node], sampling)  # [V]
        residual = probs  # what the bonus draws from: p without the children that were rejected
        children = tree.children[node]
        if children:
            child_tokens = torch.tensor([node_tokens[child] for child in children], device=device)  # [m]
            child_probs = probs[child_tokens]  # [m]
            residual = probs.index_fill(0, child_tokens, 0.0)
            mass_left = residual.sum() + child_probs.flip(0).cumsum(0).flip(0)  # [m] r_i, never below p(x_i)
            draws = torch.rand(len(children), generator=generator, device=device)
            is_accepted = (mass_left > 0) & (draws * mass_left < child_probs)
            num_rejected = int((is_accepted.cumsum(0) == 0).sum())  # children before the first accepted
            if num_rejected < len(children):
                nodes.append(children[num_rejected])
                continue
        bonus = _draw_bonus(residual, logits[node], generator)
        return VerifyResult(nodes, [node_tokens[n] for n in nodes[1:]], bonus)


def _draw_bonus(residual: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """A draw from `residual` [V] (multinomial renormalises); the argmax of `logits` [V] when nothing is left."""
    argmax = torch.zeros_like(residual).scatter_(0, logits.argmax().view(1), 1.0)
    weights = torch.where(residual.sum() > 0, residual, argmax)
    return int(torch.multinomial(weights, 1, generator=generator))
