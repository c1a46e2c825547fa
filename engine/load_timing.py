"""Measure what a batch step costs on this machine: verification of [rows, width] tokens, and drafting for rows.

`measure_batch_latency` times the engine's own calls (the target's tree forward over a cache of `context`
positions per row; the batched drafter) at a few row counts, widths and top_k values, and returns plain numbers
that the load planner (`policy.load_planner.LoadLatencyTable`) interpolates between and caches per machine. It
takes seconds on a CPU with a 135M model and milliseconds with the tiny test models.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from engine.batch_draft import BatchDraftCache, BatchDrafter
from engine.draft import PendingDraftInput
from engine.draft_head import DraftHead
from engine.slots import SlotCache
from engine.target import TargetModel
from engine.types import TreeParams


def _timed_passes(calls: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each call, over `repeats` passes that each run every call once (after one warm-up
    pass): a slow spell on a shared machine then slows every shape alike instead of one, so the shapes keep
    their true ratios, which is what the planner compares."""
    times: dict = {key: [] for key in calls}
    for repeat in range(repeats + 1):
        for key, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:  # pass 0 warms up
                times[key].append(time.perf_counter() - started)
    return {key: statistics.median(seconds) for key, seconds in times.items()}


def nondecreasing(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): verifying more tokens
    per row never costs less, so a measured dip is noise, averaged with its neighbour."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


@torch.inference_mode()
def measure_batch_latency(
    target: TargetModel,
    head: DraftHead,
    rows: Sequence[int] = (1, 2, 4, 8, 16),
    widths: Sequence[int] = (1, 2, 3, 5, 9),
    top_ks: Sequence[int] = (1, 2),
    context: int = 128,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    """Median seconds of one verify forward per (rows, width), of drafting's fixed part per rows (reading one
    pair per row, the root's top-k, the host's tree selection) and of one draft round per (rows, top_k).
    Per row count, every shape is timed once per pass (`_timed_passes`), and verify costs are made
    non-decreasing in width.

    Returns {"context": C, "verify": [[rows, width, s], ...], "draft_base": [[rows, top_k, s], ...],
    "draft_round": [[rows, top_k, s], ...]}: JSON-ready."""
    target, widths = target.for_head(head), sorted(widths)
    device = target.device
    generator = torch.Generator().manual_seed(seed)
    vocab = target.lm_head.out_features
    drafter = BatchDrafter(head, target.lm_head)
    verify, draft_base, draft_round = [], [], []
    for num_rows in rows:
        ids = torch.randint(0, vocab, (num_rows, context), generator=generator).to(device)
        cache = target.new_cache()
        prefill = target.prefill(ids, cache)
        slots = SlotCache(cache.layers, torch.ones(num_rows, context, dtype=torch.bool, device=device))
        calls = {}
        for width in widths:
            tokens = ids[:, :width]
            offsets = torch.arange(width, device=device).expand(num_rows, -1)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            prefix = slots.prefix_mask(target.dtype).expand(-1, -1, width, -1)
            new = torch.zeros(width, width, dtype=target.dtype, device=device)
            new.masked_fill_(~causal, torch.finfo(target.dtype).min)
            mask = torch.cat((prefix, new.expand(num_rows, 1, -1, -1)), dim=-1)

            def run(tokens=tokens, offsets=offsets, mask=mask, slots=slots, cache=cache) -> None:
                target.forward_tree(tokens, slots.positions(offsets), mask, cache)
                slots.crop(context)

            calls[("verify", width)] = run
        draft = BatchDraftCache.empty(head, device, num_rows)
        features = prefill.features
        drafter.read(
            draft, [PendingDraftInput(features[b : b + 1, :-1], ids[b : b + 1, 1:]) for b in range(num_rows)]
        )
        pending = [PendingDraftInput(features[b : b + 1, -1:], ids[b : b + 1, -1:]) for b in range(num_rows)]
        for top_k in top_ks:
            for depth in (0, 2):
                params = TreeParams(top_k, depth, top_k)

                def run(params=params, draft=draft, pending=pending) -> None:
                    drafter.draft(draft, pending, params)
                    draft.slots.crop(context - 1)

                calls[("draft", top_k, depth)] = run
        timed = _timed_passes(calls, repeats, device)
        for width, seconds in zip(widths, nondecreasing([timed[("verify", w)] for w in widths]), strict=True):
            verify.append([num_rows, width, seconds])
        for top_k in top_ks:
            base, deeper = timed[("draft", top_k, 0)], timed[("draft", top_k, 2)]
            draft_base.append([num_rows, top_k, base])
            draft_round.append([num_rows, top_k, max(deeper - base, 0.0) / 2])
    return {"context": context, "verify": verify, "draft_base": draft_base, "draft_round": draft_round}
