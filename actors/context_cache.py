"""The cluster-wide context cache: one named async Ray actor holding a `ContextIndex`.

Generation actors find it by (name, namespace) with `get_or_create_context_cache` and call `lookup` /
`lookup_batch` / `insert_batch` with context embeddings (numpy [dim] / [n, dim]). Hits come back as plain dicts
{"value": {...}, "similarity": float, "is_exact": bool} (None for a miss), so callers need no class of ours to
read them. All index work runs on the actor's event-loop thread, one call at a time (`ContextIndex` is not
thread safe); only the slow parts run in worker threads while look-ups go on: FAISS rebuilds (the Flat -> HNSW
migration, and rebuilds after deletions) and writing snapshot files.

With `snapshot_path`, a starting (or restarted) actor restores the latest snapshot found there, `shutdown()`
takes a final one, and `snapshot_interval_s` adds periodic snapshots whenever entries changed. Entries written
after the last snapshot are lost when the actor dies.

Look-ups also come over the actor's look-up link (`lookup_link()`, see `lookup_link.py`): a direct TCP
connection served on this event loop, for callers to whom a Ray call's own latency matters. The generation
actors use it, and fall back to the Ray methods when it fails. `python -m jobs.bench_cache` measures both paths.

It also holds the job's finished outputs (`policy.output_store.OutputStore`): generation actors
`publish_outputs` (token ids under their prompt's embedding, per model fingerprint) and fetch the
`similar_outputs` of a starting prompt, which become its retrieved draft branches (`actors.cross_drafts`).
Snapshots save them beside the index (`<snapshot>/outputs/`).

Not here: the index itself (`policy/context_index.py`), embeddings, deciding what to cache (the controllers and
the generation actor), and the job's statistics (`stats_collector.py`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import warnings
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.util.annotations import RayDeprecationWarning

from actors.lookup_link import new_token, start_lookup_server
from policy.context_index import ContextIndex
from policy.context_snapshot import has_snapshot, write_snapshot
from policy.output_store import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_MEMORY_BYTES,
    OutputStore,
    read_store,
    write_store,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 64  # coroutines the actor runs at once; the rest wait in Ray's queue
# Per handle: beyond this Ray raises PendingCallsLimitExceeded at the caller. On Ray 2.60 it bounds only the
# creating process's handle; a handle that another process gets by name is unbounded.
DEFAULT_MAX_PENDING_CALLS = 1024
DEFAULT_MAX_RESTARTS = 3
DEFAULT_MAX_TASK_RETRIES = 1  # look-ups are read-only and inserts overwrite, so one retry is safe
# A rebuild adds the entries inserted during its build in a worker thread until at most this many are left,
# so the swap, on the event loop, adds only a few hundred vectors.
REBUILD_CATCH_UP_ROWS = 256
NUM_SERVICE_TIMES = 2048  # stats() reports percentiles of the time spent inside this many recent look-ups


def _was_restarted() -> bool:
    """Whether Ray restarted this actor after its process died. Ray 2.60's `was_current_actor_reconstructed`
    reads Ray's own deprecated `actor_id` property and so logs a RayDeprecationWarning in every actor that
    asks; that warning is about Ray's code, not ours, and is silenced here."""
    if not ray.is_initialized():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return ray.get_runtime_context().was_current_actor_reconstructed


class ContextCacheActor:
    """An async actor around one `ContextIndex` (built once in `__init__`).

    snapshot_path: a folder (visible to the actor's node) for snapshots; restored from at start if it holds
        one, so a restarted actor comes back with its entries (`restored_entries` in stats()).
    snapshot_interval_s: if given (with snapshot_path), snapshot this often when entries changed.
    index_kwargs: `ContextIndex` arguments (dim, max_entries, similarity_threshold, ttl_s, ...); they also
        override the config saved in a restored snapshot (except dim, which must match).
    output_max_entries / output_max_memory_bytes: the bounds of the outputs store.
    """

    def __init__(
        self,
        snapshot_path: str | None = None,
        snapshot_interval_s: float | None = None,
        output_max_entries: int = DEFAULT_MAX_ENTRIES,
        output_max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
        **index_kwargs: Any,
    ) -> None:
        _check_snapshot_options(snapshot_path, snapshot_interval_s)
        self._snapshot_path = os.path.abspath(snapshot_path) if snapshot_path is not None else None
        self._snapshot_interval_s = snapshot_interval_s
        self._index_kwargs = index_kwargs
        self._restored_entries = 0
        if self._snapshot_path is not None and has_snapshot(self._snapshot_path):
            self._index = ContextIndex.restore(self._snapshot_path, auto_rebuild=False, **index_kwargs)
            self._restored_entries = len(self._index)
            logger.info(
                "context cache restored %d entries from %s", self._restored_entries, self._snapshot_path
            )
        else:
            self._index = ContextIndex(auto_rebuild=False, **index_kwargs)
        self._saved_changes = self._index.num_changes  # index changes already in the configured snapshot
        self._outputs = OutputStore(self._index.config.dim, output_max_entries, output_max_memory_bytes)
        self._output_bounds = (output_max_entries, output_max_memory_bytes)
        self._outputs_changes = 0  # outputs published since the last snapshot
        saved = None if self._snapshot_path is None else read_store(self._snapshot_path)
        if saved is not None:
            self._outputs.load_state(*saved)
        # Ray restarted this actor after its process died (max_restarts): the outage the stats show.
        self._is_restarted = _was_restarted()
        self._snapshot_lock = asyncio.Lock()
        self._rebuild_task: asyncio.Task | None = None
        self._periodic_task: asyncio.Task | None = None
        self._num_snapshots = 0
        self._last_snapshot_s: float | None = None
        self._last_rebuild_s: float | None = None
        self._last_background_error: str | None = None
        self._lookup_service_s: collections.deque[float] = collections.deque(maxlen=NUM_SERVICE_TIMES)
        self._link: dict[str, Any] | None = None
        self._link_server: asyncio.AbstractServer | None = None

    # ---- the cache ----

    async def lookup(self, embedding: np.ndarray, key: str | None = None) -> dict[str, Any] | None:
        """The hit for one embedding [dim] as {"value", "similarity", "is_exact"}, or None."""
        return self._lookup_rows(np.asarray(embedding).reshape(1, -1), None if key is None else [key])[0]

    async def lookup_batch(
        self, embeddings: np.ndarray, keys: list[str | None] | None = None
    ) -> list[dict[str, Any] | None]:
        """`lookup` for each row of embeddings [n, dim], with one FAISS search."""
        return self._lookup_rows(embeddings, keys)

    async def lookup_link(self) -> dict[str, Any]:
        """Where to reach this actor's look-ups directly, without a Ray call per look-up (see `lookup_link.py`):
        {"host", "port", "token" (hex), "dim"}. The server starts on the first call and answers on this event
        loop, like `lookup_batch`; a restarted actor serves a new port and token."""
        if self._link is None:
            token = new_token()
            server = await start_lookup_server(
                self._lookup_rows, self._index.config.dim, ray.util.get_node_ip_address(), token
            )
            host, port = server.sockets[0].getsockname()[:2]
            self._link = {"host": host, "port": port, "token": token.hex(), "dim": self._index.config.dim}
            self._link_server = server  # kept: the server lives as long as the actor
        return dict(self._link)

    def _lookup_rows(
        self, embeddings: np.ndarray, keys: list[str | None] | None
    ) -> list[dict[str, Any] | None]:
        """The look-up behind `lookup`, `lookup_batch` and the link; runs on the event-loop thread."""
        started = time.perf_counter()
        self._start_periodic_snapshots()
        hits = self._index.lookup_batch(embeddings, keys)
        self._start_rebuild_if_needed()
        results = [None if hit is None else hit.to_dict() for hit in hits]
        if len(results) == 1:
            self._lookup_service_s.append(time.perf_counter() - started)
        return results

    async def insert_batch(
        self,
        embeddings: np.ndarray,
        values: list[dict[str, Any]],
        keys: list[str | None] | None = None,
    ) -> int:
        """Store values[i] for embeddings[i] ([n, dim]); see `ContextIndex.insert_batch`. Returns the number
        of entries."""
        self._start_periodic_snapshots()
        self._index.insert_batch(embeddings, values, keys)
        self._start_rebuild_if_needed()
        return len(self._index)

    async def publish_outputs(
        self, fingerprint: str, embeddings: np.ndarray, outputs: list[list[int]], publisher: str
    ) -> int:
        """Store finished rows' new token ids under their prompts' embeddings [n, dim], for the model
        `fingerprint`; returns the number of outputs held."""
        self._start_periodic_snapshots()
        self._outputs_changes += len(outputs)
        return self._outputs.publish(fingerprint, embeddings, outputs, publisher)

    async def similar_outputs(
        self, fingerprint: str, embeddings: np.ndarray, k: int, min_similarity: float = 0.0
    ) -> list[list[dict[str, Any]]]:
        """Per prompt embedding [n, dim]: the outputs of up to k most similar earlier prompts of the same
        fingerprint, {"tokens", "publisher", "similarity"}, most similar first."""
        return self._outputs.similar(fingerprint, embeddings, k, min_similarity)

    async def stats(self) -> dict[str, Any]:
        """`ContextIndex.stats()` plus pid, is_restarted (Ray restarted this actor), memory_estimate_bytes,
        restored_entries, snapshots_written, last_snapshot_s, last_rebuild_s, last_background_error, and
        lookup_service_ms: percentiles of the time spent inside the last (up to NUM_SERVICE_TIMES) single
        look-ups (a Ray call or the link), without the transport."""
        service_ms = np.asarray(self._lookup_service_s) * 1e3
        return {
            **self._index.stats(),
            "pid": os.getpid(),
            "is_restarted": self._is_restarted,
            "memory_estimate_bytes": self._index.memory_estimate_bytes(),
            "restored_entries": self._restored_entries,
            "snapshots_written": self._num_snapshots,
            "last_snapshot_s": self._last_snapshot_s,
            "last_rebuild_s": self._last_rebuild_s,
            "last_background_error": self._last_background_error,
            "outputs": self._outputs.stats(),
            "lookup_service_ms": {
                "num": len(service_ms),
                **{
                    f"p{percent}": float(np.percentile(service_ms, percent)) if len(service_ms) else None
                    for percent in (50, 90, 99)
                },
            },
        }

    async def snapshot(self, path: str | None = None) -> str:
        """Write a snapshot under `path` (default: the configured snapshot_path); returns its folder."""
        target = path if path is not None else self._snapshot_path
        if target is None:
            raise ValueError("snapshot() needs a path: none given and the actor has no snapshot_path")
        return await self._write_snapshot(target)

    async def restore(self, path: str) -> int:
        """Replace the entries with the latest snapshot under `path` (built in a worker thread); returns the
        number of entries."""
        index = await asyncio.to_thread(ContextIndex.restore, path, auto_rebuild=False, **self._index_kwargs)
        self._index = index  # a rebuild still running finishes on the old index, which is then dropped
        saved = await asyncio.to_thread(read_store, path)
        self._outputs = OutputStore(index.config.dim, *self._output_bounds)
        if saved is not None:
            self._outputs.load_state(*saved)
        self._restored_entries = len(index)
        is_configured_path = os.path.abspath(path) == self._snapshot_path
        self._saved_changes = index.num_changes if is_configured_path else -1
        return len(index)

    async def ping(self) -> bool:
        """A no-op round trip (readiness checks, and the baseline of look-up latency)."""
        return True

    @ray.method(max_task_retries=0)  # it ends by exiting; a retry would find the actor gone
    async def shutdown(self) -> None:
        """Take a final snapshot (if a snapshot_path is configured) and exit the actor for good (no restart).

        The call itself then fails with ActorDiedError at the caller; `shutdown_context_cache` expects that.
        """
        if self._periodic_task is not None:
            self._periodic_task.cancel()
        if self._snapshot_path is not None:
            await self._write_snapshot(self._snapshot_path)
        ray.actor.exit_actor()

    # ---- background work ----

    def _start_rebuild_if_needed(self) -> None:
        if self._rebuild_task is None and self._index.needs_rebuild():
            self._rebuild_task = asyncio.get_running_loop().create_task(self._rebuild_in_background())

    async def _rebuild_in_background(self) -> None:
        index = self._index
        rebuild = index.begin_rebuild()
        try:
            await asyncio.to_thread(rebuild.build)  # FAISS releases the GIL: look-ups go on meanwhile
            while index.rebuild_backlog_size(rebuild) > REBUILD_CATCH_UP_ROWS:
                entry_ids, vectors = index.take_rebuild_backlog(rebuild)
                await asyncio.to_thread(rebuild.catch_up, entry_ids, vectors)
            index.finish_rebuild(rebuild)  # adds the last few inserts on the event-loop thread
            self._last_rebuild_s = rebuild.build_s
        except Exception as error:
            index.abort_rebuild(rebuild)
            self._last_background_error = f"rebuild: {error!r}"
            logger.exception("context cache rebuild failed")
        finally:
            self._rebuild_task = None
        self._start_rebuild_if_needed()  # deletions may have piled up during the build

    def _start_periodic_snapshots(self) -> None:
        """Started lazily from the first call (entries only change through calls)."""
        if self._snapshot_interval_s is not None and self._periodic_task is None:
            self._periodic_task = asyncio.get_running_loop().create_task(self._snapshot_periodically())

    async def _snapshot_periodically(self) -> None:
        assert self._snapshot_path is not None and self._snapshot_interval_s is not None
        while True:
            await asyncio.sleep(self._snapshot_interval_s)
            if self._index.num_changes == self._saved_changes and not self._outputs_changes:
                continue
            try:
                await self._write_snapshot(self._snapshot_path)
            except Exception as error:
                self._last_background_error = f"snapshot: {error!r}"
                logger.exception("context cache snapshot to %s failed", self._snapshot_path)

    async def _write_snapshot(self, path: str) -> str:
        async with self._snapshot_lock:
            started = time.perf_counter()
            num_changes = self._index.num_changes
            state = self._index.export_state()  # a consistent copy, taken on the event-loop thread
            outputs = self._outputs.export_state()
            self._outputs_changes = 0
            folder = await asyncio.to_thread(write_snapshot, state, path)
            await asyncio.to_thread(write_store, outputs, path)
            if os.path.abspath(path) == self._snapshot_path:
                self._saved_changes = num_changes
            self._num_snapshots += 1
            self._last_snapshot_s = time.perf_counter() - started
            return str(folder)


RemoteContextCacheActor = ray.remote(ContextCacheActor)


def _check_snapshot_options(snapshot_path: str | None, snapshot_interval_s: float | None) -> None:
    if snapshot_path is not None and (
        not isinstance(snapshot_path, str | os.PathLike) or not str(snapshot_path)
    ):
        raise ValueError(f"snapshot_path must be a non-empty path or None, got {snapshot_path!r}")
    if snapshot_interval_s is None:
        return
    if not isinstance(snapshot_interval_s, int | float) or not snapshot_interval_s > 0:
        raise ValueError(f"snapshot_interval_s must be > 0 seconds or None, got {snapshot_interval_s!r}")
    if snapshot_path is None:
        raise ValueError(f"snapshot_interval_s={snapshot_interval_s!r} needs a snapshot_path")


def get_or_create_context_cache(
    name: str,
    namespace: str,
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    max_task_retries: int = DEFAULT_MAX_TASK_RETRIES,
    num_cpus: float = 0,
    snapshot_path: str | None = None,
    snapshot_interval_s: float | None = None,
    output_max_entries: int = DEFAULT_MAX_ENTRIES,
    output_max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    **index_kwargs: Any,
) -> ActorHandle:
    """The context cache actor named `name` in `namespace`, created if it does not exist yet.

    An existing actor is returned as it is: the options and index_kwargs of whoever created it win. The
    actor's lifetime is its creator's job (not detached); a crashed actor restarts up to max_restarts times
    and restores from snapshot_path. num_cpus=0 lets it schedule on a node whose CPUs are all taken.
    max_pending_calls bounds the calls queued on the creator's handle (-1: unbounded). index_kwargs are
    checked here, so a bad value raises ValueError in the caller instead of killing the actor.
    """
    for argument, value in (("name", name), ("namespace", namespace)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{argument} must be a non-empty str, got {value!r}")
    for argument, value, minimum in (
        ("max_concurrency", max_concurrency, 1),
        ("max_restarts", max_restarts, -1),
        ("max_task_retries", max_task_retries, -1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{argument} must be an int >= {minimum}, got {value!r}")
    if not isinstance(max_pending_calls, int) or max_pending_calls == 0 or max_pending_calls < -1:
        raise ValueError(
            f"max_pending_calls must be -1 (unbounded) or an int >= 1, got {max_pending_calls!r}"
        )
    _check_snapshot_options(snapshot_path, snapshot_interval_s)
    ContextIndex(**index_kwargs)  # validates; cheap while empty
    OutputStore(index_kwargs.get("dim", 384), output_max_entries, output_max_memory_bytes)  # validates
    if snapshot_path is not None:
        snapshot_path = os.path.abspath(snapshot_path)
    return RemoteContextCacheActor.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime=None,
        num_cpus=num_cpus,
        max_concurrency=max_concurrency,
        max_pending_calls=max_pending_calls,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
    ).remote(
        snapshot_path=snapshot_path,
        snapshot_interval_s=snapshot_interval_s,
        output_max_entries=output_max_entries,
        output_max_memory_bytes=output_max_memory_bytes,
        **index_kwargs,
    )


def shutdown_context_cache(cache: ActorHandle, timeout_s: float = 60.0) -> None:
    """Call `shutdown()` (final snapshot, then exit), then release the actor's name.

    On Ray 2.60, after `exit_actor()` the dead actor keeps its name while its owner holds a handle, so
    a later `get_or_create_context_cache` would get the dead one; `ray.kill` releases the name at once.
    """
    try:
        ray.get(cache.shutdown.remote(), timeout=timeout_s)
    except ray.exceptions.ActorDiedError:
        pass  # the expected end of a successful shutdown: the actor exited inside the call
    ray.kill(cache, no_restart=True)
