"""Finished generations by their prompt's embedding: what cross-request drafting retrieves.

An `OutputStore` keeps, per fingerprint (model + tokenizer + chat template: `actors.cross_drafts.fingerprint`),
the new token ids of finished rows in a FAISS inner-product index over their prompts' unit embeddings, so
`similar` finds the outputs of the most similar earlier prompts. Outputs of a different model or tokenizer are
never returned: each fingerprint has its own index. Memory is bounded: beyond max_entries entries, or
max_memory_bytes of vectors and tokens, the oldest entries go first (a job's latest outputs are the likeliest
to match what it does next).

Snapshots: `write_store` saves the entries as a folder of .npy and JSON (never pickle), written in a temporary
folder and renamed into place; `read_store` reads it back. The context cache actor (`actors.context_cache`)
owns one store and snapshots it beside its index.

Not here: deciding what to publish and turning outputs into draft branches (`actors.cross_drafts`,
`engine.suffix`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

DEFAULT_MAX_ENTRIES = 20_000
DEFAULT_MAX_MEMORY_BYTES = 64 << 20
MAX_OUTPUT_TOKENS = 1024  # tokens kept per output (its beginning: where similar prompts' outputs agree most)
ENTRY_OVERHEAD_BYTES = 200  # bookkeeping per entry, beside its vector and tokens
STORE_FOLDER = "outputs"


@dataclass
class _Entry:
    fingerprint: str
    publisher: str
    tokens: np.ndarray  # int32 [n]

    def num_bytes(self, dim: int) -> int:
        return dim * 4 + self.tokens.nbytes + ENTRY_OVERHEAD_BYTES


class OutputStore:
    """Outputs of finished rows, searchable by prompt embedding within one fingerprint. Not thread safe."""

    def __init__(
        self,
        dim: int = 384,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ) -> None:
        for name, value in (
            ("dim", dim),
            ("max_entries", max_entries),
            ("max_memory_bytes", max_memory_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.dim, self.max_entries, self.max_memory_bytes = dim, max_entries, max_memory_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._indexes: dict[str, faiss.IndexIDMap2] = {}
        self._next_id = 0
        self._bytes = 0
        self.num_published = 0
        self.num_evicted = 0
        self.num_searches = 0
        self.num_returned = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def memory_bytes(self) -> int:
        """Vectors, tokens and a fixed overhead per entry."""
        return self._bytes

    def publish(
        self, fingerprint: str, embeddings: np.ndarray, outputs: list[list[int]], publisher: str
    ) -> int:
        """Store outputs[i] under embeddings[i] ([n, dim], unit rows) for `fingerprint`; returns the number of
        entries. Empty outputs are skipped."""
        vectors = self._vectors(embeddings)
        if len(vectors) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs for {len(vectors)} embeddings")
        index = self._indexes.get(fingerprint)
        if index is None:
            index = self._indexes[fingerprint] = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        kept = [i for i, tokens in enumerate(outputs) if len(tokens)]
        ids = np.arange(self._next_id, self._next_id + len(kept), dtype=np.int64)
        self._next_id += len(kept)
        for entry_id, i in zip(ids.tolist(), kept, strict=True):
            tokens = np.asarray(outputs[i][:MAX_OUTPUT_TOKENS], dtype=np.int32)
            entry = _Entry(fingerprint, publisher, tokens)
            self._entries[entry_id] = entry
            self._bytes += entry.num_bytes(self.dim)
        if kept:
            index.add_with_ids(vectors[kept], ids)
        self.num_published += len(kept)
        self._evict()
        return len(self._entries)

    def similar(
        self, fingerprint: str, embeddings: np.ndarray, k: int, min_similarity: float = 0.0
    ) -> list[list[dict]]:
        """Per row of embeddings [n, dim]: up to k entries of `fingerprint` with cosine >= min_similarity,
        most similar first, as {"tokens": list[int], "publisher": str, "similarity": float}."""
        vectors = self._vectors(embeddings)
        self.num_searches += len(vectors)
        index = self._indexes.get(fingerprint)
        if index is None or index.ntotal == 0 or k < 1:
            return [[] for _ in vectors]
        similarities, ids = index.search(vectors, min(k, index.ntotal))
        results = []
        for row_similarities, row_ids in zip(similarities, ids, strict=True):
            hits = []
            for similarity, entry_id in zip(row_similarities.tolist(), row_ids.tolist(), strict=True):
                entry = self._entries.get(entry_id)
                if entry_id < 0 or entry is None or similarity < min_similarity:
                    continue
                hits.append(
                    {"tokens": entry.tokens.tolist(), "publisher": entry.publisher, "similarity": similarity}
                )
            self.num_returned += len(hits)
            results.append(hits)
        return results

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "fingerprints": sum(index.ntotal > 0 for index in self._indexes.values()),
            "memory_bytes": self._bytes,
            "max_memory_bytes": self.max_memory_bytes,
            "max_entries": self.max_entries,
            "published": self.num_published,
            "evicted": self.num_evicted,
            "searches": self.num_searches,
            "returned": self.num_returned,
        }

    def _vectors(self, embeddings: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [n, {self.dim}], got {list(vectors.shape)}")
        return vectors

    def _evict(self) -> None:
        removed: dict[str, list[int]] = {}
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_memory_bytes
        ):
            entry_id, entry = self._entries.popitem(last=False)
            self._bytes -= entry.num_bytes(self.dim)
            removed.setdefault(entry.fingerprint, []).append(entry_id)
            self.num_evicted += 1
        for fingerprint, ids in removed.items():
            self._indexes[fingerprint].remove_ids(np.asarray(ids, dtype=np.int64))

    # ---- snapshots ------------------------------------------------------------------------------------------

    def export_state(self) -> tuple[np.ndarray, list[dict]]:
        """(vectors [n, dim], entries as JSON-able dicts), oldest first: a copy for `write_store`."""
        records = [
            {
                "id": entry_id,
                "fingerprint": entry.fingerprint,
                "publisher": entry.publisher,
                "tokens": entry.tokens.tolist(),
            }
            for entry_id, entry in self._entries.items()
        ]
        vectors = np.zeros((len(records), self.dim), np.float32)
        for row, record in enumerate(records):
            vectors[row] = self._indexes[record["fingerprint"]].reconstruct(record["id"])
        return vectors, records

    def load_state(self, vectors: np.ndarray, records: list[dict]) -> None:
        """Publish a saved state's entries again, oldest first (the bounds of this store apply)."""
        for row, record in enumerate(records):
            self.publish(
                record["fingerprint"], vectors[row : row + 1], [record["tokens"]], record["publisher"]
            )
        self.num_published = 0


def write_store(state: tuple[np.ndarray, list[dict]], path: str | os.PathLike) -> Path:
    """Write `OutputStore.export_state()` to `path/outputs/`, replacing what was there."""
    vectors, records = state
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".tmp-outputs-{uuid.uuid4().hex}"
    temporary.mkdir()
    np.save(temporary / "vectors.npy", vectors)
    (temporary / "entries.json").write_text(json.dumps(records))
    final = root / STORE_FOLDER
    old = root / f".old-outputs-{uuid.uuid4().hex}"
    if final.exists():
        final.rename(old)
    temporary.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_store(path: str | os.PathLike) -> tuple[np.ndarray, list[dict]] | None:
    """What `write_store` wrote under `path`, or None when there is nothing (or it does not agree)."""
    folder = Path(path) / STORE_FOLDER
    try:
        vectors = np.load(folder / "vectors.npy", allow_pickle=False)
        records = json.loads((folder / "entries.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(records, list) or len(records) != len(vectors):
        return None
    return vectors, records
