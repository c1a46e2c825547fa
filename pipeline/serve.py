"""Running the online endpoint: Ray (a new local one, or the cluster at --address), the replicas' resources, the
Serve application on host:port, and a clean stop.

`start_server` deploys and returns once every replica is up (models loaded, the load planner's latency table
measured or read from this machine's cache); `stop_server` removes the application and, when this process
started Ray, shuts down Serve and that local Ray with it. `run_server` does both around a wait for SIGINT or
SIGTERM, which is what `python -m jobs.serve` runs.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve

from actors.serve_replica import APP_NAME, build_app
from common.config import ServeConfig
from pipeline.resources import ResourceError, plan_actor_resources


@dataclass(frozen=True)
class Server:
    url: str  # the API's base URL, e.g. http://127.0.0.1:8000/v1
    started_ray: bool  # this process started the local Ray it runs on
    num_cpus: float  # per replica
    num_gpus: float


def replica_resources(config: ServeConfig, cluster: dict[str, float]) -> tuple[float, float]:
    """(CPUs, GPUs) per replica: the given ones, else one GPU each on a GPU cluster, and the cluster's CPUs
    split between the replicas (nothing is kept back: a server has no other stages). ResourceError when the
    replicas cannot all fit."""
    as_actors = config.model_copy(
        update={
            "num_actors": config.num_replicas,
            "cpus_per_actor": config.cpus_per_replica,
            "num_gpus_per_actor": config.num_gpus_per_replica,
        }
    )
    try:
        resources = plan_actor_resources(as_actors, cluster, reserve=0.0)
    except ResourceError as error:
        raise ResourceError(
            str(error).replace("--num-actors", "--num-replicas").replace("actors", "replicas")
        ) from None
    return resources.num_cpus, resources.num_gpus


def deploy(config: ServeConfig, name: str, route_prefix: str, num_cpus: float, num_gpus: float) -> None:
    """Run one application on the Serve instance already started; returns once its replicas are up."""
    serve.run(build_app(config, num_cpus, num_gpus), name=name, route_prefix=route_prefix)


def start_server(config: ServeConfig) -> Server:
    """Deploy the application on the config's Ray and port; returns once its replicas are running."""
    started_ray = not ray.is_initialized() and config.address is None and "RAY_ADDRESS" not in os.environ
    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=True)
    try:
        num_cpus, num_gpus = replica_resources(config, ray.cluster_resources())
        serve.start(http_options={"host": config.host, "port": config.port})
        deploy(config, APP_NAME, "/", num_cpus, num_gpus)
    except BaseException:  # nothing is left running for a server that never came up
        stop_server(Server("", started_ray, 0.0, 0.0))
        raise
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return Server(f"http://{host}:{config.port}/v1", started_ray, num_cpus, num_gpus)


def stop_server(server: Server) -> None:
    """Remove the application; with a Ray this process started, Serve and Ray stop too."""
    try:
        if server.started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


class Signals:
    """SIGINT and SIGTERM caught, the previous handlers back on `restore`. `ray.init` sets a SIGTERM handler of
    its own (it exits at once, and a Ray torn down that way aborts at exit), so `catch` again once Ray is up."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.event = threading.Event()
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.catch()

    def catch(self) -> None:
        for sig in self.previous:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received.append(signum)
        self.event.set()

    def wait(self) -> int:
        while not self.event.wait(timeout=1.0):  # a timed wait, so the handlers run promptly on every Python
            continue
        return self.received[0]

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_server(config: ServeConfig, log=print) -> int:
    """Serve until SIGINT or SIGTERM, then stop cleanly; returns the signal's number."""
    signals = Signals()
    try:
        server = start_server(config)
        signals.catch()
        try:
            log(
                f"eagleray: serving {config.model_name!r} at {server.url} ({config.num_replicas} replica(s), "
                f"{server.num_cpus:g} CPUs and {server.num_gpus:g} GPUs each, {config.tree_choice}); "
                "Ctrl-C or SIGTERM stops it",
                flush=True,
            )
            signum = signals.wait()
        finally:
            log("eagleray: stopping the server", flush=True)
            stop_server(server)
    finally:
        signals.restore()
    log(f"eagleray: stopped ({signal.Signals(signum).name})", flush=True)
    return signum
