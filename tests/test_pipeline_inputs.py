"""The job's config, input resolution and row validation, without Ray: every fatal problem is named before work
starts, and every bad row becomes an error row, never a dropped one."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from actors.decisions import best_tree
from actors.generation import compact_trees, row_seed
from common.columns import ERROR_COLUMN, PLAN_COLUMNS, PLAN_MAX_NEW_TOKENS_COLUMN, PLAN_TEMPERATURE_COLUMN
from common.config import GenerateConfig, describe_validation_error
from engine.types import DraftConfidence, StepStats, TreeParams
from pipeline.inputs import InputError, resolve_input
from pipeline.resources import plan_actor_resources
from pipeline.rows import plan_row, validate_rows


def make_config(**overrides) -> GenerateConfig:
    values = {"input": "in.parquet", "output": "out", "model": "m", "draft": "d", "policy": "static"}
    return GenerateConfig(**{**values, **overrides})


def write(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


# ---- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"num_actors": 0}, "num_actors"),
        ({"batch_size": -4}, "batch_size"),
        ({"tree": "8-4-2"}, "tree"),
        ({"tree": "80/1/1"}, "tree"),
        ({"similarity_threshold": 1.5}, "similarity_threshold"),
        ({"max_new_tokens": 5000}, "max_new_tokens_cap"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_bad_config_is_refused_with_the_option_named(overrides, named):
    with pytest.raises(ValidationError) as caught:
        make_config(**overrides)
    assert named in describe_validation_error(caught.value)


def test_config_problems_can_name_the_command_line_flags():
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    with pytest.raises(ValidationError) as caught:
        make_config(num_actors=0)
    assert describe_validation_error(caught.value, flag).startswith("--num-actors: ")
    with pytest.raises(ValidationError) as caught:
        make_config(max_new_tokens=200, max_new_tokens_cap=100)
    assert describe_validation_error(caught.value, flag) == (
        "config: --max-new-tokens 200 is above --max-new-tokens-cap 100"
    )
    with pytest.raises(ValidationError) as caught:
        make_config(prompt_column="id_column", id_column="id_column")  # a quoted value keeps its spelling
    assert describe_validation_error(caught.value, flag) == (
        "config: --prompt-column and --id-column are both 'id_column'"
    )


def test_policy_kind():
    assert make_config(policy="static").policy_kind == "static"
    assert make_config(policy="heuristic").policy_kind == "heuristic"
    assert make_config(policy="plain").policy_kind == "plain"
    assert make_config(policy="models/demo/policy").policy_kind == "learned"
    assert make_config(tree="12/11/1").static_tree == TreeParams(12, 11, 1)


# ---- input files -------------------------------------------------------------------------------------------------


def test_file_folder_glob_and_uri_resolve_to_the_same_rows(tmp_path):
    folder = tmp_path / "prompts"
    (folder / "part").mkdir(parents=True)
    write(folder / "a.parquet", prompt=["x", "y"], id=[1, 2])
    write(folder / "part" / "b.parquet", prompt=["z"], id=[3])
    (folder / "notes.txt").write_text("not parquet")
    assert resolve_input(str(folder / "a.parquet"), "prompt").num_rows == 2
    assert resolve_input(str(folder), "prompt").num_rows == 3
    assert len(resolve_input(str(folder), "prompt").paths) == 2
    assert resolve_input(str(folder / "*.parquet"), "prompt").num_rows == 2
    assert resolve_input(f"file://{folder}", "prompt").num_rows == 3


def test_missing_prompt_column_names_the_available_columns(tmp_path):
    path = write(tmp_path / "a.parquet", text=["x"], id=[1])
    with pytest.raises(InputError, match=r"no prompt column 'prompt'.*\['text', 'id'\]"):
        resolve_input(path, "prompt")


@pytest.mark.parametrize("name", ["missing.parquet", "nothing-*.parquet"])
def test_missing_input_is_fatal(tmp_path, name):
    with pytest.raises(InputError, match="does not exist|matches no Parquet"):
        resolve_input(str(tmp_path / name), "prompt")


def test_unreadable_file_is_fatal(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(InputError, match="cannot read"):
        resolve_input(str(path), "prompt")


@pytest.mark.parametrize("column", ["generated_text", ERROR_COLUMN, PLAN_MAX_NEW_TOKENS_COLUMN])
def test_input_with_a_column_the_job_writes_is_refused(tmp_path, column):
    path = write(tmp_path / "a.parquet", prompt=["x"], **{column: ["old"]})
    with pytest.raises(InputError, match=column):
        resolve_input(path, "prompt")


# ---- rows --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, max_new_tokens, temperature, error",
    [
        ("def f():", None, None, None),
        (None, None, None, "prompt is null"),
        ("", None, None, "prompt is empty"),
        ("  \n\t", None, None, "whitespace"),
        (42, None, None, "prompt must be text"),
        ("ok", -1, None, "max_new_tokens must be >= 1"),
        ("ok", 0, None, "max_new_tokens must be >= 1"),
        ("ok", 2.5, None, "whole number"),
        ("ok", math.nan, None, "whole number"),
        ("ok", 10**9, None, "above the cap"),
        ("ok", None, -0.5, "temperature must be >= 0"),
        ("ok", None, math.inf, "finite"),
        ("ok", None, 1e9, "above the cap"),
        ("ok", "12", None, "whole number"),
    ],
)
def test_plan_row(prompt, max_new_tokens, temperature, error):
    plan = plan_row(prompt, max_new_tokens, temperature, make_config())
    if error is None:
        assert plan.error is None and plan.prompt == prompt
    else:
        assert plan.prompt is None and error in plan.error


def test_row_values_override_defaults_without_clamping():
    config = make_config(max_new_tokens=64, temperature=0.0)
    plan = plan_row("p", 7, 0.8, config)
    assert (plan.max_new_tokens, plan.temperature, plan.error) == (7, 0.8, None)
    plan = plan_row("p", None, None, config)
    assert (plan.max_new_tokens, plan.temperature) == (64, 0.0)


def test_validate_rows_keeps_every_row_and_column():
    table = pa.table(
        {
            "id": [1, 2, 3, 4],
            "prompt": ["a", None, " ", "b"],
            "max_new_tokens": [4, None, 3, -2],
            "extra": ["x", "y", "z", "w"],
        }
    )
    validated = validate_rows(table, make_config(max_new_tokens=64, temperature=0.5))
    assert validated.num_rows == 4
    assert validated.column_names == ["id", "prompt", "max_new_tokens", "extra", *PLAN_COLUMNS]
    errors = validated.column(ERROR_COLUMN).to_pylist()
    assert errors[0] is None
    assert "null" in errors[1] and "whitespace" in errors[2] and "max_new_tokens" in errors[3]
    # The resolved values the actor reads: the row's own, else the job's; null on an error row.
    assert validated.column(PLAN_MAX_NEW_TOKENS_COLUMN).to_pylist() == [4, None, None, None]
    assert validated.column(PLAN_TEMPERATURE_COLUMN).to_pylist() == [0.5, None, None, None]


# ---- small helpers of the actor ----------------------------------------------------------------------------------


def step(tree: str, emitted: int, seconds: float) -> StepStats:
    confidence = DraftConfidence(0.5, 1.0, -1.0, -1.0)
    return StepStats(
        0, TreeParams.parse(tree), emitted - 1, emitted, seconds / 2, seconds / 2, confidence, 10
    )


def test_compact_trees_run_length():
    steps = [step("12/11/1", 3, 0.1)] * 2 + [step("8/4/2", 2, 0.1)] + [step("12/11/1", 3, 0.1)]
    assert compact_trees(steps) == "12/11/1x2,8/4/2x1,12/11/1x1"
    assert compact_trees([]) == ""


def test_best_tree_prefers_the_measured_fastest_trusted_tree():
    steps = [step("8/4/2", 4, 0.1)] * 3 + [step("12/11/1", 9, 0.1)] * 2 + [step("24/23/1", 50, 0.1)]
    tree, rate = best_tree(steps)
    assert tree == TreeParams(12, 11, 1) and rate == pytest.approx(90.0)  # 24/23/1 ran once: not trusted
    assert best_tree([step("3/2/1", 1, 0.1)])[0] == TreeParams(3, 2, 1)
    assert best_tree([]) is None


def test_row_seed_depends_on_row_and_job_seed_only():
    assert row_seed(0, "a") == row_seed(0, "a")
    assert len({row_seed(0, "a"), row_seed(0, "b"), row_seed(1, "a")}) == 3


# ---- resources ---------------------------------------------------------------------------------------------------


def test_cpu_only_actors_split_the_cpus_and_leave_room_for_io():
    one = plan_actor_resources(make_config(num_actors=1), {"CPU": 2.0})
    two = plan_actor_resources(make_config(num_actors=2), {"CPU": 2.0})
    assert (one.num_cpus, one.num_gpus) == (1.5, 0.0)
    assert (two.num_cpus, two.num_gpus) == (0.75, 0.0)


def test_gpu_cluster_gives_each_actor_a_gpu_and_refuses_too_many_actors():
    plan = plan_actor_resources(make_config(num_actors=2), {"CPU": 32.0, "GPU": 2.0})
    assert plan.num_gpus == 1.0 and plan.num_cpus == 8.0
    with pytest.raises(ValueError, match="GPUs"):
        plan_actor_resources(make_config(num_actors=3), {"CPU": 32.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="CPUs"):
        plan_actor_resources(make_config(num_actors=2, cpus_per_actor=2.0), {"CPU": 2.0})
