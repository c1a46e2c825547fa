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


def _seconds(call, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def measure_batch_latency(
    target: TargetModel,
    head: DraftHead,
    rows: Sequence[int] = (1, 2, 4, 8, 16),
    widths: Sequence[int] = (1, 3, 5, 9),
    top_ks: Sequence[int] = (1, 2),
    context: int = 128,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Median seconds of one verify forward per (rows, width), of drafting's fixed part per rows (reading one
    pair per row, the root's top-k, the host's tree selection) and of one draft round per (rows, top_k).

    Returns {"context": C, "verify": [[rows, width, s], ...], "draft_base": [[rows, top_k, s], ...],
    "draft_round": [[rows, top_k, s], ...]}: JSON-ready."""
    target = target.for_head(head)
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

            run()  # warm-up
            verify.append([num_rows, width, _seconds(run, repeats, device)])
        draft = BatchDraftCache.empty(head, device, num_rows)
        features = prefill.features
        drafter.read(
            draft, [PendingDraftInput(features[b : b + 1, :-1], ids[b : b + 1, 1:]) for b in range(num_rows)]
        )
        pending = [PendingDraftInput(features[b : b + 1, -1:], ids[b : b + 1, -1:]) for b in range(num_rows)]
        for top_k in top_ks:
            timed = {}
            for depth in (0, 2):
                params = TreeParams(top_k, depth, top_k)

                def run(params=params, draft=draft, pending=pending) -> None:
                    drafter.draft(draft, pending, params)
                    draft.slots.crop(context - 1)

                run()
                timed[depth] = _seconds(run, repeats, device)
            draft_base.append([num_rows, top_k, timed[0]])
            draft_round.append([num_rows, top_k, max(timed[2] - timed[0], 0.0) / 2])
    return {"context": context, "verify": verify, "draft_base": draft_base, "draft_round": draft_round}
