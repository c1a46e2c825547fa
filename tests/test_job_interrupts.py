"""A running job as a user meets it, on a local Ray with the tiny demo models: Ctrl-C, a killed driver, a second
driver on the same output folder, and what the driver's log shows when it is not a terminal (a Ray job's log, a
pipe)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray
from test_pipeline_faults import (
    REPO,
    WAIT_S,
    list_result_files_local,
    run_job_process,
    wait_for,
    write_prompts,
)

from common.columns import ERROR_COLUMN
from demo.build import demo_paths
from jobs import generate
from pipeline.lock import LOCK_NAME
from pipeline.resume import count_written_rows

pytestmark = pytest.mark.starts_ray


def job_argv(tiny_demo: str, input_path, output, *extra: str) -> list[str]:
    paths = demo_paths(tiny_demo)
    argv = ["--input", str(input_path), "--output", str(output), "--model", paths["target"]]
    return [*argv, "--draft", paths["draft"], *extra]


def test_ctrl_c_then_a_killed_driver_and_the_third_run_writes_the_rest_once(
    local_ray, tiny_demo, tmp_path, capsys
):
    """One job interrupted the two ways users interrupt jobs: Ctrl-C (the driver says what is safely written and
    releases its lock), then SIGKILL of the rerun (no goodbye, its lock left behind); a third run writes the
    rest, every row exactly once. A second driver on the output while the first runs is turned away before it
    touches anything. The input has no id column, so the ids are Ray Data's row hashes, the case that must come
    out the same on every read of the files."""
    num_rows = (
        64  # enough work (3072 tokens, ~20 s here) that a driver still runs when its first file appears
    )
    prompts = write_prompts(tiny_demo, tmp_path / "in.parquet", num_rows, with_ids=False)
    output = tmp_path / "out"
    argv = job_argv(
        tiny_demo, tmp_path / "in.parquet", output, "--policy", "static", "--max-new-tokens", "48"
    )
    argv += ["--batch-size", "2", "--no-progress"]
    driver = run_job_process(argv)
    try:
        # While the job starts up, a second driver on the same folder (here in this process) stops before it
        # touches anything; then Ctrl-C goes as soon as a first result file is there, so the job is mid-way.
        wait_for(lambda: (output / LOCK_NAME).exists() or driver.poll() is not None, "the output's lock")
        assert driver.poll() is None, f"the job ended before the test could go on:\n{driver.stdout.read()}"
        assert open(output / LOCK_NAME).read().startswith(f'{{"pid": {driver.pid},')
        with pytest.raises(SystemExit) as exited:
            generate.main(argv)
        assert exited.value.code == 2
        refusal = capsys.readouterr().err
        assert f"is in use by another driver (pid {driver.pid} on " in refusal and "--output" in refusal
        wait_for(lambda: list_result_files_local(output) or driver.poll() is not None, "a first result file")
        assert driver.poll() is None, f"the job ended before the test could go on:\n{driver.stdout.read()}"
        written_before = count_written_rows(str(output))
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        log, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(60)
    assert driver.returncode == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    lines = [line for line in log.splitlines() if line.startswith("jobs.generate:")]
    assert len(lines) == 1, log
    said = re.fullmatch(
        rf"jobs\.generate: interrupted; (\d+) of {num_rows} rows are safely written in {re.escape(str(output))}; "
        "rerun the same command to resume",
        lines[0],
    )
    assert said, lines[0]
    interrupted_with = count_written_rows(str(output))
    assert written_before <= int(said[1]) <= interrupted_with < num_rows
    assert not (output / LOCK_NAME).exists()  # released on the way out

    rerun = run_job_process(argv)
    try:
        wait_for(
            lambda: count_written_rows(str(output)) > interrupted_with or rerun.poll() is not None,
            "the rerun's first result file",
        )
        assert rerun.poll() is None, f"the rerun ended before it could be killed:\n{rerun.stdout.read()}"
        rerun.send_signal(signal.SIGKILL)
    finally:
        rerun.wait(60)
    assert interrupted_with < count_written_rows(str(output)) < num_rows

    final = run_job_process(argv)
    log, _ = final.communicate(timeout=WAIT_S)
    assert final.returncode == 0, log
    assert "resuming" in log
    table = pq.read_table(str(output))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == num_rows
    assert sorted(table.column("prompt").to_pylist()) == sorted(prompts)
    assert table.column(ERROR_COLUMN).null_count == num_rows
    # Each row's id is the hash a fresh read of the same file gives it now, so any later run numbers the rows
    # the same way (the reruns above showed it only for the rows written before them).
    reread = ray.data.read_parquet(str(tmp_path / "in.parquet"), include_row_hash=True).to_pandas()
    assert dict(zip(reread["prompt"], reread["row_hash"].tolist(), strict=True)) == dict(
        zip(table.column("prompt").to_pylist(), ids, strict=True)
    )


def test_the_log_has_no_alarming_noise_and_no_bar_fragments(local_ray, tiny_demo, tmp_path):
    """Progress on (the default), the learned policy with the shared cache (so the cache actor runs too), and
    stdout a pipe, as under `ray job submit`."""
    write_prompts(tiny_demo, tmp_path / "in.parquet", 16)
    policy = demo_paths(tiny_demo)["policy"]
    argv = job_argv(
        tiny_demo, tmp_path / "in.parquet", tmp_path / "out", "--policy", policy, "--shared-cache"
    )
    argv += ["--max-new-tokens", "8", "--batch-size", "4"]
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "jobs.generate", *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=WAIT_S,
    )
    log = process.stdout.decode()  # bytes: text mode would turn the \r of a bar into \n
    assert process.returncode == 0, log
    assert "rows: 16 in, 16 out" in log
    assert "constructor arguments in the object store" not in log, log
    assert "DeprecationWarning" not in log, log
    assert "\r" not in log, log  # no tqdm bar (Ray Data's Parquet sampling, Hugging Face's weight loading)
    assert "Total Progress" in log  # Ray Data's progress, as log lines
