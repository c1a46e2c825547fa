"""Row validation: decide, per row, what to generate or why not, once, before the generation actor.

A row is generated from its chat messages when the input has the messages column (`messages_column`), else
from its prompt; the choice is the input's, not the row's, so a null messages value is an error even when the
row has a prompt. A row is an error row, with `__inference_error__` naming the problem, when its prompt is
null, not a string, empty or whitespace; when its messages value is null, not a list, empty, or holds an item
that is not a {role, content} mapping, has no role or a role other than system, user or assistant, or has
content that is missing, not a string, empty or whitespace; when it has messages but the job runs without a
chat template; when its own `max_new_tokens` / `temperature` column holds a value that is negative,
NaN, infinite, not a number, or above the cap; or when its `sampling_params` (a mapping, as Ray Data LLM rows
carry it: max_tokens, temperature, top_p, top_k, seed, stop) is not a mapping, has a key not in SAMPLING_KEYS, a
value out of its range (`_sampling_values`), or a max_tokens / temperature that disagrees with the row's column
of the same meaning. Nothing is clamped. A null (a parameter column's, a sampling_params key's, or the whole
sampling_params) means "use the job's default". A prompt too long for the model's context is found later, by the actor, once it is tokenized.
`validate_rows` never drops a row: it returns exactly the rows it was given, in order, with the plan columns
(`common.columns.PLAN_SCHEMA`) that the actor reads instead of planning again; `validate_batch` is the
processor's row stage around it. `skip_done_batch` (the job's read stage) names the row ids and leaves out only
the rows a previous run of the job already wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.columns import (
    ERROR_COLUMN,
    OUTPUT_COLUMNS,
    PLAN_MAX_NEW_TOKENS_COLUMN,
    PLAN_SCHEMA,
    PLAN_SEED_COLUMN,
    PLAN_STOP_COLUMN,
    PLAN_TEMPERATURE_COLUMN,
    PLAN_TOP_K_COLUMN,
    PLAN_TOP_P_COLUMN,
    SAMPLING_PARAMS_COLUMN,
)
from common.config import MAX_TEMPERATURE, GenerateConfig, ProcessorConfig
from common.prompts import messages_error, prompt_error
from pipeline.resume import ROW_HASH_COLUMN, id_digests, is_done

MAX_NEW_TOKENS_COLUMN = "max_new_tokens"
TEMPERATURE_COLUMN = "temperature"
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RowPlan:
    """What to do with one row: generate `prompt` (its text, or its list of messages) with these settings, or
    report `error`. seed None: the row's stream comes from the job's seed and the row; stop: strings that end
    the generation (the text stops before the first one)."""

    prompt: str | list | None
    max_new_tokens: int
    temperature: float
    error: str | None = None
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """math.isfinite without its OverflowError for ints beyond float range (they are finite)."""
    return isinstance(value, int) or math.isfinite(value)


def _is_whole(value) -> bool:
    return _is_number(value) and _is_finite(value) and value == int(value)


def _max_new_tokens(value, config: ProcessorConfig, name: str = "max_new_tokens") -> tuple[int, str | None]:
    if value is None:
        return config.max_new_tokens, None
    if not _is_whole(value):
        return 0, f"{name} must be a whole number, got {value!r}"
    if value < 1:
        return 0, f"{name} must be >= 1, got {value!r}"
    if value > config.max_new_tokens_cap:
        return 0, f"{name} {value!r} is above the cap of {config.max_new_tokens_cap}"
    return int(value), None


def _temperature(value, config: ProcessorConfig, name: str = "temperature") -> tuple[float, str | None]:
    if value is None:
        return config.temperature, None
    if not _is_number(value) or not _is_finite(value):
        return 0.0, f"{name} must be a finite number, got {value!r}"
    if value < 0:
        return 0.0, f"{name} must be >= 0, got {value!r}"
    if value > MAX_TEMPERATURE:
        return 0.0, f"{name} {value!r} is above the cap of {MAX_TEMPERATURE}"
    return float(value), None


def _top_p(value) -> str | None:
    if value is None:
        return None
    if not _is_number(value) or not _is_finite(value) or not 0 <= value <= 1:
        return f"sampling_params.top_p must be a number in [0, 1] (0 or 1: off), got {value!r}"
    return None


def _top_k(value) -> str | None:
    if value is None:
        return None
    if not _is_whole(value) or value < -1:
        return f"sampling_params.top_k must be a whole number >= 0 (0 or -1: off), got {value!r}"
    return None


def _seed(value) -> str | None:
    if value is None:
        return None
    if not _is_whole(value) or not 0 <= value <= MAX_SEED:
        return f"sampling_params.seed must be a whole number in [0, 2**63), got {value!r}"
    return None


def _stop(value) -> tuple[tuple[str, ...], str | None]:
    """The stop strings of a `stop` value: one string or a list of them, each non-empty."""
    if value is None:
        return (), None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(stop, str) for stop in stops):
        return (), f"sampling_params.stop must be a string or a list of strings, got {value!r}"
    if not all(stops):
        return (), "sampling_params.stop holds an empty string, which would stop before the first token"
    if len(stops) > MAX_STOP_STRINGS:
        return (), f"sampling_params.stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}"
    return tuple(dict.fromkeys(stops)), None


def _sampling_values(sampling_params) -> tuple[dict, list[str]]:
    """(the keys a row's sampling_params sets, not null, and the problems with it). A null value sets nothing."""
    if sampling_params is None:
        return {}, []
    if not isinstance(sampling_params, Mapping):
        return {}, [
            f"sampling_params must be a mapping of {', '.join(SAMPLING_KEYS)}, got "
            f"{type(sampling_params).__name__}"
        ]
    given = {key: value for key, value in sampling_params.items() if value is not None}
    unknown = [key for key in given if key not in SAMPLING_KEYS]
    if unknown:
        return {}, [
            f"sampling_params has unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
            f"{', '.join(SAMPLING_KEYS)}"
        ]
    problems = [
        problem
        for problem in (_top_p(given.get("top_p")), _top_k(given.get("top_k")), _seed(given.get("seed")))
        if problem
    ]
    return given, problems


def _one_of(column_value, sampling_value, column: str, key: str) -> tuple[object, str | None]:
    """The value a row sets for one setting, in its column or in sampling_params; a problem when both are set
    and differ."""
    if sampling_value is None:
        return column_value, None
    if column_value is not None and column_value != sampling_value:
        return None, (
            f"sampling_params.{key} {sampling_value!r} disagrees with the row's {column} column "
            f"{column_value!r}; set one"
        )
    return sampling_value, None


def plan_row(
    prompt,
    max_new_tokens,
    temperature,
    config: ProcessorConfig,
    *,
    is_messages: bool = False,
    sampling_params=None,
) -> RowPlan:
    """Check one row's prompt (its messages when is_messages) and parameters: its max_new_tokens and
    temperature columns and its sampling_params (the values as Python objects, None for null)."""
    error = messages_error(prompt, config) if is_messages else prompt_error(prompt)
    given, problems = _sampling_values(sampling_params)
    max_new_tokens, tokens_clash = _one_of(
        max_new_tokens, given.get("max_tokens"), "max_new_tokens", "max_tokens"
    )
    temperature, temperature_clash = _one_of(
        temperature, given.get("temperature"), "temperature", "temperature"
    )
    tokens_name = "sampling_params.max_tokens" if "max_tokens" in given else "max_new_tokens"
    temperature_name = "sampling_params.temperature" if "temperature" in given else "temperature"
    tokens, tokens_error = (
        (0, tokens_clash) if tokens_clash else _max_new_tokens(max_new_tokens, config, tokens_name)
    )
    temp, temperature_error = (
        (0.0, temperature_clash) if temperature_clash else _temperature(temperature, config, temperature_name)
    )
    stop, stop_error = _stop(given.get("stop"))
    problems = [
        problem for problem in (error, tokens_error, temperature_error, *problems, stop_error) if problem
    ]
    if problems:
        return RowPlan(None, tokens, temp, "; ".join(problems))
    top_k = int(given.get("top_k", config.top_k))
    seed = given.get("seed")
    return RowPlan(
        prompt,
        tokens,
        temp,
        top_p=float(given.get("top_p", config.top_p)),
        top_k=max(top_k, 0),
        seed=None if seed is None else int(seed),
        stop=stop,
    )


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def plan_rows(table: pa.Table, config: ProcessorConfig) -> list[RowPlan]:
    """One RowPlan per row of `table`, in order, from its messages when the table has the messages column, else
    from its prompt. A row that already carries an error keeps it."""
    is_messages = config.messages_column in table.column_names
    prompts = _column(table, config.messages_column if is_messages else config.prompt_column)
    rows = zip(
        prompts,
        _column(table, MAX_NEW_TOKENS_COLUMN),
        _column(table, TEMPERATURE_COLUMN),
        _column(table, SAMPLING_PARAMS_COLUMN),
        _column(table, ERROR_COLUMN),
        strict=True,
    )
    plans = []
    for prompt, max_new_tokens, temperature, sampling_params, error in rows:
        plan = plan_row(
            prompt,
            max_new_tokens,
            temperature,
            config,
            is_messages=is_messages,
            sampling_params=sampling_params,
        )
        if error is not None:
            plan = RowPlan(None, plan.max_new_tokens, plan.temperature, error)
        plans.append(plan)
    return plans


def validate_rows(table: pa.Table, config: ProcessorConfig) -> pa.Table:
    """The same rows with the plan columns set: `__inference_error__` (null when the row is fine), and the
    resolved sampling settings (`common.columns.PLAN_SCHEMA`; null on an error row). A plan column the table
    already has is replaced in place; the others are appended."""
    plans = plan_rows(table, config)

    def resolved(value):
        return [None if plan.error is not None else value(plan) for plan in plans]

    columns = {
        ERROR_COLUMN: [plan.error for plan in plans],
        PLAN_MAX_NEW_TOKENS_COLUMN: resolved(lambda plan: plan.max_new_tokens),
        PLAN_TEMPERATURE_COLUMN: resolved(lambda plan: plan.temperature),
        PLAN_TOP_P_COLUMN: resolved(lambda plan: plan.top_p),
        PLAN_TOP_K_COLUMN: resolved(lambda plan: plan.top_k),
        PLAN_SEED_COLUMN: resolved(lambda plan: plan.seed),
        PLAN_STOP_COLUMN: resolved(lambda plan: list(plan.stop)),
    }
    for field in PLAN_SCHEMA:
        values = pa.array(columns[field.name], type=field.type)
        if field.name in table.column_names:
            table = table.set_column(table.column_names.index(field.name), field, values)
        else:
            table = table.append_column(field, values)
    return table


def validate_batch(table: pa.Table, config: dict) -> pa.Table:
    """The processor's row stage (Ray Data map_batches, the config as a dict): `validate_rows`.
    It lives here, not beside the processor, so that these workers import only pyarrow, numpy and pydantic, not
    the engine (torch). A ValueError when the rows already have a column that generation writes (the error column
    excepted: an error already on a row is kept)."""
    clashes = [name for name in OUTPUT_COLUMNS if name != ERROR_COLUMN and name in table.column_names]
    if clashes:
        raise ValueError(
            f"the rows already have column(s) {clashes}, which generation writes; rename or drop them first "
            "(e.g. in the preprocess)"
        )
    return validate_rows(table, ProcessorConfig.of(config))


def skip_done_batch(table: pa.Table, config: dict, done_digests: np.ndarray, generate_ids: bool) -> pa.Table:
    """The job's read stage (Ray Data map_batches, the config as a dict): name the row ids and leave out the
    rows a previous run of the job already finished.

    generate_ids: the input has no id column, so the row hashes Ray Data computed become the ids (see
    `pipeline.resume`). done_digests: sorted digests of the finished ids ([m] uint64, often empty)."""
    job = GenerateConfig(**config)
    if generate_ids:
        position = table.column_names.index(ROW_HASH_COLUMN)
        table = table.rename_columns(
            [job.id_column if i == position else name for i, name in enumerate(table.column_names)]
        )
    if len(done_digests):
        done = is_done(id_digests(table.column(job.id_column).to_pylist()), done_digests)  # [n] bool
        if done.any():
            table = table.filter(pa.array(~done))
    return table
