"""What a new user trips over, without a cluster: rows cut off by the model's context say so (finish_reason),
prompt columns that cannot hold text, draft heads and policies that do not fit the target, and submitted jobs
without models all stop before any actor starts, with one line that names the problem."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.generation import ActorRow, GenerationActor
from actors.stats import ActorStats, GenerationTotals
from common.columns import ERROR_COLUMN, FINISH_REASON_VALUES, RESULT_SCHEMA
from common.config import GenerateConfig
from demo.build import demo_paths
from engine.batch import RequestResult
from engine.types import GenerationOutput
from jobs import generate, models
from pipeline.checks import ModelCheckError, check_models
from pipeline.inputs import InputError, resolve_input
from pipeline.rows import validate_rows
from pipeline.summary import aggregate_actor_stats, all_rows_failed, format_finish_reasons


@pytest.fixture
def prompts_file(tmp_path) -> str:
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["def f(x):", "import os"]}), path)
    return str(path)


def actor_stats(actor_id: str, totals: GenerationTotals) -> ActorStats:
    return ActorStats(actor_id, 1, "cpu", None, 1, "static", 1.0, None, None, totals)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """generate.main's exit status and its stderr."""
    with pytest.raises(SystemExit) as exited:
        generate.main(argv)
    return exited.value.code, capsys.readouterr().err


def write_config(folder, **values) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(values, f)
    return str(folder)


# ---- 1. finish_reason: a row cut off by the context is no silent success --------------------------------------


def test_a_prompt_near_the_context_limit_finishes_with_context(tiny_demo):
    paths = demo_paths(tiny_demo)
    config = GenerateConfig(
        input="unused.parquet",
        output="unused",
        model=paths["target"],
        draft=paths["draft"],
        policy="static",
        max_new_tokens=20,
    )
    actor = GenerationActor(config.model_dump())
    limit = actor.context_limit
    ids = actor.tokenizer("x = 1\n" * 400).input_ids[: limit - 5]  # 5 tokens of room, 20 asked for
    long_prompt = actor.tokenizer.decode(ids)
    assert limit - 20 < len(actor.tokenizer(long_prompt).input_ids) < limit
    table = pa.table({"id": [1, 2, 3], "prompt": ["def f(x):", long_prompt, ""]})
    out = actor(validate_rows(table, config)).to_pylist()
    assert out[0]["finish_reason"] in ("stop", "length") and out[0][ERROR_COLUMN] is None
    cut = out[1]
    assert cut["finish_reason"] == "context" and cut[ERROR_COLUMN] is None
    assert cut["num_input_tokens"] + cut["num_generated_tokens"] == limit
    assert cut["num_generated_tokens"] < config.max_new_tokens
    assert out[2]["finish_reason"] is None and out[2][ERROR_COLUMN] == "prompt is empty"
    totals = actor.stats().totals
    assert totals.finish_context == 1 and totals.finish_stop + totals.finish_length == 1
    assert totals.rows_error == 1
    # The engine's "eos" is the column's "stop" (OpenAI's and vLLM's name).
    output = GenerationOutput(
        torch.tensor([[1, 2, 3, 7]]), num_prompt_tokens=3, num_new_tokens=1, finish_reason="eos"
    )
    columns = actor._result_columns([ActorRow("abc", [1, 2, 3], 4, 0.0)], [RequestResult(output=output)])
    assert columns["finish_reason"] == ["stop"] and actor.totals.finish_stop == totals.finish_stop + 1


def test_the_summary_counts_each_finish_reason():
    assert RESULT_SCHEMA.field("finish_reason").type == pa.string()
    assert sorted(FINISH_REASON_VALUES) == ["context", "length", "stop"]
    first = actor_stats("a", GenerationTotals(rows_ok=3, finish_stop=1, finish_context=2))
    second = actor_stats("b", GenerationTotals(rows_ok=2, finish_length=2))
    summary = aggregate_actor_stats({"a/1": first, "b/2": second})
    assert summary["finish_reasons"] == {"stop": 1, "length": 2, "context": 2}
    assert summary["finish_context"] == 2  # the typed totals' fields are in _stats.json as well
    line = format_finish_reasons(summary["finish_reasons"])
    assert "1 stop, 2 length, 2 context" in line and "model's context" in line
    assert "model's context" not in format_finish_reasons({"stop": 1, "length": 0, "context": 0})
    merged = GenerationTotals()
    merged.merge(first.totals)
    assert merged.finish_reasons == {"stop": 1, "length": 0, "context": 2}


# ---- 2. wrong types are found before any work; a job whose rows all failed says so ----------------------------


@pytest.mark.parametrize(
    ("column", "type_name"),
    [
        (pa.array([1, 2]), "int64"),
        (pa.array([0.5, 1.5]), "double"),
        (pa.array([["a"], ["b"]]), "list<element: string>"),
        (pa.array([{"text": "a"}, {"text": "b"}]), "struct<text: string>"),
        (pa.array([b"a", b"b"]), "binary"),
    ],
)
def test_a_prompt_column_that_cannot_hold_text_stops_the_job(tmp_path, capsys, column, type_name):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": column}), path)
    with pytest.raises(InputError, match="cannot hold text") as raised:
        resolve_input(str(path), "prompt")
    assert f"prompt column 'prompt' has Arrow type {type_name}" in str(raised.value)
    if type_name == "binary":
        assert "decode it to string first" in str(raised.value)
    status, err = run_main(["--input", str(path), "--output", str(tmp_path / "out")], capsys)
    assert status == 2 and f"Arrow type {type_name}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "column",
    [
        pa.array(["a", None]),
        pa.array(["a", "b"], pa.large_string()),
        pa.array(["a", "b"]).dictionary_encode(),
        pa.nulls(2),  # every row null: allowed; each row becomes an error row ("prompt is null")
    ],
)
def test_text_and_null_prompt_columns_pass(tmp_path, column):
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": column}), path)
    assert resolve_input(str(path), "prompt").num_rows == 2


def test_a_job_whose_rows_all_failed_exits_1_after_the_summary(tiny_demo, prompts_file, monkeypatch, capsys):
    assert all_rows_failed({"rows_out": 3, "rows_error_in_output": 2}) is None
    assert all_rows_failed({"rows_out": 0, "rows_error_in_output": 0}) is None
    assert "all 3 rows in the output failed" in all_rows_failed({"rows_out": 3, "rows_error_in_output": 3})
    import pipeline.build

    def failed_run(config):
        print("eagleray job summary (measured)")
        return {"rows_out": 2, "rows_error_in_output": 2}

    monkeypatch.setattr(pipeline.build, "run_generate", failed_run)
    paths = demo_paths(tiny_demo)
    argv = ["--input", prompts_file, "--output", "unused", "--model", paths["target"]]
    with pytest.raises(SystemExit) as exited:
        generate.main(argv + ["--draft", paths["draft"], "--policy", "static"])
    captured = capsys.readouterr()
    assert exited.value.code == 1 and "eagleray job summary" in captured.out
    assert captured.err.strip() == (
        "jobs.generate: all 2 rows in the output failed (see their __inference_error__); nothing was generated"
    )


# ---- 3. a draft head or policy that does not fit the target: one line, exit 2 ---------------------------------


def test_a_draft_head_for_another_target_stops_the_job_in_one_line(tmp_path, tiny_demo, prompts_file, capsys):
    """The issue's case: the demo head next to another model (here SmolLM2's sizes; config.json only)."""
    other = write_config(tmp_path / "smollm2", hidden_size=576, vocab_size=49152, model_type="llama")
    draft = demo_paths(tiny_demo)["draft"]
    argv = ["--input", prompts_file, "--output", str(tmp_path / "out"), "--model", other]
    status, err = run_main(argv + ["--draft", draft, "--policy", "static"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert other in err and draft in err
    assert "hidden_size 64 vs 576" in err and "vocab_size 512 vs 49152" in err
    assert not (tmp_path / "out").exists()


def test_the_demo_models_fit_and_a_policy_is_checked_against_the_target(tmp_path, tiny_demo):
    paths = demo_paths(tiny_demo)

    def config(**values) -> GenerateConfig:
        base = {"input": "x", "output": "y", "model": paths["target"], "draft": paths["draft"]}
        return GenerateConfig(**{**base, "policy": paths["policy"], **values})

    check_models(config())  # the demo's own draft head and policy fit its target
    check_models(config(policy="static"))
    # A policy folder each actor would fail to load is found on the driver.
    broken = str(tmp_path / "policy")
    shutil.copytree(paths["policy"], broken)
    os.remove(os.path.join(broken, "latency.json"))
    with pytest.raises(ModelCheckError, match=r"--policy '.*policy' cannot be loaded: .*latency.json"):
        check_models(config(policy=broken))
    # A target whose vocabulary is narrower than the policy's trees (configs only, no weights).
    narrow_model = write_config(tmp_path / "narrow", hidden_size=64, vocab_size=2)
    narrow_draft = write_config(tmp_path / "narrow_draft", hidden_size=64, vocab_size=2)
    narrow = {"model": narrow_model, "draft": narrow_draft}
    with pytest.raises(ModelCheckError, match=r"--policy '.*' does not fit --model .*vocab_size 2"):
        check_models(config(**narrow))
    with pytest.raises(ModelCheckError, match=r"--tree does not fit .*\['8/4/3'\]"):
        check_models(config(**narrow, policy="static", tree="8/4/3"))
    check_models(config(**narrow, policy="static", tree="8/4/2"))
    with pytest.raises(ModelCheckError, match="no integer hidden_size"):
        check_models(config(draft=write_config(tmp_path / "empty", vocab_size=512)))


# ---- 4. a submitted job, or one joining a cluster, never builds models ----------------------------------------


def test_a_submitted_job_without_models_stops_and_names_the_build_command(
    tmp_path, prompts_file, capsys, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(models.SUBMITTED_JOB_ENV, "{}")
    built = []
    monkeypatch.setattr(models, "build_target", lambda *args, **kwargs: built.append(args))
    root = str(tmp_path / "models" / "smollm2")
    status, err = run_main(
        ["--input", prompts_file, "--output", str(tmp_path / "out"), "--models-root", root], capsys
    )
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "ray job submit" in err and f"python -m jobs.build_models --out {root}" in err
    assert built == [] and not os.path.exists(root)
    monkeypatch.chdir(tmp_path)
    status, err = run_main(
        ["--input", prompts_file, "--output", "out", "--models-root", "models/smollm2"], capsys
    )
    assert status == 2 and "relative" in err and os.path.join(str(tmp_path), "models", "smollm2") in err
    assert built == []


def test_a_job_joining_a_cluster_does_not_build_but_a_local_run_does(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(models.SUBMITTED_JOB_ENV, raising=False)
    assert models.implicit_build_refusal() is None
    assert "ray://head:10001" in models.implicit_build_refusal("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert "'auto'" in models.implicit_build_refusal()
    root = str(tmp_path / "smollm2")
    with pytest.raises(models.ModelsMissingError, match="joins the Ray cluster"):
        models.ensure_models(root, refusal=models.implicit_build_refusal())
    assert not os.path.exists(root)

    class Built(Exception):
        pass

    def build_target(out_root, force=False):
        raise Built(out_root)

    monkeypatch.setattr(models, "build_target", build_target)
    with pytest.raises(Built, match=root):  # a plain local run builds what is missing
        models.ensure_models(root, refusal=None)
    # ... after copying in the committed head and policy, which need no building
    assert os.path.isfile(os.path.join(root, "draft", "config.json"))
    assert os.path.isfile(os.path.join(root, "policy", "policy.json"))


# ---- a cluster too small for the actors asked for ----------------------------------------------------------


def test_more_actors_than_the_cluster_holds_is_one_line_and_exit_2(
    tmp_path, prompts_file, tiny_demo, capsys, monkeypatch
):
    import pipeline.build
    from pipeline.resources import ResourceError, plan_actor_resources

    def too_small(config):  # what run_generate meets once Ray is up: the real planner on a 2-CPU cluster
        plan_actor_resources(config, {"CPU": 2.0})

    monkeypatch.setattr(pipeline.build, "run_generate", too_small)
    paths = demo_paths(tiny_demo)
    argv = ["--input", prompts_file, "--output", str(tmp_path / "out"), "--model", paths["target"]]
    argv += ["--draft", paths["draft"], "--policy", "static", "--num-actors", "8", "--cpus-per-actor", "1"]
    status, err = run_main(argv, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "8 actors need" in err and "lower --num-actors" in err
    with pytest.raises(ResourceError):
        too_small(
            GenerateConfig(
                input="x", output="y", model="m", draft="d", policy="static", num_actors=8, cpus_per_actor=1.0
            )
        )


def test_an_eagle3_head_fits_by_its_target_hidden_size_and_trees_by_its_draft_vocabulary(tmp_path, tiny_demo):
    """An EAGLE-3 config.json names the target's width target_hidden_size (its own may differ) and drafts over
    draft_vocab_size tokens: a tree may branch no wider."""
    paths = demo_paths(tiny_demo)
    fits = write_config(
        tmp_path / "e3", hidden_size=32, target_hidden_size=64, vocab_size=512, draft_vocab_size=3
    )
    base = {"input": "x", "output": "y", "model": paths["target"], "draft": fits, "policy": "static"}
    check_models(GenerateConfig(**base, tree="8/4/3"))
    with pytest.raises(ModelCheckError, match=r"--tree does not fit .*\['8/4/4'\]"):
        check_models(GenerateConfig(**base, tree="8/4/4"))
    other = write_config(tmp_path / "e3-other", hidden_size=64, target_hidden_size=576, vocab_size=512)
    with pytest.raises(ModelCheckError, match="hidden_size 576 vs 64"):
        check_models(GenerateConfig(**{**base, "draft": other}))
