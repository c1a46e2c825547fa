"""Cross-request drafts, a generation actor's side: what similar earlier prompts generated becomes draft branches.

When a batch's prompts start, `CrossRequestDrafts.start` embeds them (MiniLM) and fetches, from the shared
context cache actor, the outputs of the most similar earlier prompts of the same model fingerprint, published
by any actor of the job. Each row then drafts from an `engine.suffix.RowProposals`: its own prompt and output,
the fetched outputs, and this actor's own recent outputs (shared by its rows, updated as rows finish). A
finished row's output is queued and `publish` sends the queue to the cache actor after every batch, without
waiting: publishing never holds up generation.

Faults: a cache actor that is dead, restarting or slow (CALL_TIMEOUT_S), or an encoder that fails, costs the
rows of that batch their fetched outputs (they draft from their prompt and this actor's outputs), and is
counted; nothing fails a row.

Counters (`RetrievalCounters`, cumulative) reach the job summary and the dashboard through the actor's stats;
the tokens proposed and accepted per source are counted by the engine in each step's StepStats.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from engine.suffix import RowProposals, TokenIndex

SOURCES = ("prompt", "actor", "cluster")  # the row's own prompt and output; this actor's outputs; another's
NEIGHBOURS = 4  # outputs fetched per prompt
MIN_SIMILARITY = 0.3  # cosine below which an earlier prompt's output is not fetched
RECENT_OUTPUTS = 256  # this actor's own outputs kept for its rows
CALL_TIMEOUT_S = 5.0
EMBED_CHARS = 1000  # a prompt's beginning is embedded: a template's instruction, the start of a record
MAX_PUBLISHES_IN_FLIGHT = 8


def fingerprint(model_config: dict, tokenizer) -> str:
    """What decides a model's outputs for a prompt: its config, its tokenizer's vocabulary and chat template.
    Outputs are shared only between actors whose fingerprints agree."""
    config = {
        key: value
        for key, value in model_config.items()
        if key not in ("_name_or_path", "transformers_version")
    }
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


@dataclass
class RetrievalCounters:
    """Cumulative, per actor process."""

    fetches: int = 0  # prompts whose similar outputs were asked for
    fetched_outputs: int = 0  # outputs that came back (each became part of a row's index)
    fetch_failures: int = 0  # batches whose fetch failed: their rows drafted local-only
    published_outputs: int = 0  # outputs sent to the cache actor
    publish_failures: int = 0  # publish calls that failed (those outputs are not shared)
    embed_seconds: float = 0.0
    fetch_seconds: float = 0.0


class CrossRequestDrafts:
    """One actor's cross-request drafting.

    cache: the ContextCacheActor handle (None: this actor's own outputs and each row's prompt only).
    model_fingerprint: `fingerprint(...)` of the actor's target and tokenizer.
    load_encoder: returns texts -> unit embeddings [n, dim]; called once, here (not without a cache)."""

    def __init__(
        self,
        cache,
        model_fingerprint: str,
        actor_id: str,
        load_encoder: Callable[[], Callable[[list[str]], np.ndarray]],
        neighbours: int = NEIGHBOURS,
        min_similarity: float = MIN_SIMILARITY,
    ) -> None:
        self.cache, self.fingerprint, self.actor_id = cache, model_fingerprint, actor_id
        self.neighbours, self.min_similarity = neighbours, min_similarity
        self._load_encoder = load_encoder
        # Loaded with the actor (a few seconds), not inside its first batch; without a cache nothing is embedded.
        self._encode: Callable[[list[str]], np.ndarray] | None = None if cache is None else load_encoder()
        self.recent = TokenIndex(max_sequences=RECENT_OUTPUTS)
        self.counters = RetrievalCounters()
        self._lock = threading.Lock()
        self._queued: list[tuple[np.ndarray, list[int]]] = []
        self._in_flight: list = []

    def start(self, texts: list[str], prompt_ids: list[list[int]]) -> list[RowProposals]:
        """One RowProposals per prompt (texts: what is embedded; prompt_ids: what the row's index starts with)."""
        if not texts:
            return []
        started = time.perf_counter()
        if self.cache is None:  # nothing to fetch from or publish to: no embeddings needed
            return [RowProposals(ids, (), self.recent, on_finish=self._finisher(None)) for ids in prompt_ids]
        try:
            if self._encode is None:
                self._encode = self._load_encoder()
            embeddings = self._encode([text[:EMBED_CHARS] for text in texts])
        except Exception:  # no embeddings: these rows draft from their prompts and this actor's outputs
            with self._lock:
                self.counters.fetch_failures += 1
            return [RowProposals(ids, (), self.recent, on_finish=self._finisher(None)) for ids in prompt_ids]
        fetched_at = time.perf_counter()
        fetched = self._fetch(embeddings)
        with self._lock:
            self.counters.embed_seconds += fetched_at - started
            self.counters.fetch_seconds += time.perf_counter() - fetched_at
        return [
            RowProposals(ids, outputs, self.recent, on_finish=self._finisher(embedding))
            for ids, outputs, embedding in zip(prompt_ids, fetched, embeddings, strict=True)
        ]

    def _fetch(self, embeddings: np.ndarray) -> list[list[tuple[list[int], str]]]:
        empty: list[list[tuple[list[int], str]]] = [[] for _ in embeddings]
        if self.cache is None:
            return empty
        try:
            hits = ray.get(
                self.cache.similar_outputs.remote(
                    self.fingerprint, embeddings, self.neighbours, self.min_similarity
                ),
                timeout=CALL_TIMEOUT_S,
            )
        except (ray.exceptions.RayError, TimeoutError):
            with self._lock:
                self.counters.fetch_failures += 1
            return empty
        rows = [
            [(hit["tokens"], "actor" if hit["publisher"] == self.actor_id else "cluster") for hit in row_hits]
            for row_hits in hits
        ]
        with self._lock:
            self.counters.fetches += len(rows)
            self.counters.fetched_outputs += sum(len(row) for row in rows)
        return rows

    def _finisher(self, embedding: np.ndarray | None) -> Callable[[list[int]], None]:
        def finished(new_tokens: list[int]) -> None:  # on the engine's thread, as the row finishes
            if not new_tokens:
                return
            self.recent.add(new_tokens, "actor")
            if embedding is not None:
                with self._lock:
                    self._queued.append((embedding, new_tokens))

        return finished

    def publish(self) -> None:
        """Send the finished rows' outputs to the cache actor (one call, not waited for), and count the
        earlier calls that failed."""
        if self.cache is None:
            with self._lock:
                self._queued.clear()
            return
        if self._in_flight:
            done, self._in_flight = ray.wait(self._in_flight, num_returns=len(self._in_flight), timeout=0)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    self.counters.publish_failures += 1
        with self._lock:
            queued, self._queued = self._queued, []
        if not queued or len(self._in_flight) >= MAX_PUBLISHES_IN_FLIGHT:
            with self._lock:  # a stuck cache actor: keep at most one call's worth waiting, drop the rest
                self._queued = queued[-64:] + self._queued
            return
        embeddings = np.stack([embedding for embedding, _ in queued])
        outputs = [tokens for _, tokens in queued]
        try:
            ref = self.cache.publish_outputs.remote(self.fingerprint, embeddings, outputs, self.actor_id)
        except ray.exceptions.RayError:
            self.counters.publish_failures += 1
            return
        self._in_flight.append(ref)
        self.counters.published_outputs += len(outputs)
