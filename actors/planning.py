"""The load planner an actor (or a bench) uses: its latency table read from the per-machine cache, or measured.

The table depends on the machine and the model (`policy.latency.latency_signature`) and on the row counts it
covers; it is cached as JSON under ~/.cache/eagleray/load_latency/ (override with EAGLERAY_CACHE_DIR), so only
the first start on a machine measures (seconds with a 135M model on a CPU).
"""

from __future__ import annotations

import logging
import os

from engine.draft_head import DraftHead
from engine.load_timing import measure_batch_latency
from engine.packed_linear import PackedLinear
from engine.target import TargetModel
from policy.latency import latency_signature
from policy.load_planner import LoadLatencyTable, LoadPlanner

logger = logging.getLogger(__name__)
CACHE_ENV = "EAGLERAY_CACHE_DIR"


def cache_dir() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "eagleray")
    return os.path.join(root, "load_latency")


def measured_rows(max_rows: int) -> tuple[int, ...]:
    """The row counts the table measures: powers of two up to max_rows, and max_rows itself."""
    powers = {1 << i for i in range(max_rows.bit_length()) if 1 << i <= max_rows}
    return tuple(sorted(powers | {max_rows}))


def load_latency_table(target: TargetModel, head: DraftHead, max_rows: int, log=print) -> LoadLatencyTable:
    """The cached table for this machine, model and row range, or a fresh measurement (then cached)."""
    rows = measured_rows(max_rows)
    signature = {
        **latency_signature(target.config.to_dict(), str(target.device)),
        "draft": head.hidden_size,
        "draft_kind": head.kind,
        "draft_vocab": head.num_proposal_tokens,
        "rows": list(rows),
        "packed_linears": any(isinstance(m, PackedLinear) and m.use_packed for m in target.model.modules()),
        "attention": target.config._attn_implementation,  # packed tree attention changed every verify cost
        "kv_append": "in-place",  # engine.kv_buffer: appends no longer copy the cache
    }
    name = f"{signature['model']}-{signature['device']}-{signature['num_threads']}t-{max_rows}rows.json"
    path = os.path.join(cache_dir(), name)
    table = LoadLatencyTable.load(path, signature)
    if table is not None:
        return table
    log(f"measuring the batch latency table for 1..{max_rows} rows (once per machine; cached in {path})")
    table = LoadLatencyTable.from_measurements(measure_batch_latency(target, head, rows=rows), signature)
    try:
        table.save(path)
    except OSError as error:  # a read-only home: measure again next time
        logger.warning("could not cache the latency table at %s: %s", path, error)
    return table


def build_load_planner(target: TargetModel, head: DraftHead, max_rows: int, log=print) -> LoadPlanner:
    return LoadPlanner(load_latency_table(target, head, max_rows, log))
