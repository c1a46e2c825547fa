"""Row validation: decide, per row, what to generate or why not, once, before the generation actor.

A row is an error row, with `__inference_error__` naming the problem, when its prompt is null, not a string,
empty or whitespace, or when its own `max_new_tokens` / `temperature` column holds a value that is negative,
NaN, infinite, not a number, or above the cap. Nothing is clamped. A null in a parameter column means "use the
job's default". A prompt too long for the model's context is found later, by the actor, once it is tokenized.
`validate_rows` never drops a row: it returns exactly the rows it was given, in order, with the plan columns
(`common.columns.PLAN_SCHEMA`) that the actor reads instead of planning again; `prepare_batch` (the pipeline's
row stage) leaves out only the rows a previous run of the job already wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.columns import ERROR_COLUMN, PLAN_MAX_NEW_TOKENS_COLUMN, PLAN_SCHEMA, PLAN_TEMPERATURE_COLUMN
from common.config import MAX_TEMPERATURE, GenerateConfig
from pipeline.resume import ROW_HASH_COLUMN, id_digests, is_done

MAX_NEW_TOKENS_COLUMN = "max_new_tokens"
TEMPERATURE_COLUMN = "temperature"


@dataclass(frozen=True)
class RowPlan:
    """What to do with one row: generate `prompt` with these settings, or report `error`."""

    prompt: str | None
    max_new_tokens: int
    temperature: float
    error: str | None = None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """math.isfinite without its OverflowError for ints beyond float range (they are finite)."""
    return isinstance(value, int) or math.isfinite(value)


def _max_new_tokens(value, config: GenerateConfig) -> tuple[int, str | None]:
    if value is None:
        return config.max_new_tokens, None
    if not _is_number(value) or not _is_finite(value) or value != int(value):
        return 0, f"max_new_tokens must be a whole number, got {value!r}"
    if value < 1:
        return 0, f"max_new_tokens must be >= 1, got {value!r}"
    if value > config.max_new_tokens_cap:
        return 0, f"max_new_tokens {value!r} is above the cap of {config.max_new_tokens_cap}"
    return int(value), None


def _temperature(value, config: GenerateConfig) -> tuple[float, str | None]:
    if value is None:
        return config.temperature, None
    if not _is_number(value) or not _is_finite(value):
        return 0.0, f"temperature must be a finite number, got {value!r}"
    if value < 0:
        return 0.0, f"temperature must be >= 0, got {value!r}"
    if value > MAX_TEMPERATURE:
        return 0.0, f"temperature {value!r} is above the cap of {MAX_TEMPERATURE}"
    return float(value), None


def plan_row(prompt, max_new_tokens, temperature, config: GenerateConfig) -> RowPlan:
    """Check one row's prompt and parameters (the values as Python objects, None for null)."""
    if prompt is None:
        error = "prompt is null"
    elif not isinstance(prompt, str):
        error = f"prompt must be text, got {type(prompt).__name__}"
    elif not prompt.strip():
        error = "prompt is empty or whitespace" if prompt else "prompt is empty"
    else:
        error = None
    tokens, tokens_error = _max_new_tokens(max_new_tokens, config)
    temp, temperature_error = _temperature(temperature, config)
    problems = [problem for problem in (error, tokens_error, temperature_error) if problem]
    if problems:
        return RowPlan(None, tokens, temp, "; ".join(problems))
    return RowPlan(prompt, tokens, temp)


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def plan_rows(table: pa.Table, config: GenerateConfig) -> list[RowPlan]:
    """One RowPlan per row of `table`, in order. A row that already carries an error keeps it."""
    prompts = _column(table, config.prompt_column)
    tokens = _column(table, MAX_NEW_TOKENS_COLUMN)
    temperatures = _column(table, TEMPERATURE_COLUMN)
    errors = _column(table, ERROR_COLUMN)
    plans = []
    for prompt, max_new_tokens, temperature, error in zip(prompts, tokens, temperatures, errors, strict=True):
        plan = plan_row(prompt, max_new_tokens, temperature, config)
        if error is not None:
            plan = RowPlan(None, plan.max_new_tokens, plan.temperature, error)
        plans.append(plan)
    return plans


def validate_rows(table: pa.Table, config: GenerateConfig) -> pa.Table:
    """The same rows with the plan columns set: `__inference_error__` (null when the row is fine), and the
    resolved `__max_new_tokens__` / `__temperature__` (null on an error row). A plan column the table already
    has is replaced in place; the others are appended."""
    plans = plan_rows(table, config)
    columns = {
        ERROR_COLUMN: [plan.error for plan in plans],
        PLAN_MAX_NEW_TOKENS_COLUMN: [
            None if plan.error is not None else plan.max_new_tokens for plan in plans
        ],
        PLAN_TEMPERATURE_COLUMN: [None if plan.error is not None else plan.temperature for plan in plans],
    }
    for field in PLAN_SCHEMA:
        values = pa.array(columns[field.name], type=field.type)
        if field.name in table.column_names:
            table = table.set_column(table.column_names.index(field.name), field, values)
        else:
            table = table.append_column(field, values)
    return table


def prepare_batch(table: pa.Table, config: dict, done_digests: np.ndarray, generate_ids: bool) -> pa.Table:
    """The pipeline's row stage (Ray Data map_batches, the config as a dict): name the row ids, skip the rows a
    previous run of the job already finished, and validate the rest (`validate_rows`).

    generate_ids: the input has no id column, so the row hashes Ray Data computed become the ids (see
    `pipeline.resume`). done_digests: sorted digests of the finished ids ([m] uint64, often empty).
    It lives here, not beside the pipeline, so that these workers import only pyarrow, numpy and pydantic,
    not the engine (torch)."""
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
    return validate_rows(table, job)
