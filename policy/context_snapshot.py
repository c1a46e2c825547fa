"""Snapshots of a `ContextIndex` on disk, and the records they hold (`ContextIndexConfig`, `ContextIndexState`).

`write_snapshot` writes a `ContextIndexState` (a copy of an index's entries and config, made on the index's
owner thread by `ContextIndex.export_state`) as a new folder `path/snapshot-NNNNNNNNN/` of .npy (vectors, ids)
and JSON (keys, values, write ages, config), never pickle. Everything is written and fsynced in a temporary
folder that is then renamed into place, so a crash mid-snapshot leaves the previous snapshot intact; older
snapshots are deleted afterwards. `read_snapshot` reads the latest complete snapshot back and checks that its
files agree; `has_snapshot` says whether there is one. These functions touch only their arguments and the
files, so `write_snapshot` may run in a worker thread.

Not here: the index, exporting its state and building an index from a read state (`ContextIndex.export_state`
and `ContextIndex.restore` in `context_index.py`; this module never imports it), deciding when to snapshot
(`actors/context_cache.py`), and locking: one writer per folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

# Exact search up to this many entries, HNSW beyond: Flat costs O(entries) per query and falls behind HNSW
# (M=32, efSearch 64) past about this size (`python -m jobs.bench_cache` measures both).
FLAT_MAX_ENTRIES = 10_000
SNAPSHOT_FORMAT_VERSION = 1
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d{9})$")
TEMPORARY_PREFIX = ".tmp-"
MANIFEST_FILE = "manifest.json"  # written last inside a snapshot folder


@dataclass(frozen=True)
class ContextIndexConfig:
    """What a `ContextIndex` is; saved in its snapshots. See `ContextIndex` for each field."""

    dim: int = 384
    max_entries: int = 200_000
    similarity_threshold: float = 0.85
    duplicate_similarity: float = 0.999
    ttl_s: float | None = None
    flat_max_entries: int = FLAT_MAX_ENTRIES
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    hnsw_ef_construction: int = 40
    rebuild_deleted_fraction: float = 0.2
    max_value_bytes: int = 4096
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name, minimum in (
            ("dim", 1),
            ("max_entries", 1),
            ("max_value_bytes", 2),
            ("flat_max_entries", 0),
            ("hnsw_m", 2),
            ("hnsw_ef_search", 1),
            ("hnsw_ef_construction", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name in ("similarity_threshold", "duplicate_similarity"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.duplicate_similarity < self.similarity_threshold:
            raise ValueError(
                f"duplicate_similarity ({self.duplicate_similarity!r}) must be >= similarity_threshold "
                f"({self.similarity_threshold!r}): an insert may only overwrite an entry it would hit"
            )
        if self.ttl_s is not None and not (isinstance(self.ttl_s, int | float) and self.ttl_s > 0):
            raise ValueError(f"ttl_s must be > 0 seconds or None (no expiry), got {self.ttl_s!r}")
        if self.max_memory_bytes is not None and (
            not isinstance(self.max_memory_bytes, int) or self.max_memory_bytes < 1
        ):
            raise ValueError(f"max_memory_bytes must be an int >= 1 or None, got {self.max_memory_bytes!r}")
        fraction = self.rebuild_deleted_fraction
        if not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
            raise ValueError(f"rebuild_deleted_fraction must be in (0, 1), got {fraction!r}")


@dataclass(frozen=True)
class ContextIndexState:
    """A copy of everything a snapshot holds, made on the owner thread; `write_snapshot` may run elsewhere.

    Rows are least recently used first: ids [n], vectors [n, dim] (unit rows), keys, values, write ages."""

    config: ContextIndexConfig
    ids: np.ndarray
    vectors: np.ndarray
    keys: list[str | None]
    values: list[dict[str, Any]]
    write_ages_s: list[float]
    next_id: int


def write_snapshot(state: ContextIndexState, path: str | os.PathLike) -> Path:
    """Write `state` as a new folder `path/snapshot-NNNNNNNNN/` and delete the older ones.

    Files: vectors.npy [n, dim] float32 and ids.npy [n] int64 (np.save, allow_pickle=False), entries.json
    (keys, values, write ages; all lists in least recently used first order, aligned with ids) and
    manifest.json (format, config, counts). Everything is written and fsynced in `path/.tmp-<random>/`, which
    is then renamed into place: a crash leaves either the previous snapshot or the new one, plus a temporary
    folder that the next snapshot removes. One writer per `path`.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TEMPORARY_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    existing = _snapshot_folders(root)
    number = existing[0][0] + 1 if existing else 0
    temporary = root / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
    temporary.mkdir()
    _write_file(temporary / "vectors.npy", lambda file: np.save(file, state.vectors, allow_pickle=False))
    _write_file(temporary / "ids.npy", lambda file: np.save(file, state.ids, allow_pickle=False))
    entries = {"keys": state.keys, "values": state.values, "write_ages_s": state.write_ages_s}
    _write_file(temporary / "entries.json", lambda file: file.write(json.dumps(entries).encode()))
    manifest = {
        "format_version": SNAPSHOT_FORMAT_VERSION,
        "saved_at_unix_s": time.time(),
        "num_entries": len(state.ids),
        "next_id": state.next_id,
        "config": asdict(state.config),
    }
    _write_file(temporary / MANIFEST_FILE, lambda file: file.write(json.dumps(manifest, indent=1).encode()))
    final = root / f"{SNAPSHOT_PREFIX}{number:09d}"
    os.rename(temporary, final)
    _fsync_folder(root)
    for _, older in existing:
        shutil.rmtree(older, ignore_errors=True)
    return final


def has_snapshot(path: str | os.PathLike) -> bool:
    """Whether `path` holds a complete snapshot."""
    return _latest_snapshot_folder(Path(path)) is not None


def read_snapshot(path: str | os.PathLike) -> tuple[ContextIndexState, float]:
    """(state, saved_at_unix_s) of the latest complete snapshot under `path`; temporary folders are ignored."""
    folder = _latest_snapshot_folder(Path(path))
    if folder is None:
        raise FileNotFoundError(f"no complete snapshot under {path}")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("format_version") != SNAPSHOT_FORMAT_VERSION:
        raise ValueError(
            f"{folder}: format_version {manifest.get('format_version')!r}, expected {SNAPSHOT_FORMAT_VERSION}"
        )
    known_fields = {field.name for field in fields(ContextIndexConfig)}
    config = ContextIndexConfig(**{k: v for k, v in manifest["config"].items() if k in known_fields})
    vectors = np.load(folder / "vectors.npy", allow_pickle=False)
    entry_ids = np.load(folder / "ids.npy", allow_pickle=False)
    entries = json.loads((folder / "entries.json").read_text())
    num_entries = manifest["num_entries"]
    if vectors.dtype != np.float32 or vectors.shape != (num_entries, config.dim):
        raise ValueError(
            f"{folder}: vectors are {vectors.dtype} {vectors.shape}, expected [{num_entries}, {config.dim}]"
        )
    if entry_ids.dtype != np.int64 or entry_ids.shape != (num_entries,):
        raise ValueError(
            f"{folder}: ids are {entry_ids.dtype} {entry_ids.shape}, expected int64 [{num_entries}]"
        )
    if len(np.unique(entry_ids)) != num_entries:
        raise ValueError(f"{folder}: ids are not unique")
    for name in ("keys", "values", "write_ages_s"):
        if len(entries[name]) != num_entries:
            raise ValueError(
                f"{folder}: entries.json has {len(entries[name])} {name}, expected {num_entries}"
            )
    state = ContextIndexState(
        config=config,
        ids=entry_ids,
        vectors=vectors,
        keys=entries["keys"],
        values=entries["values"],
        write_ages_s=entries["write_ages_s"],
        next_id=int(manifest["next_id"]),
    )
    return state, float(manifest["saved_at_unix_s"])


def _snapshot_folders(root: Path) -> list[tuple[int, Path]]:
    """(number, folder) of the renamed-into-place snapshot folders, newest first."""
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), child)
        for child in root.iterdir()
        if (match := SNAPSHOT_PATTERN.match(child.name)) and child.is_dir()
    ]
    return sorted(found, reverse=True)


def _latest_snapshot_folder(root: Path) -> Path | None:
    for _, folder in _snapshot_folders(root):
        if (folder / MANIFEST_FILE).is_file():
            return folder
    return None


def _write_file(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
