"""`LRUDict`: a map that keeps its keys in order of use, least recently used first.

The one recency structure of the policy's caches: `LRUCache` (a bounded cache with a time-to-live and counters,
`caches.py`), the decode cache's streams, and `ContextIndex`'s use and write orders are all built on it. It only
orders and bounds; what counts as a use (a hit, a write), counting, and expiry belong to its owner.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, ItemsView, Iterator, ValuesView
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUDict(Generic[K, V]):
    """Keys in use order, least recently used first.

    `set` and `touch` count as uses; reading (`get`, `[]`, `in`, iteration) does not, so the owner decides which
    reads refresh recency. max_size: when given, `set` drops the least recently used entries beyond it and
    returns them; when None the map is unbounded and the owner evicts with `pop_oldest`.

    Example: d = LRUDict(2); d.set("a", 1); d.set("b", 2); d.touch("a"); d.set("c", 3) -> [("b", 2)], and
    list(d) == ["a", "c"].
    """

    def __init__(self, max_size: int | None = None) -> None:
        if max_size is not None and (
            not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1
        ):
            raise ValueError(f"max_size must be an int >= 1 or None (unbounded), got {max_size!r}")
        self.max_size = max_size
        self._items: OrderedDict[K, V] = OrderedDict()

    def set(self, key: K, value: V) -> list[tuple[K, V]]:
        """Store `value` under `key` as the most recently used entry; returns the entries dropped for size."""
        self._items[key] = value
        self._items.move_to_end(key)
        evicted: list[tuple[K, V]] = []
        while self.max_size is not None and len(self._items) > self.max_size:
            evicted.append(self._items.popitem(last=False))
        return evicted

    def touch(self, key: K) -> None:
        """Mark `key` as the most recently used entry. KeyError if absent."""
        self._items.move_to_end(key)

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._items.get(key, default)

    def pop(self, key: K) -> V:
        """Remove `key` and return its value. KeyError if absent."""
        return self._items.pop(key)

    def oldest(self) -> K:
        """The least recently used key. KeyError when empty."""
        if not self._items:
            raise KeyError("oldest() of an empty LRUDict")
        return next(iter(self._items))

    def pop_oldest(self) -> tuple[K, V]:
        """Remove and return the least recently used (key, value). KeyError when empty."""
        return self._items.popitem(last=False)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._items)

    def values(self) -> ValuesView[V]:
        return self._items.values()

    def items(self) -> ItemsView[K, V]:
        return self._items.items()

    def clear(self) -> None:
        self._items.clear()
