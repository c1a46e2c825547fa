"""eagleray inside any Ray Data pipeline: `build_processor(config, preprocess, postprocess)(dataset) -> dataset`.

    [preprocess: map] -> validate rows (tasks) -> map_batches(GenerationStage, ActorPoolStrategy) -> [postprocess]

The shape of Ray Data LLM's processors. A row carries `messages` (a list of {role, content}) or a `prompt`, and
optionally its own `sampling_params` (max_tokens, temperature, top_p, top_k, seed, stop; see `pipeline.rows`);
the config's values are the defaults. The returned dataset is lazy: nothing runs until the caller consumes it
(`write_parquet`, `take`, `iter_rows`, another stage). Every row comes back, with its columns plus the result
columns (`common.columns.RESULT_SCHEMA`); a row that cannot be generated, or whose preprocess raised, carries
its reason in `__inference_error__`, and a row whose postprocess raised comes back as the actor wrote it, with
the reason added. The job (`pipeline.build.run_generate`) is one user of this: read Parquet -> processor ->
write Parquet.

Applying a processor starts what its actors share (Ray, if it is not running; the stats collector; the shared
cache actor with `shared_cache`); `summary()` then aggregates every actor's statistics so far, and `close()`
ends the stats collector.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Dataset

from actors.context_cache import get_or_create_context_cache
from actors.generation_stage import GenerationStage
from actors.stats import ActorStats
from actors.stats_collector import create_stats_collector
from common.columns import ERROR_COLUMN
from common.config import ProcessorConfig
from pipeline.checks import check_model_folders, check_models
from pipeline.resources import IO_TASK_CPUS, USER_STAGE_CPU_RESERVE, ActorResources, plan_actor_resources
from pipeline.rows import validate_batch
from pipeline.summary import aggregate_actor_stats

logger = logging.getLogger(__name__)
Row = dict[str, Any]
RowFunction = Callable[[Row], Row]


class _Guarded:
    """A user's row function as a Ray Data `map` stage: a row it raises on comes back (as it came in) with the
    error in `__inference_error__` instead of failing the dataset."""

    def __init__(self, function: RowFunction, stage: str) -> None:
        self.function, self.stage = function, stage
        self.__name__ = f"{stage}({getattr(function, '__name__', type(function).__name__)})"

    def __call__(self, row: Row) -> Row:
        try:
            result = self.function(row)
        except Exception as error:  # one row's failure is that row's error; the dataset goes on
            return {**row, ERROR_COLUMN: f"{self.stage} raised {type(error).__name__}: {error}"}
        if not isinstance(result, dict):
            return {**row, ERROR_COLUMN: f"{self.stage} returned {type(result).__name__}, not a row (dict)"}
        return result


CACHE_STATS_TIMEOUT_S = 30.0


def _actor_pool(config: ProcessorConfig) -> ActorPoolStrategy:
    """A fixed pool; with max_concurrent_batches above 1 each actor takes that many batches at once, on threads
    of its own that feed its one engine thread (`actors.engine_runner`). No batch waits in an actor's own queue
    beyond those (Ray Data's default queues as many again): the first actor up would otherwise take the batches
    of the others still starting."""
    if config.max_concurrent_batches == 1:
        return ActorPoolStrategy(size=config.num_actors, max_tasks_in_flight_per_actor=1)
    return ActorPoolStrategy(
        size=config.num_actors,
        max_concurrent_calls_per_actor=config.max_concurrent_batches,
        max_tasks_in_flight_per_actor=config.max_concurrent_batches,
        enable_true_multi_threading=True,
    )


class Processor:
    """Generation as a Ray Data stage. Build it with `build_processor`; apply it with `processor(dataset)`.

    run_id: the run's id (the dashboard metrics' `job` tag); default: config.job_name plus a fresh suffix.
    stats_path / cache_snapshot_path: where the stats collector and the shared cache keep what they save (the
        job puts them beside its output); None: in memory.
    cpu_reserve: CPUs the actors leave to the dataset's other stages when config.cpus_per_actor is not given
        (`pipeline.resources`): a whole one for a user's stages by default; the job, whose stages are light,
        leaves less.
    actor_kwargs: passed to GenerationActor, through GenerationStage (tests inject hooks this way)."""

    def __init__(
        self,
        config: ProcessorConfig,
        preprocess: RowFunction | None = None,
        postprocess: RowFunction | None = None,
        *,
        run_id: str | None = None,
        stats_path: str | None = None,
        cache_snapshot_path: str | None = None,
        cache_snapshot_interval_s: float | None = None,
        cpu_reserve: float = USER_STAGE_CPU_RESERVE,
        **actor_kwargs,
    ) -> None:
        self.config = ProcessorConfig.of(config)
        self.preprocess, self.postprocess = preprocess, postprocess
        self.run_id = run_id or f"{self.config.job_name}-{uuid.uuid4().hex[:8]}"
        # A run's own namespace, unless configured to share the cache with other runs.
        self.namespace = self.config.namespace or f"eagleray-{self.run_id}"
        self.stats_path = stats_path
        self.cache_snapshot_path = cache_snapshot_path
        self.cache_snapshot_interval_s = cache_snapshot_interval_s
        self.cpu_reserve = cpu_reserve
        self.actor_kwargs = actor_kwargs
        self.resources: ActorResources | None = None
        self.stats_collector = None
        self.cache = None

    def start(self, address: str | None = None) -> ActorResources:
        """Connect to Ray (or start a local one), plan the actors' resources (a `ResourceError` when the
        cluster cannot hold them) and create the stats collector and the shared cache. Idempotent."""
        if self.resources is not None:
            return self.resources
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=True)
        cluster = ray.cluster_resources()
        resources = plan_actor_resources(self.config, cluster, self.cpu_reserve)
        left = float(cluster.get("CPU", 0.0)) - resources.num_cpus * self.config.num_actors
        if left < self.cpu_reserve - 1e-9:
            logger.warning(
                "eagleray: the %d generation actor(s) hold %g of the cluster's %g CPUs, leaving %g; a stage of "
                "the dataset that asks for more (Ray Data tasks ask for 1 CPU by default) waits until the "
                "actors finish, which they never do without input: lower cpus_per_actor, or give that stage "
                "num_cpus",
                self.config.num_actors,
                resources.num_cpus * self.config.num_actors,
                float(cluster.get("CPU", 0.0)),
                left,
            )
        self.stats_collector = create_stats_collector(self.run_id, self.namespace, self.stats_path)
        if self.config.uses_cache_actor:
            self.cache = get_or_create_context_cache(
                self.config.cache_name,
                self.namespace,
                max_restarts=-1,  # a cache that always comes back (from its last snapshot); generation never waits
                snapshot_path=self.cache_snapshot_path,
                snapshot_interval_s=self.cache_snapshot_interval_s,
                similarity_threshold=self.config.similarity_threshold,
                max_memory_bytes=int(self.config.cache_memory_mb * 2**20),
            )
        self.resources = resources
        return resources

    def __call__(self, dataset: Dataset) -> Dataset:
        """The lazy dataset of `dataset`'s rows, generated."""
        if not isinstance(dataset, Dataset):
            raise TypeError(f"a processor takes a ray.data.Dataset, got {type(dataset).__name__}")
        resources = self.start()
        config = self.config.model_dump()
        if self.preprocess is not None:
            dataset = dataset.map(_Guarded(self.preprocess, "preprocess"), num_cpus=IO_TASK_CPUS)
        dataset = dataset.map_batches(
            validate_batch, fn_kwargs={"config": config}, batch_format="pyarrow", num_cpus=IO_TASK_CPUS
        )
        dataset = dataset.map_batches(
            GenerationStage,
            fn_constructor_kwargs={
                "config": config,
                "cache": self.cache,
                "stats_collector": self.stats_collector,
                "run_id": self.run_id,
                **self.actor_kwargs,
            },
            compute=_actor_pool(self.config),
            batch_size=self.config.batch_size,
            batch_format="pyarrow",
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
        )
        if self.postprocess is not None:
            dataset = dataset.map(_Guarded(self.postprocess, "postprocess"), num_cpus=IO_TASK_CPUS)
        return dataset

    def summary(self) -> dict:
        """Every actor's statistics so far, aggregated (`pipeline.summary.aggregate_actor_stats`), and the shared
        cache's (None without one). Empty totals before the processor has run."""
        if self.stats_collector is None:
            return aggregate_actor_stats({})
        reports = ray.get(self.stats_collector.reports.remote())
        summary = aggregate_actor_stats(
            {reporter: ActorStats.from_dict(stats) for reporter, stats in reports.items()}
        )
        summary["shared_cache"] = None
        if self.cache is not None:
            try:
                summary["shared_cache"] = ray.get(self.cache.stats.remote(), timeout=CACHE_STATS_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):  # a cache actor that died for good: no stats
                summary["shared_cache_unreachable"] = True
        return summary

    def close(self) -> None:
        """End the stats collector (the run's own). The shared cache stays for others in its namespace. A
        processor applied again after this starts afresh (a new collector, so new totals)."""
        if self.stats_collector is not None:
            ray.kill(self.stats_collector, no_restart=True)
            self.stats_collector = None
        self.resources = None


def build_processor(
    config: ProcessorConfig,
    preprocess: RowFunction | None = None,
    postprocess: RowFunction | None = None,
    **options,
) -> Processor:
    """A processor for `config`: `processor(dataset)` returns the generated dataset, lazily. The model, draft
    head and policy are checked here, before any work (`pipeline.checks`: a ModelCheckError naming the problem).

    preprocess(row) -> row runs first (give the row `messages` or a `prompt`, and `sampling_params` if it has
    its own); postprocess(row) -> row runs on each generated row (it sees the input's columns and
    generated_text, num_generated_tokens, finish_reason, ..., `__inference_error__`). What they return is the
    row that goes on. `options` are `Processor`'s keyword arguments."""
    if not isinstance(config, ProcessorConfig):
        raise TypeError(f"build_processor takes a ProcessorConfig, got {type(config).__name__}")
    for name, function in (("preprocess", preprocess), ("postprocess", postprocess)):
        if function is not None and not callable(function):
            raise TypeError(f"{name} must be a function of a row (dict) returning a row, got {function!r}")
    check_model_folders(config)
    check_models(config)  # the draft head and the policy fit the target
    return Processor(config, preprocess, postprocess, **options)
