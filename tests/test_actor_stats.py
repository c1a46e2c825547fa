"""Typed actor statistics, the stats collector (as a plain class, then as a Ray actor whose process is killed)
and the job summary that adds the reports up."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import ray

from actors.decisions import DecisionCounters
from actors.stats import ActorStats, GenerationTotals
from actors.stats_collector import StatsCollector, create_stats_collector, find_stats_collectors
from pipeline.summary import aggregate_actor_stats
from policy.stats import OptimizationStats

pytestmark = pytest.mark.starts_ray


def actor_stats(actor_id: str, pid: int, rows_ok: int, **extra) -> ActorStats:
    totals = GenerationTotals(
        rows_ok=rows_ok,
        rows_error=1,
        generated_tokens=10 * rows_ok,
        steps=4 * rows_ok,
        emitted_in_steps=8 * rows_ok,
        generation_seconds=1.0,
        decision_seconds=0.25,
    )
    values = {
        "actor_id": actor_id,
        "pid": pid,
        "device": "cpu",
        "node_id": "node-1",
        "num_threads": 1,
        "policy": "learned",
        "init_seconds": 2.0,
        "first_batch_started_at": 100.0 + pid,
        "last_batch_finished_at": 110.0 + pid,
        "totals": totals,
        **extra,
    }
    return ActorStats(**values)


def test_stats_round_trip_through_json_with_their_typed_parts():
    optimizer = OptimizationStats(num_steps=7, fallback_reasons={"bad tree": 2})
    optimizer.cache_lookups["state"] = 5
    stats = actor_stats("a", 1, 3, optimizer=optimizer, decisions=DecisionCounters(lookups=4, local_hits=1))
    again = ActorStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    assert isinstance(again.totals, GenerationTotals) and isinstance(again.optimizer, OptimizationStats)
    assert again.decisions.local_hits == 1 and again.optimizer.cache_lookups["state"] == 5
    bare = actor_stats("b", 2, 1)
    assert ActorStats.from_dict(bare.to_dict()) == bare and bare.optimizer is None


def test_summary_adds_up_every_incarnation_and_counts_restarts():
    decisions = [
        DecisionCounters(lookups=4, local_hits=1, shared_lookups=3, shared_hits=2),
        DecisionCounters(),
    ]
    per_actor = {
        "a/1": actor_stats("a", 1, 3, optimizer=OptimizationStats(num_steps=5), decisions=decisions[0]),
        "a/2": actor_stats("a", 2, 2, optimizer=OptimizationStats(num_steps=6), decisions=decisions[1]),
        "b/3": actor_stats("b", 3, 5),
    }
    summary = aggregate_actor_stats(per_actor)
    assert (summary["num_actors"], summary["actor_restarts"]) == (2, 1)
    assert (summary["rows_ok"], summary["rows_error"], summary["generated_tokens"]) == (10, 3, 100)
    assert summary["mean_accepted_tokens"] == 2.0
    assert summary["decision_overhead_fraction"] == pytest.approx(0.25)
    assert (summary["first_batch_started_at"], summary["last_batch_finished_at"]) == (101.0, 113.0)
    assert summary["per_actor"]["a/2"]["rows"] == 3 and summary["per_actor"]["b/3"]["pid"] == 3
    assert summary["optimizer"]["steps"] == 11
    assert (
        summary["prompt_decisions"]["lookups"] == 4
        and summary["prompt_decisions"]["shared_hit_rate"] == 2 / 3
    )
    assert "prompt_decisions" not in aggregate_actor_stats({"b/3": per_actor["b/3"]})


def test_the_collector_keeps_the_latest_report_per_reporter_and_saves_each(tmp_path):
    path = str(tmp_path / "out" / "_actor_stats.json")
    collector = StatsCollector("job-1", path)
    collector.report("actor-a", {"steps": 10})
    collector.report("actor-b", {"steps": 4})
    collector.report("actor-a", {"steps": 25})
    assert collector.reports() == {"actor-a": {"steps": 25}, "actor-b": {"steps": 4}}  # replaced, not added
    assert StatsCollector("job-1", path).reports() == collector.reports()  # a restarted collector reads them
    assert StatsCollector("job-2", path).reports() == {}  # another run of the job starts afresh
    assert StatsCollector("job-1").reports() == {}  # without a path nothing is kept
    with pytest.raises(ValueError, match="reporter must be a non-empty str"):
        collector.report("", {})
    with pytest.raises(ValueError, match="job_id must be a non-empty str"):
        StatsCollector("")


def test_a_killed_collector_comes_back_with_its_reports(local_ray, tmp_path):
    namespace = f"stats-{uuid.uuid4().hex[:8]}"
    collector = create_stats_collector("job-1", namespace, str(tmp_path / "_actor_stats.json"))
    ray.get(collector.report.remote("actor-a", {"steps": 3, "pid": os.getpid()}))
    assert len(find_stats_collectors(namespace)) == 1 and find_stats_collectors("elsewhere") == []
    pid = ray.get(collector.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            reports = ray.get(collector.reports.remote(), timeout=10)
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline, "the collector did not come back"
            time.sleep(0.2)
    assert reports == {"actor-a": {"steps": 3, "pid": os.getpid()}}
    ray.kill(collector, no_restart=True)


def test_summary_adds_up_the_trees_chosen_for_the_load():
    per_actor = {
        "a/1": actor_stats("a", 1, 3, batch_trees={"plain": 5, "3/2/1": 2}),
        "b/2": actor_stats("b", 2, 2, batch_trees={"3/2/1": 4}),
        "c/3": actor_stats("c", 3, 1),  # rows decoded one at a time: no batch steps
    }
    summary = aggregate_actor_stats(per_actor)
    assert summary["batch_trees"] == {"3/2/1": 6, "plain": 5}
    assert list(summary["batch_trees"]) == ["3/2/1", "plain"]  # most chosen first
    again = ActorStats.from_dict(json.loads(json.dumps(per_actor["a/1"].to_dict())))
    assert again.batch_trees == {"plain": 5, "3/2/1": 2}
