"""Policy caches and the adaptive decision interval: the LRU helper, exact counters on scripted sequences, eviction
order, expiry, and incremental detokenisation that always equals a full decode. CPU only, no Ray. The fuzzy cache
is a ContextIndex: see test_context_index.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.types import TreeParams
from policy.caches import CacheCounters, DecisionCache, DecodeCache, LRUCache, content_key
from policy.frequency import SmartFrequencyAdjuster
from policy.lru import LRUDict


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------------- counters


def test_hit_rate_is_hits_over_lookups_exactly():
    cache: LRUCache[str, int] = LRUCache(max_size=8)
    cache.put("a", 1)
    cache.put("b", 2)
    hits = 0
    for key in ["a", "x", "b", "y", "a", "z", "w", "b", "v", "u"]:  # 4 stored keys asked for, 6 absent
        hits += cache.get(key) is not None
    counters = cache.counters
    assert (counters.lookups, counters.hits, counters.misses, counters.inserts) == (10, 4, 6, 2)
    assert hits == 4
    assert counters.hit_rate == 0.4
    assert f"{counters.hit_rate:.1%}" == "40.0%"
    assert counters.to_dict() == {
        "lookups": 10,
        "hits": 4,
        "inserts": 2,
        "evictions": 0,
        "misses": 6,
        "hit_rate": 0.4,
    }
    assert CacheCounters().hit_rate == 0.0


def test_counters_property_is_a_snapshot():
    cache: LRUCache[str, int] = LRUCache(max_size=2)
    snapshot = cache.counters
    snapshot.hits = 99
    assert cache.counters.hits == 0


# ---------------------------------------------------------------------------------------------------- LRU helper


def test_lru_dict_orders_by_use_and_bounds_by_size():
    lru: LRUDict[str, int] = LRUDict(max_size=2)
    assert lru.set("a", 1) == [] and lru.set("b", 2) == []
    assert lru.get("a") == 1 and list(lru) == ["a", "b"]  # reading is not a use
    lru.touch("a")
    assert list(lru) == ["b", "a"] and lru.oldest() == "b"
    assert lru.set("c", 3) == [("b", 2)]  # the least recently used entry is dropped and returned
    assert lru.set("a", 10) == [] and list(lru.items()) == [("c", 3), ("a", 10)]  # a write is a use
    assert lru.pop("c") == 3 and len(lru) == 1 and "c" not in lru
    assert lru.pop_oldest() == ("a", 10)
    with pytest.raises(KeyError):
        lru.oldest()
    with pytest.raises(KeyError):
        lru.touch("missing")


def test_unbounded_lru_dict_leaves_eviction_to_its_owner():
    lru: LRUDict[int, None] = LRUDict()
    for key in range(1000):
        assert lru.set(key, None) == []
    assert len(lru) == 1000 and lru.oldest() == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_size"):
            LRUDict(max_size=bad)


# ---------------------------------------------------------------------------------------------------- LRU cache


def test_lru_evicts_least_recently_used_first():
    cache: LRUCache[str, int] = LRUCache(max_size=3)
    for index, key in enumerate("abc"):
        cache.put(key, index)
    assert cache.get("a") == 0  # a is now the most recent; b the least
    cache.put("d", 3)
    assert len(cache) == 3
    assert cache.get("b") is None
    cache.put("e", 4)  # evicts c
    assert [cache.get(key) for key in "acde"] == [0, None, 3, 4]
    counters = cache.counters
    assert (counters.inserts, counters.evictions) == (5, 2)
    assert (counters.lookups, counters.hits) == (6, 4)


def test_lru_overwrite_refreshes_recency_without_growing():
    cache: LRUCache[str, int] = LRUCache(max_size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)  # b is now least recent
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("a") == 10
    assert cache.get("b") is None


def test_lru_ttl_expires_on_lookup_with_fake_clock():
    clock = FakeClock()
    cache: LRUCache[str, int] = LRUCache(max_size=4, ttl_s=10.0, clock=clock)
    cache.put("a", 1)
    clock.now += 5.0
    cache.put("b", 2)
    clock.now += 5.0  # a is exactly 10 s old: still valid
    assert cache.get("a") == 1
    clock.now += 0.5  # a is 10.5 s old, b 5.5 s
    assert cache.get("a") is None
    assert cache.get("b") == 2
    assert len(cache) == 1
    counters = cache.counters
    assert (counters.lookups, counters.hits, counters.evictions) == (3, 2, 1)
    cache.put("b", 20)  # a write restarts the clock
    clock.now += 9.0
    assert cache.get("b") == 20


def test_disabled_cache_counts_and_stores_nothing():
    cache: LRUCache[str, int] = LRUCache(max_size=2, enabled=False)
    cache.put("a", 1)
    assert cache.get("a") is None
    assert len(cache) == 0
    assert cache.counters == CacheCounters()
    decisions = DecisionCache(enabled=False)
    decisions.put((1,), TreeParams(8, 3, 4))
    assert decisions.get((1,)) is None and decisions.counters == CacheCounters()
    decode = DecodeCache(lambda ids: "".join(map(chr, ids)), enabled=False)
    assert decode.text([72, 105]) == "Hi"
    assert decode.counters == CacheCounters()


@pytest.mark.parametrize("max_size", [0, -1, 1.5, True])
def test_lru_rejects_bad_sizes(max_size):
    with pytest.raises(ValueError, match="max_size"):
        LRUCache(max_size=max_size)


def test_lru_rejects_none_values_and_bad_ttl():
    with pytest.raises(ValueError, match="None"):
        LRUCache(max_size=1).put("a", None)
    with pytest.raises(ValueError, match="ttl_s"):
        LRUCache(max_size=1, ttl_s=0)


def test_content_key_is_stable_and_content_based():
    assert (
        content_key([1, 2, 3]) == content_key((1, 2, 3)) == content_key(np.array([1, 2, 3], dtype=np.int64))
    )
    assert content_key([1, 2, 3]) != content_key([1, 2, 3, 0])
    assert content_key([1, 2]) != content_key([2, 1])
    assert len(content_key([])) == 16
    assert (
        content_key([1, 2]).hex() == "2cc5e4d47c5f3c5fbe635a5a5b7bb392"
    )  # pinned: keys are shared across actors
    with pytest.raises(ValueError, match="integers"):
        content_key(np.array([1.5]))


# ---------------------------------------------------------------------------------------------------- decision cache


def test_decision_cache_buckets_and_counts():
    edges = [np.array([0.25, 0.75]), np.array([1.0, 2.0, 4.0])]
    assert DecisionCache.bucket(np.array([0.5, 3.0]), edges) == (1, 2)
    assert DecisionCache.bucket(np.array([0.0, 9.0]), edges) == (0, 3)
    assert DecisionCache.bucket(np.array([0.75, 1.0]), edges) == (2, 1)  # an edge belongs to the bin above it
    with pytest.raises(ValueError, match="one value per edge"):
        DecisionCache.bucket(np.array([0.5]), edges)
    with pytest.raises(ValueError, match="finite"):
        DecisionCache.bucket(np.array([math.nan, 1.0]), edges)

    cache = DecisionCache(max_size=4)
    params = TreeParams(8, 3, 4)
    bucket = DecisionCache.bucket(np.array([0.5, 3.0]), edges)
    assert cache.get(bucket) is None
    cache.put(bucket, params)
    assert cache.get(DecisionCache.bucket(np.array([0.6, 2.5]), edges)) == params  # same bucket
    assert cache.get((0, 0)) is None
    counters = cache.counters
    assert (counters.lookups, counters.hits, counters.inserts) == (3, 1, 1)
    with pytest.raises(ValueError, match="TreeParams"):
        cache.put(bucket, (8, 3, 4))


# ---------------------------------------------------------------------------------------------------- decode cache


CORPUS = (
    "def naïve_sum(values):\n    return sum(values)  # Ω(n) — déjà vu\n"
    "Größe, Straße, façade, coöperate, smörgåsbord. 日本語のテキスト、中文文本。 Emoji: 🚀🎉👍🏽 and 🇯🇵.\n"
    "Ελληνικά, русский текст, עברית, العربية. Math: ∑ ∫ √ ≤ ≥ ≠ ∞ → ⇒. Currency: € £ ¥ ₹.\n"
) * 12 + "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(40))


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Tokenizer:
    """A real byte-level BPE (GPT-2 style) trained on a few KB with multibyte text, so merges split characters."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    assert len(CORPUS.encode()) > 4000
    return tokenizer


# Fake byte-level decoder: single bytes, whole characters and pieces of multi-byte UTF-8 characters.
FAKE_PIECES = [
    b"a",
    b" ",
    b"xy",
    b"\n",
    b"\xc3",
    b"\xa9",
    b"\xe2\x82",
    b"\xac",
    b"\xf0\x9f",
    b"\x9a\x80",
    b"\xef\xbf\xbd",
]
FAKE_PIECES += ["é".encode(), "€".encode(), b"\xbf", b"\xff"]


def fake_byte_decode(token_ids: list[int]) -> str:
    return b"".join(FAKE_PIECES[token_id] for token_id in token_ids).decode("utf-8", errors="replace")


# Fake SentencePiece/Metaspace decoder: "▁" is a space, and the text's first leading space is dropped.
FAKE_WORDS = ["▁the", "▁cat", "s", "▁", ".", "▁▁", "ing", "▁a"]


def fake_metaspace_decode(token_ids: list[int]) -> str:
    text = "".join(FAKE_WORDS[token_id] for token_id in token_ids).replace("▁", " ")
    return text[1:] if text.startswith(" ") else text


def stream_texts(cache: DecodeCache, token_ids: list[int], chunk_sizes: list[int], stream=0) -> list[tuple]:
    """Feed token_ids in growing prefixes; return (cached text, prefix) pairs."""
    results, end = [], 0
    for size in chunk_sizes:
        end = min(len(token_ids), end + size)
        results.append((cache.text(token_ids[:end], stream=stream), token_ids[:end]))
        if end == len(token_ids):
            break
    return results


chunk_sizes_strategy = st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunk_sizes=chunk_sizes_strategy, overlap=st.integers(1, 5))
def test_decode_cache_equals_full_decode_on_byte_level_bpe(byte_level_tokenizer, data, chunk_sizes, overlap):
    vocab_size = byte_level_tokenizer.get_vocab_size()
    if data.draw(st.booleans()):  # real text (every merge boundary it uses) ...
        start = data.draw(st.integers(0, len(CORPUS) - 1))
        token_ids = byte_level_tokenizer.encode(CORPUS[start : start + 300]).ids
    else:  # ... or arbitrary ids, i.e. arbitrary (often invalid) byte strings
        token_ids = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=120))
    decode = byte_level_tokenizer.decode
    cache = DecodeCache(
        decode, max_size=64, overlap=overlap, max_tail_tokens=overlap + data.draw(st.integers(0, 8))
    )
    for text, prefix in stream_texts(cache, token_ids, chunk_sizes):
        assert text == decode(prefix)


@settings(max_examples=150, deadline=None)
@given(
    token_ids=st.lists(st.integers(0, len(FAKE_PIECES) - 1), max_size=80),
    chunk_sizes=chunk_sizes_strategy,
    overlap=st.integers(1, 5),
)
def test_decode_cache_equals_full_decode_on_fake_byte_decoder(token_ids, chunk_sizes, overlap):
    cache = DecodeCache(fake_byte_decode, max_size=64, overlap=overlap, max_tail_tokens=overlap)
    for text, prefix in stream_texts(cache, token_ids, chunk_sizes):
        assert text == fake_byte_decode(prefix)


@settings(max_examples=100, deadline=None)
@given(token_ids=st.lists(st.integers(0, len(FAKE_WORDS) - 1), max_size=60), chunk_sizes=chunk_sizes_strategy)
def test_decode_cache_equals_full_decode_on_fake_metaspace_decoder(token_ids, chunk_sizes):
    cache = DecodeCache(fake_metaspace_decode, max_size=64, overlap=1, max_tail_tokens=3)
    for text, prefix in stream_texts(cache, token_ids, chunk_sizes):
        assert text == fake_metaspace_decode(prefix)


def test_decode_cache_interleaved_streams_stay_exact(byte_level_tokenizer):
    decode = byte_level_tokenizer.decode
    first = byte_level_tokenizer.encode(CORPUS[:400]).ids
    second = byte_level_tokenizer.encode(CORPUS[150:600]).ids
    cache = DecodeCache(decode, max_size=8)
    for end in range(3, 60, 3):
        assert cache.text(first[:end], stream="first") == decode(first[:end])
        assert cache.text(second[:end], stream="second") == decode(second[:end])
    assert cache.text(second[:10], stream="first") == decode(second[:10])  # a different sequence: no reuse


def test_decode_cache_handles_one_list_grown_in_place(byte_level_tokenizer):
    decode = byte_level_tokenizer.decode
    source = byte_level_tokenizer.encode(CORPUS[:600]).ids
    cache = DecodeCache(decode)
    growing: list[int] = []
    for token_id in source[:80]:
        growing.append(token_id)  # the caller mutates the list it passed before
        assert cache.text(growing) == decode(growing)
    growing[10] = source[40]  # an edit inside the old prefix: no stale reuse
    assert cache.text(growing + source[80:84]) == decode(growing + source[80:84])
    assert cache.counters.lookups == 81


def test_decode_cache_counts_hits_and_decodes_only_the_tail(byte_level_tokenizer):
    decoded_lengths: list[int] = []

    def decode(token_ids):
        decoded_lengths.append(len(token_ids))
        return byte_level_tokenizer.decode(token_ids)

    # ASCII text, so every boundary is settled and the tail bound below is exact (multibyte text can hold the
    # anchor back a few calls; the hypothesis tests cover its exactness).
    token_ids = byte_level_tokenizer.encode(CORPUS[CORPUS.index("line 0") :]).ids
    assert len(token_ids) >= 100
    cache = DecodeCache(decode, max_size=16, overlap=4, max_tail_tokens=16)
    ends = list(range(20, 101, 4))  # 21 calls, growing by 4 tokens
    for end in ends:
        assert cache.text(token_ids[:end], stream="s") == byte_level_tokenizer.decode(token_ids[:end])
    counters = cache.counters
    assert (counters.lookups, counters.hits) == (21, 20)  # only the first call decoded everything
    assert max(decoded_lengths[3:]) <= 16 + 4  # after warm-up, decodes cover at most the tail plus new tokens
    cache.text(token_ids[:100], stream="s")  # the same sequence again is a hit too
    cache.text(token_ids[:50], stream="s")  # shorter than the previous one: a full decode, a miss
    cache.text(token_ids[:60], stream="new")  # an unknown stream: a miss
    counters = cache.counters
    assert (counters.lookups, counters.hits) == (24, 21)
    assert counters.hit_rate == 21 / 24


def test_decode_cache_holds_back_the_anchor_inside_a_character():
    decoded: list[list[int]] = []

    def decode(token_ids):
        decoded.append(list(token_ids))
        return fake_byte_decode(token_ids)

    cache = DecodeCache(decode, overlap=1, max_tail_tokens=1)
    euro_start, euro_end, letter = 6, 7, 0  # b"\xe2\x82" + b"\xac" is "€"
    ids = [letter, letter, euro_start]
    assert cache.text(ids) == "aa\ufffd"
    ids = ids + [euro_end, letter]
    assert cache.text(ids) == "aa€a"  # the split character was re-decoded whole, not appended as U+FFFD
    assert cache.counters.hits == 1


# ---------------------------------------------------------------------------------------------------- frequency


def test_frequency_defaults_match_the_prototype():
    adjuster = SmartFrequencyAdjuster()
    assert adjuster.interval == 8
    assert (adjuster.min_interval, adjuster.max_interval) == (1, 32)
    assert (adjuster.target_overhead_fraction, adjuster.stable_decisions_to_grow) == (0.01, 3)
    assert adjuster.worth_saving_fraction == 0.005


def test_frequency_decides_on_step_zero_and_every_interval():
    adjuster = SmartFrequencyAdjuster(initial_interval=4)
    decided = [step for step in range(13) if adjuster.should_decide(step)]
    assert decided == [0, 4, 8, 12]
    assert (adjuster.decisions, adjuster.skipped_steps) == (4, 9)
    assert adjuster.should_decide(0)  # a new generation starts again at step 0


def test_frequency_scripted_growth_and_shrink():
    adjuster = SmartFrequencyAdjuster(initial_interval=8, min_interval=2, max_interval=32)
    # Worth saving: 0.0048 s over 8 steps of 0.1 s = 0.6% (within the 1% budget, above the 0.5% floor).
    moderate = {"decision_seconds": 0.0048, "step_seconds": 0.1}
    script = [
        (False, 8),  # 1 stable
        (False, 8),  # 2 stable
        (False, 16),  # 3 stable -> double (now 0.3% a decision: no longer worth saving)
        (False, 16),
        (False, 16),
        (False, 16),  # stable, but too cheap to skip: stays
    ]
    for changed, expected_interval in script:
        adjuster.record_decision(changed, **moderate)
        assert adjuster.interval == expected_interval
    for expected_interval in (8, 4, 2, 2):  # changed -> halve, clamped at min_interval (cheap decisions)
        adjuster.record_decision(True, decision_seconds=1e-5, step_seconds=0.1)
        assert adjuster.interval == expected_interval
    assert adjuster.changes == 4
    # Decisions worth saving at every interval: stable runs double up to max_interval.
    costly = SmartFrequencyAdjuster(initial_interval=8, max_interval=32, target_overhead_fraction=0.5)
    for expected_interval in (8, 8, 16, 16, 16, 32, 32, 32, 32):
        costly.record_decision(False, decision_seconds=0.01, step_seconds=0.1)
        assert costly.interval == expected_interval


def test_cheap_stable_decisions_keep_the_interval():
    adjuster = SmartFrequencyAdjuster(initial_interval=2)
    for _ in range(10):
        adjuster.record_decision(False, decision_seconds=5e-5, step_seconds=0.02)  # 0.125% a decision
    assert adjuster.interval == 2
    adjuster.record_decision(True, decision_seconds=5e-5, step_seconds=0.02)
    assert adjuster.interval == 1


def test_frequency_overhead_budget_doubles_even_on_change():
    adjuster = SmartFrequencyAdjuster(initial_interval=4, target_overhead_fraction=0.01)
    adjuster.record_decision(True, decision_seconds=0.002, step_seconds=0.01)  # 0.002 / (4 * 0.01) = 5%
    assert adjuster.interval == 8 and adjuster.last_overhead_fraction == pytest.approx(0.05)
    adjuster.record_decision(True, decision_seconds=0.002, step_seconds=0.01)  # 2.5%
    assert adjuster.interval == 16
    adjuster.record_decision(True, decision_seconds=0.001, step_seconds=0.01)  # 0.625%: within budget
    assert adjuster.interval == 8
    adjuster.record_decision(
        True, decision_seconds=0.001, step_seconds=0.0
    )  # unknown step time: no budget rule
    assert adjuster.interval == 4
    with pytest.raises(ValueError, match="decision_seconds"):
        adjuster.record_decision(False, decision_seconds=-1.0, step_seconds=0.01)


def test_frequency_validates_its_settings():
    with pytest.raises(ValueError, match="min_interval"):
        SmartFrequencyAdjuster(initial_interval=64)
    with pytest.raises(ValueError, match="target_overhead_fraction"):
        SmartFrequencyAdjuster(target_overhead_fraction=0)
