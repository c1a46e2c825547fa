"""One job summary from every generation actor's cumulative stats, and its printed form.

The summary adds up what the actors counted and measured (`actors.stats.ActorStats`), and nothing else: rows,
rows by finish reason, tokens, steps, tau, generation time, the optimizer's cache levels and decisions (via `OptimizationStats.merge`),
and the prompt-level decision caches (local, shared, cross-actor). The pipeline adds the rows it read and wrote
and the job's wall time. The summary is plain data: it is printed and written as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from actors.decisions import DecisionCounters
from actors.stats import ActorStats, GenerationTotals
from common.columns import FINISH_REASON_VALUES
from policy.stats import OptimizationStats, format_stats


def aggregate_actor_stats(per_actor: dict[str, ActorStats]) -> dict:
    """Sum the actors' stats (keyed by reporter: one per actor process, so an actor that Ray restarted appears
    once per incarnation, each with its own totals) into one dict."""
    totals = GenerationTotals()
    for stats in per_actor.values():
        totals.merge(stats.totals)
    num_actors = len({stats.actor_id for stats in per_actor.values()})
    summary: dict = {
        "num_actors": num_actors,
        "actor_restarts": len(per_actor) - num_actors,
        **asdict(totals),
    }
    summary["finish_reasons"] = totals.finish_reasons
    summary["mean_accepted_tokens"] = totals.emitted_in_steps / totals.steps if totals.steps else None
    generation = totals.generation_seconds
    summary["tokens_per_generation_second"] = totals.generated_tokens / generation if generation else None
    summary["decision_overhead_fraction"] = totals.decision_seconds / generation if generation else None
    starts = [s.first_batch_started_at for s in per_actor.values() if s.first_batch_started_at]
    ends = [s.last_batch_finished_at for s in per_actor.values() if s.last_batch_finished_at]
    summary["first_batch_started_at"] = min(starts) if starts else None
    summary["last_batch_finished_at"] = max(ends) if ends else None
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    # Throughput once the actors are up: from the first batch starting to the last one finishing.
    summary["tokens_per_batch_span_second"] = totals.generated_tokens / span if span > 0 else None
    summary["actor_init_seconds"] = max((s.init_seconds for s in per_actor.values()), default=0.0)
    summary["per_actor"] = {
        reporter: {
            "actor_id": stats.actor_id,
            "pid": stats.pid,
            "rows": stats.totals.rows,
            "generated_tokens": stats.totals.generated_tokens,
            "generation_seconds": round(stats.totals.generation_seconds, 3),
            "num_threads": stats.num_threads,
            "device": stats.device,
            "node_id": stats.node_id,
            **shared_cache_use(stats.decisions or DecisionCounters()),
        }
        for reporter, stats in sorted(per_actor.items())
    }
    batch_trees: dict[str, int] = {}
    for stats in per_actor.values():
        for tree, count in stats.batch_trees.items():
            batch_trees[tree] = batch_trees.get(tree, 0) + count
    summary["batch_trees"] = dict(sorted(batch_trees.items(), key=lambda item: -item[1]))
    summary["cross_request_drafts"] = retrieved_by_source(totals)
    optimizers = [stats.optimizer for stats in per_actor.values() if stats.optimizer is not None]
    if optimizers:
        merged = OptimizationStats()
        for optimizer in optimizers:
            merged.merge(optimizer)
        summary["optimizer"] = merged.to_dict()
        summary["optimizer_text"] = format_stats(merged)
    decisions = [stats.decisions for stats in per_actor.values() if stats.decisions is not None]
    if decisions:
        summary["prompt_decisions"] = combine_decisions(decisions)
    return summary


def retrieved_by_source(totals: GenerationTotals) -> dict:
    """Retrieved branch tokens verified and accepted, per source and in all, with the acceptance rate."""
    by_source = {
        source: {
            "proposed": getattr(totals, f"retrieved_proposed_{source}"),
            "accepted": getattr(totals, f"retrieved_accepted_{source}"),
        }
        for source in ("prompt", "actor", "cluster")
    }
    proposed = sum(item["proposed"] for item in by_source.values())
    accepted = sum(item["accepted"] for item in by_source.values())
    return {
        "by_source": by_source,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance": accepted / proposed if proposed else None,
        "accepted_share_of_generated": accepted / totals.generated_tokens
        if totals.generated_tokens
        else None,
    }


def format_cross_request_drafts(summary: dict) -> list[str]:
    """The summary's lines on retrieved branches (none when nothing was retrieved or tried)."""
    drafts = summary.get("cross_request_drafts")
    if not drafts or not (
        drafts["proposed"] or summary.get("outputs_published") or summary.get("retrieval_failures")
    ):
        return []
    sources = ", ".join(
        f"{source} {item['accepted']}/{item['proposed']}" for source, item in drafts["by_source"].items()
    )
    share = drafts["accepted_share_of_generated"] or 0.0
    lines = [
        f"  cross-request drafts: {drafts['accepted']} of {drafts['proposed']} retrieved tokens accepted "
        f"({(drafts['acceptance'] or 0.0):.1%}; {share:.1%} of the generated tokens), by source accepted/proposed: "
        f"{sources}",
        f"  retrieval: {summary['outputs_fetched']} outputs fetched, {summary['outputs_published']} published, "
        f"{summary['retrieval_seconds']:.1f} s embedding and fetching; {summary['retrieval_failures']} failed "
        f"calls to the cache actor (those rows drafted local-only)",
    ]
    return lines


def shared_cache_use(decisions: DecisionCounters) -> dict:
    """One actor's use of the cluster-wide decision cache: look-ups it sent there, trees it published, and hits
    on entries another actor published."""
    return {
        "shared_lookups": decisions.shared_lookups,
        "decisions_published": decisions.published,
        "cross_actor_hits": decisions.cross_actor_hits,
    }


def combine_decisions(decisions: list[DecisionCounters]) -> dict:
    """The prompt decisions' counters added up field by field, with their hit rates."""
    combined = {item.name: sum(getattr(d, item.name) for d in decisions) for item in fields(DecisionCounters)}
    lookups = combined["lookups"]
    combined["local_hit_rate"] = combined["local_hits"] / lookups if lookups else 0.0
    shared_lookups = combined["shared_lookups"]
    combined["shared_hit_rate"] = combined["shared_hits"] / shared_lookups if shared_lookups else 0.0
    combined["cross_actor_hit_rate"] = combined["cross_actor_hits"] / lookups if lookups else 0.0
    return combined


def format_finish_reasons(reasons: dict[str, int]) -> str:
    """The summary's line of the rows this run generated, by finish_reason: '  finished (this run's rows): 3 stop,
    2 length, 1 context (...)'."""
    line = "  finished (this run's rows): " + ", ".join(
        f"{reasons.get(reason, 0)} {reason}" for reason in FINISH_REASON_VALUES
    )
    if reasons.get("context"):
        line += " (context: cut off by the model's context before max_new_tokens)"
    return line


def all_rows_failed(summary: dict) -> str | None:
    """The line to print when every row in the output is an error row (the job produced no text); else None."""
    rows_out, errors = summary.get("rows_out", 0), summary.get("rows_error_in_output", 0)
    if rows_out and errors == rows_out:
        return (
            f"all {rows_out} rows in the output failed (see their __inference_error__); nothing was generated"
        )
    return None


def format_summary(summary: dict) -> str:
    """The printed block at the end of a job: `aggregate_actor_stats` plus what `pipeline.build.run_generate`
    adds (rows in and out, ids, wall time, the shared cache actor's stats, the config)."""
    rows_in, rows_out = summary["rows_in"], summary["rows_out"]
    resumed = summary["rows_resumed"]
    duplicates, missing = summary["duplicate_rows_out"], summary["missing_rows"]
    lines = [
        "eagleray job summary (measured)",
        f"  rows: {rows_in} in, {rows_out} out"
        + (f" ({resumed} written by an earlier run, resumed)" if resumed else "")
        + f", {summary['rows_error_in_output']} with errors"
        + ("" if rows_in == rows_out and not duplicates and not missing else "  ** ROW COUNT MISMATCH **"),
        f"  ids: {summary['unique_ids_out']} unique out, {duplicates} duplicate rows, {missing} missing",
        format_finish_reasons(summary.get("finish_reasons", {})),
        f"  actors {summary['num_actors']} ({summary['actor_restarts']} restarts), wall {summary['wall_seconds']:.1f} s, "
        f"generated tokens {summary['generated_tokens']}, {summary['tokens_per_wall_second']:.1f} tokens/s of wall time",
    ]
    if summary["startup_seconds"] is not None and summary["tokens_per_batch_span_second"]:
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
    if summary.get("batch_trees"):
        chosen = ", ".join(f"{tree} {count}" for tree, count in summary["batch_trees"].items())
        failures = summary.get("planner_failures", 0)
        lines.append(
            f"  trees chosen for the load, in batch steps: {chosen}"
            + (f"; {failures} steps decoded plainly after a planner failure" if failures else "")
        )
    lines.extend(format_cross_request_drafts(summary))
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
    cache = summary["shared_cache"]  # None when the job ran without the shared cache actor
    if summary.get("shared_cache_unreachable"):
        lines.append(
            "  shared cache actor: unreachable at the end of the job (it died for good); no stats from it"
        )
    if cache:
        lines.append(
            f"  shared cache actor: {cache['entries']} entries (~{cache['memory_estimate_bytes'] / 2**20:.1f} MiB), "
            f"{cache['hits']} hits of {cache['lookups']} look-ups, {cache['evictions']} evicted, "
            f"{cache['restored_entries']} restored from a snapshot"
            + (
                f"; {cache['outputs']['entries']} outputs for cross-request drafts "
                f"(~{cache['outputs']['memory_bytes'] / 2**20:.1f} MiB, {cache['outputs']['evicted']} evicted)"
                if cache.get("outputs")
                else ""
            )
        )
    if cache and cache["is_restarted"]:
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
