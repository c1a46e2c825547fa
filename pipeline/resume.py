"""Resuming a job: the output folder itself records which rows are done.

Before any work a job writes `_job.json` into its output folder: the settings that decide each row's result
(`JOB_FINGERPRINT_FIELDS`) and where its row ids come from. Rerunning the same command with the same output
folder resumes: the ids of the rows in the result files already there are read back, and only rows whose id is
not among them are generated. A result file is complete or unreadable (Parquet writes its footer last), so a
file cut off by a killed driver cannot be read; it is deleted and its rows are done again. Other settings
(actors, batch size, the address) may change between runs; a fingerprint that differs stops the job before any
work, naming each setting with its recorded and its new value, unless `--overwrite` asks for a fresh start.
Locations compare by what they name, not how they are spelled (`canonical_location`): `../x/p.parquet`, its
absolute path, a path through a symlink and `file:///.../p.parquet` are one input.

Row ids: the input's id column, which must then be unique (checked before any work). Input without it gets one,
written under the id column's name: a 64-bit hash of the file's path and the row's position in it (Ray Data's
`include_row_hash`), the same on every read of the same files.

Done ids travel to the row-validation tasks as sorted 64-bit digests (`id_digests`): 8 bytes a row. Two ids
share a digest with probability ~n^2 / 2^65 (about 3e-8 for a million rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.config import GenerateConfig
from pipeline.inputs import InputError, InputFiles, split_uri

JOB_NAME = "_job.json"
ROW_HASH_COLUMN = "row_hash"  # Ray Data's name for the hash read_parquet(include_row_hash=True) adds
# The settings that decide a row's result; a resumed run must match them.
JOB_FINGERPRINT_FIELDS = (
    "input",
    "prompt_column",
    "messages_column",
    "chat_template",
    "id_column",
    "model",
    "draft",
    "policy",
    "tree",
    "max_new_tokens",
    "max_new_tokens_cap",
    "max_prompt_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
)
# Fingerprint fields that may name files or folders ("policy" may also be a keyword such as 'static').
LOCATION_FIELDS = ("input", "model", "draft", "policy")


@dataclass(frozen=True)
class ResumeState:
    """What a run starts from: its fingerprint, whether ids are generated, and the rows already done."""

    fingerprint: dict
    generate_ids: bool  # the input has no id column: ids are row hashes
    done_digests: np.ndarray  # [n] uint64, sorted: digests of the ids already in the output
    num_done: int
    deleted_files: list[str]


def id_digests(values: list) -> np.ndarray:
    """[n] uint64 digests of row ids, e.g. [17, "a"] -> two 64-bit numbers. Ids compare as text: 17 == "17"."""
    digests = [
        int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little")
        for value in values
    ]
    return np.asarray(digests, dtype=np.uint64)


def is_done(digests: np.ndarray, done_digests: np.ndarray) -> np.ndarray:
    """[n] bool: which of digests [n] are among done_digests [m] (sorted)."""
    if len(done_digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    positions = np.searchsorted(done_digests, digests)  # [n]
    positions = np.minimum(positions, len(done_digests) - 1)
    return done_digests[positions] == digests


def canonical_location(location: str) -> str:
    """One spelling for each local file or folder: plain paths and file:// URIs become absolute real paths
    ('../x/p.parquet' and 'file:///home/me/x/p.parquet' -> '/home/me/x/p.parquet', symlinks resolved; a glob's
    wildcards are kept). Other URIs (s3://, gs://...) are kept as given, less a trailing '/'."""
    if "://" in location and not location.startswith("file://"):
        return location.rstrip("/")
    _, path = split_uri(location)
    return os.path.realpath(path)


def _canonical_setting(name: str, value):
    """A fingerprint value in the form that compares: the input's location always; a model, draft or policy
    folder only when it exists here (a policy keyword, or a name that is no local folder, stays as it is)."""
    if name == "input" or (name in LOCATION_FIELDS and isinstance(value, str) and os.path.exists(value)):
        return canonical_location(value)
    return value


def job_fingerprint(config: GenerateConfig) -> dict:
    """The settings that decide each row's result, locations in canonical form (`canonical_location`)."""
    return {name: _canonical_setting(name, getattr(config, name)) for name in JOB_FINGERPRINT_FIELDS}


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """'--name: <recorded> before, <current> now' for each setting of `current` that `recorded` does not match.
    Recorded locations are put in canonical form too (an older record may hold them as given)."""
    lines = []
    for name, value in current.items():
        if name not in recorded and value == GenerateConfig.model_fields[name].default:
            continue  # a setting newer than the record, left at the default the older run had
        before = recorded.get(name)
        if isinstance(before, str):
            before = _canonical_setting(name, before)
        if before != value:
            lines.append(f"--{name.replace('_', '-')}: {before!r} before, {value!r} now")
    return lines


def check_unique_ids(inputs: InputFiles, id_column: str) -> None:
    """InputError when the input's id column has a null or a repeated value (reads only that column)."""
    values = []
    for path in inputs.paths:
        values.extend(pq.read_table(path, columns=[id_column], filesystem=inputs.filesystem)[0].to_pylist())
    if any(value is None for value in values):
        raise InputError(
            f"id column {id_column!r} has nulls; ids must be unique (or choose another --id-column)"
        )
    digests = id_digests(values)
    unique, counts = np.unique(digests, return_counts=True)
    if len(unique) != len(values):
        repeated = set(unique[counts > 1].tolist())
        example = next(
            value for value, digest in zip(values, digests.tolist(), strict=True) if digest in repeated
        )
        raise InputError(
            f"id column {id_column!r} repeats values (e.g. {example!r}); ids must be unique so that a resumed "
            "job knows which rows are done (choose a unique --id-column, or one the input lacks: then the job "
            "numbers the rows itself)"
        )


def plan_resume(
    config: GenerateConfig, inputs: InputFiles, filesystem: pafs.FileSystem, path: str
) -> ResumeState:
    """Check the output folder against this run and read back the ids already done there.

    The folder must exist (see `build.prepare_output`). It is fresh (no `_job.json`, no result files), or holds
    a run of the same fingerprint, which this run resumes; anything else is an InputError."""
    generate_ids = config.id_column not in inputs.schema.names
    if generate_ids and ROW_HASH_COLUMN in inputs.schema.names:
        raise InputError(
            f"the input has no id column {config.id_column!r} but has {ROW_HASH_COLUMN!r}, the name under which "
            "the job would compute row ids; pass --id-column to name a unique column"
        )
    if not generate_ids:
        check_unique_ids(inputs, config.id_column)
    fingerprint = job_fingerprint(config)
    result_files = list_result_files(filesystem, path)
    job_path = posixpath.join(path, JOB_NAME)
    if filesystem.get_file_info(job_path).type == pafs.FileType.File:
        with filesystem.open_input_stream(job_path) as stream:
            previous = json.loads(stream.read())
        differences = fingerprint_differences(previous.get("fingerprint", {}), fingerprint)
        if differences:
            raise InputError(
                f"output {config.output!r} holds a job with other settings, so it cannot be resumed:\n  "
                + "\n  ".join(differences)
                + "\npass --overwrite to start afresh, or choose another --output"
            )
    elif result_files:
        raise InputError(
            f"output {config.output!r} already holds {len(result_files)} result file(s) but no {JOB_NAME}; pass "
            "--overwrite to replace them, or choose another --output"
        )
    done: list = []
    deleted: list[str] = []
    for file in result_files:
        try:
            done.extend(pq.read_table(file, columns=[config.id_column], filesystem=filesystem)[0].to_pylist())
        except (OSError, pa.ArrowException):
            filesystem.delete_file(file)  # cut off mid-write: its rows are done again
            deleted.append(file)
    with filesystem.open_output_stream(job_path) as stream:
        record = {"fingerprint": fingerprint, "ids": "row_hash" if generate_ids else "column"}
        stream.write(json.dumps(record, indent=2).encode())
    return ResumeState(fingerprint, generate_ids, np.unique(id_digests(done)), len(done), deleted)


def list_result_files(filesystem: pafs.FileSystem, path: str) -> list[str]:
    return sorted(
        entry.path
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if entry.path.endswith(".parquet")
    )


def count_written_rows(location: str) -> int:
    """Rows in the output folder's complete result files: what a rerun finds done (a file cut off mid-write
    has no footer, cannot be read, and counts for nothing). Reads only the files' footers."""
    filesystem, path = split_uri(location)
    total = 0
    for file in list_result_files(filesystem, path):
        try:
            total += pq.read_metadata(file, filesystem=filesystem).num_rows
        except (OSError, pa.ArrowException):
            pass  # cut off, or still being written
    return total
