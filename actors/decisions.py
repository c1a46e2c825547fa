"""Prompt-level tree decisions shared across the cluster: a local cache in front of the shared cache actor.

For each prompt, a generation actor asks "has a similar prompt been generated before, and which tree served it
best?". The look-up order is: the actor's own `ContextIndex` (exact content hash, then cosine over MiniLM prompt
embeddings), then the shared `ContextCacheActor` (the same look-up over every actor's entries). A hit hands the
stored tree to the engine for the whole generation, so that generation asks the policy nothing. After a miss, the
tree that measured fastest on that prompt (accepted tokens per second of step time) is published to both levels.

All of it runs on one background thread, never on the generation thread: the encoder loads there, each batch's
prompts are embedded and looked up there while the batch generates, and results are published there. A
generation whose look-up has not finished when its first step starts simply uses the actor's controller
(`PromptController`), counted as `not_ready`.

Shared look-ups go over the shared actor's look-up link (`lookup_link.py`: a direct TCP connection to the
actor's process, cheaper per look-up than a Ray call), and through a Ray call while the link is down. When the
shared actor cannot be reached (dead, restarting, or too slow), the actor carries on with its local cache only,
counts the outage, and tries the shared actor again after `retry_after_s`. Values are small dicts
({"tree": "12/11/1", "actor": "3f2a9c1e", "tokens_per_s": 412.0}); no text is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import ray

from actors.lookup_link import LookupLinkClient, LookupLinkError
from engine.types import Controller, DecodingState, StepStats, TreeParams
from policy.context_index import ContextIndex

PROMPT_EMBEDDING_CHARS = 256  # the prompt's tail that is embedded: the part nearest to what is generated next
MIN_STEPS_FOR_RATE = 2  # a tree used for fewer steps than this is not trusted as the prompt's best


@dataclass
class DecisionCounters:
    """Prompt-level counts. Each counter has one writer: `not_ready`, `steps_served` and `generations_served`
    the generation thread, the rest the background thread; so no lock is needed. `cross_actor_hits` are shared
    hits on entries another actor published; `steps_served` are engine steps whose tree came from a cached
    decision (no policy call)."""

    lookups: int = 0
    not_ready: int = 0  # generations that started before their look-up finished (they used the policy)
    failures: int = 0  # background look-up or publish jobs that raised (the generations went on)
    local_hits: int = 0
    shared_lookups: int = 0
    shared_hits: int = 0
    cross_actor_hits: int = 0
    steps_served: int = 0
    generations_served: int = 0
    published: int = 0
    shared_unreachable: int = 0  # shared calls that failed or timed out
    link_lookups: int = 0  # shared look-ups answered over the actor's look-up link (the rest: Ray calls)
    link_failures: int = 0  # link calls that failed; that batch went through a Ray call instead
    local_only_lookups: int = 0  # look-ups made while the shared actor was considered down
    embedding_seconds: float = 0.0  # on the background thread
    shared_seconds: float = 0.0  # on the background thread
    encoder_load_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def best_tree(steps: Sequence[StepStats]) -> tuple[TreeParams, float] | None:
    """The tree with the most tokens emitted per second of step time among those used for at least
    MIN_STEPS_FOR_RATE steps (or the most used, if none was), with its rate; None without steps."""
    emitted: dict[TreeParams, int] = {}
    seconds: dict[TreeParams, float] = {}
    count: dict[TreeParams, int] = {}
    for step in steps:
        emitted[step.tree_params] = emitted.get(step.tree_params, 0) + step.num_emitted
        seconds[step.tree_params] = seconds.get(step.tree_params, 0.0) + step.step_seconds
        count[step.tree_params] = count.get(step.tree_params, 0) + 1
    if not count:
        return None
    trusted = [tree for tree, n in count.items() if n >= MIN_STEPS_FOR_RATE] or [max(count, key=count.get)]
    rate = {tree: emitted[tree] / max(seconds[tree], 1e-9) for tree in trusted}
    tree = max(trusted, key=rate.get)
    return tree, rate[tree]


class PromptDecisions:
    """Background, local-then-shared look-up of prompt-level tree decisions, with honest counters.

    load_encoder: returns texts -> unit embeddings [n, dim] (MiniLM); called once, on the background thread.
    shared: a ContextCacheActor handle, or None for local-only.
    """

    def __init__(
        self,
        actor_id: str,
        load_encoder: Callable[[], Callable[[list[str]], np.ndarray]],
        shared=None,
        similarity_threshold: float = 0.85,
        local_size: int = 150,
        timeout_s: float = 2.0,
        retry_after_s: float = 5.0,
        embedding_chars: int = PROMPT_EMBEDDING_CHARS,
    ) -> None:
        self.actor_id = actor_id
        self.shared = shared
        self.local = ContextIndex(max_entries=local_size, similarity_threshold=similarity_threshold)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.embedding_chars = embedding_chars
        self.counters = DecisionCounters()
        self.last_error: str | None = None
        self._shared_down_until = 0.0
        self._link: LookupLinkClient | None = None  # the shared actor's look-up link, once known
        self._link_down_until = 0.0
        self._embeddings: dict[str, np.ndarray] = {}  # key -> embedding, kept from look-up until publish
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eagleray-prompt-decisions")
        self._encoder: Future = self._executor.submit(self._load_encoder, load_encoder)

    def _load_encoder(self, load_encoder):
        started = time.perf_counter()
        encoder = load_encoder()
        self.counters.encoder_load_seconds = time.perf_counter() - started
        return encoder

    # ---- called on the generation thread (never blocks on embedding or the shared actor) ----------------------

    def submit(self, texts: list[str], keys: list[str]) -> list[Future]:
        """Start the look-ups of a batch of prompts; each future resolves to a TreeParams or None."""
        futures: list[Future] = [Future() for _ in texts]
        self._executor.submit(self._lookup_job, list(texts), list(keys), futures)
        return futures

    def publish(self, keys: list[str], steps: list[Sequence[StepStats]]) -> Future:
        """Store each generation's fastest tree under its prompt (local and shared), in the background."""
        return self._executor.submit(self._publish_job, list(keys), [list(s) for s in steps])

    def record(self, served_steps: int | None) -> None:
        """A generation finished: on a cached tree for `served_steps` steps, or (None) on the policy."""
        if served_steps is not None:
            self.counters.generations_served += 1
            self.counters.steps_served += served_steps

    def count_not_ready(self) -> None:
        self.counters.not_ready += 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._link is not None:
            self._link.close()

    # ---- the background thread ----------------------------------------------------------------------------------

    def _lookup_job(self, texts: list[str], keys: list[str], futures: list[Future]) -> None:
        try:
            encode = self._encoder.result()
            started = time.perf_counter()
            embeddings = encode([text[-self.embedding_chars :] for text in texts])  # [n, dim]
            self.counters.embedding_seconds += time.perf_counter() - started
            for key, embedding in zip(keys, embeddings, strict=True):
                self._embeddings[key] = embedding
            decisions = self._lookup(embeddings, keys)
        except Exception as error:  # a failed look-up costs speed only: the generations use the policy
            self.counters.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            decisions = [None] * len(texts)
        for future, decision in zip(futures, decisions, strict=True):
            future.set_result(decision)

    def _lookup(self, embeddings: np.ndarray, keys: list[str]) -> list[TreeParams | None]:
        self.counters.lookups += len(keys)
        decisions: list[TreeParams | None] = [None] * len(keys)
        missing = []
        for index, hit in enumerate(self.local.lookup_batch(embeddings, keys)):
            if hit is not None:
                decisions[index] = TreeParams.parse(hit.value["tree"])
                self.counters.local_hits += 1
            else:
                missing.append(index)
        if missing and self.shared is not None:
            shared_hits = self._shared_lookup(embeddings[missing], [keys[index] for index in missing])
            if shared_hits is not None:
                self.counters.shared_lookups += len(missing)
                for index, hit in zip(missing, shared_hits, strict=True):
                    if hit is None:
                        continue
                    value = hit["value"]  # the actor answers plain dicts: {"value", "similarity", "is_exact"}
                    decisions[index] = TreeParams.parse(value["tree"])
                    self.counters.shared_hits += 1
                    self.counters.cross_actor_hits += int(value.get("actor") != self.actor_id)
                    self.local.insert_batch(embeddings[index : index + 1], [value], [keys[index]])
        return decisions

    def _publish_job(self, keys: list[str], steps: list[list[StepStats]]) -> None:
        try:
            rows, values = [], []
            for key, generation_steps in zip(keys, steps, strict=True):
                best = best_tree(generation_steps)
                if best is None or key not in self._embeddings:
                    continue
                tree, rate = best
                rows.append(key)
                values.append({"tree": tree.compact, "actor": self.actor_id, "tokens_per_s": round(rate, 3)})
            if rows:
                vectors = np.stack([self._embeddings[key] for key in rows])  # [n, dim]
                self.local.insert_batch(vectors, values, rows)
                self.counters.published += len(rows)
                if self.shared is not None:
                    self._call_shared("insert_batch", vectors, values, rows)
        except Exception as error:
            self.counters.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
        finally:
            for key in keys:
                self._embeddings.pop(key, None)

    def _shared_lookup(self, embeddings: np.ndarray, keys: list[str]) -> list[dict | None] | None:
        """The shared actor's hits over its look-up link, or through a Ray call when the link is down (a
        failed link is counted and tried again after retry_after_s); None when the actor cannot be reached."""
        link = self._link_to_shared()
        if link is not None:
            started = time.perf_counter()
            try:
                hits = link.lookup_batch(embeddings, keys)
                self.counters.link_lookups += len(keys)
                return hits
            except LookupLinkError as error:
                self.counters.link_failures += 1
                self.last_error = f"{type(error).__name__}: {error}"
                link.close()
                self._link = None
                self._link_down_until = time.monotonic() + self.retry_after_s
            finally:
                self.counters.shared_seconds += time.perf_counter() - started
        return self._call_shared("lookup_batch", embeddings, keys)

    def _link_to_shared(self) -> LookupLinkClient | None:
        """The client of the shared actor's look-up link, asking the actor where it is when there is none."""
        now = time.monotonic()
        if self._link is None and now >= self._link_down_until and now >= self._shared_down_until:
            description = self._call_shared("lookup_link")
            if description is not None:
                self._link = LookupLinkClient.from_description(description, self.timeout_s)
        return self._link

    def _call_shared(self, method: str, *args):
        """The shared actor's answer, or None (counted) when it is down, failing or slower than timeout_s."""
        if time.monotonic() < self._shared_down_until:
            if method == "lookup_batch":
                self.counters.local_only_lookups += len(args[1])
            return None
        started = time.perf_counter()
        try:
            return ray.get(getattr(self.shared, method).remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as error:
            self.counters.shared_unreachable += 1
            self.last_error = f"{type(error).__name__}: {error}"
            self._shared_down_until = time.monotonic() + self.retry_after_s
            if method == "lookup_batch":
                self.counters.local_only_lookups += len(args[1])
            return None
        finally:
            self.counters.shared_seconds += time.perf_counter() - started


class PromptController:
    """One generation's controller: the prompt's cached tree when its look-up finished before the first step,
    otherwise the actor's own controller for the whole generation (a `StaticController` for a static policy).
    The fallback sees `observe` and `finish` only for generations it decided."""

    def __init__(self, lookup: Future, fallback: Controller, decisions: PromptDecisions) -> None:
        self.lookup = lookup
        self.fallback = fallback
        self.decisions = decisions
        self.cached: TreeParams | None = None

    def decide(self, state: DecodingState) -> TreeParams:
        if state.step_index == 0:
            if self.lookup.done():
                self.cached = self.lookup.result()
            else:
                self.decisions.count_not_ready()
        if self.cached is not None:
            return self.cached
        return self.fallback.decide(state)

    def observe(self, stats: StepStats) -> None:
        if self.cached is None:
            self.fallback.observe(stats)

    def finish(self, num_new_tokens: int, wall_seconds: float) -> None:
        if self.cached is None:
            self.fallback.finish(num_new_tokens, wall_seconds)
