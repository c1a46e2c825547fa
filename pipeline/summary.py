"""One job summary from every generation actor's cumulative stats, and its printed form.

The summary adds up what the actors counted and measured, and nothing else: rows, tokens, steps, tau, generation
time, the optimizer's cache levels and decisions (via `OptimizationStats.merge`), and the prompt-level decision
caches (local, shared, cross-actor). The pipeline adds the rows it read and wrote and the job's wall time.
"""

from __future__ import annotations

from policy.stats import OptimizationStats, format_stats

TOTAL_KEYS = (
    "rows_ok",
    "rows_error",
    "input_tokens",
    "generated_tokens",
    "steps",
    "emitted_in_steps",
    "generation_seconds",
    "batch_seconds",
    "num_batches",
    "decision_seconds",
    "stats_report_failures",
)


def aggregate_actor_stats(per_actor: dict[str, dict]) -> dict:
    """Sum the actors' stats (from `GenerationActor.stats()`, keyed by reporter: one per actor process, so an
    actor that Ray restarted appears once per incarnation, each with its own totals) into one dict."""
    totals = {key: sum(stats.get(key, 0) for stats in per_actor.values()) for key in TOTAL_KEYS}
    num_actors = len({stats.get("actor_id", reporter) for reporter, stats in per_actor.items()})
    summary: dict = {"num_actors": num_actors, "actor_restarts": len(per_actor) - num_actors, **totals}
    summary["mean_accepted_tokens"] = (
        totals["emitted_in_steps"] / totals["steps"] if totals["steps"] else None
    )
    generation = totals["generation_seconds"]
    summary["tokens_per_generation_second"] = totals["generated_tokens"] / generation if generation else None
    summary["decision_overhead_fraction"] = totals["decision_seconds"] / generation if generation else None
    starts = [s["first_batch_started_at"] for s in per_actor.values() if s.get("first_batch_started_at")]
    ends = [s["last_batch_finished_at"] for s in per_actor.values() if s.get("last_batch_finished_at")]
    summary["first_batch_started_at"] = min(starts) if starts else None
    summary["last_batch_finished_at"] = max(ends) if ends else None
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    # Throughput once the actors are up: from the first batch starting to the last one finishing.
    summary["tokens_per_batch_span_second"] = totals["generated_tokens"] / span if span > 0 else None
    summary["actor_init_seconds"] = max(
        (s.get("init_seconds") or 0.0 for s in per_actor.values()), default=0.0
    )
    summary["per_actor"] = {
        reporter: {
            "actor_id": stats.get("actor_id"),
            "pid": stats.get("pid"),
            "rows": stats["rows_ok"] + stats["rows_error"],
            "generated_tokens": stats["generated_tokens"],
            "generation_seconds": round(stats["generation_seconds"], 3),
            "num_threads": stats.get("num_threads"),
            "device": stats.get("device"),
            "node_id": stats.get("node_id"),
        }
        for reporter, stats in sorted(per_actor.items())
    }
    optimizers = [stats["optimizer"] for stats in per_actor.values() if "optimizer" in stats]
    if optimizers:
        merged = OptimizationStats()
        for fields in optimizers:
            merged.merge(OptimizationStats(**fields))
        summary["optimizer"] = merged.to_dict()
        summary["optimizer_text"] = format_stats(merged)
    decisions = [stats["decisions"] for stats in per_actor.values() if "decisions" in stats]
    if decisions:
        combined = {key: sum(d[key] for d in decisions) for key in decisions[0]}
        lookups = combined["lookups"]
        combined["local_hit_rate"] = combined["local_hits"] / lookups if lookups else 0.0
        shared_lookups = combined["shared_lookups"]
        combined["shared_hit_rate"] = combined["shared_hits"] / shared_lookups if shared_lookups else 0.0
        combined["cross_actor_hit_rate"] = combined["cross_actor_hits"] / lookups if lookups else 0.0
        summary["prompt_decisions"] = combined
    return summary


def format_summary(summary: dict) -> str:
    """The printed block at the end of a job."""
    rows_in, rows_out = summary["rows_in"], summary["rows_out"]
    resumed = summary.get("rows_resumed", 0)
    duplicates, missing = summary.get("duplicate_rows_out", 0), summary.get("missing_rows", 0)
    lines = [
        "eagleray job summary (measured)",
        f"  rows: {rows_in} in, {rows_out} out"
        + (f" ({resumed} written by an earlier run, resumed)" if resumed else "")
        + f", {summary['rows_error_in_output'] if 'rows_error_in_output' in summary else summary['rows_error']}"
        " with errors"
        + ("" if rows_in == rows_out and not duplicates and not missing else "  ** ROW COUNT MISMATCH **"),
        f"  ids: {summary.get('unique_ids_out', rows_out)} unique out, {duplicates} duplicate rows, {missing} missing",
        f"  actors {summary['num_actors']} ({summary['actor_restarts']} restarts), wall {summary['wall_seconds']:.1f} s, "
        f"generated tokens {summary['generated_tokens']}, {summary['tokens_per_wall_second']:.1f} tokens/s of wall time",
    ]
    if summary.get("startup_seconds") is not None and summary.get("tokens_per_batch_span_second"):
        lines.append(
            f"  startup {summary['startup_seconds']:.1f} s until the first batch (actor init "
            f"{summary['actor_init_seconds']:.1f} s); after it {summary['tokens_per_batch_span_second']:.1f} tokens/s"
        )
    if summary["steps"]:
        lines.append(
            f"  engine: {summary['steps']} steps, tau {summary['mean_accepted_tokens']:.2f}, "
            f"{summary['tokens_per_generation_second']:.1f} tokens/s of generation time, deciding "
            f"{summary['decision_overhead_fraction']:.2%} of it"
        )
    decisions = summary.get("prompt_decisions")
    if decisions:
        lines.append(
            f"  prompt decisions: {decisions['lookups']} look-ups; local hits {decisions['local_hits']}; shared "
            f"hits {decisions['shared_hits']} of {decisions['shared_lookups']} ({decisions['shared_hit_rate']:.1%}), "
            f"{decisions['cross_actor_hits']} from another actor; {decisions['steps_served']} steps in "
            f"{decisions['generations_served']} generations decided by a cached tree (no policy call)"
        )
        if decisions["shared_lookups"] or decisions["link_failures"]:
            lines.append(
                f"  shared look-ups: {decisions['link_lookups']} over the cache actor's look-up link, "
                f"{decisions['shared_lookups'] - decisions['link_lookups']} by Ray call; "
                f"{decisions['link_failures']} link failures"
            )
        if decisions["shared_unreachable"] or decisions["local_only_lookups"]:
            lines.append(
                f"  shared cache unreachable {decisions['shared_unreachable']} times; "
                f"{decisions['local_only_lookups']} look-ups went local-only"
            )
    cache = summary.get("shared_cache")
    if cache and summary.get("config", {}).get("shared_cache"):
        lines.append(
            f"  shared cache actor: {cache['entries']} entries (~{cache['memory_estimate_bytes'] / 2**20:.1f} MiB), "
            f"{cache['hits']} hits of {cache['lookups']} look-ups, {cache['evictions']} evicted, "
            f"{cache['restored_entries']} restored from a snapshot"
        )
    if cache and cache.get("is_restarted"):
        lines.append(
            f"  shared cache actor was restarted after a crash (pid now {cache['pid']}); it restored "
            f"{cache['restored_entries']} entries from its last snapshot"
        )
    if "optimizer_text" in summary:
        lines.extend("  " + line for line in summary["optimizer_text"].splitlines())
    if summary["stats_report_failures"]:
        lines.append(
            f"  stats reports that failed (later reports carried the totals): {summary['stats_report_failures']}"
        )
    return "\n".join(lines)
