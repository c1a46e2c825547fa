"""Reading prompt Parquet files for the jobs: one place for column checks and tokenization."""

from __future__ import annotations

import os

import pyarrow.parquet as pq


def read_prompt_column(path: str, column: str = "prompt", limit: int | None = None) -> list[str]:
    """The `column` of a Parquet file as strings; a clear ValueError when the file or column is missing."""
    if not os.path.exists(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    table = pq.read_table(path)
    if column not in table.column_names:
        raise ValueError(f"{path!r} has no column {column!r}; available columns: {table.column_names}")
    values = table.column(column).to_pylist()
    prompts = [v for v in values if isinstance(v, str) and v.strip()]
    if not prompts:
        raise ValueError(f"{path!r} column {column!r} has no non-empty prompts")
    return prompts[:limit] if limit is not None else prompts


if __name__ == "__main__":
    from jobs import refuse_to_run

    refuse_to_run("jobs.prompts", "the entry points' Parquet prompt reader")
