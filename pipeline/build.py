"""The job's Ray Data dataflow and one job run.

    read_parquet -> ids, skip done (tasks) -> the processor (`pipeline.processor`: validate rows, generate)
      -> write_parquet

`build_pipeline` wires the dataset; `run_generate` checks the input and output first (fatal problems stop the job
before any actor starts), works out what an earlier run of the same job already wrote (`pipeline.resume`),
connects to or starts Ray, starts the processor (the job's stats collector, and the shared cache actor only with
`shared_cache`), executes the pipeline, then collects every actor's stats into one summary, printed and written
to `<output>/_stats.json`.

Faults: Ray Data restarts a generation actor that dies and retries its batch (max_restarts=-1 and
max_task_retries=-1 are its defaults for actor pools); the stats collector restarts from the reports it saved in
`<output>/_actor_stats.json`; the cache actor restarts from its snapshot in `<output>/_context_cache/` while
the generation actors carry on with local caches; a killed driver leaves complete result files (and at most
one unreadable one per write in flight), from which a rerun resumes.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import DataContext, Dataset

from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from pipeline.inputs import InputError, InputFiles, resolve_input, split_uri
from pipeline.lock import hold_output_lock
from pipeline.processor import Processor
from pipeline.quiet import absorb_actor_restart_warning, draws_bars
from pipeline.resources import IO_CPU_RESERVE, IO_TASK_CPUS
from pipeline.resume import JOB_NAME, ResumeState, list_result_files, plan_resume
from pipeline.rows import skip_done_batch
from pipeline.summary import format_summary

STATS_NAME = "_stats.json"
ACTOR_STATS_NAME = "_actor_stats.json"
CACHE_SNAPSHOT_NAME = "_context_cache"
CACHE_SNAPSHOT_INTERVAL_S = 30.0
MAX_READ_BLOCKS = 2000
ROWS_PER_FILE_BATCHES = 4  # result files of about four batches: they stream out early, and not one per batch


def num_read_blocks(num_rows: int, config: GenerateConfig) -> int:
    """Blocks of about one batch, at least two per actor, and at most MAX_READ_BLOCKS. A block goes to one actor
    call whole, and a call works through its block's batches one after the other; an actor that starts first
    takes a few calls before the others are up, so blocks of several batches would leave the others idle and
    keep each actor on one batch at a time."""
    wanted = math.ceil(num_rows / config.batch_size)
    return max(1, min(MAX_READ_BLOCKS, max(wanted, 2 * config.num_actors)))


def build_pipeline(
    config: GenerateConfig, inputs: InputFiles, resume: ResumeState, processor: Processor
) -> Dataset:
    """The dataset that, when written, generates every input row not already done (`resume`)."""
    context = DataContext.get_current()
    # No bar while the dataset is created outside a terminal (its Parquet sampling bar would be \r fragments);
    # the run itself shows progress either way: bars in a terminal, log lines elsewhere (`pipeline.quiet`).
    context.enable_progress_bars = config.progress and draws_bars()
    context.enable_operator_progress_bars = config.progress
    # Ray 2.60's new Parquet reader lists files in a task that always asks for a whole CPU, which a small
    # cluster whose CPUs the actors hold can never grant (the job then waits forever). The files are already
    # listed here, so use the reader that takes them as given, with light read tasks.
    context.use_datasource_v2 = False
    config_dict = config.model_dump()
    dataset = ray.data.read_parquet(
        inputs.paths,
        filesystem=inputs.filesystem,
        num_cpus=IO_TASK_CPUS,
        override_num_blocks=num_read_blocks(inputs.num_rows, config),
        include_row_hash=resume.generate_ids,
    )
    dataset.context.enable_progress_bars = config.progress  # the context the run uses, shared downstream
    dataset = dataset.map_batches(
        skip_done_batch,
        fn_kwargs={
            "config": config_dict,
            "done_digests": resume.done_digests,
            "generate_ids": resume.generate_ids,
        },
        batch_format="pyarrow",
        num_cpus=IO_TASK_CPUS,
    )
    return processor(dataset)


def prepare_output(location: str, overwrite: bool) -> tuple[pafs.FileSystem, str]:
    """The output folder, created if needed. With `overwrite`, everything an earlier job left there (results,
    _job.json, _stats.json, _actor_stats.json, the cache snapshots) is deleted first; without it,
    `resume.plan_resume` decides."""
    filesystem, path = split_uri(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError(f"output {location!r} is a file; give a folder")
    if info.type == pafs.FileType.Directory and overwrite:
        for file in list_result_files(filesystem, path):
            filesystem.delete_file(file)
        for name in (STATS_NAME, ACTOR_STATS_NAME, JOB_NAME):
            if filesystem.get_file_info(posixpath.join(path, name)).type == pafs.FileType.File:
                filesystem.delete_file(posixpath.join(path, name))
        cache_path = posixpath.join(path, CACHE_SNAPSHOT_NAME)
        if filesystem.get_file_info(cache_path).type == pafs.FileType.Directory:
            filesystem.delete_dir(cache_path)
    filesystem.create_dir(path, recursive=True)
    return filesystem, path


@dataclass(frozen=True)
class OutputCount:
    """What the output folder holds, read back from its files."""

    rows: int
    error_rows: int
    unique_ids: int

    @property
    def duplicate_rows(self) -> int:
        return self.rows - self.unique_ids


def count_output(filesystem: pafs.FileSystem, path: str, id_column: str) -> OutputCount:
    """Rows, error rows and distinct ids in the written output (ids compared as text)."""
    rows = errors = 0
    ids: set[str] = set()
    for file in list_result_files(filesystem, path):
        table = pq.read_table(file, columns=[id_column, ERROR_COLUMN], filesystem=filesystem)
        rows += table.num_rows
        errors += table.num_rows - table.column(ERROR_COLUMN).null_count
        ids.update(str(value) for value in table.column(id_column).to_pylist())
    return OutputCount(rows, errors, len(ids))


def read_stats(filesystem: pafs.FileSystem, output_path: str) -> dict:
    """The summary an earlier run wrote to <output>/_stats.json ({} if there is none)."""
    path = posixpath.join(output_path, STATS_NAME)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return {}
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def local_output_path(filesystem: pafs.FileSystem, output_path: str, name: str) -> str | None:
    """Where an actor keeps what it saves (the cache's snapshots, the collected stats): beside the results when
    they are on a local (or mounted) disk; None for other filesystems (the actor then keeps it in memory)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return posixpath.join(output_path, name)
    return None


def run_generate(config: GenerateConfig, **actor_kwargs) -> dict:
    """Run one job end to end, or resume it, and return its summary (also printed and written to
    <output>/_stats.json). The output folder's lock (`pipeline.lock`) keeps a second driver out meanwhile."""
    # Fatal problems surface before Ray starts.
    inputs = resolve_input(config.input, config.prompt_column, config.messages_column)
    with hold_output_lock(config.output):
        return _run_locked(config, inputs, **actor_kwargs)


def _run_locked(config: GenerateConfig, inputs: InputFiles, **actor_kwargs) -> dict:
    """`run_generate` once this driver holds the output folder's lock."""
    filesystem, output_path = prepare_output(config.output, config.overwrite)
    resume = plan_resume(config, inputs, filesystem, output_path)
    if resume.num_done >= inputs.num_rows:
        print(
            f"eagleray: all {inputs.num_rows} rows are already in {config.output}; nothing to do (--overwrite "
            "generates them again)"
        )
        return read_stats(filesystem, output_path)
    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=True)
    absorb_actor_restart_warning()  # Ray Data's actor pool would log a harmless error (`pipeline.quiet`)
    job_id = f"{config.job_name}-{uuid.uuid4().hex[:8]}"
    processor = Processor(
        config,
        run_id=job_id,
        stats_path=local_output_path(filesystem, output_path, ACTOR_STATS_NAME),
        cache_snapshot_path=local_output_path(filesystem, output_path, CACHE_SNAPSHOT_NAME),
        cache_snapshot_interval_s=CACHE_SNAPSHOT_INTERVAL_S,
        cpu_reserve=IO_CPU_RESERVE,  # the job's own read, validate and write tasks are light
        **actor_kwargs,
    )
    resources = processor.start()
    print(
        f"eagleray: {inputs.num_rows} rows from {len(inputs.paths)} file(s) -> {config.output}"
        + (f" ({resume.num_done} already done there, resuming)" if resume.num_done else "")
        + f"; {config.num_actors} actor(s) x {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU; "
        f"{config.tree_choice}; cross-request drafts {'on' if config.cross_request_drafts else 'off'}; shared cache "
        f"{'on' if config.shared_cache else 'off'}; job {job_id}"
    )
    for file in resume.deleted_files:
        print(f"eagleray: deleted {file}, cut off by an earlier run; its rows are generated again")
    started = time.perf_counter()
    started_at = time.time()
    dataset = build_pipeline(config, inputs, resume, processor)
    dataset.write_parquet(
        output_path,
        filesystem=filesystem,
        min_rows_per_file=ROWS_PER_FILE_BATCHES * config.batch_size,  # generation blocks are one batch each
        ray_remote_args={"num_cpus": IO_TASK_CPUS},
    )
    wall_seconds = time.perf_counter() - started
    summary = processor.summary()
    processor.close()  # the job's own collector; its reports are now in the summary
    written = count_output(filesystem, output_path, config.id_column)
    summary.update(
        job_id=job_id,
        namespace=processor.namespace,
        rows_in=inputs.num_rows,
        rows_out=written.rows,
        rows_resumed=resume.num_done,
        rows_error_in_output=written.error_rows,
        unique_ids_out=written.unique_ids,
        duplicate_rows_out=written.duplicate_rows,
        missing_rows=inputs.num_rows - written.unique_ids,
        partial_files_deleted=len(resume.deleted_files),
        wall_seconds=wall_seconds,
        startup_seconds=(
            summary["first_batch_started_at"] - started_at if summary["first_batch_started_at"] else None
        ),
        tokens_per_wall_second=summary["generated_tokens"] / wall_seconds if wall_seconds else 0.0,
        config=config.model_dump(),
    )
    with filesystem.open_output_stream(posixpath.join(output_path, STATS_NAME)) as stream:
        stream.write(
            json.dumps({k: v for k, v in summary.items() if k != "optimizer_text"}, indent=2).encode()
        )
    print(format_summary(summary))
    return summary
