"""One job's statistics collector: the latest cumulative report of every generation actor process.

`StatsCollector` is a plain class; `RemoteStatsCollector` wraps it as a small Ray actor, one per job, named
`stats_collector_name(job_id)` in the job's namespace. It runs whether or not the shared cache does, and it
imports neither the engine nor FAISS: reports are plain JSON-able dicts (`actors.stats.ActorStats.to_dict()`).

With a `path`, every report is saved there (one small JSON file, replaced atomically), and a collector that Ray
restarts after a crash reads it back, so the job summary still counts every report made before the crash. A
file left by another job is ignored: each run of a job has its own id.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ray
from ray.actor import ActorHandle

STATS_COLLECTOR_PREFIX = "job-stats-"


class StatsCollector:
    """reporter (one generation actor process) -> its latest report, for the job `job_id`."""

    def __init__(self, job_id: str, path: str | None = None) -> None:
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty str, got {job_id!r}")
        self.job_id = job_id
        self.path = os.path.abspath(path) if path is not None else None
        self._reports: dict[str, dict[str, Any]] = self._read()

    def report(self, reporter: str, stats: dict[str, Any]) -> None:
        """Keep `stats` (JSON-able) as the latest report of `reporter`, replacing its previous one."""
        if not isinstance(reporter, str) or not reporter:
            raise ValueError(f"reporter must be a non-empty str, got {reporter!r}")
        if not isinstance(stats, dict):
            raise ValueError(f"stats must be a dict, got {type(stats).__name__}")
        self._reports[reporter] = dict(stats)
        if self.path is not None:
            self._write(json.dumps({"job_id": self.job_id, "reports": self._reports}))

    def reports(self) -> dict[str, dict[str, Any]]:
        """{reporter: latest report}, in order of first report."""
        return dict(self._reports)

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not os.path.isfile(self.path):
            return {}
        with open(self.path) as file:
            saved = json.load(file)
        return dict(saved["reports"]) if saved.get("job_id") == self.job_id else {}

    def _write(self, text: str) -> None:
        """Replace the file atomically: a reader (or a restarted collector) sees the old file or the new one."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            file.write(text)
        os.replace(temporary, self.path)


RemoteStatsCollector = ray.remote(StatsCollector)


def stats_collector_name(job_id: str) -> str:
    return f"{STATS_COLLECTOR_PREFIX}{job_id}"


def create_stats_collector(job_id: str, namespace: str, path: str | None = None) -> ActorHandle:
    """The collector of `job_id`, a named actor in `namespace` owned by the caller (it lives as long as the
    caller's job). It asks for no CPU, so that it schedules on a cluster whose CPUs the generation actors hold,
    and restarts without limit (reports are idempotent, so a retried call is harmless)."""
    return RemoteStatsCollector.options(
        name=stats_collector_name(job_id),
        namespace=namespace,
        get_if_exists=True,
        lifetime=None,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(job_id, path)


def find_stats_collectors(namespace: str) -> list[ActorHandle]:
    """The live collectors in `namespace` (for tools that watch a running job from outside it)."""
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == namespace and actor["name"].startswith(STATS_COLLECTOR_PREFIX)
    ]
    handles = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace=namespace))
        except ValueError:
            continue  # it ended between the listing and the look-up
    return handles
