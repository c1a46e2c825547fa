"""Per-row `sampling_params` (the row stage's checks and defaults) and stop strings on a real tokenizer."""

from __future__ import annotations

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from actors.stops import StopStrings, first_stop
from common.columns import (
    ERROR_COLUMN,
    PLAN_SEED_COLUMN,
    PLAN_STOP_COLUMN,
    PLAN_TOP_K_COLUMN,
    PLAN_TOP_P_COLUMN,
)
from common.config import ProcessorConfig
from demo.build import demo_paths
from pipeline.rows import plan_row, validate_rows


def config(**overrides) -> ProcessorConfig:
    return ProcessorConfig(**{"model": "m", "draft": "d", "policy": "static", **overrides})


def test_defaults_come_from_the_config_and_a_row_overrides_each():
    job = config(max_new_tokens=20, temperature=0.5, top_p=0.9, top_k=7)
    plan = plan_row("hi", None, None, job, sampling_params=None)
    assert (plan.max_new_tokens, plan.temperature, plan.top_p, plan.top_k, plan.seed, plan.stop) == (
        20,
        0.5,
        0.9,
        7,
        None,
        (),
    )
    given = {"max_tokens": 3, "temperature": 0.0, "top_p": 0.5, "top_k": -1, "seed": 11, "stop": "\n\n"}
    plan = plan_row("hi", None, None, job, sampling_params=given)
    assert plan.error is None
    assert (plan.max_new_tokens, plan.temperature, plan.top_p, plan.top_k, plan.seed, plan.stop) == (
        3,
        0.0,
        0.5,
        0,  # -1 is "off", as vLLM spells it
        11,
        ("\n\n",),
    )
    # An Arrow struct reads back with every key of the column, null where a row left it out.
    plan = plan_row("hi", None, None, job, sampling_params=dict.fromkeys(given) | {"stop": ["a", "b", "a"]})
    assert plan.error is None and plan.max_new_tokens == 20 and plan.stop == ("a", "b")


@pytest.mark.parametrize(
    ("sampling_params", "problem"),
    [
        (
            "fast",
            "sampling_params must be a mapping of max_tokens, temperature, top_p, top_k, seed, stop, got str",
        ),
        ({"max_token": 3}, "sampling_params has unknown key(s) 'max_token'; allowed: max_tokens"),
        ({"max_tokens": 0}, "sampling_params.max_tokens must be >= 1, got 0"),
        ({"max_tokens": 2.5}, "sampling_params.max_tokens must be a whole number, got 2.5"),
        ({"max_tokens": 10**6}, "sampling_params.max_tokens 1000000 is above the cap of 4096"),
        ({"temperature": -1.0}, "sampling_params.temperature must be >= 0, got -1.0"),
        ({"temperature": "hot"}, "sampling_params.temperature must be a finite number, got 'hot'"),
        ({"top_p": 1.5}, "sampling_params.top_p must be a number in [0, 1] (0 or 1: off), got 1.5"),
        ({"top_k": True}, "sampling_params.top_k must be a whole number >= 0 (0 or -1: off), got True"),
        ({"seed": -5}, "sampling_params.seed must be a whole number in [0, 2**63), got -5"),
        ({"stop": [""]}, "sampling_params.stop holds an empty string"),
        ({"stop": 3}, "sampling_params.stop must be a string or a list of strings, got 3"),
        ({"stop": ["x"] * 17}, "sampling_params.stop holds 17 strings; at most 16"),
    ],
)
def test_a_bad_sampling_params_value_is_a_named_row_error(sampling_params, problem):
    plan = plan_row("hi", None, None, config(), sampling_params=sampling_params)
    assert plan.prompt is None and problem in plan.error


def test_a_row_column_and_its_sampling_params_must_agree():
    plan = plan_row("hi", 5, None, config(), sampling_params={"max_tokens": 3})
    assert "sampling_params.max_tokens 3 disagrees with the row's max_new_tokens column 5" in plan.error
    plan = plan_row("hi", 3, 0.5, config(), sampling_params={"max_tokens": 3, "temperature": 0.5})
    assert plan.error is None and (plan.max_new_tokens, plan.temperature) == (3, 0.5)


def test_every_problem_of_a_row_is_named_at_once():
    plan = plan_row("", None, None, config(), sampling_params={"max_tokens": -1, "top_p": 7})
    assert plan.error.split("; ") == [
        "prompt is empty",
        "sampling_params.max_tokens must be >= 1, got -1",
        "sampling_params.top_p must be a number in [0, 1] (0 or 1: off), got 7",
    ]


def test_validate_rows_writes_the_resolved_settings_of_a_struct_column():
    params = pa.array(
        [{"max_tokens": 2, "seed": 4, "stop": ["."]}, None, {"top_p": 9.0}],
        type=pa.struct(
            [
                ("max_tokens", pa.int64()),
                ("seed", pa.int64()),
                ("stop", pa.list_(pa.string())),
                ("top_p", pa.float64()),
            ]
        ),
    )
    table = pa.table({"prompt": ["a", "b", "c"], "sampling_params": params})
    validated = validate_rows(table, config(top_k=3))
    assert validated.column(ERROR_COLUMN).to_pylist()[:2] == [None, None]
    assert "top_p" in validated.column(ERROR_COLUMN).to_pylist()[2]
    assert validated.column(PLAN_SEED_COLUMN).to_pylist() == [4, None, None]
    assert validated.column(PLAN_STOP_COLUMN).to_pylist() == [["."], [], None]
    assert validated.column(PLAN_TOP_K_COLUMN).to_pylist() == [3, 3, None]
    assert validated.column(PLAN_TOP_P_COLUMN).to_pylist() == [1.0, 1.0, None]


def test_stop_strings_keep_the_fewest_tokens_that_hold_the_stop(tiny_demo):
    tokenizer = AutoTokenizer.from_pretrained(demo_paths(tiny_demo)["target"])
    ids = tokenizer("def f(x):\n    return x + 1\n").input_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stops = StopStrings(tokenizer, ("return", "never there"))
    keep = stops(ids)
    assert (
        keep is not None
        and "return" in stops.decode(ids[:keep])
        and "return" not in stops.decode(ids[: keep - 1])
    )
    assert stops.cut(stops.decode(ids[:keep])) == text[: text.index("return")]
    assert StopStrings(tokenizer, ("never there",))(ids) is None
    assert first_stop("a.b!c", (".", "!")) == 1 and first_stop("abc", ("x",)) is None
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(tokenizer, ("",))
