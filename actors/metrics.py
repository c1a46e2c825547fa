"""Dashboard metrics of a generation actor, through `ray.util.metrics`.

Every metric carries the tags `job` (the run's unique id, which the job prints at start, so that two runs of one
job name are two series), `job_name` (--job-name) and `actor` (Ray requires a value for every declared tag key)
and is named `eagleray_*`; the Ray metrics exporter shows them as `ray_eagleray_*` in Prometheus and the
dashboard's Metrics tab. Counters take deltas per batch. Each counter series exists from the start at 0 (rows
by status and by finish reason as the actor starts, the others at their first report), so that a dashboard
plots `status="error"` before the first error and `increase()` sees that first error. This module only
publishes numbers that the actor measured; it computes nothing of its own.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from actors.stats import ActorStats
from common.columns import FINISH_REASON_VALUES

TAG_KEYS = ("job", "job_name", "actor")
ROW_SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


def record_zero(metric: Counter, tags: dict[str, str] | None = None) -> None:
    """Create a counter's series (its default tags plus `tags`) at 0, as Prometheus clients do for labelled
    counters. `Counter.inc(0)` raises (Ray 2.60 accepts only values > 0); `Metric._record`, which `inc` calls once
    that check has passed, records the 0 as an increment of nothing, and the exporter then shows the series."""
    metric._record(0, tags=tags)


class ActorMetrics:
    """The metrics one generation actor publishes."""

    def __init__(self, run_id: str, job_name: str, actor: str) -> None:
        self.tags = {"job": run_id, "job_name": job_name, "actor": actor}

        def counter(name: str, description: str, extra: tuple[str, ...] = ()) -> Counter:
            metric = Counter(f"eagleray_{name}", description=description, tag_keys=TAG_KEYS + extra)
            metric.set_default_tags(self.tags)
            return metric

        def gauge(name: str, description: str) -> Gauge:
            metric = Gauge(f"eagleray_{name}", description=description, tag_keys=TAG_KEYS)
            metric.set_default_tags(self.tags)
            return metric

        self.rows = counter("rows", "rows finished, by status (ok or error)", ("status",))
        self.finish_reasons = counter(
            "finish_reasons", "generated rows by finish reason (stop, length or context)", ("reason",)
        )
        self.tokens = counter("generated_tokens", "new tokens generated")
        self.steps = counter("steps", "draft/verify steps")
        self.fallbacks = counter("fallbacks", "steps that fell back to the static tree")
        self.cache_lookups = counter("cache_lookups", "look-ups per cache level", ("level",))
        self.cache_hits = counter("cache_hits", "hits (stored value reused) per cache level", ("level",))
        self.shared_unreachable = counter(
            "shared_cache_unreachable", "failed calls to the shared cache actor"
        )
        self.retrieved_tokens = counter(
            "retrieved_tokens",
            "retrieved branch tokens (cross-request drafts), by source and outcome (proposed or accepted)",
            ("source", "outcome"),
        )
        self.retrieval_failures = counter(
            "retrieval_failures", "failed fetches and publishes to the cache actor (local-only drafting)"
        )
        self.retrieval_seconds = gauge(
            "retrieval_seconds", "seconds spent embedding prompts and fetching outputs"
        )
        self.tau = gauge("mean_accepted_tokens", "tau: tokens gained per step, this actor so far")
        self.decision_overhead = gauge(
            "decision_overhead_fraction", "share of generation wall time spent deciding trees"
        )
        self.tokens_per_s = gauge("tokens_per_second", "generated tokens per second of generation time")
        self.row_seconds = Histogram(
            "eagleray_row_seconds",
            description="generation seconds per row",
            boundaries=ROW_SECONDS_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )
        self.row_seconds.set_default_tags(self.tags)
        self._last: dict[str, float] = {}
        for status in ("ok", "error"):
            self._add(self.rows, f"rows_{status}", 0, {"status": status})
        for reason in FINISH_REASON_VALUES:
            self._add(self.finish_reasons, f"finish_{reason}", 0, {"reason": reason})
        self._add(self.tokens, "tokens", 0)
        self._add(self.steps, "steps", 0)

    def _add(self, metric: Counter, key: str, total: float, tags: dict[str, str] | None = None) -> None:
        """Increase `metric` by how much `total` grew since the last call for this key; the first call for a key
        creates its series, at 0 when nothing was counted yet."""
        first = key not in self._last
        delta = total - self._last.get(key, 0)
        self._last[key] = total
        if delta > 0:
            metric.inc(delta, tags=tags)
        elif first:
            record_zero(metric, tags)

    def publish(self, stats: ActorStats, row_seconds: list[float]) -> None:
        """Publish an actor's cumulative stats (`GenerationActor.stats()`) and this batch's row times."""
        totals = stats.totals
        self._add(self.rows, "rows_ok", totals.rows_ok, {"status": "ok"})
        self._add(self.rows, "rows_error", totals.rows_error, {"status": "error"})
        for reason, count in totals.finish_reasons.items():
            self._add(self.finish_reasons, f"finish_{reason}", count, {"reason": reason})
        self._add(self.tokens, "tokens", totals.generated_tokens)
        self._add(self.steps, "steps", totals.steps)
        optimizer = stats.optimizer
        if optimizer is not None:
            self._add(self.fallbacks, "fallbacks", optimizer.fallbacks)
            for level, lookups in optimizer.cache_lookups.items():
                self._add(self.cache_lookups, f"lookups:{level}", lookups, {"level": level})
                self._add(self.cache_hits, f"hits:{level}", optimizer.cache_hits[level], {"level": level})
        decisions = stats.decisions
        if decisions is not None:
            for level, lookups, hits in (
                ("prompt_local", decisions.lookups, decisions.local_hits),
                ("prompt_shared", decisions.shared_lookups, decisions.shared_hits),
            ):
                self._add(self.cache_lookups, f"lookups:{level}", lookups, {"level": level})
                self._add(self.cache_hits, f"hits:{level}", hits, {"level": level})
            self._add(self.shared_unreachable, "unreachable", decisions.shared_unreachable)
        for source in ("prompt", "actor", "cluster"):
            for outcome in ("proposed", "accepted"):
                self._add(
                    self.retrieved_tokens,
                    f"retrieved:{source}:{outcome}",
                    getattr(totals, f"retrieved_{outcome}_{source}"),
                    {"source": source, "outcome": outcome},
                )
        self._add(self.retrieval_failures, "retrieval_failures", totals.retrieval_failures)
        self.retrieval_seconds.set(totals.retrieval_seconds)
        if totals.steps:
            self.tau.set(totals.emitted_in_steps / totals.steps)
        if totals.generation_seconds > 0:
            self.tokens_per_s.set(totals.generated_tokens / totals.generation_seconds)
            self.decision_overhead.set(totals.decision_seconds / totals.generation_seconds)
        for seconds in row_seconds:
            self.row_seconds.observe(seconds)


SERVE_TAG_KEYS = ("app", "replica")
FIRST_TOKEN_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
PER_TOKEN_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
REQUEST_SECONDS_BOUNDARIES = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class ServeMetrics:
    """The metrics one Serve replica publishes (`actors.serve_replica`), tagged with its app and replica, as
    measured per request: status, time to first token, time per output token after the first, request latency;
    and its load and tau as they change."""

    def __init__(self, app: str, replica: str) -> None:
        self.tags = {"app": app, "replica": replica}

        def tagged(metric):
            metric.set_default_tags(self.tags)
            return metric

        self.requests = tagged(
            Counter(
                "eagleray_serve_requests",
                description="requests answered, by kind (whole, stream, refused) and HTTP status (499: the "
                "client went away)",
                tag_keys=SERVE_TAG_KEYS + ("kind", "status"),
            )
        )
        self.tokens = tagged(
            Counter(
                "eagleray_serve_generated_tokens", description="new tokens answered", tag_keys=SERVE_TAG_KEYS
            )
        )
        self.first_token = tagged(
            Histogram(
                "eagleray_serve_time_to_first_token_seconds",
                description="seconds from a request's start to its first new token",
                boundaries=FIRST_TOKEN_BOUNDARIES,
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        self.per_token = tagged(
            Histogram(
                "eagleray_serve_time_per_output_token_seconds",
                description="seconds per new token after the first",
                boundaries=PER_TOKEN_BOUNDARIES,
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        self.latency = tagged(
            Histogram(
                "eagleray_serve_request_seconds",
                description="seconds from a request's start to its last token",
                boundaries=REQUEST_SECONDS_BOUNDARIES,
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        self.waiting = tagged(
            Gauge(
                "eagleray_serve_queue_length",
                description="requests waiting for a row",
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        self.active = tagged(
            Gauge(
                "eagleray_serve_active_requests",
                description="requests held (decoding or waiting)",
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        self.tau = tagged(
            Gauge(
                "eagleray_serve_mean_accepted_tokens",
                description="tau: tokens gained per step, this replica so far",
                tag_keys=SERVE_TAG_KEYS,
            )
        )
        record_zero(self.tokens)
        for kind, status in (("whole", "200"), ("stream", "200"), ("refused", "400")):
            record_zero(self.requests, {"kind": kind, "status": status})
        self.set_load(0, 0)

    def count_request(self, kind: str, status: int) -> None:
        self.requests.inc(1, tags={"kind": kind, "status": str(status)})

    def set_load(self, waiting: int, active: int) -> None:
        self.waiting.set(waiting)
        self.active.set(active)

    def observe_answer(
        self,
        tokens: int,
        first_token_s: float,
        per_token_s: float | None,
        latency_s: float,
        tau: float | None,
    ) -> None:
        if tokens > 0:
            self.tokens.inc(tokens)
        self.first_token.observe(first_token_s)
        if per_token_s is not None:
            self.per_token.observe(per_token_s)
        self.latency.observe(latency_s)
        if tau is not None:
            self.tau.set(tau)
