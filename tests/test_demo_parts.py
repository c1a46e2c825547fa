"""Fast checks of the demo builders: corpus split, tokenizer round trips, prompt cutting, tiny target training."""

from __future__ import annotations

import dataclasses
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.corpus import Corpus, build_corpus, make_prompts, split_key, write_prompts_parquet
from demo.target import TINY_TARGET_CONFIG, target_preset, tokenize_corpus, train_target
from demo.tokenizer import train_tokenizer

ROUND_TRIP_TEXTS = [
    'def greet(name: str) -> str:\n\t"""Say hello."""\n\treturn f"héllo {name} — ünïcödé 日本語 🐍"\n',
    "  leading spaces , odd  punctuation .\r\nwindows line\n\n\ttrailing tab\t",
    "x",
]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(max_train_chars=200_000)


@pytest.fixture(scope="module")
def tokenizer(corpus: Corpus):
    return train_tokenizer((document.text for document in corpus.train_documents), vocab_size=512)


def test_split_is_by_module_and_deterministic(corpus: Corpus) -> None:
    full = build_corpus()
    heldout_keys = {split_key(document) for document in full.heldout_documents}
    train_keys = {split_key(document) for document in full.train_documents}
    assert heldout_keys and train_keys
    assert not heldout_keys & train_keys
    assert {document.kind for document in full.heldout_documents} == {"code", "prose"}
    # The held-out set does not depend on the cap or the seed.
    assert build_corpus(max_train_chars=50_000, seed=3).heldout_documents == full.heldout_documents
    assert corpus.heldout_documents == full.heldout_documents
    assert build_corpus(max_train_chars=200_000) == corpus
    assert sum(len(document.text) for document in corpus.train_documents) <= 200_000
    names = [document.name for document in full.train_documents]
    assert not any("/test/" in f"/{name}" or "/tests/" in f"/{name}" for name in names)


def test_tokenizer_round_trips_and_prepends_bos(tokenizer) -> None:
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.padding_side == "left"
    for text in ROUND_TRIP_TEXTS:
        input_ids = tokenizer(text).input_ids
        assert input_ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(input_ids, skip_special_tokens=True) == text
        assert tokenizer(text, add_special_tokens=False).input_ids == input_ids[1:]


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_prompts_come_from_heldout_documents(corpus: Corpus, tokenizer, tmp_path) -> None:
    rows = make_prompts(corpus.heldout_documents, tokenizer, num_prompts=30, seed=1)
    assert rows == make_prompts(corpus.heldout_documents, tokenizer, num_prompts=30, seed=1)
    assert len(rows) == 30
    assert len({row["id"] for row in rows}) == 30
    assert len({row["prompt"] for row in rows}) == 30
    assert sum(row["kind"] == "code" for row in rows) == 20
    for row in rows:
        assert set(row) == {"id", "prompt", "kind"}
        assert row["id"].startswith(f"{row['kind']}-")
        sources = [
            d.text for d in corpus.heldout_documents if d.kind == row["kind"] and row["prompt"] in d.text
        ]
        assert sources, row["id"]
        assert not any(row["prompt"] in document.text for document in corpus.train_documents)
        assert 40 <= len(tokenizer(row["prompt"], add_special_tokens=False).input_ids) <= 200
        assert not row["prompt"].endswith("\n")

    path = tmp_path / "prompts.parquet"
    write_prompts_parquet(rows, path)
    table = pq.read_table(path)
    assert table.column_names == ["id", "prompt", "kind"]
    assert all(str(field.type) == "string" for field in table.schema)
    assert table.to_pylist() == rows


def test_tiny_target_trains_saves_and_reloads(corpus: Corpus, tokenizer, tmp_path) -> None:
    train_ids = tokenize_corpus(corpus.train_documents, tokenizer)
    heldout_ids = tokenize_corpus(corpus.heldout_documents[:4], tokenizer)
    assert train_ids[0] == tokenizer.bos_token_id
    # A generous time budget: max_steps ends training, so the test does not depend on machine load.
    config = dataclasses.replace(
        TINY_TARGET_CONFIG, max_steps=20, time_budget_s=600.0, num_eval_windows=8, num_threads=1
    )
    report = train_target(train_ids, heldout_ids, tokenizer, config, tmp_path, progress=False)

    assert report.num_steps == 20
    assert report.final_train_loss < report.initial_train_loss
    assert math.isfinite(report.heldout_loss) and report.heldout_loss < math.log(config.vocab_size)
    assert 0.0 <= report.heldout_top1_accuracy <= 1.0
    assert report.num_parameters > 0 and report.tokens_per_second > 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 8
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.do_sample is False
    assert reloaded_tokenizer.padding_side == "left"
    encoded = reloaded_tokenizer("def f(x):\n", return_tensors="pt")
    assert encoded.input_ids[0, 0].item() == tokenizer.bos_token_id
    generated = model.generate(**encoded, max_new_tokens=5)
    assert generated.shape[1] == encoded.input_ids.shape[1] + 5 or generated[0, -1] == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32


def test_presets_and_config_validation() -> None:
    full = target_preset("full")
    assert full.num_hidden_layers == 12 and full.hidden_size // full.num_attention_heads == 64
    assert target_preset("tiny").num_hidden_layers >= 8
    with pytest.raises(ValueError, match="preset"):
        target_preset("huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TINY_TARGET_CONFIG, num_attention_heads=3)
