"""`build_processor` in a user's own Ray Data pipeline, on a local Ray with the tiny demo models: every row comes
back with the postprocess's columns, text equals the Parquet job's for the same messages rows (greedy, and sampled
with the same seed), per-row sampling_params are honoured (max_tokens, top_k, seed, stop), and bad rows carry
their error."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.generation import row_seed
from common.columns import ERROR_COLUMN, RESULT_SCHEMA
from common.config import GenerateConfig, ProcessorConfig
from demo.build import demo_paths
from pipeline.build import run_generate
from pipeline.checks import ModelCheckError
from pipeline.processor import build_processor

pytestmark = pytest.mark.starts_ray

# Ray's workers cannot import this test module, so its row functions travel by value (as a user's script's do).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_NEW_TOKENS = 10
NUM_GOOD = 4


@pytest.fixture(scope="module")
def config(local_ray, tiny_demo, templated_copy, tmp_path_factory) -> ProcessorConfig:
    """The demo target with a chat template, for messages rows."""
    paths = demo_paths(tiny_demo)
    return ProcessorConfig(
        model=templated_copy(tmp_path_factory.mktemp("processor") / "target"),
        draft=paths["draft"],
        policy="static",  # fixed trees: a seeded sample is then the same in every run
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=3,
    )


@pytest.fixture(scope="module")
def questions(tiny_demo) -> list[str]:
    return pq.read_table(demo_paths(tiny_demo)["prompts"]).column("prompt").to_pylist()[:NUM_GOOD]


SAMPLED_QID = 50  # the job's one sampled row (its temperature column), of questions[2]
SAMPLE_TEMPERATURE = 5.0


@pytest.fixture(scope="module")
def job_texts(config, questions, tmp_path_factory) -> dict[int, str]:
    """The Parquet job's text for each question as a messages row, greedy, and for SAMPLED_QID sampled with the
    job's seed stream for that id: qid -> generated_text."""
    folder = tmp_path_factory.mktemp("job")
    table = pa.table(
        {
            "qid": [*range(NUM_GOOD), SAMPLED_QID],
            "messages": [chat(question) for question in [*questions, questions[2]]],
            "temperature": [None] * NUM_GOOD + [SAMPLE_TEMPERATURE],
        }
    )
    pq.write_table(table, folder / "in.parquet")
    job = GenerateConfig(
        **{**config.model_dump(), "id_column": "qid"},
        input=str(folder / "in.parquet"),
        output=str(folder / "out"),
        progress=False,
    )
    summary = run_generate(job)
    assert summary["rows_ok"] == table.num_rows
    return {row["qid"]: row["generated_text"] for row in pq.read_table(folder / "out").to_pylist()}


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def preprocess(row: dict) -> dict:
    """The user's own shape in, eagleray's out: messages, and sampling_params when the row has them."""
    if row["question"] == "boom":
        raise KeyError("no such question")
    return {
        "qid": row["qid"],
        "messages": chat(row["question"]),
        "sampling_params": row["params"],
    }


def postprocess(row: dict) -> dict:
    return {
        "qid": row["qid"],
        "answer": row["generated_text"],
        "tokens": row["num_generated_tokens"],
        "finish": row["finish_reason"],
        "error": row[ERROR_COLUMN],
    }


@pytest.fixture(scope="module")
def processed(config, questions, job_texts) -> dict[int, dict]:
    """qid -> the processed row, for a dataset built in memory: the plain questions, then one row per
    sampling_params case. Row 18 is the job's sampled row, with its seed and a stop string from its text."""
    items = [{"qid": qid, "question": question, "params": None} for qid, question in enumerate(questions)]
    sample = job_texts[SAMPLED_QID]
    stops = [(i, c) for i, c in enumerate(sample) if i > 0 and c.strip() and c not in sample[:i]]
    assert stops, f"the sample {sample!r} has no character to stop at"
    stop_index, stop = stops[len(stops) // 2]
    seed = row_seed(config.seed, str(SAMPLED_QID))  # the job's stream for the row
    cases = [
        {"max_tokens": 3},
        {"temperature": 5.0, "top_k": 1},
        {"temperature": 5.0, "seed": 7},
        {"temperature": 5.0, "seed": 7},
        {"temperature": 5.0, "seed": 8},
        {"top_p": 2.0},
        {"max_token": 5},
        {"max_tokens": 0, "top_k": 1.5},
        {"temperature": SAMPLE_TEMPERATURE, "seed": seed, "stop": [stop]},
        {"temperature": SAMPLE_TEMPERATURE, "seed": seed},
    ]
    source = {10: 0, 11: 1, 12: 2, 13: 2, 14: 2, 15: 0, 16: 0, 17: 0, 18: 2, 19: 2}
    for offset, params in enumerate(cases):
        qid = 10 + offset
        items.append({"qid": qid, "question": questions[source[qid]], "params": params})
    items.append({"qid": 99, "question": "boom", "params": None})
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    dataset = processor(ray.data.from_items(items))
    rows = dataset.take_all()
    summary = processor.summary()
    processor.close()
    assert len(rows) == len(items)
    rows = {row["qid"]: row for row in rows}
    return {"rows": rows, "stop": (stop, sample[:stop_index]), "summary": summary}


def test_every_row_comes_back_with_the_postprocess_columns(processed):
    rows = processed["rows"]
    assert sorted(rows) == [*range(NUM_GOOD), *range(10, 20), 99]
    assert all(set(row) == {"qid", "answer", "tokens", "finish", "error"} for row in rows.values())
    assert processed["summary"]["rows_ok"] + processed["summary"]["rows_error"] == len(rows)


def test_greedy_text_is_the_jobs(processed, job_texts):
    rows = processed["rows"]
    for qid in range(NUM_GOOD):
        text = job_texts[qid]
        assert rows[qid]["error"] is None
        assert rows[qid]["answer"] == text


def test_max_tokens_and_top_k_are_honoured(processed, job_texts):
    rows = processed["rows"]
    assert rows[10]["error"] is None and 1 <= rows[10]["tokens"] <= 3
    assert job_texts[0].startswith(rows[10]["answer"])
    assert rows[11]["answer"] == job_texts[1]  # top_k 1 samples the greedy token at any temperature


def test_a_stop_string_ends_the_text_where_it_begins(processed, job_texts):
    """Row 19 is the job's sampled row again (its seed given): the same text. Row 18 adds a stop string from
    that text: the same text, cut where the stop begins."""
    rows = processed["rows"]
    assert rows[19]["error"] is None and rows[19]["answer"] == job_texts[SAMPLED_QID]
    stop, before = processed["stop"]
    assert rows[18]["error"] is None and rows[18]["finish"] == "stop"
    assert rows[18]["answer"] == before
    assert rows[18]["tokens"] < rows[19]["tokens"]


def test_a_rows_seed_decides_its_sample(processed):
    rows = processed["rows"]
    assert all(rows[qid]["error"] is None for qid in (12, 13, 14))
    assert rows[12]["answer"] == rows[13]["answer"]  # same seed, different rows: the same sample
    assert rows[12]["answer"] != rows[14]["answer"]


def test_bad_rows_carry_their_error(processed):
    rows = processed["rows"]
    assert "sampling_params.top_p must be a number in [0, 1]" in rows[15]["error"]
    assert "sampling_params has unknown key(s) 'max_token'" in rows[16]["error"]
    assert "sampling_params.max_tokens must be >= 1" in rows[17]["error"]
    assert "sampling_params.top_k must be a whole number" in rows[17]["error"]
    assert rows[99]["error"] == "preprocess raised KeyError: 'no such question'"
    assert all(rows[qid]["answer"] is None for qid in (15, 16, 17, 99))


def test_the_processor_refuses_what_it_cannot_use(config, tmp_path):
    with pytest.raises(TypeError, match="takes a ProcessorConfig"):
        build_processor({"model": "m"})
    with pytest.raises(TypeError, match="preprocess must be a function"):
        build_processor(config, preprocess="messages")
    with pytest.raises(TypeError, match="takes a ray.data.Dataset"):
        build_processor(config)([{"prompt": "hi"}])
    # Models that cannot work are refused before any actor starts.
    with pytest.raises(ModelCheckError, match="--model '/no/such/model' is not a folder"):
        build_processor(config.model_copy(update={"model": "/no/such/model"}))
    (tmp_path / "config.json").write_text('{"hidden_size": 7, "vocab_size": 11}')
    with pytest.raises(ModelCheckError, match="does not fit --model"):
        build_processor(config.model_copy(update={"draft": str(tmp_path)}))


def test_rows_that_already_have_a_result_column_stop_with_its_name(config):
    processor = build_processor(config)
    dataset = processor(ray.data.from_items([{"prompt": "hi", "generated_text": "earlier"}]))
    with pytest.raises(Exception, match="generated_text"):
        dataset.take_all()
    processor.close()
    assert processor.stats_collector is None
    processor.start()  # applied again after close(), a processor starts a collector of its own again
    assert processor.stats_collector is not None and processor.summary()["rows_ok"] == 0
    processor.close()


def test_without_stages_the_rows_keep_their_columns_and_gain_the_results(config, questions, job_texts):
    processor = build_processor(config)
    (row,) = processor(
        ray.data.from_items([{"qid": 7, "messages": chat(questions[0]), "tag": "t"}])
    ).take_all()
    processor.close()
    assert list(row) == ["qid", "messages", "tag", *RESULT_SCHEMA.names]
    assert row[ERROR_COLUMN] is None and row["generated_text"] == job_texts[0]
