"""One engine thread per actor: the batched engine decodes the rows of every batch the actor is working on.

Ray Data may hand an actor several batches at once (`max_concurrent_batches`, threads of one actor). Each
`__call__` submits its rows here and waits for their results; the engine thread admits them into its continuous
batch as rows finish, so one batch's stragglers decode together with the next batch's rows instead of leaving
the batch half empty. The thread steps only while there is work, and records how long it was busy: that is the
actor's generation time (rows overlap, so their own times do not add up to it).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from engine.batch import BatchEngine, GenerationRequest, RequestResult
from engine.draft_head import DraftHead
from engine.target import TargetModel
from engine.types import BatchPlanner


class EngineRunner:
    """Owns a `BatchEngine` and the thread that steps it. `submit` is thread-safe."""

    def __init__(
        self,
        target: TargetModel,
        head: DraftHead,
        max_length: int | None,
        max_batch_size: int,
        planner: BatchPlanner | None = None,
        before_request: Callable[[int, GenerationRequest], None] | None = None,
    ) -> None:
        self.engine = BatchEngine(target, head, max_length, max_batch_size, planner, self._before)
        self._hook = before_request
        self._ids = itertools.count()
        self._futures: dict[int, tuple[Future, int]] = {}
        self._inbox: list[tuple[int, GenerationRequest]] = []
        self._wake = threading.Condition()
        self._closed = False
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="eagleray-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[GenerationRequest]) -> list[Future]:
        """Queue requests; each future resolves to its RequestResult (never raises for a row's failure)."""
        futures = []
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine runner is closed")
            for position, request in enumerate(requests):
                key = next(self._ids)
                future: Future = Future()
                self._futures[key] = (future, position)
                self._inbox.append((key, request))
                futures.append(future)
            self._wake.notify()
        return futures

    def generate(self, requests: list[GenerationRequest]) -> list[RequestResult]:
        """Submit and wait: one result per request, in order."""
        return [future.result() for future in self.submit(requests)]

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet decoding (a gauge: read without the engine's lock)."""
        return len(self._inbox) + len(self.engine.queue)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5.0)

    def _before(self, key: int, request: GenerationRequest) -> None:
        """The caller's hook sees a row's index within its own submission, as with `generate_batch`."""
        if self._hook is not None:
            self._hook(self._futures[key][1], request)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not self._inbox and engine.idle and not self._closed:
                    self._wake.wait()
                if self._closed and not self._inbox and engine.idle:
                    return
                for key, request in self._inbox:
                    engine.submit(key, request)
                self._inbox.clear()
            started = time.perf_counter()
            try:
                engine.step()
            except Exception as error:  # a bug in the engine: fail the rows in flight, keep serving the next
                engine.fail_all(f"{type(error).__name__}: {error}")
            except BaseException as error:  # the thread is going away: no caller may wait forever
                engine.fail_all(f"{type(error).__name__}: the engine thread stopped")
                for index, _ in engine.queue:
                    engine.results[index] = RequestResult(
                        error=f"{type(error).__name__}: the engine thread stopped"
                    )
                self._deliver()
                raise
            self.busy_seconds += time.perf_counter() - started
            self._deliver()

    def _deliver(self) -> None:
        results = self.engine.results
        for key in list(results):
            future, _ = self._futures.pop(key)
            result = results.pop(key)
            if not future.cancelled():  # a caller that gave up on its row
                future.set_result(result)
