"""On a local Ray: the dashboard metrics tell two runs of one job name apart and show zero counters from the
start, read back from the node's Prometheus endpoint; and a job whose rows all failed exits 1."""

from __future__ import annotations

import re
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.metrics import ActorMetrics
from actors.stats import ActorStats, GenerationTotals
from common.columns import ERROR_COLUMN
from demo.build import demo_paths
from jobs import generate

pytestmark = pytest.mark.starts_ray

SERIES = re.compile(r"^(ray_eagleray_\w+)\{(.*)\} (\S+)$")


@pytest.fixture(scope="module")
def metrics_ray():
    """A local Ray that exports metrics every 0.5 s (the default waits 10 s), for this module only."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"metrics_report_interval_ms": 500},
    )
    yield ray
    ray.shutdown()


@ray.remote(num_cpus=0)
class Publisher:
    """An actor that publishes a generation actor's metrics for given stats."""

    def __init__(self, run_id: str, job_name: str) -> None:
        self.metrics = ActorMetrics(run_id, job_name, "actor-1")

    def publish(self, stats: dict) -> None:
        self.metrics.publish(ActorStats.from_dict(stats), [0.2])


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """(name, tags, value) of every eagleray series on this node's Prometheus endpoint."""
    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found.append((match.group(1), tags, float(match.group(3))))
    return found


def value(series, name: str, **tags) -> float | None:
    for found_name, found_tags, found_value in series:
        if found_name == name and all(found_tags.get(key) == text for key, text in tags.items()):
            return found_value
    return None


def test_two_runs_of_one_job_name_are_two_series_and_zero_counters_show(metrics_ray):
    stats = ActorStats(
        "actor-1", 1, "cpu", None, 1, "static", 1.0, None, None, GenerationTotals(rows_ok=2, finish_length=2)
    )
    first, second = (
        Publisher.remote("eagleray-run1", "eagleray"),
        Publisher.remote("eagleray-run2", "eagleray"),
    )
    ray.get([first.publish.remote(stats.to_dict()), second.publish.remote(stats.to_dict())])
    rows = "ray_eagleray_rows_total"

    def expected_series(series) -> bool:
        return all(
            value(series, rows, job=run, job_name="eagleray", actor="actor-1", status="error") == 0.0
            and value(series, rows, job=run, status="ok") == 2.0
            and value(series, "ray_eagleray_finish_reasons_total", job=run, reason="context") == 0.0
            and value(series, "ray_eagleray_finish_reasons_total", job=run, reason="length") == 2.0
            and value(series, "ray_eagleray_steps_total", job=run) == 0.0
            for run in ("eagleray-run1", "eagleray-run2")
        )

    # Ray exports metrics every few seconds, so the zero series and the counted ones can arrive in different
    # scrapes: wait until every expected value is there.
    deadline = time.monotonic() + 90
    series = scrape()
    while not expected_series(series):
        assert time.monotonic() < deadline, f"the expected series did not all appear within 90 s: {series}"
        time.sleep(0.5)
        series = scrape()
    ray.kill(first)
    ray.kill(second)


def test_a_job_whose_rows_all_failed_exits_1(metrics_ray, tiny_demo, tmp_path, capsys):
    """A null-typed prompt column passes the schema check (it can hold text); every row is then an error row."""
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": pa.nulls(3)}), path)
    paths = demo_paths(tiny_demo)
    output = tmp_path / "out"
    argv = [
        "--input",
        str(path),
        "--output",
        str(output),
        "--model",
        paths["target"],
        "--draft",
        paths["draft"],
    ]
    with pytest.raises(SystemExit) as exited:
        generate.main(argv + ["--policy", "static", "--no-progress"])
    captured = capsys.readouterr()
    assert exited.value.code == 1
    assert "eagleray job summary" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "jobs.generate: all 3 rows in the output failed (see their __inference_error__); nothing was generated"
    )
    table = pq.read_table(str(output))
    assert table.column(ERROR_COLUMN).to_pylist() == ["prompt is null"] * 3
    assert table.column("finish_reason").null_count == 3
