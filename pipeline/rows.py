"""Row validation: decide, per row, what to generate or why not, once, before the generation actor.

A row is generated from its chat messages when the input has the messages column (`messages_column`), else
from its prompt; the choice is the input's, not the row's, so a null messages value is an error even when the
row has a prompt. A row is an error row, with `__inference_error__` naming the problem, when its prompt is
null, not a string, empty or whitespace; when its messages value is null, not a list, empty, or holds an item
that is not a {role, content} mapping, has no role or a role other than system, user or assistant, or has
content that is missing, not a string, empty or whitespace; when it has messages but the job runs without a
chat template; or when its own `max_new_tokens` / `temperature` column holds a value that is negative,
NaN, infinite, not a number, or above the cap. Nothing is clamped. A null in a parameter column means "use the
job's default". A prompt too long for the model's context is found later, by the actor, once it is tokenized.
`validate_rows` never drops a row: it returns exactly the rows it was given, in order, with the plan columns
(`common.columns.PLAN_SCHEMA`) that the actor reads instead of planning again; `prepare_batch` (the pipeline's
row stage) leaves out only the rows a previous run of the job already wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from common.columns import ERROR_COLUMN, PLAN_MAX_NEW_TOKENS_COLUMN, PLAN_SCHEMA, PLAN_TEMPERATURE_COLUMN
from common.config import MAX_TEMPERATURE, GenerateConfig
from pipeline.resume import ROW_HASH_COLUMN, id_digests, is_done

MAX_NEW_TOKENS_COLUMN = "max_new_tokens"
TEMPERATURE_COLUMN = "temperature"
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowPlan:
    """What to do with one row: generate `prompt` (its text, or its list of messages) with these settings, or
    report `error`."""

    prompt: str | list | None
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


def prompt_error(prompt) -> str | None:
    """Why a prompt value cannot be generated, or None when it can."""
    if prompt is None:
        return "prompt is null"
    if not isinstance(prompt, str):
        return f"prompt must be text, got {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt is empty or whitespace" if prompt else "prompt is empty"
    return None


def messages_error(messages, config: GenerateConfig) -> str | None:
    """Why a messages value cannot be generated, or None when it can. A valid value is a non-empty list of
    mappings, each with a `role` in MESSAGE_ROLES and non-blank string `content` (other keys are ignored),
    e.g. [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]."""
    if not config.chat_template:
        return "messages need a chat template; the job runs with --no-chat-template (give prompts instead)"
    if messages is None:
        return "messages is null"
    if not isinstance(messages, list | tuple):
        return f"messages must be a list of {{role, content}} messages, got {type(messages).__name__}"
    if not messages:
        return "messages is empty"
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            return f"{where} must be a {{role, content}} mapping, got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return f"{where} has no role"
        if role not in MESSAGE_ROLES:
            return f"{where} has unknown role {role!r}; allowed: {', '.join(MESSAGE_ROLES)}"
        if content is None:
            return f"{where} has no content"
        if not isinstance(content, str):
            return f"{where} content must be text, got {type(content).__name__}"
        if not content.strip():
            return f"{where} content is empty or whitespace" if content else f"{where} content is empty"
    return None


def plan_row(
    prompt, max_new_tokens, temperature, config: GenerateConfig, *, is_messages: bool = False
) -> RowPlan:
    """Check one row's prompt (its messages when is_messages) and parameters (the values as Python objects,
    None for null)."""
    error = messages_error(prompt, config) if is_messages else prompt_error(prompt)
    tokens, tokens_error = _max_new_tokens(max_new_tokens, config)
    temp, temperature_error = _temperature(temperature, config)
    problems = [problem for problem in (error, tokens_error, temperature_error) if problem]
    if problems:
        return RowPlan(None, tokens, temp, "; ".join(problems))
    return RowPlan(prompt, tokens, temp)


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def plan_rows(table: pa.Table, config: GenerateConfig) -> list[RowPlan]:
    """One RowPlan per row of `table`, in order, from its messages when the table has the messages column, else
    from its prompt. A row that already carries an error keeps it."""
    is_messages = config.messages_column in table.column_names
    prompts = _column(table, config.messages_column if is_messages else config.prompt_column)
    tokens = _column(table, MAX_NEW_TOKENS_COLUMN)
    temperatures = _column(table, TEMPERATURE_COLUMN)
    errors = _column(table, ERROR_COLUMN)
    plans = []
    for prompt, max_new_tokens, temperature, error in zip(prompts, tokens, temperatures, errors, strict=True):
        plan = plan_row(prompt, max_new_tokens, temperature, config, is_messages=is_messages)
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
