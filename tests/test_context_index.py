"""ContextIndex without Ray: key and fuzzy look-ups, thresholds, LRU/TTL counters, Flat -> HNSW migration,
deleted ids, rebuilds (inline and in the background protocol), snapshots and input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from policy.context_index import ContextHit, ContextIndex
from policy.context_snapshot import has_snapshot

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_units(num_rows: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """[num_rows, dim] random unit vectors (pairwise cosines near 0 for dim >= 16)."""
    return unit(np.random.default_rng(seed).standard_normal((num_rows, dim))).astype(np.float32)


def at_cosine(vector: np.ndarray, cosine: float, seed: int = 1) -> np.ndarray:
    """A unit vector whose cosine to the unit `vector` is exactly `cosine` (up to float64 rounding)."""
    other = np.random.default_rng(seed).standard_normal(len(vector))
    other -= (other @ vector) * vector  # orthogonal to vector
    other /= np.linalg.norm(other)
    return cosine * vector.astype(np.float64) + np.sqrt(1 - cosine**2) * other


def basis(index: int, dim: int = DIM) -> np.ndarray:
    vector = np.zeros(dim, dtype=np.float32)
    vector[index] = 1.0
    return vector


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_exact_key_hit_comes_first_and_unknown_keys_fall_back_to_similarity() -> None:
    index = ContextIndex(dim=DIM)
    index.insert(basis(0), {"tree": "12/11/1"}, key="hash-a")
    exact = index.lookup(basis(5), key="hash-a")  # a far embedding: only the key can match
    assert exact == ContextHit({"tree": "12/11/1"}, similarity=0.0, is_exact=True)
    fuzzy = index.lookup(basis(0), key="hash-unknown")
    assert fuzzy is not None and not fuzzy.is_exact and fuzzy.similarity == pytest.approx(1.0)
    assert index.lookup(basis(5), key="hash-unknown") is None
    stats = index.stats()
    assert (stats["lookups"], stats["exact_hits"], stats["fuzzy_hits"], stats["misses"]) == (3, 1, 1, 1)


def test_threshold_just_above_and_below() -> None:
    index = ContextIndex(dim=DIM, similarity_threshold=0.85)
    stored = basis(0)
    index.insert(stored, {"tree": "a"})
    above = index.lookup(at_cosine(stored, 0.851))
    assert above is not None and above.similarity == pytest.approx(0.851, abs=1e-6)
    assert index.lookup(at_cosine(stored, 0.85)) is not None  # the threshold itself is a hit
    assert index.lookup(at_cosine(stored, 0.849)) is None
    assert index.stats()["hits"] == 2 and index.stats()["misses"] == 1


def test_lru_eviction_order_and_counters_on_a_scripted_sequence() -> None:
    index = ContextIndex(dim=DIM, max_entries=3)
    for name, axis in (("a", 0), ("b", 1), ("c", 2)):
        index.insert(basis(axis), {"name": name})
    assert index.lookup(basis(0)).value == {"name": "a"}  # recency now b, c, a
    index.insert(basis(3), {"name": "d"})  # evicts b: c, a, d
    assert index.lookup(basis(1)) is None
    index.insert(at_cosine(basis(2), 0.9995), {"name": "c2"})  # a near-duplicate: updates c: a, d, c
    index.insert(basis(4), {"name": "e"})  # evicts a: d, c, e
    assert index.lookup(basis(0)) is None
    assert index.lookup(basis(3)).value == {"name": "d"}
    assert index.lookup(basis(2)).value == {"name": "c2"}
    assert index.stats() == {
        "entries": 3,
        "index_kind": "flat",
        "index_vectors": 3,  # each eviction left 1 deleted of 4 vectors (> 0.2): rebuilt twice
        "deleted_pending": 0,
        "is_rebuilding": False,
        "lookups": 5,
        "hits": 3,
        "misses": 2,
        "hit_rate": 0.6,
        "exact_hits": 0,
        "fuzzy_hits": 3,
        "inserts": 5,
        "updates": 1,
        "evictions": 2,
        "expirations": 0,
        "rebuilds": 2,
    }


def test_ttl_counts_from_the_last_write_with_an_injected_clock() -> None:
    clock = FakeClock()
    index = ContextIndex(dim=DIM, ttl_s=10.0, clock=clock)
    index.insert(basis(0), {"name": "a"})
    clock.now = 5.0
    index.insert(basis(1), {"name": "b"})
    clock.now = 10.5
    assert index.lookup(basis(0)) is None  # written at 0: expired
    assert index.lookup(basis(1)).value == {"name": "b"}
    clock.now = 12.0
    index.insert(basis(1), {"name": "b2"})  # a rewrite restarts b's TTL
    clock.now = 21.0
    assert index.lookup(basis(1)).value == {"name": "b2"}  # a hit does not extend it
    clock.now = 22.5
    assert index.lookup(basis(1)) is None
    stats = index.stats()
    assert (stats["entries"], stats["expirations"], stats["evictions"]) == (0, 2, 0)


def test_near_duplicates_update_in_place_within_and_across_batches() -> None:
    index = ContextIndex(dim=DIM)
    stored = random_units(1)[0]
    index.insert_batch(
        np.stack([stored, at_cosine(stored, 0.9996), basis(3)]), [{"v": 1}, {"v": 2}, {"v": 3}]
    )
    assert len(index) == 2 and index.stats()["updates"] == 1
    index.insert(at_cosine(stored, 0.9993, seed=7), {"v": 4})
    assert len(index) == 2 and index.lookup(stored).value == {"v": 4}


def test_a_near_duplicate_with_a_new_key_moves_the_entry_to_that_key() -> None:
    index = ContextIndex(dim=DIM)
    index.insert(basis(0), {"v": 1}, key="old")
    index.insert(at_cosine(basis(0), 0.9995), {"v": 2}, key="new")
    assert len(index) == 1
    assert index.lookup(basis(7), key="new") == ContextHit({"v": 2}, pytest.approx(0.0, abs=1e-6), True)
    assert index.lookup(basis(7), key="old") is None  # far embedding and a forgotten key
    assert index.lookup(basis(0), key="old").is_exact is False  # the old context still finds it by cosine


def test_flat_migrates_to_hnsw_and_results_stay_correct() -> None:
    vectors = random_units(150, dim=32, seed=3)
    index = ContextIndex(dim=32, flat_max_entries=50)
    for start in range(0, 150, 10):
        index.insert_batch(vectors[start : start + 10], [{"i": i} for i in range(start, start + 10)])
        assert index.index_kind == ("flat" if start + 10 <= 50 else "hnsw")
    assert index.stats()["rebuilds"] == 1
    noisy = unit(vectors + 0.02 * np.random.default_rng(4).standard_normal(vectors.shape))
    hits = index.lookup_batch(noisy)
    assert [hit.value["i"] for hit in hits] == list(range(150))


def test_deleted_ids_are_never_returned_in_hnsw_mode() -> None:
    vectors = random_units(100, dim=32, seed=5)
    # A tiny threshold: every look-up returns the nearest live entry, whatever it is.
    index = ContextIndex(
        dim=32, max_entries=60, flat_max_entries=20, similarity_threshold=0.01, rebuild_deleted_fraction=0.9
    )
    for start in range(0, 100, 10):
        index.insert_batch(vectors[start : start + 10], [{"i": i} for i in range(start, start + 10)])
    stats = index.stats()
    assert stats["index_kind"] == "hnsw" and stats["evictions"] == 40 and stats["deleted_pending"] > 0
    hits = index.lookup_batch(vectors[:40])  # each evicted vector is still in the HNSW graph, at cosine 1
    assert all(hit is not None and hit.value["i"] >= 40 and hit.similarity < 0.99 for hit in hits)
    assert all(index.lookup(vector).value["i"] >= 40 for vector in vectors[:40])


@pytest.mark.parametrize("flat_max_entries", [1000, 10], ids=["flat", "hnsw"])
def test_rebuild_is_triggered_past_the_deleted_fraction_and_counted(flat_max_entries: int) -> None:
    vectors = random_units(80, dim=32, seed=6)
    index = ContextIndex(
        dim=32, max_entries=40, flat_max_entries=flat_max_entries, rebuild_deleted_fraction=0.2
    )
    index.insert_batch(vectors[:40], [{"i": i} for i in range(40)])
    rebuilds_before = index.stats()["rebuilds"]
    for i in range(40, 80):
        before = index.stats()
        index.insert(vectors[i], {"i": i})
        after = index.stats()
        if after["rebuilds"] > before["rebuilds"]:
            # this insert's eviction pushed the deleted fraction past 0.2: rebuilt from the 40 live vectors
            assert (before["deleted_pending"] + 1) / (before["index_vectors"] + 1) > 0.2
            assert (after["deleted_pending"], after["index_vectors"]) == (0, 40)
        else:
            assert after["deleted_pending"] / after["index_vectors"] <= 0.2
    stats = index.stats()
    assert stats["rebuilds"] - rebuilds_before == 3  # after the 11th deletion (11 of 51 > 0.2), 3 times
    assert stats["index_kind"] == ("flat" if flat_max_entries == 1000 else "hnsw")
    assert [hit.value["i"] for hit in index.lookup_batch(vectors[40:])] == list(range(40, 80))


def test_background_rebuild_replays_inserts_and_removals_made_during_the_build() -> None:
    vectors = random_units(40, dim=32, seed=8)
    extra = random_units(2, dim=32, seed=13)
    index = ContextIndex(dim=32, max_entries=32, flat_max_entries=20, auto_rebuild=False)
    index.insert_batch(vectors[:30], [{"i": i} for i in range(30)])  # ids 0..29
    assert index.index_kind == "flat" and index.needs_rebuild()
    rebuild = index.begin_rebuild()  # holds ids 0..29
    assert not index.needs_rebuild() and index.stats()["is_rebuilding"]
    index.insert_batch(vectors[30:], [{"i": i} for i in range(30, 40)])  # ids 30..39, evicting 0..7
    assert [hit.value["i"] for hit in index.lookup_batch(vectors[8:])] == list(range(8, 40))
    rebuild.build()  # what a worker thread would do
    assert index.rebuild_backlog_size(rebuild) == 10
    backlog_ids, backlog_vectors = index.take_rebuild_backlog(rebuild)
    assert backlog_ids.tolist() == list(range(30, 40)) and index.rebuild_backlog_size(rebuild) == 0
    index.insert(extra[0], {"i": 40})  # id 40, evicting 8 (held by the build)
    index.lookup_batch(vectors[9:30])  # 30 becomes the least recently used
    index.insert(extra[1], {"i": 41})  # id 41, evicting 30 (handed over in the backlog)
    rebuild.catch_up(backlog_ids, backlog_vectors)  # what a worker thread would do
    index.finish_rebuild(rebuild)
    stats = index.stats()
    assert (stats["index_kind"], stats["rebuilds"], stats["is_rebuilding"]) == ("hnsw", 1, False)
    # 30 built + 10 caught up + ids 40, 41 added at the swap; deleted: 0..8 (built) and 30 (caught up)
    assert (stats["entries"], stats["index_vectors"], stats["deleted_pending"]) == (32, 42, 10)
    live = list(range(9, 30)) + list(range(31, 40))
    assert [hit.value["i"] for hit in index.lookup_batch(vectors[live])] == live
    assert [hit.value["i"] for hit in index.lookup_batch(extra)] == [40, 41]
    assert all(hit is None for hit in index.lookup_batch(vectors[[*range(9), 30]]))
    assert index.needs_rebuild()  # 10 of 42 deleted > 0.2
    with pytest.raises(RuntimeError, match="did not begin"):
        index.finish_rebuild(rebuild)


@pytest.mark.parametrize("flat_max_entries", [1000, 20], ids=["flat", "hnsw"])
def test_snapshot_round_trip_preserves_lookups_and_recency(tmp_path: Path, flat_max_entries: int) -> None:
    vectors = random_units(60, dim=32, seed=9)
    index = ContextIndex(dim=32, max_entries=60, flat_max_entries=flat_max_entries)
    keys = [f"hash-{i}" if i % 2 else None for i in range(60)]
    index.insert_batch(vectors, [{"i": i, "tree": [i, 2, 1]} for i in range(60)], keys=keys)
    index.lookup_batch(vectors[:5])  # rows 0..4 become the most recent
    index.snapshot(tmp_path / "cache")
    assert has_snapshot(tmp_path / "cache")
    restored = ContextIndex.restore(tmp_path / "cache")
    assert restored.config == index.config and restored.index_kind == index.index_kind
    queries = unit(vectors + 0.05 * np.random.default_rng(10).standard_normal(vectors.shape))
    for original, copy in zip(
        index.lookup_batch(queries, keys=keys), restored.lookup_batch(queries, keys=keys), strict=True
    ):
        assert (original.value, original.is_exact) == (copy.value, copy.is_exact)
        assert original.similarity == pytest.approx(copy.similarity, abs=1e-6)
    # Same recency: the next insert into either evicts the same entry (the least recently used one).
    new_vector = random_units(1, dim=32, seed=11)[0]
    for cache in (index, restored):
        cache.lookup_batch(vectors[::2])
        cache.insert(new_vector, {"i": 60})
    survivors = [[hit is not None for hit in cache.lookup_batch(vectors)] for cache in (index, restored)]
    assert survivors[0] == survivors[1] and survivors[0].count(False) == 1


def test_a_half_written_snapshot_does_not_break_restore(tmp_path: Path, monkeypatch) -> None:
    vectors = random_units(10, seed=12)
    index = ContextIndex(dim=DIM)
    index.insert_batch(vectors[:5], [{"i": i} for i in range(5)])
    first = index.snapshot(tmp_path)
    # A crash while writing the next one: ids.npy fails half-way.
    index.insert_batch(vectors[5:], [{"i": i} for i in range(5, 10)])
    original_save = np.save

    def failing_save(file, array, allow_pickle=True):
        if array.dtype == np.int64:
            file.write(b"\x93NUMPY")
            raise OSError("disk full")
        original_save(file, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        index.snapshot(tmp_path)
    monkeypatch.undo()
    (tmp_path / "snapshot-000000007").mkdir()  # a folder that never got its manifest
    leftovers = sorted(child.name for child in tmp_path.iterdir())
    assert any(name.startswith(".tmp-") for name in leftovers)
    restored = ContextIndex.restore(tmp_path)
    assert len(restored) == 5 and restored.lookup(vectors[4]).value == {"i": 4}
    # The next snapshot clears the temporary folder and replaces the old snapshot.
    second = index.snapshot(tmp_path)
    assert not first.exists() and not any(child.name.startswith(".tmp-") for child in tmp_path.iterdir())
    assert len(ContextIndex.restore(second.parent)) == 10


def test_snapshot_holds_no_pickle_and_restore_checks_it(tmp_path: Path) -> None:
    index = ContextIndex(dim=DIM)
    index.insert(basis(0), {"tree": "6/5/1"}, key="k")
    folder = index.snapshot(tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == [
        "entries.json",
        "ids.npy",
        "manifest.json",
        "vectors.npy",
    ]
    assert np.load(folder / "vectors.npy", allow_pickle=False).shape == (1, DIM)
    entries = json.loads((folder / "entries.json").read_text())
    assert entries["keys"] == ["k"] and entries["values"] == [{"tree": "6/5/1"}]
    with pytest.raises(ValueError, match="dim=8"):
        ContextIndex.restore(tmp_path, dim=8)
    np.save(folder / "ids.npy", np.array([0, 1], dtype=np.int64), allow_pickle=False)
    with pytest.raises(ValueError, match="ids are"):
        ContextIndex.restore(tmp_path)
    with pytest.raises(FileNotFoundError):
        ContextIndex.restore(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    ("arguments", "bad_name"),
    [
        ({"dim": 0}, "dim"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": 2.5}, "max_entries"),
        ({"similarity_threshold": 0.0}, "similarity_threshold"),
        ({"similarity_threshold": 1.5}, "similarity_threshold"),
        ({"duplicate_similarity": 0.8}, "duplicate_similarity"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"flat_max_entries": -1}, "flat_max_entries"),
        ({"hnsw_m": 1}, "hnsw_m"),
        ({"hnsw_ef_search": 0}, "hnsw_ef_search"),
        ({"rebuild_deleted_fraction": 1.0}, "rebuild_deleted_fraction"),
    ],
)
def test_invalid_configuration_names_the_bad_value(arguments: dict, bad_name: str) -> None:
    with pytest.raises(ValueError, match=bad_name):
        ContextIndex(**arguments)


def test_invalid_inputs_are_rejected_before_anything_changes() -> None:
    index = ContextIndex(dim=DIM)
    with pytest.raises(ValueError, match=r"shape \[n, 16\]"):
        index.lookup(np.ones(DIM + 1))
    with pytest.raises(ValueError, match="finite"):
        index.insert(np.full(DIM, np.nan), {"v": 1})
    with pytest.raises(ValueError, match="non-zero"):
        index.insert(np.zeros(DIM), {"v": 1})
    with pytest.raises(ValueError, match="2 values for 1 embeddings"):
        index.insert_batch(basis(0)[None], [{"v": 1}, {"v": 2}])
    with pytest.raises(ValueError, match="dicts"):
        index.insert(basis(0), ["not", "a", "dict"])
    with pytest.raises(ValueError, match="finite numbers"):
        index.insert(basis(0), {"tokens_per_s": float("nan")})
    with pytest.raises(ValueError, match="JSON-able"):
        index.insert(basis(0), {"tree": object()})
    with pytest.raises(ValueError, match="keys must be"):
        index.lookup_batch(np.stack([basis(0), basis(1)]), keys=["only-one"])
    with pytest.raises(ValueError, match="non-empty str"):
        index.insert(basis(0), {"v": 1}, key="")
    assert len(index) == 0 and index.stats()["lookups"] == 0


def test_an_hnsw_index_that_shrinks_to_half_of_flat_max_entries_goes_back_to_flat() -> None:
    clock = FakeClock()
    vectors = random_units(35, dim=32, seed=14)
    index = ContextIndex(dim=32, flat_max_entries=20, ttl_s=10.0, clock=clock)
    index.insert_batch(vectors[:30], [{"i": i} for i in range(30)])
    assert index.index_kind == "hnsw"
    clock.now = 11.0
    index.insert_batch(vectors[30:], [{"i": i} for i in range(30, 35)])  # the first 30 expire first
    stats = index.stats()
    assert (stats["index_kind"], stats["entries"], stats["expirations"], stats["rebuilds"]) == (
        "flat",
        5,
        30,
        2,
    )
    assert [hit.value["i"] for hit in index.lookup_batch(vectors[30:])] == list(range(30, 35))


@pytest.mark.parametrize("flat_max_entries", [1000, 10], ids=["flat", "hnsw"])
def test_single_and_batched_lookups_agree_with_deleted_entries_present(flat_max_entries: int) -> None:
    # Single flat queries take the numpy path, batches of >= 20 the FAISS one; both skip the evicted entries.
    vectors = random_units(60, dim=32, seed=15)
    index = ContextIndex(
        dim=32,
        max_entries=40,
        flat_max_entries=flat_max_entries,
        similarity_threshold=0.01,
        rebuild_deleted_fraction=0.9,
    )
    index.insert_batch(vectors[:40], [{"i": i} for i in range(40)])  # (migrates to HNSW in that case)
    index.insert_batch(vectors[40:], [{"i": i} for i in range(40, 60)])  # evicts 0..19, deleted in the index
    stats = index.stats()
    assert (stats["index_kind"], stats["deleted_pending"]) == (
        "flat" if flat_max_entries == 1000 else "hnsw",
        20,
    )
    queries = unit(vectors + 0.3 * np.random.default_rng(16).standard_normal(vectors.shape))
    batched = index.lookup_batch(queries)
    single = [index.lookup(query) for query in queries]
    assert [hit.value for hit in batched] == [hit.value for hit in single]
    assert all(hit.value["i"] >= 20 for hit in batched)
    assert [hit.similarity for hit in batched] == pytest.approx([hit.similarity for hit in single], abs=1e-5)


def test_the_memory_bound_evicts_least_recently_used_entries_and_big_values_are_refused():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 16)).astype(np.float32)
    unbounded = ContextIndex(dim=16)
    unbounded.insert_batch(vectors[:10], [{"tree": "8/4/2"}] * 10)
    per_entry = unbounded.memory_estimate_bytes() / 10
    index = ContextIndex(dim=16, max_memory_bytes=int(per_entry * 10.5))
    index.insert_batch(vectors[:10], [{"tree": "8/4/2"}] * 10)
    assert len(index) == 10 and index.stats()["evictions"] == 0
    index.lookup(vectors[0])  # entry 0 becomes the most recently used
    index.insert_batch(vectors[10:12], [{"tree": "8/4/2"}] * 2)
    assert len(index) == 10 and index.stats()["evictions"] == 2
    assert index.memory_estimate_bytes() <= per_entry * 10.5
    assert index.lookup(vectors[0]) is not None and index.lookup(vectors[1]) is None  # 1 and 2 were evicted
    # A larger value takes more of the bound, so fewer entries fit.
    index.insert_batch(vectors[12:14], [{"tree": "8/4/2", "note": "x" * 400}] * 2)
    assert len(index) < 10
    with pytest.raises(ValueError, match="above max_value_bytes=64"):
        ContextIndex(dim=16, max_value_bytes=64).insert(vectors[0], {"note": "x" * 100})


def test_an_exact_duplicate_hits_at_threshold_one() -> None:
    # float32 inner products of unit vectors are a few ulp off: the threshold is compared with a tolerance.
    index = ContextIndex(dim=384, similarity_threshold=1.0, duplicate_similarity=1.0)
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    index.insert(vector * 3.0, {"tree": "8/3/4"})  # scaled on purpose: stored normalised
    hit = index.lookup(vector)
    assert hit is not None and hit.value == {"tree": "8/3/4"} and not hit.is_exact


def test_the_index_leaves_the_process_thread_count_alone() -> None:
    # faiss and torch share one OpenMP runtime: an index must not silently drop generation to one thread.
    import torch

    before = torch.get_num_threads()
    index = ContextIndex(dim=8, max_entries=4, flat_max_entries=2)
    index.insert_batch(random_units(3, dim=8), [{"i": i} for i in range(3)])  # past flat_max_entries: HNSW
    index.lookup(np.ones(8, dtype=np.float32))
    assert index.index_kind == "hnsw" and torch.get_num_threads() == before
