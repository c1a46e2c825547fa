"""Local caches of the policy's inference path, with counters that count only what really happened.

- `LRUCache`: a bounded least-recently-used map (`lru.LRUDict`) with an optional time-to-live and counters, the
  building block of the others.
- `DecodeCache`: incremental detokenisation of a growing token stream (reuses the text of a cached prefix).
- `content_key`: the content hash of a token sequence; the optimizer's state cache is an `LRUCache` from it to
  the context's embedding.
- `DecisionCache`: TreeParams keyed by a bucketed observation.

The ground rule: a look-up counts as a hit only when a stored value is actually returned and used. Nothing here
estimates a hit rate. This module holds no fuzzy (embedding) look-up (`context_index.ContextIndex` is that cache),
and it does not decide when to consult a cache (see `optimizer.py`).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Generic, TypeVar

import numpy as np

from engine.types import TreeParams
from policy.lru import LRUDict

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

REPLACEMENT_CHARACTER = "\ufffd"  # what a UTF-8 decoder emits for an incomplete or invalid byte sequence


@dataclass
class CacheCounters:
    """What a cache did. `lookups` counts get calls on an enabled cache, `hits` the look-ups that returned a
    stored value, `inserts` the values stored (new keys and overwrites), `evictions` the entries dropped for size
    or age (not by `clear`)."""

    lookups: int = 0
    hits: int = 0
    inserts: int = 0
    evictions: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_rate(self) -> float:
        """hits / lookups, exactly; 0.0 before the first look-up."""
        return self.hits / self.lookups if self.lookups else 0.0

    def to_dict(self) -> dict[str, int | float]:
        return {**asdict(self), "misses": self.misses, "hit_rate": self.hit_rate}


class LRUCache(Generic[K, V]):
    """A map of at most `max_size` entries that evicts the least recently used one.

    ttl_s: if given, an entry older than `ttl_s` seconds (since its last `put`) is dropped when looked up; that
        look-up is a miss and the drop an eviction. A hit does not extend the entry's life.
    enabled: when False, `get` returns None and counts nothing, and `put` stores nothing. This is how a cache
        level is turned off without changing the caller.
    clock: seconds, monotonic; injected so that tests can move time.

    Values must not be None: None is what `get` returns for a miss.
    """

    def __init__(
        self,
        max_size: int,
        ttl_s: float | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds or None (no expiry), got {ttl_s!r}")
        self.max_size = max_size
        self.ttl_s = ttl_s
        self.enabled = enabled
        self._clock = clock
        self._entries: LRUDict[K, tuple[V, float]] = LRUDict(max_size)  # key -> (value, written_at)
        self._counters = CacheCounters()

    def get(self, key: K) -> V | None:
        """The stored value (a hit, and the entry becomes the most recent), or None (a miss)."""
        if not self.enabled:
            return None
        self._counters.lookups += 1
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, written_at = entry
        if self.ttl_s is not None and self._clock() - written_at > self.ttl_s:
            self._entries.pop(key)
            self._counters.evictions += 1
            return None
        self._entries.touch(key)
        self._counters.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        """Store `value` as the most recent entry, evicting the least recent ones beyond `max_size`."""
        if value is None:
            raise ValueError("LRUCache cannot store None: None means a miss")
        if not self.enabled:
            return
        self._counters.inserts += 1
        self._counters.evictions += len(self._entries.set(key, (value, self._clock())))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def counters(self) -> CacheCounters:
        """A snapshot of the counters."""
        return replace(self._counters)

    def clear(self) -> None:
        """Drop every entry. The counters keep their history (dropped entries are not counted as evictions)."""
        self._entries.clear()


def content_key(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """A stable 16-byte key for a token sequence: blake2b of its little-endian int32 bytes.

    Equal sequences give equal keys on every machine and in every process (unlike `hash()`), so keys can be
    shared between actors. Example: content_key([1, 2]) == content_key((1, 2)) == content_key(np.array([1, 2])).
    """
    if isinstance(token_ids, np.ndarray) and token_ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got an array of dtype {token_ids.dtype}")
    return _content_hasher(token_ids).digest()


def _int32_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    data = np.asarray(token_ids, dtype="<i4")
    if data.ndim != 1:
        raise ValueError(f"token ids must be one sequence (1-D), got shape {data.shape}")
    return data.tobytes()


def _content_hasher(token_ids: Sequence[int] | np.ndarray) -> hashlib.blake2b:
    """The hash state behind `content_key`; `update(_int32_bytes(more_ids))` extends it to ids + more_ids."""
    return hashlib.blake2b(_int32_bytes(token_ids), digest_size=16)


@dataclass(frozen=True)
class _DecodedPrefix:
    """The text of a decoded token sequence, and where a continuation of it can start decoding.

    anchor: a token index whose text is settled: for every continuation `ids` of this prefix,
        decode(ids) == text[:head_length] + decode(ids[anchor:]).
    Example (byte-level, overlap 2, "é" = bytes C3 A9 split over tokens e1, e2): for [h, i, e1, e2, !, ?] the
    boundary before "!" is settled (its window [e1, e2] decodes to "é"), so anchor 4, head "hié"; for
    [h, i, e1, e2, !] the boundary before e2 is not (its window [i, e1] decodes to "i\ufffd"), so the anchor
    stays where it was.
    """

    num_tokens: int
    text: str
    anchor: int
    head_length: int


@dataclass
class _StreamState:
    """A stream's previous sequence (a copy, since callers often grow one list in place) and its hash state."""

    token_ids: list[int]
    hasher: hashlib.blake2b


class DecodeCache:
    """Incremental detokenisation: `text(ids)` equals `decode(ids)` exactly, but decodes only a short tail when
    the stream's previous sequence is a cached prefix of `ids`.

    How: each decoded sequence is stored under content_key(ids) with an anchor, a token boundary `overlap` or more
    tokens before its end whose text is settled. The next call on the same stream checks that the previous
    sequence is a prefix of `ids` (a list comparison; its content key is extended by hashing only the new
    tokens), finds its entry by that key, keeps the settled head of its text, and decodes `ids[anchor:]` (the
    overlap plus the new tokens). Per call this costs O(len(ids)) only in C-level list copies and comparisons.
    Like Hugging Face's streaming detokeniser, the anchor only moves to a boundary whose window decodes to text
    that does not end in the replacement character '\ufffd', because a byte-level BPE token can end inside a
    multi-byte UTF-8 character.

    Exactness contract on `decode`: after a window that decodes to a complete final character, the text of what
    follows does not depend on what came before. This holds for byte-level BPE decoders (GPT-2, Llama-3, Qwen2,
    the demo tokenizer: token bytes concatenated, then UTF-8 decoded with replacement), and with the overlap for
    SentencePiece/Metaspace decoders (they strip only the first token's leading space). It does not hold for
    decoders that rewrite text across tokens, e.g. `clean_up_tokenization_spaces=True`: pass a decode without it.
    Keys are 128-bit content hashes; a collision (about 2**-64 after 2**32 entries) is the only other way to err.

    Counters: `lookups` counts `text` calls, `hits` the calls that reused a cached prefix's text (a non-empty
    settled head), the rest fell back to a full decode. `inserts`/`evictions` are those of the prefix LRU.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        max_size: int = 1024,
        overlap: int = 4,
        max_tail_tokens: int = 16,
        enabled: bool = True,
    ) -> None:
        if overlap < 1:
            raise ValueError(f"overlap must be >= 1 token, got {overlap}")
        if max_tail_tokens < overlap:
            raise ValueError(f"max_tail_tokens must be >= overlap ({overlap}), got {max_tail_tokens}")
        self._decode = decode
        self.overlap = overlap
        self.max_tail_tokens = max_tail_tokens
        self.enabled = enabled
        self._prefixes: LRUCache[bytes, _DecodedPrefix] = LRUCache(max_size)
        self._streams: LRUDict[Hashable, _StreamState] = LRUDict(max_size)
        self._lookups = 0
        self._hits = 0

    def text(self, token_ids: Sequence[int], stream: Hashable = None) -> str:
        """decode(token_ids), reusing the text of this stream's previous sequence when it is a prefix.

        stream: names the token stream (e.g. a request id); calls on one stream should pass growing sequences.
        """
        ids = token_ids if isinstance(token_ids, list) else [int(t) for t in token_ids]
        if not self.enabled:
            return self._decode(ids)
        self._lookups += 1
        num_tokens = len(ids)
        cached, hasher = self._find_prefix(ids, stream)
        if cached is not None and cached.num_tokens == num_tokens:
            text = cached.text  # the same sequence again
            anchor, head_length = cached.anchor, cached.head_length
            self._hits += 1
        elif cached is not None:
            # ids = [settled head | tail from the anchor]; only the tail is decoded.
            text = cached.text[: cached.head_length] + self._decode(ids[cached.anchor :])
            anchor, head_length = cached.anchor, cached.head_length
            self._hits += 1
        else:
            text = self._decode(ids)
            anchor, head_length = 0, 0
        if num_tokens - anchor > self.max_tail_tokens or head_length == 0:
            anchor, head_length = self._advance_anchor(ids, text, anchor, head_length)
        self._prefixes.put(hasher.digest(), _DecodedPrefix(num_tokens, text, anchor, head_length))
        self._streams.set(stream, _StreamState(list(ids), hasher))
        return text

    def _find_prefix(self, ids: list[int], stream: Hashable) -> tuple[_DecodedPrefix | None, hashlib.blake2b]:
        """The cached entry of the stream's previous sequence if it is a prefix of `ids` (else None), and the
        hash state of `ids`."""
        state = self._streams.get(stream)
        num_previous = len(state.token_ids) if state is not None else 0
        if state is None or num_previous > len(ids) or ids[:num_previous] != state.token_ids:
            return None, _content_hasher(ids)
        hasher = state.hasher.copy()
        cached = self._prefixes.get(hasher.digest())
        hasher.update(_int32_bytes(ids[num_previous:]))
        if cached is None or cached.head_length == 0:
            return None, hasher  # nothing settled to reuse: a full decode, counted as a miss
        assert cached.num_tokens == num_previous, "content key collision in DecodeCache"
        return cached, hasher

    def _advance_anchor(self, ids: list[int], text: str, anchor: int, head_length: int) -> tuple[int, int]:
        """Move the anchor to `overlap` tokens before the end if that boundary is settled.

        Settled: the window just before it decodes to text ending in a complete character (a byte-level
        decoder is then between characters there, whatever came before), and `text` ends with the decoded
        tokens after it (true for the decoders of the class contract; a cheap guard otherwise).
        """
        candidate = len(ids) - self.overlap
        if candidate <= anchor:
            return anchor, head_length
        window = self._decode(ids[max(anchor, candidate - self.overlap) : candidate])
        if not window or window.endswith(REPLACEMENT_CHARACTER):
            return anchor, head_length
        rest = self._decode(ids[candidate:])
        if not text.endswith(rest):
            return anchor, head_length
        return candidate, len(text) - len(rest)

    @property
    def counters(self) -> CacheCounters:
        prefix_counters = self._prefixes.counters
        return CacheCounters(
            lookups=self._lookups,
            hits=self._hits,
            inserts=prefix_counters.inserts,
            evictions=prefix_counters.evictions,
        )

    def __len__(self) -> int:
        return len(self._prefixes)

    def clear(self) -> None:
        self._prefixes.clear()
        self._streams.clear()


class DecisionCache(LRUCache[tuple[int, ...], TreeParams]):
    """An LRUCache of TreeParams keyed by an observation bucket: similar observations reuse one decision.

    Buckets come from `bucket(features, edges)` with fixed, per-feature edges, chosen once (e.g. from quantiles of
    a calibration run) and never moved while the cache lives; otherwise one key would mean different observations.
    """

    def __init__(
        self,
        max_size: int = 4096,
        ttl_s: float | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max_size, ttl_s=ttl_s, enabled=enabled, clock=clock)

    @staticmethod
    def bucket(features: np.ndarray, edges: Sequence[Sequence[float]]) -> tuple[int, ...]:
        """Bucket index of each feature: the number of edges <= feature_i (np.digitize's convention).

        features: [num_features]; edges: num_features increasing sequences (they may differ in length).
        Example: features [0.5, 3.0], edges [[0.25, 0.75], [1, 2, 4]] -> (1, 2).
        It runs on every decision, so it works on Python floats with bisect, avoiding the per-call overhead of
        one np.digitize per feature.
        """
        values = features.tolist() if isinstance(features, np.ndarray) else list(features)
        if len(values) != len(edges) or any(isinstance(value, list) for value in values):
            raise ValueError(
                f"features must be 1-D with one value per edge array ({len(edges)}), got {features!r:.200}"
            )
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"features must be finite to be bucketed, got {values}")
        return tuple(
            bisect.bisect_right(feature_edges, value)
            for value, feature_edges in zip(values, edges, strict=True)
        )

    def put(self, bucket: tuple[int, ...], params: TreeParams) -> None:
        if not isinstance(params, TreeParams):
            raise ValueError(f"DecisionCache stores TreeParams, got {type(params).__name__}")
        super().put(bucket, params)
