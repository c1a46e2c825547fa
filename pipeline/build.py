"""The Ray Data dataflow and one job run.

    read_parquet -> validate rows (tasks) -> map_batches(GenerationActor, ActorPoolStrategy) -> write_parquet

`build_pipeline` wires the dataset; `run_generate` checks the input and output first (fatal problems stop the job
before any actor starts), connects to or starts Ray, creates the shared cache actor, executes the pipeline, then
collects every actor's stats into one summary, printed and written to `<output>/_stats.json`.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from actors.context_cache import get_or_create_context_cache
from actors.generation import GenerationActor
from actors.summary import aggregate_actor_stats, format_summary
from pipeline.config import ERROR_COLUMN, GenerateConfig
from pipeline.inputs import InputError, InputFiles, resolve_input, split_uri
from pipeline.resources import IO_TASK_CPUS, ActorResources, plan_actor_resources
from pipeline.rows import validate_batch

STATS_NAME = "_stats.json"
MAX_READ_BLOCKS = 2000


def num_read_blocks(num_rows: int, config: GenerateConfig) -> int:
    """Blocks of about four batches, so that every actor gets work and results stream out early; at least two
    per actor, and at most MAX_READ_BLOCKS. A block goes to one actor whole, so a single-block input would
    leave the other actors idle."""
    wanted = math.ceil(num_rows / (4 * config.batch_size))
    return max(1, min(MAX_READ_BLOCKS, max(wanted, 2 * config.num_actors)))


def build_pipeline(
    config: GenerateConfig, inputs: InputFiles, resources: ActorResources, cache, job_id: str, **actor_kwargs
) -> Dataset:
    """The dataset that, when written, generates every input row. `actor_kwargs` go to GenerationActor."""
    context = DataContext.get_current()
    context.enable_progress_bars = config.progress
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
    )
    dataset = dataset.map_batches(
        validate_batch, fn_kwargs={"config": config_dict}, batch_format="pyarrow", num_cpus=IO_TASK_CPUS
    )
    return dataset.map_batches(
        GenerationActor,
        fn_constructor_kwargs={"config": config_dict, "cache": cache, "job_id": job_id, **actor_kwargs},
        compute=ActorPoolStrategy(size=config.num_actors),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )


def prepare_output(location: str, overwrite: bool) -> tuple[pafs.FileSystem, str]:
    """The output folder, created if needed. Parquet files already there are an error unless `overwrite`,
    which deletes them first (and the old _stats.json)."""
    filesystem, path = split_uri(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError(f"output {location!r} is a file; give a folder")
    if info.type == pafs.FileType.Directory:
        existing = [
            entry.path
            for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
            if entry.path.endswith(".parquet") or posixpath.basename(entry.path) == STATS_NAME
        ]
        if existing and not overwrite:
            raise InputError(
                f"output {location!r} already holds {len(existing)} result file(s); pass --overwrite to replace "
                "them, or choose another --output"
            )
        for entry in existing:
            filesystem.delete_file(entry)
    filesystem.create_dir(path, recursive=True)
    return filesystem, path


def count_output(filesystem: pafs.FileSystem, path: str) -> tuple[int, int]:
    """(rows, error rows) in the written output, read back from the files' error column."""
    files = [
        entry.path
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        if entry.path.endswith(".parquet")
    ]
    rows = errors = 0
    for file in files:
        column = pq.read_table(file, columns=[ERROR_COLUMN], filesystem=filesystem).column(ERROR_COLUMN)
        rows += len(column)
        errors += len(column) - column.null_count
    return rows, errors


def run_generate(config: GenerateConfig, **actor_kwargs) -> dict:
    """Run one job end to end and return its summary (also printed and written to <output>/_stats.json)."""
    inputs = resolve_input(config.input, config.prompt_column)  # fatal problems surface before Ray starts
    filesystem, output_path = prepare_output(config.output, config.overwrite)
    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=True)
    resources = plan_actor_resources(config, ray.cluster_resources())
    cache = get_or_create_context_cache(config.cache_name, config.namespace)
    job_id = f"{config.job_name}-{uuid.uuid4().hex[:8]}"
    print(
        f"eagleray: {inputs.num_rows} rows from {len(inputs.paths)} file(s) -> {config.output}; {config.num_actors} "
        f"actor(s) x {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU; policy {config.policy_kind}; "
        f"shared cache {'on' if config.shared_cache else 'off'}; job {job_id}"
    )
    started = time.perf_counter()
    started_at = time.time()
    dataset = build_pipeline(config, inputs, resources, cache, job_id, **actor_kwargs)
    dataset.write_parquet(output_path, filesystem=filesystem, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    wall_seconds = time.perf_counter() - started
    per_actor = ray.get(cache.job_stats.remote(job_id))
    summary = aggregate_actor_stats(per_actor)
    rows_out, rows_error_out = count_output(filesystem, output_path)
    summary.update(
        job_id=job_id,
        rows_in=inputs.num_rows,
        rows_out=rows_out,
        rows_error_in_output=rows_error_out,
        wall_seconds=wall_seconds,
        startup_seconds=(
            summary["first_batch_started_at"] - started_at if summary["first_batch_started_at"] else None
        ),
        tokens_per_wall_second=summary["generated_tokens"] / wall_seconds if wall_seconds else 0.0,
        shared_cache=ray.get(cache.stats.remote()) if config.shared_cache else None,
        config=config.model_dump(),
    )
    with filesystem.open_output_stream(posixpath.join(output_path, STATS_NAME)) as stream:
        stream.write(
            json.dumps({k: v for k, v in summary.items() if k != "optimizer_text"}, indent=2).encode()
        )
    print(format_summary(summary))
    return summary
