"""Faults injected for real into a running job on a local Ray, with the tiny demo models: a generation actor's
process killed (`os.kill`), the shared cache actor's process killed (for a restart, or for good), the stats
collector killed. Each test checks that every input id comes out exactly once. A killed driver, and the rerun
that resumes, is in test_job_interrupts.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.stats import ActorStats
from actors.stats_collector import find_stats_collectors
from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from demo.build import demo_paths
from pipeline.build import run_generate
from pipeline.resume import list_result_files

pytestmark = pytest.mark.starts_ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 240.0


def write_prompts(tiny_demo: str, path, num_rows: int, with_ids: bool = True) -> list[str]:
    distinct = pq.read_table(demo_paths(tiny_demo)["prompts"]).column("prompt").to_pylist()
    prompts = [f"{distinct[i % len(distinct)]} #{i}" for i in range(num_rows)]
    columns = {"prompt": prompts, "source": [f"s{i}" for i in range(num_rows)]}
    if with_ids:
        columns = {"id": [f"row-{i}" for i in range(num_rows)], **columns}
    pq.write_table(pa.table(columns), path)
    return prompts


def fault_config(tiny_demo: str, input_path, output, **overrides) -> GenerateConfig:
    paths = demo_paths(tiny_demo)
    values = {
        "input": str(input_path),
        "output": str(output),
        "model": paths["target"],
        "draft": paths["draft"],
        "policy": "static",
        "max_new_tokens": 16,
        "batch_size": 2,
        "progress": False,
        "namespace": f"faults-{uuid.uuid4().hex[:8]}",
    }
    return GenerateConfig(**{**values, **overrides})


class JobThread(threading.Thread):
    """run_generate on a thread, so that the test can inject a fault while the job runs."""

    def __init__(self, config: GenerateConfig) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = run_generate(self.config)
        except BaseException as error:  # handed to the test thread
            self.error = error

    def result(self) -> dict:
        self.join(WAIT_S)
        assert not self.is_alive(), "the job did not finish"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def wait_for(condition, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def cache_of(config: GenerateConfig):
    try:
        return ray.get_actor(config.cache_name, namespace=config.namespace)
    except ValueError:
        return None


def reports(config: GenerateConfig) -> dict[str, ActorStats]:
    """The job's generation-actor reports, {reporter: stats}, from the job's stats collector once it runs."""
    collectors = find_stats_collectors(config.namespace)
    if not collectors:
        return {}
    return {
        reporter: ActorStats.from_dict(stats)
        for reporter, stats in ray.get(collectors[0].reports.remote()).items()
    }


def assert_every_id_once(output, expected_ids: list) -> pa.Table:
    table = pq.read_table(str(output))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows in the output"
    assert sorted(ids) == sorted(expected_ids), "rows lost or invented"
    return table


def test_a_killed_generation_actor_loses_no_row(local_ray, tiny_demo, tmp_path):
    write_prompts(tiny_demo, tmp_path / "in.parquet", 24)
    config = fault_config(tiny_demo, tmp_path / "in.parquet", tmp_path / "out")
    job = JobThread(config)
    job.start()
    first = wait_for(
        lambda: next((s for s in reports(config).values() if s.totals.rows_ok > 0), None), "a batch"
    )
    assert cache_of(config) is None  # the shared cache is off: no cache actor, the stats go to the collector
    os.kill(first.pid, signal.SIGKILL)
    summary = job.result()
    table = assert_every_id_once(tmp_path / "out", [f"row-{i}" for i in range(24)])
    assert table.column(ERROR_COLUMN).null_count == 24
    assert summary["actor_restarts"] >= 1 and summary["num_actors"] == 1
    assert {actor["pid"] for actor in summary["per_actor"].values()} - {first.pid}  # a new process
    assert summary["rows_ok"] >= 24  # the batch in flight when it died was generated again


def test_a_killed_cache_actor_restarts_from_its_snapshot(local_ray, tiny_demo, tmp_path):
    write_prompts(tiny_demo, tmp_path / "in.parquet", 24)
    paths = demo_paths(tiny_demo)
    config = fault_config(
        tiny_demo, tmp_path / "in.parquet", tmp_path / "out", policy=paths["policy"], shared_cache=True
    )
    job = JobThread(config)
    job.start()
    cache = wait_for(lambda: cache_of(config), "the cache actor")
    wait_for(lambda: ray.get(cache.stats.remote())["entries"] > 0, "a published decision")
    # Count the entries first: the snapshot taken after holds at least these (more may be published between).
    before = ray.get(cache.stats.remote())
    ray.get(cache.snapshot.remote())
    os.kill(before["pid"], signal.SIGKILL)
    summary = job.result()
    assert_every_id_once(tmp_path / "out", [f"row-{i}" for i in range(24)])
    after = summary["shared_cache"]
    assert after["pid"] != before["pid"] and after["is_restarted"]
    assert after["restored_entries"] >= before["entries"] > 0
    # The job's statistics live in its stats collector, which the crash did not touch.
    assert summary["rows_ok"] >= 24
    decisions = summary["prompt_decisions"]
    assert decisions["lookups"] >= 24


def test_a_cache_actor_killed_for_good_mid_job_loses_no_row(local_ray, tiny_demo, tmp_path):
    """With cross-request drafts on, the cache actor dies for good (no restart) while the job runs: fetches and
    publishes fail, counted, the rows draft from their own prompts and their actor's outputs, and every row comes
    out generated."""
    write_prompts(tiny_demo, tmp_path / "in.parquet", 24)
    config = fault_config(tiny_demo, tmp_path / "in.parquet", tmp_path / "out", cross_request_drafts=True)
    job = JobThread(config)
    job.start()
    cache = wait_for(lambda: cache_of(config), "the cache actor")
    wait_for(lambda: ray.get(cache.stats.remote())["outputs"]["entries"] > 0, "a published output")
    ray.kill(cache, no_restart=True)
    summary = job.result()
    table = assert_every_id_once(tmp_path / "out", [f"row-{i}" for i in range(24)])
    assert table.column(ERROR_COLUMN).null_count == 24
    assert summary["retrieval_failures"] > 0 and summary["outputs_published"] > 0
    assert summary["shared_cache"] is None and summary["shared_cache_unreachable"]


def test_a_killed_stats_collector_comes_back_with_the_reports(local_ray, tiny_demo, tmp_path):
    write_prompts(tiny_demo, tmp_path / "in.parquet", 24)
    config = fault_config(tiny_demo, tmp_path / "in.parquet", tmp_path / "out")
    job = JobThread(config)
    job.start()
    wait_for(lambda: any(s.totals.rows_ok > 0 for s in reports(config).values()), "a report")
    collector = find_stats_collectors(config.namespace)[0]
    os.kill(ray.get(collector.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)
    summary = job.result()
    assert_every_id_once(tmp_path / "out", [f"row-{i}" for i in range(24)])
    # The restarted collector read back the reports saved before the crash; later reports replaced them.
    assert summary["rows_ok"] == 24 and summary["num_actors"] == 1
    assert os.path.isfile(tmp_path / "out" / "_actor_stats.json")


def _default_sigint() -> None:
    """In the child before it starts: Ctrl-C's default. A test run started in the background of a shell
    (`make test &`) ignores SIGINT, the driver would inherit that, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_job_process(argv: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.generate", *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )


def list_result_files_local(output) -> list[str]:
    import pyarrow.fs as pafs

    return list_result_files(pafs.LocalFileSystem(), str(output)) if os.path.isdir(output) else []


def test_shared_look_ups_go_over_the_link_and_fall_back_to_ray_when_it_breaks(local_ray):
    """Shared look-ups use the cache actor's look-up link; when the link dies under them (the actor restarted
    on a new port), that batch goes through a Ray call, and the next one over a fresh link."""
    from actors.context_cache import get_or_create_context_cache
    from actors.decisions import PromptDecisions
    from engine.types import TreeParams

    cache = get_or_create_context_cache(f"link-{uuid.uuid4().hex[:8]}", "faults-link", max_restarts=1)
    vectors = np.eye(384, dtype=np.float32)[:3]
    ray.get(cache.insert_batch.remote(vectors, [{"tree": "12/11/1", "actor": "other"}] * 3, ["a", "b", "c"]))

    def encoder(texts: list[str]) -> np.ndarray:  # "x", "xx", "xxx" -> the three stored vectors
        return vectors[[len(text) - 1 for text in texts]]

    decisions = PromptDecisions("actor-a", lambda: encoder, cache, timeout_s=30.0, retry_after_s=0.0)
    assert decisions.submit(["x"], ["k1"])[0].result(timeout=60) == TreeParams(12, 11, 1)
    assert (decisions.counters.link_lookups, decisions.counters.shared_hits) == (1, 1)
    pid = ray.get(cache.stats.remote())["pid"]
    os.kill(pid, signal.SIGKILL)  # Ray restarts it: empty (no snapshot path), on a new link
    wait_for(lambda: _alive_pid(cache) not in (None, pid), "the cache actor to restart")
    assert decisions.submit(["xx"], ["k2"])[0].result(timeout=60) is None  # the restarted actor is empty
    counters = decisions.counters
    assert counters.link_failures == 1 and counters.link_lookups == 1  # the broken link's batch: a Ray call
    assert counters.shared_lookups == 2 and counters.shared_unreachable == 0
    assert decisions.submit(["xxx"], ["k3"])[0].result(timeout=60) is None
    assert decisions.counters.link_lookups == 2  # over the restarted actor's new link
    decisions.close()


def _alive_pid(cache) -> int | None:
    try:
        return ray.get(cache.stats.remote(), timeout=5)["pid"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_decisions_go_local_only_while_the_shared_cache_is_down(local_ray):
    """With the shared actor dead, look-ups and publishes carry on against the local cache, counted."""
    from actors.context_cache import get_or_create_context_cache
    from actors.decisions import PromptDecisions
    from engine.types import DraftConfidence, StepStats, TreeParams

    def encoder(texts: list[str]) -> np.ndarray:  # equal texts -> equal unit vectors
        vectors = np.zeros((len(texts), 384), dtype=np.float32)
        vectors[np.arange(len(texts)), [len(text) % 384 for text in texts]] = 1.0
        return vectors

    cache = get_or_create_context_cache(f"down-{uuid.uuid4().hex[:8]}", "faults-down", max_restarts=0)
    ray.get(cache.ping.remote())
    os.kill(ray.get(cache.stats.remote())["pid"], signal.SIGKILL)
    decisions = PromptDecisions("actor-a", lambda: encoder, cache, retry_after_s=60.0)
    assert decisions.submit(["abc"], ["k1"])[0].result(timeout=60) is None
    tree = TreeParams(12, 11, 1)
    steps = [
        StepStats(i, tree, 2, 3, 0.01, 0.01, DraftConfidence(0.5, 1.0, -1.0, -1.0), 10 + i) for i in range(3)
    ]
    decisions.publish(["k1"], [steps]).result(timeout=60)
    assert decisions.submit(["abc"], ["k1"])[0].result(timeout=60) == tree  # the local cache still serves
    assert decisions.submit(["a different prompt"], ["k2"])[0].result(timeout=60) is None  # a local miss
    counters = decisions.counters
    assert counters.shared_unreachable == 1  # then the actor is left alone for retry_after_s
    # The two local misses went local-only (the first when its call failed, the second inside the retry window).
    assert counters.local_only_lookups == 2 and counters.shared_lookups == 0
    assert counters.local_hits == 1 and counters.published == 1
    decisions.close()
