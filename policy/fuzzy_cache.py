"""A fuzzy decision cache: similar contexts (by sentence-embedding cosine) reuse a stored decision.

`FuzzyCache` keeps L2-normalised embeddings in a FAISS inner-product index (so inner product = cosine) with one
value per entry, typically the TreeParams chosen for that context. It is bounded with LRU eviction and an optional
time-to-live. It is a plain class: the Ray actor that shares it across the cluster wraps it (DESIGN decision 7),
and nothing here imports ray. It computes no embeddings (see `embedding.py`) and knows nothing of exact-hash
look-ups, which callers try first (see `caches.py`).

`IndexFlatIP` is exact and costs O(entries) per query (measured 0.6 ms at 10k entries on this CPU), so it suits
up to about 30k entries; beyond that an HNSW index with periodic rebuilds is the planned successor.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import faiss
import numpy as np

from policy.caches import CacheCounters

V = TypeVar("V")

# float32 inner products of unit vectors are off by a few ulp (an exact duplicate can score 0.99999994), so
# thresholds are compared with this much slack.
SIMILARITY_TOLERANCE = 1e-6


def normalise_embeddings(embeddings: np.ndarray, dim: int) -> np.ndarray:
    """Rows scaled to unit length, as a C-contiguous float32 [n, dim] array (FAISS's input format).

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


@dataclass
class FuzzyCacheCounters(CacheCounters):
    """`CacheCounters` plus: `near_misses`, look-ups whose nearest entry scored below the threshold (misses on an
    empty cache are not near misses); `updates`, inserts that overwrote a near-duplicate entry's value in place
    (not counted in `inserts`, which counts new entries)."""

    near_misses: int = 0
    updates: int = 0


class FuzzyCache(Generic[V]):
    """Nearest-neighbour cache over unit-normalised embeddings.

    dim: embedding size (384 for all-MiniLM-L6-v2).
    similarity_threshold: a look-up hits when the nearest entry's cosine is >= this, in (0, 1].
    duplicate_similarity: an insert this close to an existing entry overwrites that entry's value instead of
        adding a new one, in (0, 1].
    max_size: entries kept; beyond it the least recently used (hit or written) entry is removed.
    ttl_s: if given, entries older than this (since last written) are removed before each look-up or insert,
        counted as evictions.
    clock: seconds, monotonic; injected for tests.

    It leaves FAISS's OpenMP thread count alone: FAISS and torch share one OpenMP runtime, so setting it here
    would silently change the generation thread's torch thread count too.
    """

    def __init__(
        self,
        dim: int,
        max_size: int = 10_000,
        similarity_threshold: float = 0.85,
        duplicate_similarity: float = 0.999,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
        for name, value in (
            ("similarity_threshold", similarity_threshold),
            ("duplicate_similarity", duplicate_similarity),
        ):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds or None (no expiry), got {ttl_s!r}")
        self.dim = dim
        self.max_size = max_size
        self.similarity_threshold = similarity_threshold
        self.duplicate_similarity = duplicate_similarity
        self.ttl_s = ttl_s
        self._clock = clock
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._values: OrderedDict[int, V] = OrderedDict()  # id -> value, least recently used first
        self._written_at: OrderedDict[int, float] = OrderedDict()  # id -> time, oldest write first
        self._next_id = 0
        self._counters = FuzzyCacheCounters()

    def lookup(self, embedding: np.ndarray) -> tuple[V | None, float | None]:
        """(value, cosine) of the nearest entry on a hit; (None, its cosine) below the threshold; (None, None)
        when the cache is empty."""
        return self.lookup_batch(np.asarray(embedding).reshape(1, -1))[0]

    def lookup_batch(self, embeddings: np.ndarray) -> list[tuple[V | None, float | None]]:
        """`lookup` for each row of embeddings [n, dim], with one FAISS search."""
        queries = self._normalise(embeddings)  # [n, dim]
        self._remove_expired()
        self._counters.lookups += len(queries)
        if len(self._values) == 0:
            return [(None, None)] * len(queries)
        similarities, ids = self._index.search(queries, 1)  # [n, 1] each
        results: list[tuple[V | None, float | None]] = []
        for similarity, entry_id in zip(similarities[:, 0].tolist(), ids[:, 0].tolist(), strict=True):
            assert entry_id in self._values, "FAISS returned an id the cache does not hold"
            if similarity >= self.similarity_threshold - SIMILARITY_TOLERANCE:
                self._values.move_to_end(entry_id)
                self._counters.hits += 1
                results.append((self._values[entry_id], similarity))
            else:
                self._counters.near_misses += 1
                results.append((None, similarity))
        return results

    def insert(self, embedding: np.ndarray, value: V) -> None:
        """Store `value` for this context; overwrite a near-duplicate's value instead of adding an entry."""
        if value is None:
            raise ValueError("FuzzyCache cannot store None: None means a miss")
        query = self._normalise(np.asarray(embedding).reshape(1, -1))  # [1, dim]
        self._remove_expired()
        now = self._clock()
        if len(self._values):
            similarities, ids = self._index.search(query, 1)
            entry_id = int(ids[0, 0])
            if similarities[0, 0] >= self.duplicate_similarity - SIMILARITY_TOLERANCE:
                self._values[entry_id] = value
                self._values.move_to_end(entry_id)
                self._written_at[entry_id] = now
                self._written_at.move_to_end(entry_id)
                self._counters.updates += 1
                return
        entry_id = self._next_id
        self._next_id += 1
        self._index.add_with_ids(query, np.array([entry_id], dtype=np.int64))
        self._values[entry_id] = value
        self._written_at[entry_id] = now
        self._counters.inserts += 1
        if len(self._values) > self.max_size:
            least_recent_id, _ = self._values.popitem(last=False)
            self._remove(least_recent_id)

    def _remove(self, entry_id: int) -> None:
        """Drop an entry from the index and the bookkeeping (already popped from `_values` or not)."""
        self._values.pop(entry_id, None)
        del self._written_at[entry_id]
        num_removed = self._index.remove_ids(np.array([entry_id], dtype=np.int64))
        assert num_removed == 1, f"FAISS removed {num_removed} vectors for id {entry_id}"
        self._counters.evictions += 1

    def _remove_expired(self) -> None:
        if self.ttl_s is None:
            return
        deadline = self._clock() - self.ttl_s
        while self._written_at:
            entry_id, written_at = next(iter(self._written_at.items()))
            if written_at >= deadline:
                break
            self._remove(entry_id)

    def _normalise(self, embeddings: np.ndarray) -> np.ndarray:
        return normalise_embeddings(embeddings, self.dim)

    @property
    def counters(self) -> FuzzyCacheCounters:
        """A snapshot of the counters."""
        return replace(self._counters)

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Drop every entry; the counters keep their history."""
        self._index.reset()
        self._values.clear()
        self._written_at.clear()
