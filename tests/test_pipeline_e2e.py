"""The job end to end on a local Ray with the tiny demo models: every row comes back with every input column,
good rows are identical to plain greedy decoding, bad rows carry a named error, and fatal input problems stop
the job before any actor starts."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.context_cache import get_or_create_context_cache
from common.columns import ERROR_COLUMN, PLAN_COLUMNS, RESULT_SCHEMA
from common.config import GenerateConfig
from demo.build import demo_paths
from engine.ea_model import EaModel
from jobs import generate
from pipeline.build import STATS_NAME, run_generate

pytestmark = pytest.mark.starts_ray

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def demo_prompts(tiny_demo) -> list[str]:
    return pq.read_table(demo_paths(tiny_demo)["prompts"]).column("prompt").to_pylist()[:5]


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory, demo_prompts) -> str:
    """Five good rows (one with its own max_new_tokens, one sampled) and seven bad ones."""
    rows = [
        # (prompt, max_new_tokens, temperature)
        (demo_prompts[0], None, None),
        (demo_prompts[1], 5, None),
        (demo_prompts[2], None, None),
        (demo_prompts[3], None, 0.7),
        (demo_prompts[4], None, None),
        (None, None, None),
        ("", None, None),
        ("   \n", None, None),
        ("x = 1\n" * 400, None, None),  # longer than the tiny target's 512-token context
        (demo_prompts[0], -3, None),
        (demo_prompts[0], None, math.nan),
        (demo_prompts[0], 10**7, None),
    ]
    table = pa.table(
        {
            "id": list(range(100, 100 + len(rows))),
            "prompt": [r[0] for r in rows],
            "max_new_tokens": pa.array([r[1] for r in rows], type=pa.int64()),
            "temperature": pa.array([r[2] for r in rows], type=pa.float64()),
            "source": [f"s{i}" for i in range(len(rows))],
        }
    )
    path = tmp_path_factory.mktemp("input") / "prompts.parquet"
    pq.write_table(table, path)
    return str(path)


def job_config(tiny_demo, input_path, output, **overrides) -> GenerateConfig:
    paths = demo_paths(tiny_demo)
    values = {
        "input": input_path,
        "output": str(output),
        "model": paths["target"],
        "draft": paths["draft"],
        "policy": paths["policy"],
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 4,
        "progress": False,
        "cache_name": f"cache-{os.getpid()}",
        "shared_cache": True,
    }
    return GenerateConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def job_result(local_ray, tiny_demo, mixed_input, tmp_path_factory):
    output = tmp_path_factory.mktemp("output")
    summary = run_generate(job_config(tiny_demo, mixed_input, output))
    return summary, pq.read_table(str(output)), output


def test_every_row_comes_back_once_with_its_columns(job_result, mixed_input):
    summary, table, _ = job_result
    source = pq.read_table(mixed_input)
    assert table.num_rows == source.num_rows == summary["rows_in"] == summary["rows_out"]
    assert sorted(table.column("id").to_pylist()) == source.column("id").to_pylist()
    by_id = {row["id"]: row for row in table.to_pylist()}
    for row in source.to_pylist():
        for name in source.column_names:
            assert by_id[row["id"]][name] == row[name] or (row[name] != row[name])  # NaN != NaN


def test_output_schema(job_result, mixed_input):
    _, table, _ = job_result
    for field in RESULT_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    # The input's columns, then the result columns; the plan columns never reach the output.
    assert table.column_names == [*pq.read_schema(mixed_input).names, *RESULT_SCHEMA.names]
    assert not set(PLAN_COLUMNS[1:]) & set(table.column_names)


def test_bad_rows_name_their_problem(job_result):
    _, table, _ = job_result
    errors = {row["id"]: row[ERROR_COLUMN] for row in table.to_pylist()}
    assert all(errors[i] is None for i in range(100, 105))
    expected = {
        105: "prompt is null",
        106: "prompt is empty",
        107: "whitespace",
        108: "context",
        109: "max_new_tokens must be >= 1",
        110: "temperature must be a finite number",
        111: "above the cap",
    }
    for row_id, text in expected.items():
        assert text in errors[row_id], (row_id, errors[row_id])
    rows = {row["id"]: row for row in table.to_pylist()}
    assert rows[105]["generated_text"] is None and rows[105]["num_generated_tokens"] is None


def test_greedy_rows_are_identical_to_plain_decoding(job_result, tiny_demo, demo_prompts):
    _, table, _ = job_result
    rows = {row["id"]: row for row in table.to_pylist()}
    paths = demo_paths(tiny_demo)
    model = EaModel.from_pretrained(base_model_path=paths["target"], ea_model_path=paths["draft"])
    tokenizer = model.get_tokenizer()
    for row_id, prompt, max_new_tokens in [
        (100, demo_prompts[0], MAX_NEW_TOKENS),
        (101, demo_prompts[1], 5),
        (102, demo_prompts[2], MAX_NEW_TOKENS),
    ]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        reference = model.naivegenerate(ids, max_new_tokens=max_new_tokens)[0, ids.shape[1] :]
        assert rows[row_id]["generated_text"] == tokenizer.decode(reference, skip_special_tokens=True)
        assert rows[row_id]["num_generated_tokens"] == len(reference)
        assert rows[row_id]["num_input_tokens"] == ids.shape[1]
        assert rows[row_id]["num_steps"] >= 1 and rows[row_id]["mean_accepted_tokens"] >= 1.0
        assert rows[row_id]["time_taken_llm"] > 0
        trees = rows[row_id]["tree_params"].split(",")
        assert sum(int(run.rsplit("x", 1)[1]) for run in trees) == rows[row_id]["num_steps"]


def test_summary_is_written_and_consistent(job_result):
    summary, table, output = job_result
    with open(os.path.join(output, STATS_NAME)) as f:
        written = json.load(f)
    assert written["rows_in"] == written["rows_out"] == table.num_rows
    assert written["rows_error"] == written["rows_error_in_output"] == 7
    assert written["rows_ok"] == 5
    assert written["generated_tokens"] == sum(
        v or 0 for v in table.column("num_generated_tokens").to_pylist()
    )
    assert written["num_actors"] == 1
    assert written["optimizer"]["generations"] + written["prompt_decisions"]["generations_served"] == 5
    assert written["prompt_decisions"]["lookups"] == 5


def test_rerun_of_a_finished_job_does_nothing_and_other_settings_need_overwrite(
    job_result, tiny_demo, mixed_input, capsys
):
    summary, table, output = job_result
    again = run_generate(job_config(tiny_demo, mixed_input, output))
    assert "nothing to do" in capsys.readouterr().out
    assert again["job_id"] == summary["job_id"]  # the finished run's summary, unchanged
    assert pq.read_table(str(output)).num_rows == table.num_rows
    with pytest.raises(ValueError, match=r"(?s)--max-new-tokens: \d+ before, 3 now.*--overwrite"):
        run_generate(job_config(tiny_demo, mixed_input, output, max_new_tokens=3))


def test_missing_prompt_column_stops_before_any_work(tmp_path, tiny_demo, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["hello"]}), path)
    paths = demo_paths(tiny_demo)
    argv = ["--input", str(path), "--output", str(tmp_path / "out"), "--model", paths["target"]]
    argv += ["--draft", paths["draft"], "--policy", "static"]
    with pytest.raises(SystemExit) as exited:
        generate.main(argv)
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "no prompt column 'prompt'" in message and "['id', 'text']" in message
    assert not (tmp_path / "out").exists()


def test_bad_option_stops_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        generate.main(["--max-new-tokens", "-1", "--output", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "--max-new-tokens: Input should be greater than 0" in capsys.readouterr().err


def test_jobs_read_each_others_cache_entries_only_when_given_one_namespace(
    local_ray, tiny_demo, demo_prompts, tmp_path
):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": demo_prompts[:3]}), path)

    def job(name: str, **overrides) -> dict:
        return run_generate(job_config(tiny_demo, str(path), tmp_path / name, max_new_tokens=4, **overrides))

    shared = f"shared-{os.getpid()}"
    # A handle held here keeps the shared actor alive between the jobs (it belongs to its creator).
    cache = get_or_create_context_cache(f"cache-{os.getpid()}", shared)
    first = job("a", namespace=shared)
    assert first["namespace"] == shared and first["prompt_decisions"]["published"] > 0
    # By default a job runs in a namespace of its own: it does not read the entries the first job published.
    alone = job("b")
    assert alone["namespace"] != shared and alone["prompt_decisions"]["shared_hits"] == 0
    again = job("c", namespace=shared)
    assert again["namespace"] == shared and again["prompt_decisions"]["shared_hits"] == 3
    ray.kill(cache)


def test_messages_rows_through_the_job_are_templated_and_checked(
    local_ray, tiny_demo, demo_prompts, tmp_path
):
    """A messages input on a target with a chat template: good rows equal plain greedy decoding of the templated
    ids, a malformed row names its problem, and the input's prompt column is not read."""
    import shutil

    import torch

    target = tmp_path / "target"
    shutil.copytree(demo_paths(tiny_demo)["target"], target)
    (target / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    conversations = [
        [{"role": "user", "content": demo_prompts[0]}],
        [{"role": "system", "content": "Write code."}, {"role": "user", "content": demo_prompts[1]}],
        [{"role": "narrator", "content": demo_prompts[2]}],
    ]
    kind = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"id": [1, 2, 3], "prompt": [None] * 3, "messages": pa.array(conversations, type=kind)})
    pq.write_table(table, tmp_path / "chat.parquet")
    input_path = str(tmp_path / "chat.parquet")
    run_generate(
        job_config(
            tiny_demo, input_path, tmp_path / "out", model=str(target), policy="static", shared_cache=False
        )
    )
    rows = {row["id"]: row for row in pq.read_table(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == [1, 2, 3]
    assert rows[3]["__inference_error__"].startswith("messages[0] has unknown role 'narrator'")
    model = EaModel.from_pretrained(base_model_path=str(target), ea_model_path=demo_paths(tiny_demo)["draft"])
    tokenizer = model.get_tokenizer()
    for row_id, messages in [(1, conversations[0]), (2, conversations[1])]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        new_ids = model.naivegenerate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS)[0, len(ids) :]
        assert rows[row_id]["__inference_error__"] is None
        assert rows[row_id]["num_input_tokens"] == len(ids)
        assert rows[row_id]["generated_text"] == tokenizer.decode(new_ids, skip_special_tokens=True)
