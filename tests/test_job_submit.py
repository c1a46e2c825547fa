"""`ray job submit` of the unchanged job against a real `ray start --head` that this test starts (token
authentication left at Ray's default), with the runtime_env the repository ships."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from demo.build import demo_paths

pytestmark = pytest.mark.starts_ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node started with the `ray` CLI in a temp folder of its own; its processes killed afterwards."""
    if ray.is_initialized():
        ray.shutdown()  # the module's jobs go to the head, and this process needs no Ray of its own meanwhile
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"  # token authentication on, for the head and for the job client
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], check=True, env=env, capture_output=True)
    dashboard_port, gcs_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-head-")
    subprocess.run(
        [ray_cli, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}"]
        + [f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}"]  # not the default 52365
        + ["--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    yield env, ray_cli, f"http://127.0.0.1:{dashboard_port}"
    stop_cluster(temp_dir, gcs_port)


def stop_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill one `ray start` cluster: every process naming its temp folder or GCS port, and their descendants (the
    workers and agents under its raylet). `ray stop` would kill every Ray on the machine, the other pytest-xdist
    worker's included (whose driver then dies with it)."""
    marks = (temp_dir, f":{gcs_port}")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(m in " ".join(process.info["cmdline"] or ()) for m in marks):
            found[process.pid] = process
            with contextlib.suppress(psutil.NoSuchProcess):  # it may end while being looked at
                found.update((child.pid, child) for child in process.children(recursive=True))
    for process in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(list(found.values()), timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)  # its session logs


def test_ray_job_submit_runs_the_job(ray_head, tiny_demo, tmp_path):
    env, ray_cli, address = ray_head
    paths = demo_paths(tiny_demo)
    prompts = pq.read_table(paths["prompts"]).column("prompt").to_pylist()[:3] + [""]
    input_path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "prompt": prompts}), input_path)
    output = tmp_path / "out"
    command = [ray_cli, "job", "submit", "--address", address, "--working-dir", REPO]
    command += ["--runtime-env", os.path.join(REPO, "jobs", "generate.yaml"), "--"]
    command += ["python", "-m", "jobs.generate", "--input", str(input_path), "--output", str(output)]
    command += ["--model", paths["target"], "--draft", paths["draft"], "--policy", paths["policy"]]
    command += ["--max-new-tokens", "8", "--no-progress"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert "succeeded" in finished.stdout
    assert "eagleray job summary" in finished.stdout
    table = pq.read_table(str(output))
    assert sorted(table.column("id").to_pylist()) == [1, 2, 3, 4]
    errors = {row["id"]: row["__inference_error__"] for row in table.to_pylist()}
    assert errors[1] is None and errors[2] is None and errors[3] is None
    assert "empty" in errors[4]
    assert os.path.isfile(output / "_stats.json")


def test_a_client_without_the_token_is_refused(ray_head):
    """Token authentication is on: the job API turns away a client that holds a wrong token."""
    env, ray_cli, address = ray_head
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    refused = subprocess.run(
        [ray_cli, "job", "list", "--address", address], env=wrong, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0
    assert "token authentication is enabled" in refused.stderr
    allowed = subprocess.run(
        [ray_cli, "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_a_submitted_job_without_models_stops_instead_of_building_them(ray_head, tmp_path):
    """The default --models-root is relative: under `ray job submit` it points into the uploaded copy of the working
    dir, which has no models/. The job stops (exit 2 in the driver) and names the build command."""
    env, ray_cli, address = ray_head
    input_path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [1], "prompt": ["def f(x):"]}), input_path)
    command = [ray_cli, "job", "submit", "--address", address, "--working-dir", REPO]
    command += ["--runtime-env", os.path.join(REPO, "jobs", "generate.yaml"), "--"]
    command += [
        "python",
        "-m",
        "jobs.generate",
        "--input",
        str(input_path),
        "--output",
        str(tmp_path / "out"),
    ]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420, cwd=REPO)
    log = finished.stdout + finished.stderr
    assert finished.returncode != 0, log[-4000:]
    assert "this job runs under `ray job submit`" in log and "python -m jobs.build_models --out" in log
    assert "--models-root is relative" in log and "converted" not in log
    assert not (tmp_path / "out").exists()
