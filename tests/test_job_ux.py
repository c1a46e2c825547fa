"""What a new user trips over, without a cluster: how each jobs module says it is run (--help, prog, help text
and defaults), resuming the same input spelled another way, and the output folder's lock against a second
driver. The cases with a running job (Ctrl-C, a second driver, the log's noise) are in
tests/test_job_interrupts.py."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import jobs
from common.config import GenerateConfig
from pipeline.build import run_generate
from pipeline.inputs import InputError, resolve_input
from pipeline.lock import LOCK_NAME, LockOwner, OutputLockedError, hold_output_lock, local_folder
from pipeline.resume import JOB_NAME, canonical_location, count_written_rows, plan_resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_MODULES = sorted(info.name for info in pkgutil.iter_modules(jobs.__path__))

# Runs `python -m jobs.<name> --help` for every module in one interpreter (runpy does what -m does), so that
# torch, transformers and ray are imported once: [{name, code, out, err}].
HELP_SCRIPT = """
import contextlib, io, json, runpy, sys
results = []
for name in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [name, "--help"]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("jobs." + name, run_name="__main__", alter_sys=True)
        except SystemExit as exited:
            code = exited.code
    results.append({"name": name, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print("RESULTS" + json.dumps(results))
"""


# ---- 7. help and names ------------------------------------------------------------------------------------------


def test_every_jobs_module_is_an_entry_point_or_a_named_helper():
    assert sorted(jobs.ENTRY_POINTS + jobs.HELPER_MODULES) == JOB_MODULES


def test_every_jobs_module_run_with_help_says_how_it_is_run():
    process = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, *JOB_MODULES],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(process.stdout.split("RESULTS", 1)[1])
    assert [result["name"] for result in results] == JOB_MODULES
    for result in results:
        name = result["name"]
        if name in jobs.ENTRY_POINTS:
            assert result["code"] == 0, result
            assert result["out"].startswith(f"usage: python -m jobs.{name} "), result["out"][:200]
        else:
            assert result["code"] == 2, result
            assert result["out"] == ""
            assert f"jobs.{name} is " in result["err"] and "not an entry point" in result["err"]
            assert "python -m jobs.generate" in result["err"]


def entry_point_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `python -m jobs.<name>` builds, caught where it would parse the command line."""
    captured = []

    class Caught(Exception):
        pass

    def catch(parser, args=None, namespace=None):
        captured.append(parser)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught):
        importlib.import_module(f"jobs.{name}").main([])
    monkeypatch.undo()
    return captured[0]


@pytest.mark.parametrize("name", jobs.ENTRY_POINTS)
def test_every_option_has_help_and_shows_its_default(name, monkeypatch):
    parser = entry_point_parser(name, monkeypatch)
    assert parser.prog == f"python -m jobs.{name}"
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings} has no help text"
        shown = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        has_value_default = action.default is not None and action.default is not False  # 0 is a value
        if has_value_default and not action.required:
            assert "default" in shown, f"{name}: {action.option_strings} does not show its default: {shown!r}"


def test_generate_help_shows_the_defaults_a_user_looks_for(capsys):
    from jobs import generate

    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = GenerateConfig.model_fields
    for name in ("max_new_tokens", "temperature", "batch_size", "num_actors", "seed"):
        option = f"{generate.option_name(name)} {name.upper()}"  # once in the usage line, then in the list
        assert f"(default: {fields[name].default})" in text.split(option, 2)[2][:300], name


def test_a_bench_count_below_one_names_the_flag_and_exits_2(capsys):
    from jobs import bench_cache

    with pytest.raises(SystemExit) as exited:
        bench_cache.parse_args(["--dim", "0"])
    assert exited.value.code == 2
    assert "--dim must be >= 1, got 0" in capsys.readouterr().err


# ---- 6. resume: the same input spelled another way ------------------------------------------------------------


def resume_config(input_location: str, output, **overrides) -> GenerateConfig:
    values = {"input": input_location, "output": str(output), "model": "m", "draft": "d", "policy": "static"}
    return GenerateConfig(**{**values, **overrides})


def plan(config: GenerateConfig):
    os.makedirs(config.output, exist_ok=True)
    inputs = resolve_input(config.input, config.prompt_column)
    return plan_resume(config, inputs, pafs.LocalFileSystem(), config.output)


@pytest.fixture
def prompts_in_subfolder(tmp_path, monkeypatch) -> str:
    """data/p.parquet under tmp_path, with tmp_path/work as the working directory; returns the absolute path."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    path = tmp_path / "data" / "p.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a", "b", "c"]}), path)
    monkeypatch.chdir(tmp_path / "work")
    return str(path)


def test_the_same_input_given_another_way_resumes(tmp_path, prompts_in_subfolder):
    output = tmp_path / "out"
    plan(resume_config("../data/p.parquet", output))
    pq.write_table(pa.table({"id": [2], "prompt": ["b"]}), output / "part-0.parquet")
    os.symlink(tmp_path / "data", tmp_path / "linked")
    for spelling in (
        prompts_in_subfolder,
        f"file://{prompts_in_subfolder}",
        str(tmp_path / "linked" / "p.parquet"),
        "./../data/./p.parquet",
    ):
        assert plan(resume_config(spelling, output)).num_done == 1, spelling
    recorded = json.loads((output / JOB_NAME).read_text())["fingerprint"]
    assert recorded["input"] == os.path.realpath(prompts_in_subfolder)


def test_a_record_that_holds_the_input_as_given_still_resumes(tmp_path, prompts_in_subfolder):
    output = tmp_path / "out"
    plan(resume_config(prompts_in_subfolder, output))
    record = json.loads((output / JOB_NAME).read_text())
    record["fingerprint"]["input"] = "../data/p.parquet"  # as an earlier version wrote it
    (output / JOB_NAME).write_text(json.dumps(record))
    assert plan(resume_config(prompts_in_subfolder, output)).num_done == 0


def test_other_settings_are_listed_with_their_old_and_new_values(tmp_path, prompts_in_subfolder):
    output = tmp_path / "out"
    plan(resume_config(prompts_in_subfolder, output))
    other = tmp_path / "data" / "q.parquet"
    pq.write_table(pa.table({"id": [1], "prompt": ["a"]}), other)
    with pytest.raises(InputError) as error:
        plan(resume_config(str(other), output, temperature=0.5, max_new_tokens=64))
    lines = str(error.value).splitlines()
    assert lines[0] == f"output {str(output)!r} holds a job with other settings, so it cannot be resumed:"
    assert sorted(lines[1:4]) == [
        f"  --input: {os.path.realpath(prompts_in_subfolder)!r} before, {os.path.realpath(other)!r} now",
        "  --max-new-tokens: 128 before, 64 now",
        "  --temperature: 0.0 before, 0.5 now",
    ]
    assert "--overwrite" in lines[4]


def test_locations_compare_by_what_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_location("a/../b/p.parquet") == str(tmp_path.resolve() / "b" / "p.parquet")
    assert canonical_location(f"file://{tmp_path}/b/p.parquet") == str(tmp_path.resolve() / "b" / "p.parquet")
    assert canonical_location("data/*.parquet") == str(tmp_path.resolve() / "data" / "*.parquet")
    assert canonical_location("s3://bucket/prompts/") == "s3://bucket/prompts"


def test_written_rows_count_complete_files_only(tmp_path):
    assert count_written_rows(str(tmp_path / "missing")) == 0
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 cut off mid-write")
    assert count_written_rows(str(tmp_path)) == 2


# ---- 10. one driver per output folder -------------------------------------------------------------------------


def write_lock(folder, owner: LockOwner) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    with open(path, "w") as file:
        file.write(owner.to_text())
    return path


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_is_held_for_the_block_and_released_after_it_even_on_ctrl_c(tmp_path):
    output = str(tmp_path / "out")
    with hold_output_lock(output) as path:
        owner = LockOwner.parse(open(path).read())
        assert (owner.pid, owner.host) == (os.getpid(), socket.gethostname())
    assert not os.path.exists(path)
    with pytest.raises(KeyboardInterrupt), hold_output_lock(output):
        raise KeyboardInterrupt
    assert not os.path.exists(path)


def test_a_second_driver_stops_before_touching_the_folder(tmp_path):
    pq.write_table(pa.table({"id": [1], "prompt": ["a"]}), tmp_path / "in.parquet")
    config = resume_config(str(tmp_path / "in.parquet"), tmp_path / "out", overwrite=True)
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"id": [7]}), tmp_path / "out" / "part-0.parquet")
    write_lock(tmp_path / "out", LockOwner(os.getpid(), socket.gethostname(), time.time()))
    with pytest.raises(OutputLockedError, match=r"is in use by another driver \(pid \d+ on .*--output"):
        run_generate(config)  # stops before --overwrite deletes anything, and before Ray starts
    assert (tmp_path / "out" / "part-0.parquet").exists()
    assert isinstance(OutputLockedError("x"), InputError)  # jobs.generate: exit status 2


@pytest.mark.parametrize(
    "owner",
    [
        LockOwner(0, socket.gethostname(), time.time()),  # replaced below by a pid that has ended
        LockOwner(os.getpid(), socket.gethostname(), 0.0),  # a pid reused by a process started later
    ],
    ids=["ended-process", "reused-pid"],
)
def test_a_lock_whose_owner_is_gone_is_taken_over(tmp_path, owner):
    if owner.pid == 0:
        owner = LockOwner(ended_pid(), owner.host, owner.started_at)
    path = write_lock(tmp_path / "out", owner)
    with hold_output_lock(str(tmp_path / "out")):
        assert LockOwner.parse(open(path).read()).pid == os.getpid()


def test_a_lock_from_another_host_is_never_judged_stale(tmp_path):
    path = write_lock(tmp_path / "out", LockOwner(ended_pid(), "another-host", time.time()))
    with pytest.raises(OutputLockedError, match=f"another-host.*delete {path}"):
        with hold_output_lock(str(tmp_path / "out")):
            pass
    assert os.path.exists(path)


def test_an_unreadable_lock_is_a_driver_writing_it_unless_it_is_old(tmp_path):
    os.makedirs(tmp_path / "out")
    path = tmp_path / "out" / LOCK_NAME
    path.write_text("")
    with pytest.raises(OutputLockedError, match="just now"):
        with hold_output_lock(str(tmp_path / "out")):
            pass
    os.utime(path, (time.time() - 60, time.time() - 60))
    with hold_output_lock(str(tmp_path / "out")):
        assert LockOwner.parse(path.read_text()).pid == os.getpid()


def test_remote_outputs_are_not_locked():
    assert local_folder("file:///tmp/out") == "/tmp/out"
    assert local_folder("mock:///out") is None  # pyarrow's in-memory filesystem stands for s3:// and the like
    with hold_output_lock("mock:///out") as path:
        assert path is None
