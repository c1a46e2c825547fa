"""The context cache actor on a local Ray: shared by name within a namespace, look-up/insert round trips,
background rebuilds, and snapshots that a fresh or restarted actor restores."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from actors.context_cache import get_or_create_context_cache, shutdown_context_cache

pytestmark = pytest.mark.starts_ray

DIM = 8
VECTORS = np.eye(DIM, dtype=np.float32)  # [8, 8] pairwise orthogonal contexts


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """Ray shared with the other test modules of the session: started if needed, never shut down here."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield


@pytest.fixture
def cache_name(ray_local) -> Iterator[str]:
    """A fresh actor name; every actor created under it (in the test namespaces) is killed afterwards."""
    name = f"context-cache-{uuid.uuid4().hex[:8]}"
    yield name
    for namespace in ("test-a", "test-b"):
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            pass  # never created, or already gone


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_one_actor_per_name_and_namespace(cache_name: str) -> None:
    first = get_or_create_context_cache(cache_name, "test-a", dim=DIM)
    again = get_or_create_context_cache(cache_name, "test-a", dim=DIM)
    elsewhere = get_or_create_context_cache(cache_name, "test-b", dim=DIM)
    ray.get(first.insert_batch.remote(VECTORS[:1], [{"tree": "12/11/1"}]))
    assert ray.get(again.lookup.remote(VECTORS[0]))["value"] == {"tree": "12/11/1"}
    assert ray.get(elsewhere.lookup.remote(VECTORS[0])) is None
    assert ray.get(again.stats.remote())["entries"] == 1 and ray.get(elsewhere.stats.remote())["entries"] == 0


def test_lookup_and_insert_round_trip(cache_name: str) -> None:
    cache = get_or_create_context_cache(cache_name, "test-a", dim=DIM, similarity_threshold=0.9)
    values = [{"tree": f"{i}/3/2", "actor": "a1b2", "tokens_per_s": 400.0 + i} for i in range(4)]
    assert ray.get(cache.insert_batch.remote(VECTORS[:4], values, [f"hash-{i}" for i in range(4)])) == 4
    near = VECTORS[1] + 0.1 * VECTORS[5]  # cosine 0.995 to VECTORS[1]
    hit = ray.get(cache.lookup.remote(near))
    assert (
        hit["value"] == values[1] and not hit["is_exact"] and hit["similarity"] == pytest.approx(0.995, 1e-3)
    )
    hits = ray.get(cache.lookup_batch.remote(VECTORS[[2, 6, 7]], ["hash-2", None, "hash-3"]))
    assert hits[0] == {"value": values[2], "similarity": pytest.approx(1.0), "is_exact": True}
    assert hits[1] is None
    assert hits[2]["value"] == values[3] and hits[2]["is_exact"]  # the key wins over a far embedding
    stats = ray.get(cache.stats.remote())
    assert (stats["lookups"], stats["exact_hits"], stats["fuzzy_hits"], stats["misses"]) == (4, 2, 1, 1)


@ray.remote(num_cpus=0)
def lookups_over_the_link(link: dict, queries: np.ndarray) -> list:
    """In another worker process: look each query up over the actor's look-up link."""
    from actors.lookup_link import LookupLinkClient

    client = LookupLinkClient.from_description(link)
    try:
        return [client.lookup(query) for query in queries]
    finally:
        client.close()


def test_the_look_up_link_answers_like_the_ray_method_from_another_process(cache_name: str) -> None:
    cache = get_or_create_context_cache(cache_name, "test-a", dim=DIM, similarity_threshold=0.9)
    link = ray.get(cache.lookup_link.remote())
    assert ray.get(cache.lookup_link.remote()) == link  # one server per actor
    assert set(link) == {"host", "port", "token", "dim"} and link["dim"] == DIM
    ray.get(cache.insert_batch.remote(VECTORS[:3], [{"i": i} for i in range(3)]))  # after the link started
    queries = np.stack([VECTORS[0], VECTORS[2] + 0.1 * VECTORS[6], VECTORS[5]])  # hit, near hit, miss
    over_link = ray.get(lookups_over_the_link.remote(link, queries))
    assert over_link == [ray.get(cache.lookup.remote(query)) for query in queries]
    assert [hit and hit["value"]["i"] for hit in over_link] == [0, 2, None]
    stats = ray.get(cache.stats.remote())
    assert stats["lookups"] == 6 and stats["lookup_service_ms"]["num"] == 6  # both paths, one index


def test_flat_to_hnsw_migration_runs_in_the_background(cache_name: str) -> None:
    cache = get_or_create_context_cache(cache_name, "test-a", dim=32, flat_max_entries=20)
    vectors = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    ray.get(cache.insert_batch.remote(vectors, [{"i": i} for i in range(40)]))
    wait_for(lambda: ray.get(cache.stats.remote())["index_kind"] == "hnsw")
    stats = ray.get(cache.stats.remote())
    assert stats["rebuilds"] == 1 and stats["last_rebuild_s"] is not None
    assert [hit["value"]["i"] for hit in ray.get(cache.lookup_batch.remote(vectors))] == list(range(40))


def test_a_fresh_actor_restores_the_snapshot_and_shutdown_takes_a_final_one(
    cache_name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "cache")
    cache = get_or_create_context_cache(cache_name, "test-a", dim=DIM, snapshot_path=path)
    ray.get(cache.insert_batch.remote(VECTORS[:3], [{"i": i} for i in range(3)]))
    ray.get(cache.snapshot.remote())
    ray.get(cache.insert_batch.remote(VECTORS[3:5], [{"i": 3}, {"i": 4}]))  # only in the final snapshot
    shutdown_context_cache(cache)
    fresh = get_or_create_context_cache(cache_name, "test-a", dim=DIM, snapshot_path=path)
    assert ray.get(fresh.stats.remote())["restored_entries"] == 5
    assert [hit["value"]["i"] for hit in ray.get(fresh.lookup_batch.remote(VECTORS[:5]))] == list(range(5))


def test_periodic_snapshots_only_when_entries_changed_and_a_killed_actor_restores(
    cache_name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "cache")
    cache = get_or_create_context_cache(
        cache_name, "test-a", dim=DIM, snapshot_path=path, snapshot_interval_s=0.1
    )
    ray.get(cache.insert_batch.remote(VECTORS[:2], [{"i": 0}, {"i": 1}]))
    wait_for(lambda: ray.get(cache.stats.remote())["snapshots_written"] == 1)
    time.sleep(0.5)
    ray.get(cache.lookup.remote(VECTORS[0]))  # a look-up changes no entry
    time.sleep(0.3)
    assert ray.get(cache.stats.remote())["snapshots_written"] == 1
    ray.kill(cache, no_restart=False)  # a crash: Ray restarts the actor, which restores the snapshot
    wait_for(lambda: _restored_entries(cache) == 2)
    assert ray.get(cache.lookup.remote(VECTORS[1]))["value"] == {"i": 1}


def _restored_entries(cache) -> int | None:
    try:
        return ray.get(cache.stats.remote(), timeout=5)["restored_entries"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def test_bad_options_fail_in_the_caller(ray_local) -> None:
    with pytest.raises(ValueError, match="similarity_threshold"):
        get_or_create_context_cache("never-created", "test-a", similarity_threshold=2.0)
    with pytest.raises(ValueError, match="max_pending_calls"):
        get_or_create_context_cache("never-created", "test-a", max_pending_calls=0)
    with pytest.raises(ValueError, match="namespace"):
        get_or_create_context_cache("never-created", "")
    with pytest.raises(ValueError, match="needs a snapshot_path"):
        get_or_create_context_cache("never-created", "test-a", snapshot_interval_s=5.0)
    with pytest.raises(ValueError):
        ray.get_actor("never-created", namespace="test-a")


def test_the_cache_actor_module_does_not_load_torch() -> None:
    """The cache actor starts beside the generation actors; without torch its process imports in about half the
    time, which measurably shortened a job's start-up on 2 cores."""
    code = "import sys, actors.context_cache; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
