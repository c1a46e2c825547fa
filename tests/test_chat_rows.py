"""Chat prompts in the job: messages rows checked by the row stage, prompts and messages rendered through the
tokenizer's chat template by the actor (raw text with --no-chat-template or without a template), the
template's end of turn stopping generation, and --model given as a Hugging Face id from the local cache.
No cluster: the actor is called as a plain class, as in tests/test_generation_actor.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from actors.generation import GenerationActor
from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from demo.build import demo_paths
from engine.chat import eos_token_ids
from jobs import generate
from pipeline.inputs import InputError, resolve_input
from pipeline.rows import plan_row, validate_rows

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
GOOD_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]


def config(**overrides) -> GenerateConfig:
    values = {"input": "in.parquet", "output": "out", "model": "m", "draft": "d", "policy": "static"}
    return GenerateConfig(**{**values, **overrides})


# ---- the row stage ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (None, "messages is null"),
        ("hello", "messages must be a list of {role, content} messages, got str"),
        ([], "messages is empty"),
        (["hello"], "messages[0] must be a {role, content} mapping, got str"),
        ([{"content": "hi"}], "messages[0] has no role"),
        ([{"role": None, "content": "hi"}], "messages[0] has no role"),
        (
            [{"role": "bot", "content": "hi"}],
            "messages[0] has unknown role 'bot'; allowed: system, user, assistant",
        ),
        ([{"role": "user"}], "messages[0] has no content"),
        ([{"role": "user", "content": 3}], "messages[0] content must be text, got int"),
        ([{"role": "user", "content": ""}], "messages[0] content is empty"),
        (
            [{"role": "user", "content": "hi"}, {"role": "user", "content": " \n"}],
            "messages[1] content is empty or",
        ),
    ],
)
def test_a_malformed_messages_value_is_an_error_naming_the_problem(messages, error):
    plan = plan_row(messages, None, None, config(), is_messages=True)
    assert plan.error is not None and plan.error.startswith(error)
    assert plan.prompt is None


def test_good_messages_are_planned_and_need_a_chat_template():
    plan = plan_row(GOOD_MESSAGES, 4, None, config(), is_messages=True)
    assert plan.error is None and plan.prompt == GOOD_MESSAGES and plan.max_new_tokens == 4
    refused = plan_row(GOOD_MESSAGES, None, None, config(chat_template=False), is_messages=True)
    assert refused.error.startswith("messages need a chat template; the job runs with --no-chat-template")


def test_the_messages_column_wins_over_the_prompt_column_and_no_row_is_dropped():
    rows = [GOOD_MESSAGES, None, [{"role": "user", "content": None}], [{"role": "critic", "content": "x"}]]
    table = pa.table(
        {"id": [1, 2, 3, 4], "prompt": ["a", "b", "c", "d"], "messages": pa.array(rows, type=MESSAGES_TYPE)}
    )
    errors = validate_rows(table, config()).column(ERROR_COLUMN).to_pylist()
    assert errors[0] is None
    assert errors[1] == "messages is null"  # the row's prompt is not a fallback: the input has messages
    assert errors[2] == "messages[0] has no content"
    assert errors[3].startswith("messages[0] has unknown role 'critic'")
    # Without the messages column the same config reads the prompts.
    assert validate_rows(table.drop_columns(["messages"]), config()).column(ERROR_COLUMN).null_count == 4


def test_the_messages_column_must_differ_from_the_others():
    with pytest.raises(ValidationError, match="prompt_column and messages_column are both 'text'"):
        config(prompt_column="text", messages_column="text")


def test_an_input_needs_messages_or_prompts_and_messages_of_a_list_type(tmp_path):
    path = tmp_path / "messages.parquet"
    pq.write_table(pa.table({"id": [1], "messages": pa.array([GOOD_MESSAGES], type=MESSAGES_TYPE)}), path)
    assert resolve_input(str(path), "prompt", "messages").num_rows == 1
    neither = tmp_path / "neither.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), neither)
    with pytest.raises(
        InputError, match=r"no prompt column 'prompt' and no messages column 'messages'.*'text'"
    ):
        resolve_input(str(neither), "prompt", "messages")
    as_text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"messages": ['[{"role": "user"}]'], "prompt": ["x"]}), as_text)
    with pytest.raises(InputError, match="messages column 'messages' has Arrow type string"):
        resolve_input(str(as_text), "prompt", "messages")


def test_the_eos_union():
    assert eos_token_ids(2, [2, 7], None) == (2, 7)
    assert eos_token_ids(None, None) == ()


# ---- the actor -------------------------------------------------------------------------------------------------


def actor_config(tiny_demo: str, model: str, **overrides) -> dict:
    paths = demo_paths(tiny_demo)
    values = {"model": model, "draft": paths["draft"], "max_new_tokens": 6, "shared_cache": False}
    return config(**{**values, **overrides}).model_dump()


def run_actor(job: dict, table: pa.Table) -> tuple[pa.Table, list]:
    """The actor's output for `table` (planned by the row stage) and the engine requests it made."""
    requests = []
    actor = GenerationActor(job, before_request=lambda index, request: requests.append(request))
    return actor(validate_rows(table, GenerateConfig(**job))), requests


@pytest.fixture(scope="module")
def templated_target(templated_copy, tmp_path_factory) -> str:
    return templated_copy(tmp_path_factory.mktemp("chat") / "target")


def test_a_prompt_becomes_one_templated_user_message_and_messages_are_templated(tiny_demo, templated_target):
    job = actor_config(tiny_demo, templated_target)
    out, requests = run_actor(job, pa.table({"id": [1], "prompt": ["def f(x):"]}))
    actor = GenerationActor(job)
    tokenizer = actor.tokenizer
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f(x):"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert requests[0].prompt_ids == list(expected)
    assert tokenizer.decode(requests[0].prompt_ids) == "<s>user\ndef f(x):</s><s>assistant\n"
    assert requests[0].eos_token_ids == (1,)  # the target's eos, which is also the tokenizer's
    assert out.column(ERROR_COLUMN).to_pylist() == [None]
    assert out.column("num_input_tokens").to_pylist() == [len(expected)]
    messages = pa.array([GOOD_MESSAGES], type=MESSAGES_TYPE)
    out, requests = run_actor(job, pa.table({"id": [2], "messages": messages}))
    expected = tokenizer.apply_chat_template(GOOD_MESSAGES, add_generation_prompt=True, return_dict=False)
    assert requests[0].prompt_ids == list(expected)
    text = out.column("generated_text").to_pylist()[0]
    assert text is not None and "<s>" not in text and "</s>" not in text


def test_no_chat_template_sends_raw_text_and_refuses_messages(tiny_demo, templated_target):
    job = actor_config(tiny_demo, templated_target, chat_template=False)
    out, requests = run_actor(job, pa.table({"id": [1], "prompt": ["def f(x):"]}))
    raw = GenerationActor(job).tokenizer("def f(x):").input_ids
    assert requests[0].prompt_ids == raw and requests[0].eos_token_ids is None
    out, requests = run_actor(
        job, pa.table({"id": [2], "messages": pa.array([GOOD_MESSAGES], type=MESSAGES_TYPE)})
    )
    assert requests == [] and "--no-chat-template" in out.column(ERROR_COLUMN).to_pylist()[0]


def test_a_tokenizer_without_a_template_takes_raw_prompts_and_makes_messages_rows_errors(tiny_demo):
    job = actor_config(tiny_demo, demo_paths(tiny_demo)["target"])
    out, requests = run_actor(job, pa.table({"id": [1], "prompt": ["def f(x):"]}))
    assert requests[0].prompt_ids == GenerationActor(job).tokenizer("def f(x):").input_ids
    assert requests[0].eos_token_ids is None  # the demo job's behaviour is unchanged
    rows = pa.array([GOOD_MESSAGES, [{"role": "user", "content": ""}]], type=MESSAGES_TYPE)
    out, requests = run_actor(job, pa.table({"id": [2, 3], "messages": rows}))
    errors = out.column(ERROR_COLUMN).to_pylist()
    assert (
        errors[0]
        == "messages need a chat template, and the tokenizer of --model has none (give prompts instead)"
    )
    assert errors[1] == "messages[0] content is empty"
    assert requests == [] and out.num_rows == 2


def test_the_generation_configs_end_of_turn_token_stops_generation(
    tiny_demo, templated_target, templated_copy, tmp_path
):
    """The token the target greedily emits first, listed as an eos in the generation config, ends the row there."""
    job = actor_config(tiny_demo, templated_target)
    actor = GenerationActor(job)
    _, prompt_ids, _ = actor.prompt_ids("def f(x):", is_messages=False)
    with torch.no_grad():
        first = int(actor.model.target.model(torch.tensor([prompt_ids])).logits[0, -1].argmax())
    stopping = templated_copy(tmp_path / "target", extra_eos=[first])
    out, requests = run_actor(
        actor_config(tiny_demo, stopping), pa.table({"id": [1], "prompt": ["def f(x):"]})
    )
    assert first in requests[0].eos_token_ids
    assert out.column("finish_reason").to_pylist() == ["stop"]
    assert out.column("num_generated_tokens").to_pylist() == [1]


# ---- --model as a Hugging Face id ------------------------------------------------------------------------------


def test_a_cached_model_id_resolves_to_its_snapshot_and_an_uncached_one_stops_the_job(
    tiny_demo, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-chat" / "snapshots" / "0123abcd"
    shutil.copytree(demo_paths(tiny_demo)["target"], snapshot)
    (cache / "models--org--tiny-chat" / "refs").mkdir()
    (cache / "models--org--tiny-chat" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    job = config(model="org/tiny-chat", draft=demo_paths(tiny_demo)["draft"])
    resolved = generate.check_model_folders(job)
    assert Path(resolved.model).resolve() == snapshot.resolve()
    assert generate.resolve_model(demo_paths(tiny_demo)["target"]) == demo_paths(tiny_demo)["target"]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), prompts)
    argv = ["--input", str(prompts), "--output", str(tmp_path / "out"), "--model", "org/not-cached"]
    argv += ["--draft", demo_paths(tiny_demo)["draft"], "--policy", "static"]
    with pytest.raises(SystemExit) as exited:
        generate.main(argv)
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert (
        "--model 'org/not-cached' is not a folder, nor a Hugging Face model id in the local cache" in message
    )
    assert "give --model a folder" in message and str(cache) in message
    assert not (tmp_path / "out").exists()
