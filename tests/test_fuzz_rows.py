"""Row validation on generated rows: property tests of `pipeline.rows`, and generated rows through the real job.

The properties are the module's contract: no row is dropped, reordered or changed; every value a Parquet column
can hold gives either a plan that carries the row's own values (nothing is clamped) or an error that names each
bad field, in the order prompt, max_new_tokens, temperature. The job test runs the same kinds of rows through
Ray Data and the tiny demo models and checks the same contract on the written output. Surrogates are left out of
the text because Arrow strings are UTF-8 and cannot hold them.
"""

from __future__ import annotations

import math
import operator
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from common.columns import (
    ERROR_COLUMN,
    OUTPUT_COLUMNS,
    PLAN_COLUMNS,
    PLAN_MAX_NEW_TOKENS_COLUMN,
    PLAN_TEMPERATURE_COLUMN,
)
from common.config import MAX_TEMPERATURE, GenerateConfig
from demo.build import demo_paths
from engine.ea_model import EaModel
from pipeline.build import run_generate
from pipeline.resume import id_digests
from pipeline.rows import (
    MAX_NEW_TOKENS_COLUMN,
    TEMPERATURE_COLUMN,
    RowPlan,
    plan_row,
    plan_rows,
    skip_done_batch,
    validate_batch,
    validate_rows,
)

pytestmark = pytest.mark.starts_ray

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
CHARACTERS = st.characters(exclude_categories=("Cs",))
# Characters str.strip() removes: a prompt of only these is blank. "\u200b" (zero-width space) is not one of them.
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2009\u2028\u2029\u202f\u3000"
BLANK_TEXT = st.text(st.sampled_from(WHITESPACE), max_size=8)  # "" included
PROMPTS = st.one_of(
    st.none(),
    st.text(CHARACTERS, max_size=40),
    BLANK_TEXT,
    st.builds(operator.add, BLANK_TEXT, st.text(CHARACTERS, min_size=1, max_size=20)),  # leading blanks stay
    st.builds(operator.mul, st.text(CHARACTERS, min_size=1, max_size=8), st.integers(1_000, 20_000)),  # long
)
# Prompt column types: (Arrow type, values). A prompt column that is not text makes every row an error row.
PROMPT_COLUMNS = {
    "string": (pa.string(), PROMPTS),
    "large_string": (pa.large_string(), PROMPTS),
    "int64": (pa.int64(), st.none() | st.integers(INT64_MIN, INT64_MAX)),
    "binary": (pa.binary(), st.none() | st.binary(max_size=12)),
    "null": (pa.null(), st.none()),
}
SPECIAL_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    0.5,
    1.5,
    1e300,
    -1e300,
    5e-324,
    MAX_TEMPERATURE,
    math.nextafter(MAX_TEMPERATURE, math.inf),
]


def parameter_values(kind: str, limit: int | float) -> st.SearchStrategy:
    """Values for a max_new_tokens / temperature column of Arrow type `kind`, dense around 0..limit."""
    near = st.integers(-3, int(limit) + 3)
    values = {
        "int64": st.integers(INT64_MIN, INT64_MAX) | near,
        "uint64": st.integers(0, UINT64_MAX) | st.integers(0, int(limit) + 3),
        "int8": st.integers(-128, 127),
        "float64": st.floats() | st.sampled_from(SPECIAL_FLOATS) | near.map(float) | st.floats(-3, limit + 3),
        "float32": st.floats(width=32) | st.floats(-3, limit + 3, width=32),
        "bool": st.booleans(),
        "string": st.text("0123456789.-+e naifNI", max_size=6),  # no ';', which separates an error's parts
        "null": st.nothing(),
    }[kind]
    return st.none() | values


PARAMETER_TYPES = {
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "int8": pa.int8(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "null": pa.null(),
}


@st.composite
def job_configs(draw) -> GenerateConfig:
    cap = draw(st.integers(1, 5_000))
    return GenerateConfig(
        input="in.parquet",
        output="out",
        model="target",
        draft="draft",
        policy="static",
        prompt_column=draw(st.sampled_from(["prompt", "question"])),
        max_new_tokens=draw(st.integers(1, cap)),
        max_new_tokens_cap=cap,
        temperature=draw(st.floats(0.0, MAX_TEMPERATURE)),
    )


@st.composite
def row_tables(draw) -> tuple[pa.Table, GenerateConfig]:
    """A table of 0-25 rows with a prompt column (of any type, or none), optional parameter columns of many
    types, an id and a free-text column, columns in any order, sometimes in two chunks; and a job config."""
    config = draw(job_configs())
    num_rows = draw(st.integers(0, 25))

    def column(values: st.SearchStrategy, arrow_type: pa.DataType) -> pa.Array:
        return pa.array(draw(st.lists(values, min_size=num_rows, max_size=num_rows)), type=arrow_type)

    columns = {"id": pa.array(range(num_rows), type=pa.int64())}
    prompt_kind = draw(st.sampled_from([*PROMPT_COLUMNS, "absent"]))
    if prompt_kind != "absent":
        columns[config.prompt_column] = column(PROMPT_COLUMNS[prompt_kind][1], PROMPT_COLUMNS[prompt_kind][0])
    for name, limit in (
        (MAX_NEW_TOKENS_COLUMN, config.max_new_tokens_cap),
        (TEMPERATURE_COLUMN, MAX_TEMPERATURE),
    ):
        kind = draw(st.sampled_from([*PARAMETER_TYPES, "absent"]))
        if kind != "absent":
            columns[name] = column(parameter_values(kind, limit), PARAMETER_TYPES[kind])
    columns["note"] = column(st.none() | st.text(CHARACTERS, max_size=10), pa.string())
    order = draw(st.permutations(list(columns)))
    table = pa.table({name: columns[name] for name in order})
    if num_rows > 1 and draw(st.booleans()):  # several chunks per column, as Ray Data's batches can have
        split = draw(st.integers(1, num_rows - 1))
        table = pa.concat_tables([table.slice(0, split), table.slice(split)])
    return table, config


# ---- the specification, written out independently of pipeline/rows.py -----------------------------------------


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bad_fields(prompt, max_new_tokens, temperature, config: GenerateConfig) -> list[str]:
    """The fields a row gets wrong, in the order its error must name them."""
    bad = []
    if not isinstance(prompt, str) or not prompt.strip():
        bad.append("prompt")
    if max_new_tokens is not None and not (
        is_number(max_new_tokens)
        and math.isfinite(max_new_tokens)
        and (isinstance(max_new_tokens, int) or max_new_tokens.is_integer())
        and 1 <= max_new_tokens <= config.max_new_tokens_cap
    ):
        bad.append("max_new_tokens")
    if temperature is not None and not (
        is_number(temperature) and math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE
    ):
        bad.append("temperature")
    return bad


def named_fields(error: str) -> list[str]:
    """The field each part of an error names: 'prompt is null; temperature ...' -> ['prompt', 'temperature']."""
    return [part.split(" ", 1)[0] for part in error.split("; ")]


def check_plan(plan: RowPlan, prompt, max_new_tokens, temperature, config: GenerateConfig) -> None:
    shown = prompt[:80] if isinstance(prompt, str) else prompt  # long prompts would flood a failure message
    row = (shown, max_new_tokens, temperature)
    bad = bad_fields(prompt, max_new_tokens, temperature, config)
    if bad:
        assert isinstance(plan.error, str) and plan.error, row
        assert named_fields(plan.error) == bad, (row, plan.error)
        assert plan.prompt is None, row
        return
    assert plan.error is None, (row, plan.error)
    assert plan.prompt == prompt, row  # the row's own text, not stripped
    want_tokens = config.max_new_tokens if max_new_tokens is None else max_new_tokens
    assert type(plan.max_new_tokens) is int and plan.max_new_tokens == want_tokens, (row, plan)
    assert 1 <= plan.max_new_tokens <= config.max_new_tokens_cap, (row, plan)
    want_temperature = config.temperature if temperature is None else temperature
    assert type(plan.temperature) is float and plan.temperature == want_temperature, (row, plan)
    assert math.isfinite(plan.temperature) and 0 <= plan.temperature <= MAX_TEMPERATURE, (row, plan)


def values(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def exact(column: pa.ChunkedArray) -> list[str]:
    """A column's values compared exactly: NaN equals NaN, -0.0 differs from 0.0, 1 from 1.0 and True."""
    return [repr(value) for value in column.to_pylist()]


def assert_same_rows(before: pa.Table, after: pa.Table) -> None:
    """`after` holds every column of `before`, of the same type, with the same values in the same order."""
    assert after.num_rows == before.num_rows
    for name in before.column_names:
        assert after.schema.field(name).type == before.schema.field(name).type, name
        assert exact(after.column(name)) == exact(before.column(name)), name


# ---- properties --------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(row_tables())
def test_validate_rows_keeps_every_row_and_names_every_problem(case):
    table, config = case
    validated = validate_rows(table, config)
    assert validated.column_names == [*table.column_names, *PLAN_COLUMNS]
    assert validated.schema.field(ERROR_COLUMN).type == pa.string()
    assert_same_rows(table, validated)
    plans = plan_rows(table, config)
    assert validated.column(ERROR_COLUMN).to_pylist() == [plan.error for plan in plans]
    # What the actor reads instead of planning again: the plan's values on a good row, null on an error row.
    good = [plan.error is None for plan in plans]
    assert validated.column(PLAN_MAX_NEW_TOKENS_COLUMN).to_pylist() == [
        plan.max_new_tokens if ok else None for plan, ok in zip(plans, good, strict=True)
    ]
    assert exact(validated.column(PLAN_TEMPERATURE_COLUMN)) == [
        repr(plan.temperature if ok else None) for plan, ok in zip(plans, good, strict=True)
    ]
    rows = zip(
        values(table, config.prompt_column),
        values(table, MAX_NEW_TOKENS_COLUMN),
        values(table, TEMPERATURE_COLUMN),
        plans,
        strict=True,
    )
    for prompt, max_new_tokens, temperature, plan in rows:
        check_plan(plan, prompt, max_new_tokens, temperature, config)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.sampled_from(SPECIAL_FLOATS),
    st.integers(-3, 110),
    st.integers(-3, 110).map(float),
    st.text(CHARACTERS, max_size=10),
    st.binary(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(PROMPTS, ANY_VALUE), ANY_VALUE, ANY_VALUE, job_configs())
def test_plan_row_on_any_python_values(prompt, max_new_tokens, temperature, config):
    """The values a row can hold once read (Arrow's to_pylist), and more: lists, dicts, bytes, 2**64."""
    check_plan(
        plan_row(prompt, max_new_tokens, temperature, config), prompt, max_new_tokens, temperature, config
    )


@pytest.mark.parametrize(
    ("max_new_tokens", "temperature", "field"),
    [(10**400, None, "max_new_tokens"), (None, 10**400, "temperature")],
)
def test_plan_row_on_an_int_beyond_float_range(max_new_tokens, temperature, field):
    config = GenerateConfig(input="in", output="out", model="m", draft="d", policy="static")
    plan = plan_row("hello", max_new_tokens, temperature, config)
    assert named_fields(plan.error) == [field]


@settings(max_examples=150, deadline=None)
@given(row_tables(), st.data())
def test_an_error_already_on_a_row_is_kept_and_validation_is_idempotent(case, data):
    """Validating rows again (rows that already carry plan columns) keeps earlier errors and changes nothing
    else."""
    table, config = case
    earlier = data.draw(
        st.lists(
            st.none() | st.text(CHARACTERS, min_size=1, max_size=20),
            min_size=table.num_rows,
            max_size=table.num_rows,
        )
    )
    with_errors = table.append_column(ERROR_COLUMN, pa.array(earlier, type=pa.string()))
    validated = validate_rows(with_errors, config)
    # The error column is replaced in place, not added twice; the other plan columns are appended.
    assert validated.column_names == [*with_errors.column_names, *PLAN_COLUMNS[1:]]
    assert_same_rows(table, validated)
    fresh = validate_rows(table, config).column(ERROR_COLUMN).to_pylist()
    want = [old if old is not None else new for old, new in zip(earlier, fresh, strict=True)]
    assert validated.column(ERROR_COLUMN).to_pylist() == want
    again = validate_rows(validated, config)
    assert_same_rows(validated, again)
    assert again.column_names == validated.column_names


@settings(max_examples=150, deadline=None)
@given(row_tables(), st.data())
def test_row_stage_leaves_out_only_finished_rows(case, data):
    """`skip_done_batch` (the job's read stage, config as a dict) then `validate_batch` (the processor's row
    stage): the rows whose id a previous run finished are left out; every other row comes back, in order,
    unchanged and validated."""
    table, config = case
    ids = table.column("id").to_pylist()
    done = data.draw(st.sets(st.sampled_from(ids)) if ids else st.just(set()))
    done_digests = np.sort(id_digests(sorted(done)))
    staged = validate_batch(
        skip_done_batch(table, config.model_dump(), done_digests, generate_ids=False), config.model_dump()
    )
    remaining = table.filter(pa.array([row_id not in done for row_id in ids], type=pa.bool_()))
    expected = validate_rows(remaining, config)
    assert staged.column_names == expected.column_names
    assert_same_rows(expected, staged)


# ---- generated rows through the real job ---------------------------------------------------------------------

E2E_MAX_NEW_TOKENS = 4
ASCII_PROMPTS = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30).filter(
    str.strip
)
UNICODE_PROMPTS = st.text(CHARACTERS, min_size=1, max_size=12).filter(str.strip)
GOOD_TOKENS = st.none() | st.integers(1, 6).map(float)
GREEDY = st.sampled_from([None, 0.0, -0.0])
BAD_TOKENS = st.sampled_from([0.0, -1.0, 2.5, math.nan, math.inf, 4097.0, 1e12])
BAD_TEMPERATURES = st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 100.5, 1e300])


@st.composite
def job_rows(draw) -> list[tuple]:
    """Twelve (prompt, max_new_tokens, temperature) rows in random order: six valid (greedy but one), six not."""
    rows = [
        (draw(ASCII_PROMPTS), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(ASCII_PROMPTS), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(UNICODE_PROMPTS), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(BLANK_TEXT) + draw(UNICODE_PROMPTS) + draw(BLANK_TEXT), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(UNICODE_PROMPTS), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(UNICODE_PROMPTS), draw(GOOD_TOKENS), draw(st.floats(0.1, 2.0))),  # sampled
        (None, draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(BLANK_TEXT), draw(GOOD_TOKENS), draw(GREEDY)),
        (draw(ASCII_PROMPTS), draw(BAD_TOKENS), draw(GREEDY)),
        (draw(UNICODE_PROMPTS), draw(GOOD_TOKENS), draw(BAD_TEMPERATURES)),
        (draw(ASCII_PROMPTS), draw(BAD_TOKENS), draw(BAD_TEMPERATURES)),
        (draw(BLANK_TEXT), draw(BAD_TOKENS), draw(BAD_TEMPERATURES)),
    ]
    return draw(st.permutations(rows))


def hypothesis_draws(strategy: st.SearchStrategy, count: int) -> list:
    """`count` values of `strategy` as Hypothesis generates them for a test: its simplest value first, then random
    ones. For the job below, which costs too much to run once per example: all the drawn rows go into one run."""
    drawn = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None)
    @given(strategy)
    def collect(value) -> None:
        drawn.append(value)

    collect()
    return drawn


@pytest.fixture(scope="module")
def reference_model(tiny_demo) -> EaModel:
    paths = demo_paths(tiny_demo)
    return EaModel.from_pretrained(base_model_path=paths["target"], ea_model_path=paths["draft"])


def test_generated_rows_through_the_job(local_ray, tiny_demo, reference_model, tmp_path):
    """Two draws of twelve rows (Hypothesis' simplest and a random one) in one job run: every row comes back once
    with its columns unchanged; bad rows name their problem, good greedy rows equal plain decoding."""
    rows = [row for draw in hypothesis_draws(job_rows(), 2) for row in draw]
    source = pa.table(
        {
            "id": pa.array(range(len(rows)), type=pa.int64()),
            "prompt": pa.array([row[0] for row in rows], type=pa.string()),
            MAX_NEW_TOKENS_COLUMN: pa.array([row[1] for row in rows], type=pa.float64()),
            TEMPERATURE_COLUMN: pa.array([row[2] for row in rows], type=pa.float64()),
        }
    )
    pq.write_table(source, tmp_path / "input.parquet")
    paths = demo_paths(tiny_demo)
    config = GenerateConfig(
        input=str(tmp_path / "input.parquet"),
        output=str(tmp_path / "output"),
        model=paths["target"],
        draft=paths["draft"],
        policy="static",
        max_new_tokens=E2E_MAX_NEW_TOKENS,
        batch_size=4,
        progress=False,
        overwrite=True,
        cache_name=f"fuzz-cache-{os.getpid()}",
    )
    summary = run_generate(config)
    output = pq.read_table(str(tmp_path / "output"))
    assert summary["rows_in"] == summary["rows_out"] == output.num_rows == len(rows)
    assert output.column_names[len(source.column_names) :] == list(OUTPUT_COLUMNS)  # no plan column leaks out
    assert sorted(output.column("id").to_pylist()) == source.column("id").to_pylist()
    by_id = {row["id"]: row for row in output.to_pylist()}
    tokenizer = reference_model.get_tokenizer()
    for row in source.to_pylist():
        result = by_id[row["id"]]
        for name in source.column_names:
            assert repr(result[name]) == repr(row[name]), (name, row, result)
        bad = bad_fields(row["prompt"], row[MAX_NEW_TOKENS_COLUMN], row[TEMPERATURE_COLUMN], config)
        if bad:
            assert result[ERROR_COLUMN] and named_fields(result[ERROR_COLUMN]) == bad, (row, result)
            assert result["generated_text"] is None and result["num_generated_tokens"] is None, (row, result)
            continue
        assert result[ERROR_COLUMN] is None, (row, result)
        assert result["generated_text"] is not None, (row, result)
        max_new_tokens = int(row[MAX_NEW_TOKENS_COLUMN] or E2E_MAX_NEW_TOKENS)
        assert 1 <= result["num_generated_tokens"] <= max_new_tokens, (row, result)
        if not row[TEMPERATURE_COLUMN]:  # greedy (None, 0.0 or -0.0): identical to plain decoding of this row
            input_ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
            reference = reference_model.naivegenerate(input_ids, max_new_tokens=max_new_tokens)
            expected = tokenizer.decode(reference[0, input_ids.shape[1] :], skip_special_tokens=True)
            assert result["generated_text"] == expected, (row, result)
            assert result["num_input_tokens"] == input_ids.shape[1], (row, result)
