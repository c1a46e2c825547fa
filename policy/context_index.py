"""The one FAISS similarity index of the project: context embeddings -> small decision dicts.

It is the store behind the cluster-wide context cache (`actors/context_cache.py`) and, configured small, the
in-process context-aware fuzzy cache of `optimizer.RLInferenceOptimizer` (values {"tree": "8/4/2"}).

`ContextIndex` maps a context (its 384-d all-MiniLM-L6-v2 embedding, and optionally a content-hash key) to a
small JSON-able dict such as {"tree": "12/11/1", "actor": "a1b2", "tokens_per_s": 412.0}. It stores decisions,
never text. A look-up tries the exact key first (a dict look-up), then the nearest stored embedding by cosine
(FAISS inner product over L2-normalised rows); the nearest entry is a hit when its cosine is >= the threshold.

Index: an exact `IndexIDMap(IndexFlatIP)` while the entries fit in `flat_max_entries`, then `IndexHNSWFlat`
(inner product) behind the same id map. FAISS HNSW cannot remove vectors, so removals (LRU eviction, TTL
expiry) only mark an id deleted, for both kinds; searches ask for a few extra neighbours and skip deleted ids,
and the index is rebuilt from the live vectors once the deleted fraction passes `rebuild_deleted_fraction`.
The raw unit vectors of live entries are kept in numpy, so rebuilds and snapshots never reconstruct from
FAISS (which is why the id map is the plain `IndexIDMap`: `IndexIDMap2` only adds reconstruct-by-id).
A rebuild is three steps, `begin_rebuild` (copy the live vectors), `IndexRebuild.build` (FAISS work, which
may run in another thread, as may catching up with inserts made meanwhile) and `finish_rebuild` (swap in,
replaying what changed meanwhile), so that the Ray actor keeps answering while a 100k-entry HNSW builds; with
`auto_rebuild=True` they run inline.

Bounded by LRU (a hit or a write refreshes recency) at `max_entries`, by an optional memory bound (evicting
the least recently used entries until the estimate fits, see `memory_estimate_bytes`), and by an optional TTL
since the last write. A value larger than `max_value_bytes` (as JSON) is refused with a ValueError.
`snapshot` and `restore` save and load the entries through `context_snapshot.py`, which also defines
`ContextIndexConfig` and `ContextIndexState` (the records a snapshot holds) and the snapshot files' format.

Not here: snapshot files (`context_snapshot.py`), computing embeddings (`embedding.py`), Ray
(`actors/context_cache.py`), thread safety (one owner thread; only `IndexRebuild.build` and `catch_up` may run
elsewhere), and FAISS thread counts (left alone: FAISS and torch share one OpenMP runtime, so setting them here
would change the generation thread's torch thread count too; where latency matters run FAISS on one thread, as
Ray does for the actor with OMP_NUM_THREADS=1).

Why these defaults: exact Flat search costs O(entries) per query, so past `flat_max_entries` (10k) an HNSW graph
answers faster; small Flat indexes are searched with one numpy product instead of FAISS (see
NUMPY_SEARCH_MAX_ENTRIES), and batches of queries through BLAS. `python -m jobs.bench_cache` measures both kinds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from policy.caches import CacheCounters
from policy.context_snapshot import (
    FLAT_MAX_ENTRIES,
    ContextIndexConfig,
    ContextIndexState,
    read_snapshot,
    write_snapshot,
)
from policy.lru import LRUDict

INDEX_KINDS = ("flat", "hnsw")
# float32 inner products of unit vectors are off by a few ulp (an exact duplicate can score 0.99999994), so
# thresholds are compared with this much slack.
SIMILARITY_TOLERANCE = 1e-6
# With deleted ids in the index, a search asks for this many neighbours and keeps the nearest live one; rows
# whose candidates are all deleted are searched again with 8x as many (rare below the rebuild fraction).
NUM_CANDIDATES_WITH_DELETIONS = 16
# Flat searches of at least this many queries use BLAS (a matrix product), which is several times faster for a
# batch; single queries are faster without it.
BLAS_MIN_QUERIES = 20
# Fewer queries than that against at most this many Flat entries are scored with one numpy matrix product over
# the live vectors instead (the same exact cosines, and no deleted ids to skip): FAISS runs even one query in an
# OpenMP team of the process's thread count, which on a busy machine costs more than the product itself.
NUMPY_SEARCH_MAX_ENTRIES = 8192
# The memory estimate's constants (see `ContextIndex.memory_estimate_bytes`), calibrated against process RSS:
# the estimate charges 4 vectors (store, headroom, FAISS, a rebuild's copy) + HNSW links + ENTRY_OVERHEAD_BYTES
# of Python bookkeeping an entry, and VALUE_MEMORY_FACTOR times the value's JSON size, so it stays an upper bound.
ENTRY_OVERHEAD_BYTES = 1536
VALUE_MEMORY_FACTOR = 2


def normalise_embeddings(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """Rows scaled to unit length, as a C-contiguous float32 [n, dim] array (FAISS's input format), so that inner
    product is cosine.

    Accepts [dim] (one row) or [n, dim]. Raises ValueError for another shape, NaN or inf, or a zero row.
    """
    matrix = np.array(embeddings, dtype=np.float32, ndmin=2)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"embeddings must have shape [n, {dim}], got {np.shape(embeddings)}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("embeddings must be finite (got NaN or inf)")
    wide = matrix.astype(np.float64)  # float64 so that huge or tiny components neither overflow nor vanish
    norms = np.linalg.norm(wide, axis=1, keepdims=True)  # [n, 1]
    if np.any(norms == 0):
        raise ValueError("embeddings must be non-zero vectors: a zero vector has no direction")
    return np.ascontiguousarray(wide / norms, dtype=np.float32)


@dataclass(frozen=True)
class ContextHit:
    """A stored value reused for a query: its cosine to the stored context, and whether the key matched.

    `value` is the stored dict itself; treat it as read-only."""

    value: dict[str, Any]
    similarity: float
    is_exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "similarity": self.similarity, "is_exact": self.is_exact}


@dataclass
class ContextIndexCounters(CacheCounters):
    """`CacheCounters` (`hits` = exact_hits + fuzzy_hits; `inserts` counts new entries; `evictions` only the
    LRU removals at `max_entries` or the memory bound) plus: `exact_hits` (key matched), `fuzzy_hits` (nearest cosine >= the
    threshold), `updates` (inserts that overwrote an entry's value: same key or a near-duplicate),
    `expirations` (TTL removals) and `rebuilds` (FAISS indexes rebuilt from the live vectors, migrations
    included)."""

    exact_hits: int = 0
    fuzzy_hits: int = 0
    updates: int = 0
    expirations: int = 0
    rebuilds: int = 0


@dataclass
class _Entry:
    value: dict[str, Any]
    key: str | None
    written_at: float  # clock() of the last write
    num_bytes: int  # the value's size as JSON


class _VectorStore:
    """The raw unit vectors of the live entries: rows [0, num_rows) of a growable matrix, removed by moving
    the last row into the hole, so that the live vectors are always one contiguous block."""

    def __init__(self, dim: int, max_rows_hint: int) -> None:
        self._max_rows_hint = max_rows_hint
        self._vectors = np.zeros((0, dim), dtype=np.float32)  # [capacity, dim]
        self._ids = np.zeros(0, dtype=np.int64)  # [capacity]
        self._row_of: dict[int, int] = {}
        self.num_rows = 0

    def add(self, entry_ids: np.ndarray, vectors: np.ndarray) -> None:
        """entry_ids [m] (new ids), vectors [m, dim]."""
        needed = self.num_rows + len(entry_ids)
        if needed > len(self._ids):
            capacity = max(needed, min(2 * len(self._ids), self._max_rows_hint), 1024)
            grown_vectors = np.zeros((capacity, self._vectors.shape[1]), dtype=np.float32)
            grown_vectors[: self.num_rows] = self._vectors[: self.num_rows]
            grown_ids = np.zeros(capacity, dtype=np.int64)
            grown_ids[: self.num_rows] = self._ids[: self.num_rows]
            self._vectors, self._ids = grown_vectors, grown_ids
        self._vectors[self.num_rows : needed] = vectors
        self._ids[self.num_rows : needed] = entry_ids
        for row, entry_id in enumerate(entry_ids.tolist(), start=self.num_rows):
            self._row_of[entry_id] = row
        self.num_rows = needed

    def remove(self, entry_id: int) -> None:
        row = self._row_of.pop(entry_id)
        last = self.num_rows - 1
        if row != last:
            moved_id = int(self._ids[last])
            self._vectors[row] = self._vectors[last]
            self._ids[row] = moved_id
            self._row_of[moved_id] = row
        self.num_rows = last

    def vector(self, entry_id: int) -> np.ndarray:
        """[dim], a view."""
        return self._vectors[self._row_of[entry_id]]

    def gather(self, entry_ids: Sequence[int]) -> np.ndarray:
        """[len(entry_ids), dim], a copy in the given order."""
        return self._vectors[[self._row_of[entry_id] for entry_id in entry_ids]]

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [num_rows], vectors [num_rows, dim]) as views; they change with the next add or remove."""
        return self._ids[: self.num_rows], self._vectors[: self.num_rows]


def _new_faiss_index(kind: str, config: ContextIndexConfig) -> faiss.IndexIDMap:
    if kind == "flat":
        inner = faiss.IndexFlatIP(config.dim)
    else:
        inner = faiss.IndexHNSWFlat(config.dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = config.hnsw_ef_construction
        inner.hnsw.efSearch = config.hnsw_ef_search
    return faiss.IndexIDMap(inner)  # the wrapper keeps a reference to `inner`


class IndexRebuild:
    """A FAISS index built from a copy of the live vectors taken at `ContextIndex.begin_rebuild`.

    `build()` and `catch_up()` touch only this object (and FAISS releases the GIL), so they may run in a
    worker thread while the owner keeps using the ContextIndex; `ContextIndex.finish_rebuild(self)` then swaps
    the index in. Between the two, `ContextIndex.take_rebuild_backlog` hands over the rows inserted meanwhile,
    so that a long build catches up in the thread instead of at the swap."""

    def __init__(self, kind: str, config: ContextIndexConfig, entry_ids: np.ndarray, vectors: np.ndarray):
        self.kind = kind
        self.config = config
        self.entry_ids = entry_ids  # [n] int64, a copy
        self.vectors = vectors  # [n, dim] float32, a copy
        self.index: faiss.IndexIDMap | None = None
        self.build_s: float | None = None
        self.caught_up_ids: list[np.ndarray] = []  # ids handed to catch_up, in the index once it ran
        self.num_backlog_taken = 0  # how much of the owner's log of inserts is already handed over

    def build(self) -> None:
        started = time.perf_counter()
        index = _new_faiss_index(self.kind, self.config)
        if len(self.entry_ids):
            index.add_with_ids(self.vectors, self.entry_ids)
        self.index = index
        self.build_s = time.perf_counter() - started

    def catch_up(self, entry_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows from `ContextIndex.take_rebuild_backlog`: entry_ids [m], vectors [m, dim]."""
        assert self.index is not None, "catch_up needs build() first"
        if len(entry_ids):
            self.index.add_with_ids(vectors, entry_ids)


class ContextIndex:
    """Exact-key then nearest-neighbour store of small JSON-able dicts, keyed by context embeddings.

    dim: embedding size (384 for all-MiniLM-L6-v2).
    max_entries: entries kept; beyond it the least recently used (hit or written) entries are evicted.
    similarity_threshold: a fuzzy look-up hits when the nearest live entry's cosine is >= this, in (0, 1].
    duplicate_similarity: an insert this close to an entry overwrites that entry's value instead of adding one.
    ttl_s: if given, an entry not written for this long is removed (lazily, at the next look-up or insert).
    flat_max_entries: above this many entries the exact Flat index migrates to HNSW.
    hnsw_m, hnsw_ef_search, hnsw_ef_construction: the HNSW graph degree and search/build beam widths.
    rebuild_deleted_fraction: rebuild the FAISS index once this fraction of its vectors are deleted entries.
    max_value_bytes: the largest value accepted, measured as JSON; a larger one raises ValueError.
    max_memory_bytes: if given, evict least recently used entries while `memory_estimate_bytes()` exceeds it.
    auto_rebuild: run needed rebuilds (and the Flat -> HNSW migration) inline; a Ray actor passes False and
        drives `begin_rebuild`/`finish_rebuild` itself, building in a thread.
    clock: seconds, monotonic; injected for tests.

    Keys are strings naming a context's content (e.g. a hex content hash): equal keys are expected to have
    equal embeddings, and an entry keeps the vector it was first inserted with. An entry has at most one key;
    a near-duplicate insert with another key moves the entry to that key (the old key's context still finds
    the entry by similarity).
    """

    def __init__(
        self,
        dim: int = 384,
        max_entries: int = 200_000,
        similarity_threshold: float = 0.85,
        duplicate_similarity: float = 0.999,
        ttl_s: float | None = None,
        flat_max_entries: int = FLAT_MAX_ENTRIES,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 64,
        hnsw_ef_construction: int = 40,
        rebuild_deleted_fraction: float = 0.2,
        max_value_bytes: int = 4096,
        max_memory_bytes: int | None = None,
        auto_rebuild: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = ContextIndexConfig(
            dim=dim,
            max_entries=max_entries,
            similarity_threshold=similarity_threshold,
            duplicate_similarity=duplicate_similarity,
            ttl_s=ttl_s,
            flat_max_entries=flat_max_entries,
            hnsw_m=hnsw_m,
            hnsw_ef_search=hnsw_ef_search,
            hnsw_ef_construction=hnsw_ef_construction,
            rebuild_deleted_fraction=rebuild_deleted_fraction,
            max_value_bytes=max_value_bytes,
            max_memory_bytes=max_memory_bytes,
        )
        self.auto_rebuild = auto_rebuild
        self._clock = clock
        self._entries: LRUDict[int, _Entry] = LRUDict()  # id -> entry, least recently hit or written first
        self._write_order: LRUDict[int, None] = LRUDict()  # ids, least recently written first (for the TTL)
        self._id_of_key: dict[str, int] = {}
        self._store = _VectorStore(dim, max_rows_hint=max_entries)
        self._kind = "flat"
        self._index = _new_faiss_index("flat", self.config)
        self._deleted: set[int] = set()  # ids still in self._index whose entries are gone
        self._next_id = 0
        self._value_bytes = 0  # sum of the live entries' num_bytes
        self._counters = ContextIndexCounters()
        self._num_changes = 0  # writes and removals (not recency refreshes), for "snapshot if changed"
        self._pending_rebuild: IndexRebuild | None = None
        self._added_during_rebuild: list[int] = []
        self._removed_during_rebuild: list[int] = []

    # ---- look-ups ----

    def lookup(self, embedding: np.ndarray, key: str | None = None) -> ContextHit | None:
        """The hit for one context embedding [dim] (and optional key), or None."""
        return self.lookup_batch(np.asarray(embedding).reshape(1, -1), None if key is None else [key])[0]

    def lookup_batch(
        self, embeddings: np.ndarray, keys: Sequence[str | None] | None = None
    ) -> list[ContextHit | None]:
        """A hit or None per row of embeddings [n, dim]: the exact key first, then the nearest live entry if
        its cosine is >= the threshold. Rows without a key hit share one FAISS search."""
        queries = normalise_embeddings(embeddings, self.config.dim)  # [n, dim]
        row_keys = _check_keys(keys, len(queries))
        self._remove_expired()
        results: list[ContextHit | None] = [None] * len(queries)
        fuzzy_rows: list[int] = []
        for row, key in enumerate(row_keys):
            entry_id = self._id_of_key.get(key) if key is not None else None
            if entry_id is None:
                fuzzy_rows.append(row)
                continue
            similarity = float(queries[row] @ self._store.vector(entry_id))
            results[row] = ContextHit(self._entries[entry_id].value, similarity, is_exact=True)
            self._entries.touch(entry_id)
            self._counters.exact_hits += 1
        if fuzzy_rows:
            fuzzy_queries = queries if len(fuzzy_rows) == len(queries) else queries[fuzzy_rows]
            similarities, entry_ids = self._search_nearest(fuzzy_queries)  # [m] each
            threshold = self.config.similarity_threshold - SIMILARITY_TOLERANCE
            for row, similarity, entry_id in zip(
                fuzzy_rows, similarities.tolist(), entry_ids.tolist(), strict=True
            ):
                if entry_id >= 0 and similarity >= threshold:
                    results[row] = ContextHit(self._entries[entry_id].value, similarity, is_exact=False)
                    self._entries.touch(entry_id)
                    self._counters.fuzzy_hits += 1
        num_hits = sum(result is not None for result in results)
        self._counters.lookups += len(queries)
        self._counters.hits += num_hits
        self._rebuild_inline_if_needed()
        return results

    # ---- writes ----

    def insert(self, embedding: np.ndarray, value: dict[str, Any], key: str | None = None) -> None:
        """Store `value` for one context embedding [dim] (see `insert_batch`)."""
        self.insert_batch(np.asarray(embedding).reshape(1, -1), [value], None if key is None else [key])

    def insert_batch(
        self,
        embeddings: np.ndarray,
        values: Sequence[dict[str, Any]],
        keys: Sequence[str | None] | None = None,
    ) -> None:
        """Store values[i] for the context of embeddings[i] ([n, dim]), in row order.

        A row overwrites an existing entry's value (an update, refreshing its recency and write time) when its
        key names that entry, or else when the entry is a near-duplicate (cosine >= duplicate_similarity) of
        the row: the nearest stored entry or an earlier row of the same batch, whichever is closer. Otherwise
        the row becomes a new entry. Values are copied through JSON, so what is stored is what a snapshot
        restores. LRU evictions happen after the whole batch.
        """
        vectors = normalise_embeddings(embeddings, self.config.dim)  # [n, dim]
        num_rows = len(vectors)
        if len(values) != num_rows:
            raise ValueError(f"got {len(values)} values for {num_rows} embeddings")
        stored_values = [_json_copy(value, self.config.max_value_bytes) for value in values]
        row_keys = _check_keys(keys, num_rows)
        self._remove_expired()
        now = self._clock()
        nearest_similarities, nearest_ids = self._search_nearest(vectors)  # [n] each, over stored entries
        earlier_duplicates = _earlier_duplicates(vectors, self.config.duplicate_similarity)
        resolved_ids = np.full(num_rows, -1, dtype=np.int64)  # [n] the entry each row wrote
        new_rows: list[int] = []
        for row in range(num_rows):
            key = row_keys[row]
            entry_id = self._id_of_key.get(key, -1) if key is not None else -1
            if entry_id < 0:
                best_similarity = -math.inf
                if nearest_similarities[row] >= self.config.duplicate_similarity - SIMILARITY_TOLERANCE:
                    entry_id, best_similarity = int(nearest_ids[row]), float(nearest_similarities[row])
                for earlier_row, similarity in earlier_duplicates.get(row, ()):
                    if similarity > best_similarity:
                        entry_id, best_similarity = int(resolved_ids[earlier_row]), similarity
            if entry_id >= 0:
                self._update(entry_id, stored_values[row], key, now)
            else:
                entry_id = self._next_id
                self._next_id += 1
                value, num_bytes = stored_values[row]
                self._entries.set(entry_id, _Entry(value, key, now, num_bytes))
                self._value_bytes += num_bytes
                self._write_order.set(entry_id, None)
                if key is not None:
                    self._id_of_key[key] = entry_id
                new_rows.append(row)
                self._counters.inserts += 1
            resolved_ids[row] = entry_id
        if new_rows:
            new_ids = resolved_ids[new_rows]  # [m]
            self._store.add(new_ids, vectors[new_rows])
            self._index.add_with_ids(vectors[new_rows], new_ids)
            if self._pending_rebuild is not None:
                self._added_during_rebuild.extend(new_ids.tolist())
        self._num_changes += num_rows
        self._evict_over_bounds()
        self._rebuild_inline_if_needed()

    def _evict_over_bounds(self) -> None:
        """Evict least recently used entries while over max_entries or the memory bound."""
        limit = self.config.max_memory_bytes
        while self._entries and (
            len(self._entries) > self.config.max_entries
            or (limit is not None and self.memory_estimate_bytes() > limit)
        ):
            self._remove(self._entries.oldest())
            self._counters.evictions += 1

    def memory_estimate_bytes(self) -> int:
        """An upper estimate of the memory the entries hold: per entry its vector four times (the store and its
        growth headroom, the FAISS index, a rebuild's copy), HNSW links, Python bookkeeping, and its value at VALUE_MEMORY_FACTOR
        times its JSON size (see ENTRY_OVERHEAD_BYTES)."""
        dim = self.config.dim
        per_entry = 4 * 4 * dim + 2 * 4 * self.config.hnsw_m + ENTRY_OVERHEAD_BYTES
        return len(self._entries) * per_entry + VALUE_MEMORY_FACTOR * self._value_bytes

    def _update(self, entry_id: int, stored: tuple[dict[str, Any], int], key: str | None, now: float) -> None:
        entry = self._entries[entry_id]
        self._value_bytes += stored[1] - entry.num_bytes
        entry.value, entry.num_bytes = stored
        entry.written_at = now
        if key is not None and key != entry.key:
            if entry.key is not None and self._id_of_key.get(entry.key) == entry_id:
                del self._id_of_key[entry.key]
            entry.key = key
            self._id_of_key[key] = entry_id
        self._entries.touch(entry_id)
        self._write_order.touch(entry_id)
        self._counters.updates += 1

    def _remove(self, entry_id: int) -> None:
        """Drop an entry; its vector stays in the FAISS index, marked deleted, until the next rebuild."""
        entry = self._entries.pop(entry_id)
        self._value_bytes -= entry.num_bytes
        self._write_order.pop(entry_id)
        if entry.key is not None and self._id_of_key.get(entry.key) == entry_id:
            del self._id_of_key[entry.key]
        self._store.remove(entry_id)
        self._deleted.add(entry_id)
        if self._pending_rebuild is not None:
            self._removed_during_rebuild.append(entry_id)
        self._num_changes += 1

    def _remove_expired(self) -> None:
        if self.config.ttl_s is None:
            return
        deadline = self._clock() - self.config.ttl_s
        while self._write_order:
            entry_id = self._write_order.oldest()
            if self._entries[entry_id].written_at >= deadline:
                break
            self._remove(entry_id)
            self._counters.expirations += 1

    # ---- search ----

    def _search_nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The nearest live entry of each row of queries [n, dim]: (cosines [n] float32, ids [n] int64), with
        id -1 (and cosine -inf) where there is none. One FAISS search, plus a wider one for the rare rows
        whose candidates are all deleted; or, for a few queries on a small Flat index, one numpy product."""
        num_queries = len(queries)
        best_similarities = np.full(num_queries, -np.inf, dtype=np.float32)
        best_ids = np.full(num_queries, -1, dtype=np.int64)
        num_vectors = self._index.ntotal
        if num_vectors == 0 or not self._entries or num_queries == 0:
            return best_similarities, best_ids
        is_small_flat = self._kind == "flat" and len(self._entries) <= NUMPY_SEARCH_MAX_ENTRIES
        if is_small_flat and num_queries < BLAS_MIN_QUERIES:
            entry_ids, vectors = self._store.live()  # [num_live], [num_live, dim]: live entries only
            scores = vectors @ queries.T  # [num_live, n]
            best_rows = np.argmax(scores, axis=0)  # [n]
            return scores[best_rows, np.arange(num_queries)], entry_ids[best_rows].copy()
        num_candidates = min(num_vectors, NUM_CANDIDATES_WITH_DELETIONS if self._deleted else 1)
        pending_rows = np.arange(num_queries)
        pending_queries = queries
        while True:
            with self._blas_for_batches(len(pending_rows)):
                similarities, labels = self._index.search(pending_queries, num_candidates)  # [m, k] each
            unresolved: list[int] = []
            for row, row_similarities, row_labels in zip(
                pending_rows.tolist(), similarities.tolist(), labels.tolist(), strict=True
            ):
                for similarity, label in zip(row_similarities, row_labels, strict=True):
                    if label >= 0 and label not in self._deleted:
                        best_similarities[row], best_ids[row] = similarity, label
                        break
                else:
                    unresolved.append(row)
            if not unresolved or num_candidates >= num_vectors:
                return best_similarities, best_ids
            pending_rows = np.array(unresolved)
            pending_queries = queries[pending_rows]
            num_candidates = min(num_vectors, num_candidates * 8)

    @contextlib.contextmanager
    def _blas_for_batches(self, num_queries: int) -> Iterator[None]:
        """Let a Flat search of >= BLAS_MIN_QUERIES queries use BLAS (faiss's default threshold is higher);
        the process-wide setting is restored afterwards."""
        if self._kind != "flat" or num_queries < BLAS_MIN_QUERIES:
            yield
            return
        previous = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_threshold = previous

    # ---- rebuilds ----

    def needs_rebuild(self) -> bool:
        """True when the Flat index has outgrown `flat_max_entries` or too much of the index is deleted (and no
        rebuild is under way)."""
        if self._pending_rebuild is not None:
            return False
        if self._kind == "flat" and len(self._entries) > self.config.flat_max_entries:
            return True
        num_vectors = self._index.ntotal
        return num_vectors > 0 and len(self._deleted) / num_vectors > self.config.rebuild_deleted_fraction

    def begin_rebuild(self) -> IndexRebuild:
        """Copy the live vectors into an `IndexRebuild` of the kind their number calls for (HNSW above
        `flat_max_entries`; back to Flat only at or below half of it) and start logging changes."""
        if self._pending_rebuild is not None:
            raise RuntimeError("a rebuild is already under way; finish or abort it first")
        entry_ids, vectors = self._store.live()
        num_live = len(entry_ids)
        flat_max = self.config.flat_max_entries
        is_hnsw = num_live > flat_max or (self._kind == "hnsw" and num_live > flat_max // 2)
        rebuild = IndexRebuild("hnsw" if is_hnsw else "flat", self.config, entry_ids.copy(), vectors.copy())
        self._pending_rebuild = rebuild
        self._added_during_rebuild, self._removed_during_rebuild = [], []
        return rebuild

    def rebuild_backlog_size(self, rebuild: IndexRebuild) -> int:
        """Inserts since `begin_rebuild` not yet handed to the rebuild (an upper bound: some may be gone)."""
        if rebuild is not self._pending_rebuild:
            return 0
        return len(self._added_during_rebuild) - rebuild.num_backlog_taken

    def take_rebuild_backlog(self, rebuild: IndexRebuild) -> tuple[np.ndarray, np.ndarray]:
        """(ids [m], vectors [m, dim], copies) of the live entries inserted since `begin_rebuild` and not yet
        handed over, for `rebuild.catch_up`; the rebuild then counts them as in its index."""
        if rebuild is not self._pending_rebuild:
            raise RuntimeError(
                "take_rebuild_backlog got a rebuild this index did not begin (or already finished)"
            )
        new_ids = self._added_during_rebuild[rebuild.num_backlog_taken :]
        rebuild.num_backlog_taken = len(self._added_during_rebuild)
        live_ids = [entry_id for entry_id in new_ids if entry_id in self._entries]
        rebuild.caught_up_ids.append(np.array(live_ids, dtype=np.int64))
        vectors = self._store.gather(live_ids) if live_ids else np.zeros((0, self.config.dim), np.float32)
        return rebuild.caught_up_ids[-1], vectors

    def finish_rebuild(self, rebuild: IndexRebuild) -> None:
        """Swap in a built index, adding the entries inserted since `begin_rebuild` (and not caught up) and
        marking deleted those removed since."""
        if rebuild is not self._pending_rebuild:
            raise RuntimeError("finish_rebuild got a rebuild this index did not begin (or already finished)")
        if rebuild.index is None:
            raise RuntimeError("finish_rebuild needs a built index: call rebuild.build() first")
        index = rebuild.index
        removed_ids = np.array(self._removed_during_rebuild, dtype=np.int64)
        in_new_index = np.concatenate([rebuild.entry_ids, *rebuild.caught_up_ids])  # [n + caught up]
        deleted = set(removed_ids[np.isin(removed_ids, in_new_index)].tolist())
        added_ids = [
            entry_id
            for entry_id in self._added_during_rebuild[rebuild.num_backlog_taken :]
            if entry_id in self._entries
        ]
        if added_ids:
            index.add_with_ids(self._store.gather(added_ids), np.array(added_ids, dtype=np.int64))
        self._index, self._kind, self._deleted = index, rebuild.kind, deleted
        self._counters.rebuilds += 1
        self.abort_rebuild(rebuild)

    def abort_rebuild(self, rebuild: IndexRebuild) -> None:
        """Forget a rebuild (e.g. its build failed); the current index stays in use."""
        if rebuild is self._pending_rebuild:
            self._pending_rebuild = None
            self._added_during_rebuild, self._removed_during_rebuild = [], []

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the live vectors now, in this thread."""
        rebuild = self.begin_rebuild()
        rebuild.build()
        self.finish_rebuild(rebuild)

    def _rebuild_inline_if_needed(self) -> None:
        if self.auto_rebuild and self.needs_rebuild():
            self.rebuild()

    # ---- state ----

    def stats(self) -> dict[str, Any]:
        """Sizes and counters: entries, index_kind, index_vectors, deleted_pending, is_rebuilding, lookups,
        hits, exact_hits, fuzzy_hits, misses, hit_rate, inserts, updates, evictions, expirations, rebuilds."""
        return {
            "entries": len(self._entries),
            "index_kind": self._kind,
            "index_vectors": int(self._index.ntotal),
            "deleted_pending": len(self._deleted),
            "is_rebuilding": self._pending_rebuild is not None,
            **self._counters.to_dict(),
        }

    @property
    def counters(self) -> ContextIndexCounters:
        """A snapshot of the counters."""
        return replace(self._counters)

    @property
    def index_kind(self) -> str:
        return self._kind

    @property
    def num_changes(self) -> int:
        """Writes and removals so far; a snapshot is stale when this moved since it was taken."""
        return self._num_changes

    def __len__(self) -> int:
        return len(self._entries)

    def export_state(self) -> ContextIndexState:
        """A copy of the entries (least recently used first) for `write_snapshot`."""
        entry_ids = list(self._entries)
        now = self._clock()
        entries = self._entries.values()
        return ContextIndexState(
            config=self.config,
            ids=np.array(entry_ids, dtype=np.int64),
            vectors=self._store.gather(entry_ids)
            if entry_ids
            else np.zeros((0, self.config.dim), np.float32),
            keys=[entry.key for entry in entries],
            values=[entry.value for entry in entries],  # never mutated in place, only replaced
            write_ages_s=[now - entry.written_at for entry in entries],
            next_id=self._next_id,
        )

    def snapshot(self, path: str | os.PathLike) -> Path:
        """Write a snapshot under the folder `path` (see `write_snapshot`); returns the snapshot's folder."""
        return write_snapshot(self.export_state(), path)

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike,
        *,
        auto_rebuild: bool = True,
        clock: Callable[[], float] = time.monotonic,
        **config_overrides: Any,
    ) -> ContextIndex:
        """A ContextIndex with the entries, recency order and config of the latest snapshot under `path`.

        config_overrides replace saved config fields (e.g. max_entries; not dim). Write ages keep counting
        across the downtime, by wall clock. Counters start at zero. Raises FileNotFoundError when there is no
        complete snapshot, ValueError when it is inconsistent.
        """
        state, saved_at_unix_s = read_snapshot(path)
        if "dim" in config_overrides and config_overrides["dim"] != state.config.dim:
            raise ValueError(
                f"dim={config_overrides['dim']!r} differs from the snapshot's {state.config.dim}"
            )
        config = replace(state.config, **config_overrides)
        index = cls(**asdict(config), auto_rebuild=auto_rebuild, clock=clock)
        index._load(state, downtime_s=max(0.0, time.time() - saved_at_unix_s))
        return index

    def _load(self, state: ContextIndexState, downtime_s: float) -> None:
        assert not self._entries, "_load needs an empty index"
        now = self._clock()
        for entry_id, key, value, age_s in zip(
            state.ids.tolist(), state.keys, state.values, state.write_ages_s, strict=True
        ):
            stored_value, num_bytes = _json_copy(value, self.config.max_value_bytes)
            self._entries.set(entry_id, _Entry(stored_value, key, now - age_s - downtime_s, num_bytes))
            self._value_bytes += num_bytes
            if key is not None:
                self._id_of_key[key] = entry_id
        for entry_id in sorted(self._entries, key=lambda entry_id: self._entries[entry_id].written_at):
            self._write_order.set(entry_id, None)
        self._store.add(state.ids, state.vectors)
        self._next_id = max(state.next_id, int(state.ids.max()) + 1 if len(state.ids) else 0)
        kind = "hnsw" if len(state.ids) > self.config.flat_max_entries else "flat"
        rebuild = IndexRebuild(kind, self.config, state.ids, state.vectors)
        rebuild.build()
        self._index, self._kind = rebuild.index, kind
        self._evict_over_bounds()


# ---- input checks ----


def _check_keys(keys: Sequence[str | None] | None, num_rows: int) -> list[str | None]:
    if keys is None:
        return [None] * num_rows
    if isinstance(keys, str | bytes) or len(keys) != num_rows:
        raise ValueError(f"keys must be a sequence of {num_rows} str-or-None, got {keys!r:.200}")
    for key in keys:
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"each key must be a non-empty str or None, got {key!r}")
    return list(keys)


def _json_copy(value: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], int]:
    """(a deep copy through strict JSON, its JSON size in bytes): what is stored is exactly what a snapshot gives
    back. ValueError for a value that is not JSON-able or larger than max_bytes."""
    if not isinstance(value, dict):
        raise ValueError(f"values must be JSON-able dicts, got {type(value).__name__}: {value!r:.200}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"values must be JSON-able dicts with finite numbers, got {value!r:.200}: {error}"
        ) from error
    num_bytes = len(text.encode())
    if num_bytes > max_bytes:
        raise ValueError(f"a value of {num_bytes} bytes (as JSON) is above max_value_bytes={max_bytes}")
    return json.loads(text), num_bytes


def _earlier_duplicates(
    vectors: np.ndarray, duplicate_similarity: float
) -> dict[int, list[tuple[int, float]]]:
    """For each row of vectors [n, dim], the earlier rows at cosine >= duplicate_similarity, as
    {row: [(earlier_row, cosine), ...]}. Example: rows a, b, a' with a' ~ a gives {2: [(0, 0.9995)]}."""
    if len(vectors) < 2:
        return {}
    duplicates: dict[int, list[tuple[int, float]]] = {}
    threshold = duplicate_similarity - SIMILARITY_TOLERANCE
    block = 1024  # rows per block of the Gram matrix: at most [1024, n] floats at a time
    for start in range(1, len(vectors), block):
        gram = vectors[start : start + block] @ vectors[: start + block].T  # [b, start + b]
        rows, earlier_rows = np.nonzero(gram >= threshold)
        for row, earlier_row in zip(rows.tolist(), earlier_rows.tolist(), strict=True):
            if earlier_row < start + row:
                duplicates.setdefault(start + row, []).append((earlier_row, float(gram[row, earlier_row])))
    return duplicates
