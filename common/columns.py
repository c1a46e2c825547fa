"""The columns the job adds to every row, and the per-row values the row stage hands the generation actor.

`RESULT_SCHEMA` is the one definition of the output columns: their names (`OUTPUT_COLUMNS`), their order and
their Arrow types. An input that already has one of the `RESERVED_COLUMNS` is refused before any work starts, so
that no input column is overwritten.

`PLAN_SCHEMA` holds what the row stage (`pipeline.rows.validate_rows`) resolved for each row and the actor reads:
the row's error (null when the row is to be generated) and its sampling settings: max_new_tokens, temperature,
top_p, top_k (the row's own values or the job's defaults), its seed (null: derived from the job's seed and the
row) and its stop strings (an empty list: none); null on an error row. The actor replaces these columns with the result columns,
so they never reach the output, except for the error column, which is both.
"""

from __future__ import annotations

import pyarrow as pa

ERROR_COLUMN = "__inference_error__"
PLAN_MAX_NEW_TOKENS_COLUMN = "__max_new_tokens__"
PLAN_TEMPERATURE_COLUMN = "__temperature__"
PLAN_TOP_P_COLUMN = "__top_p__"
PLAN_TOP_K_COLUMN = "__top_k__"
PLAN_SEED_COLUMN = "__seed__"
PLAN_STOP_COLUMN = "__stop__"
# The per-row struct of sampling settings, as Ray Data LLM rows carry it (`pipeline.rows.SAMPLING_KEYS`).
SAMPLING_PARAMS_COLUMN = "sampling_params"

RESULT_SCHEMA = pa.schema(
    [
        ("generated_text", pa.string()),
        ("num_input_tokens", pa.int64()),
        ("num_generated_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("num_steps", pa.int64()),
        ("mean_accepted_tokens", pa.float64()),
        ("time_taken_llm", pa.float64()),
        ("tree_params", pa.string()),
        (ERROR_COLUMN, pa.string()),
    ]
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)

# The engine's GenerationOutput.finish_reason -> the finish_reason column.
# "stop" is a row's stop string (`actors.stops`).
FINISH_REASONS: dict[str, str] = {"eos": "stop", "stop": "stop", "length": "length", "context": "context"}
# The finish_reason column's values, once each.
FINISH_REASON_VALUES: tuple[str, ...] = tuple(dict.fromkeys(FINISH_REASONS.values()))

PLAN_SCHEMA = pa.schema(
    [
        (ERROR_COLUMN, pa.string()),
        (PLAN_MAX_NEW_TOKENS_COLUMN, pa.int64()),
        (PLAN_TEMPERATURE_COLUMN, pa.float64()),
        (PLAN_TOP_P_COLUMN, pa.float64()),
        (PLAN_TOP_K_COLUMN, pa.int64()),
        (PLAN_SEED_COLUMN, pa.int64()),
        (PLAN_STOP_COLUMN, pa.list_(pa.string())),
    ]
)
PLAN_COLUMNS: tuple[str, ...] = tuple(PLAN_SCHEMA.names)

RESERVED_COLUMNS: tuple[str, ...] = OUTPUT_COLUMNS + tuple(
    name for name in PLAN_COLUMNS if name not in OUTPUT_COLUMNS
)
