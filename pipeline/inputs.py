"""Find the input Parquet files and check their schema before any actor starts.

An input is a file, a folder (searched recursively for *.parquet) or a glob, on local disk or at any URI that
`pyarrow.fs.FileSystem.from_uri` understands (s3://, gs://, hdfs://, file://). Every problem here is fatal and
raised as `InputError` with a message that names the path or column: the job stops before any work. That
includes an input with neither the messages column nor the prompt column, a prompt column whose Arrow type can
never hold text (`check_prompt_type`) and a messages column whose type can never hold a list
(`check_messages_type`), which would otherwise make every row an error row. Row-level problems are not this
module's business (see `rows.py`).
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.columns import RESERVED_COLUMNS

GLOB_CHARACTERS = "*?["


class InputError(ValueError):
    """The input cannot be read as a prompt set (missing, unreadable, or without the prompt column)."""


@dataclass(frozen=True)
class InputFiles:
    """The resolved input: files on one filesystem, their common schema and their total row count."""

    filesystem: pafs.FileSystem
    paths: list[str]
    schema: pa.Schema
    num_rows: int


def split_uri(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it). Plain paths are local; 'scheme://...' goes through pyarrow."""
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise InputError(f"cannot open {location!r}: {error}") from error
    return pafs.LocalFileSystem(), posixpath.abspath(location)


def list_parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files a file, folder or glob names, sorted; InputError when there are none."""
    filesystem, path = split_uri(location)
    if any(character in path for character in GLOB_CHARACTERS):
        base = path
        while any(character in base for character in GLOB_CHARACTERS):
            base = posixpath.dirname(base)
        candidates = _files_under(filesystem, base, location)
        paths = [candidate for candidate in candidates if _glob_match(candidate, path)]
    else:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {location!r} does not exist")
        if info.type == pafs.FileType.File:
            paths = [path]
        else:
            paths = [p for p in _files_under(filesystem, path, location) if p.endswith(".parquet")]
    if not paths:
        raise InputError(f"input {location!r} matches no Parquet files")
    return filesystem, sorted(paths)


def _glob_match(path: str, pattern: str) -> bool:
    """Shell-style match where wildcards stay inside one path component ('a/*.parquet' is not 'a/b/c.parquet')."""
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, pattern_part)
        for part, pattern_part in zip(parts, pattern_parts, strict=True)
    )


def _files_under(filesystem: pafs.FileSystem, base: str, location: str) -> list[str]:
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as error:
        raise InputError(f"cannot list {location!r}: {error}") from error
    return [info.path for info in infos if info.type == pafs.FileType.File]


def is_text_type(kind: pa.DataType) -> bool:
    """Whether a column of this Arrow type reads as Python str values (or nulls): string, large_string,
    string_view, a dictionary of those, or null (a column with every row null)."""
    if pa.types.is_dictionary(kind):
        return is_text_type(kind.value_type)
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
        or pa.types.is_null(kind)
    )


def check_prompt_type(path: str, prompt_column: str, kind: pa.DataType) -> None:
    """InputError unless the prompt column can hold text. A null-typed column passes: each of its rows becomes an
    error row ("prompt is null"). Binary is refused too: its values are bytes, which no row could use as text."""
    if is_text_type(kind):
        return
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)
    hint = " (decode it to string first)" if is_binary else ""
    raise InputError(
        f"{path!r}: prompt column {prompt_column!r} has Arrow type {kind}, which cannot hold text; the job takes "
        f"string prompts{hint} (or choose another column with --prompt-column)"
    )


def check_messages_type(path: str, messages_column: str, kind: pa.DataType) -> None:
    """InputError unless the messages column is a list (of {role, content} structs, as Ray Data LLM takes) or
    null-typed; the items are checked row by row (`pipeline.rows.messages_error`)."""
    is_list = (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_fixed_size_list(kind)
        or pa.types.is_list_view(kind)
        or pa.types.is_large_list_view(kind)
    )
    if is_list or pa.types.is_null(kind):
        return
    raise InputError(
        f"{path!r}: messages column {messages_column!r} has Arrow type {kind}; the job takes a list of "
        "{role, content} structs there (or choose another column with --messages-column)"
    )


def check_prompt_source(
    path: str, schema: pa.Schema, prompt_column: str, messages_column: str | None
) -> None:
    """The rows' source: the messages column when `schema` has it (and messages_column is given), else the
    prompt column; InputError when it is missing or of a type that cannot hold prompts."""
    if messages_column is not None and messages_column in schema.names:
        check_messages_type(path, messages_column, schema.field(messages_column).type)
        return
    if prompt_column not in schema.names:
        also = "" if messages_column is None else f" and no messages column {messages_column!r}"
        options = "--prompt-column" if messages_column is None else "--prompt-column or --messages-column"
        raise InputError(
            f"{path!r} has no prompt column {prompt_column!r}{also}; available columns: {schema.names} "
            f"(choose one with {options})"
        )
    check_prompt_type(path, prompt_column, schema.field(prompt_column).type)


def resolve_input(location: str, prompt_column: str, messages_column: str | None = None) -> InputFiles:
    """Resolve and check the input: every file readable as Parquet, each with `messages_column` of a list type
    or else `prompt_column` of a text type (`check_prompt_source`; messages_column None: the prompt column
    only), none with a column the job writes (`common.columns.RESERVED_COLUMNS`). Reads only the files'
    footers."""
    filesystem, paths = list_parquet_files(location)
    schema: pa.Schema | None = None
    num_rows = 0
    for path in paths:
        try:
            metadata = pq.read_metadata(path, filesystem=filesystem)
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"cannot read {path!r} as Parquet: {error}") from error
        file_schema = metadata.schema.to_arrow_schema()
        check_prompt_source(path, file_schema, prompt_column, messages_column)
        clashes = [name for name in RESERVED_COLUMNS if name in file_schema.names]
        if clashes:
            raise InputError(
                f"{path!r} already has column(s) {clashes}, which the job writes; rename them in the input"
            )
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise InputError(
                f"{path!r} has a different schema from {paths[0]!r}:\n{file_schema}\nvs\n{schema}"
            )
        num_rows += metadata.num_rows
    assert schema is not None
    return InputFiles(filesystem, paths, schema, num_rows)
