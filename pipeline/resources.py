"""Resources, declared in one place: what each generation actor asks Ray for, derived from the config and the
cluster.

On a GPU cluster each actor takes one GPU (so actors = GPUs) and a share of the CPUs. On CPUs only, the actors
split the cluster's CPUs, minus a reserve for the other stages: the job's read, validation and write tasks are
light (IO_CPU_RESERVE), while a processor applied to a user's dataset keeps a whole CPU (USER_STAGE_CPU_RESERVE)
for the user's own stages, which ask Ray Data's default of one CPU per task; an actor pool that left less would
wait forever for input that cannot be read. An
actor sets its torch threads from the CPUs it was given (see `actors/generation.py`).
Example: 2 CPUs, 1 actor -> 1.5 CPUs (1 thread, rounded down); 2 CPUs, 2 actors -> 0.75 CPUs each (1 thread each).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ProcessorConfig

IO_CPU_RESERVE = 0.5  # CPUs kept free for Ray Data's read / validate / write tasks
IO_TASK_CPUS = 0.1  # what each of those tasks asks for
USER_STAGE_CPU_RESERVE = (
    1.0  # CPUs kept free for a user's own stages (Ray Data tasks ask for 1 CPU by default)
)
MAX_CPUS_PER_GPU_ACTOR = 8.0


@dataclass(frozen=True)
class ActorResources:
    num_cpus: float
    num_gpus: float


class ResourceError(ValueError):
    """The cluster cannot hold the actors the job asks for (a job-level error, found before any actor starts)."""


def plan_actor_resources(
    config: ProcessorConfig, cluster: dict[str, float], reserve: float = IO_CPU_RESERVE
) -> ActorResources:
    """Per-actor CPUs and GPUs for `config.num_actors` actors on a cluster with `cluster` resources
    (`ray.cluster_resources()`), leaving `reserve` CPUs to the other stages when config.cpus_per_actor is not
    given; a ResourceError when they cannot all fit."""
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    num_gpus = config.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if total_gpus >= 1 else 0.0
    if num_gpus * config.num_actors > total_gpus + 1e-9:
        raise ResourceError(
            f"{config.num_actors} actors x {num_gpus} GPUs need {num_gpus * config.num_actors} GPUs; the cluster "
            f"has {total_gpus:g} (lower --num-actors)"
        )
    num_cpus = config.cpus_per_actor
    if num_cpus is None:
        spare = max(total_cpus - reserve, 0.0)
        num_cpus = spare / config.num_actors
        if num_gpus > 0:
            num_cpus = min(num_cpus, MAX_CPUS_PER_GPU_ACTOR)
        num_cpus = round(num_cpus, 2)
    if num_cpus <= 0 or num_cpus * config.num_actors > total_cpus + 1e-9:
        raise ResourceError(
            f"{config.num_actors} actors need {num_cpus:g} CPUs each; the cluster has {total_cpus:g} CPUs "
            "(lower --num-actors)"
        )
    return ActorResources(num_cpus=num_cpus, num_gpus=num_gpus)
