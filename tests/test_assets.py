"""The registry assets' readers: ShareGPT decoded record by record from a cut-off file, a split that depends on
the conversation id alone, and the example prompt sets (no held-out prompt from the train split)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from assets.sharegpt import Conversation, is_plain_english, iter_conversations, split_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cut_file(path, records: list[dict], cut_chars: int) -> None:
    text = json.dumps(records, indent=2)
    path.write_text(text[: len(text) - cut_chars])


def record(conversation_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": conversation_id, "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_a_cut_off_file_yields_every_complete_record(tmp_path):
    records = [record(f"c{i}_0", ("human", f"question {i}"), ("gpt", f"answer {i}")) for i in range(5)]
    path = tmp_path / "sharegpt.json"
    write_cut_file(path, records, cut_chars=40)  # the last record loses its end
    conversations = list(iter_conversations(str(path)))
    assert [c.id for c in conversations] == ["c0_0", "c1_0", "c2_0", "c3_0"]
    assert conversations[0].messages == (
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": "answer 0"},
    )


def test_malformed_records_are_skipped_not_fatal(tmp_path):
    records = [
        record("ok_0", ("human", "hi"), ("gpt", "hello")),
        record("bad_role_0", ("alien", "hi")),
        {"id": "no_turns_0", "conversations": []},
        {"conversations": [{"from": "human", "value": "no id"}]},
        record("ok_1", ("system", "be brief"), ("human", "hi")),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    assert [c.id for c in iter_conversations(str(path))] == ["ok_0", "ok_1"]
    assert (
        Conversation(
            "x", ({"role": "system", "content": "s"}, {"role": "user", "content": "u"})
        ).first_user_message
        == "u"
    )


def test_the_split_depends_on_the_conversation_alone(tmp_path):
    # the pieces of one long conversation (id_0, id_1, ...) fall on the same side
    assert {split_of(f"QWJhYvA_{i}") for i in range(6)} == {split_of("QWJhYvA_0")}
    splits = [split_of(f"conversation{i}_0") for i in range(2000)]
    assert 0.02 < splits.count("heldout") / len(splits) < 0.09  # about one in twenty
    records = [record(f"conversation{i}_0", ("human", f"q{i}")) for i in range(200)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    heldout = {c.id for c in iter_conversations(str(path), split="heldout")}
    train = {c.id for c in iter_conversations(str(path), split="train")}
    assert heldout and train and not heldout & train and len(heldout | train) == 200
    with pytest.raises(ValueError, match="split"):
        list(iter_conversations(str(path), split="test"))


def test_plain_english_filter():
    assert is_plain_english("Write a haiku about the sea.")
    assert not is_plain_english("用中文写一首关于大海的诗")
    assert not is_plain_english("")


@pytest.mark.parametrize("name", ["chat_prompts.parquet", "code_prompts.parquet"])
def test_the_committed_example_sets(name):
    path = os.path.join(REPO, "examples", name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is written by `python -m jobs.build_models --examples`")
    table = pq.read_table(path)
    assert table.column_names == ["id", "prompt", "source"]
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and table.num_rows > 100
    if name == "chat_prompts.parquet":
        # every chat prompt comes from a held-out conversation
        assert all(split_of(row_id.removeprefix("sharegpt-")) == "heldout" for row_id in ids)
