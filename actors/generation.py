"""The generation actor: a Ray Data callable class that turns a batch of prompt rows into result rows.

Built once per actor process (`__init__`): the target, its draft head and tokenizer, the tree controller, the
prompt-level decision caches in front of the shared cache actor, and the dashboard metrics. Per batch
(`__call__`, a pyarrow Table in and out):

    read the plan columns -> tokenize -> context check -> prompt decisions (local, then shared)
      -> the actor's engine thread (`actors.engine_runner`: continuous batching over every batch in flight)
      -> detokenize -> result columns -> publish decisions + stats

Trees: with max_batch_size above 1 every batch step's tree is chosen for the load by `policy.load_planner` (its
latency table measured once per machine, `actors.planning`), or is the --tree of the 'static' policy. With
max_batch_size 1, or with prompt decisions shared through the cache actor (they choose a tree per row), rows
decode one at a time and each step's tree comes from the --policy's per-row controller.

The rows come planned: the row stage has already checked each row and written its error and sampling settings
(max_new_tokens, temperature, top_p, top_k, seed, stop strings: `common.columns.PLAN_SCHEMA`); the actor only
adds the checks that need the tokenizer (a chat template for messages rows, prompt length, the model's context). A row's prompt ids come from its messages (the
input's messages column) or its prompt text (one user message) through the tokenizer's chat template with the
generation prompt appended; without a template (the tokenizer has none, or the job runs with
--no-chat-template) a prompt is tokenized as raw text, and a messages row is an error row. A templated row
stops at the target's, the generation config's and the tokenizer's eos tokens (the template's end of turn);
a raw one at the target config's eos, as plain decoding does. Every input row comes back, with every input column, the plan columns replaced
by the result columns (`common.columns.RESULT_SCHEMA`). A row that cannot be generated gets
`__inference_error__` and nulls; the batch goes on. A prompt that fits the context but leaves less room than
its max_new_tokens is generated until the context is full, and says so: finish_reason "context". Failures to load models are fatal and raise. Ray is touched
only for the runtime context (CPU count, actor id), the shared-cache and stats-collector handles and metrics;
everything else is plain Python, so tests can call the class without a cluster.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace

import pyarrow as pa
import ray
import torch
from jinja2 import TemplateError
from transformers.utils import logging as transformers_logging

from actors.cross_drafts import CrossRequestDrafts, fingerprint
from actors.decisions import PromptController, PromptDecisions
from actors.engine_runner import EngineRunner
from actors.metrics import ActorMetrics
from actors.planning import build_load_planner
from actors.stats import ActorStats, GenerationTotals
from actors.stops import StopStrings
from common.columns import (
    ERROR_COLUMN,
    FINISH_REASONS,
    PLAN_COLUMNS,
    PLAN_MAX_NEW_TOKENS_COLUMN,
    PLAN_SEED_COLUMN,
    PLAN_STOP_COLUMN,
    PLAN_TEMPERATURE_COLUMN,
    PLAN_TOP_K_COLUMN,
    PLAN_TOP_P_COLUMN,
    RESULT_SCHEMA,
)
from common.config import ProcessorConfig
from engine.batch import GenerationRequest, PlainController, RequestResult
from engine.chat import chat_eos_token_ids, chat_ids, has_chat_template
from engine.ea_model import EaModel
from engine.types import GenerationOutput, SamplingParams, StaticController, StepStats
from policy.actions import DEFAULT_ACTIONS
from policy.caches import content_key
from policy.controllers import HeuristicController
from policy.optimizer import AdaptiveParameterPredictor, RLInferenceOptimizer


@dataclass(frozen=True)
class ActorRow:
    """One row as the actor sees it: tokenized, or the reason it is not generated (then the other fields are
    what is known: prompt_ids of a prompt too long for the context, and None for an error the row stage found).

    prompt: the row's text, what prompt-level decisions embed (a messages row: its contents, one per line).
    eos_token_ids: the tokens that end this row's generation; None: the target config's eos.
    sampling: the row's temperature, top_p and top_k; seed: its own sampling seed (None: `row_seed`);
    stop: its stop strings, or None."""

    prompt: str | None
    prompt_ids: list[int]
    max_new_tokens: int | None
    sampling: SamplingParams | None
    error: str | None = None
    eos_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    stop: StopStrings | None = None


def compact_trees(steps: list[StepStats]) -> str:
    """The per-step trees, run-length encoded: '12/11/1x5,8/4/2x3,plainx2' = five steps of 12/11/1, then three
    of 8/4/2, then two plain steps (no draft)."""
    runs: list[list] = []
    for step in steps:
        if runs and runs[-1][0] == step.tree_params:
            runs[-1][1] += 1
        else:
            runs.append([step.tree_params, 1])
    return ",".join(f"{'plain' if tree is None else tree.compact}x{count}" for tree, count in runs)


def row_seed(job_seed: int, row_key: str) -> int:
    """A sampling seed that depends on the job seed and the row (its id, or its prompt), not on batching."""
    digest = hashlib.blake2b(f"{job_seed}:{row_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def assigned_cpus() -> float | None:
    """CPUs Ray gave this actor, or None outside a Ray actor (a driver, a test)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


class GenerationActor:
    """Ray Data callable class: `map_batches(GenerationActor, fn_constructor_kwargs={...}, batch_format="pyarrow")`.

    config: a `ProcessorConfig` as a dict (plain data travels to actors more simply than a model); the
        ProcessorConfig fields of a larger config (the job's) are taken.
    cache: the ContextCacheActor handle when config.shared_cache is on (prompt decisions are shared through
        it), else None.
    stats_collector: the job's StatsCollector actor handle, which gets `stats()` after every batch, or None
        (tests without a cluster).
    load_encoder: returns texts -> unit embeddings [n, 384]; default MiniLM. Used with a learned policy and
        config.shared_cache, on the prompt decisions' background thread, and by cross-request drafts.
    before_request: an optional engine hook (index, request) run before each generation; tests use it to inject
        a failure into one row.
    run_id: the unique id of this run of the job (`pipeline.build.run_generate` prints it at start), the
        metrics' `job` tag; config.job_name is their `job_name` tag. None: the job name plus a fresh suffix.
    """

    def __init__(
        self,
        config: dict,
        cache=None,
        stats_collector=None,
        load_encoder=None,
        before_request=None,
        run_id: str | None = None,
    ) -> None:
        init_started = time.perf_counter()
        self.config = ProcessorConfig.of(config)
        cpus = assigned_cpus()
        if cpus:
            # Threads from the CPUs Ray gave this actor, rounded down: an OpenMP thread without a core of its own
            # spins at every barrier and slows the threads that have one.
            torch.set_num_threads(max(1, math.floor(cpus)))
        self.num_threads = torch.get_num_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            # An actor's output goes to a log file, never a terminal: no bars (their \r fragments) there.
            transformers_logging.disable_progress_bar()
        self.model = EaModel.from_pretrained(
            base_model_path=self.config.model,
            ea_model_path=self.config.draft,
            dtype="auto",
            trust_remote_code=self.config.trust_remote_code,
        ).to(self.device)
        self.tokenizer = self.model.get_tokenizer()
        self.context_limit = self.model.target.context_limit
        self.has_chat_template = has_chat_template(self.tokenizer)
        self.use_chat_template = self.config.chat_template and self.has_chat_template
        # A chat template ends a turn with its own token, often the tokenizer's eos or one of the generation
        # config's, not always the model config's.
        self.chat_eos_token_ids = chat_eos_token_ids(self.model.target.model, self.tokenizer)
        self.optimizer: RLInferenceOptimizer | None = None
        # Per-row choices (prompt decisions, or a batch of one) need rows to decode alone.
        self.per_row_trees = not self.config.batches_rows
        self.controller = self._build_controller()  # per row; with the load planner it is never asked
        self.actor_id = self._actor_id()
        # A restarted actor keeps its id but starts a new process with fresh totals: each incarnation reports
        # its own, and the job summary adds them up.
        self.reporter = f"{self.actor_id}/{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.stats_collector = stats_collector
        self.before_request = before_request
        self.decisions: PromptDecisions | None = None
        if load_encoder is None:
            from policy.embedding import load_minilm_batch_encoder

            load_encoder = load_minilm_batch_encoder
        self.cross_drafts: CrossRequestDrafts | None = None
        if self.config.cross_request_drafts:
            self.cross_drafts = CrossRequestDrafts(
                cache,
                fingerprint(self.model.target.model.config.to_dict(), self.tokenizer),
                self.actor_id,
                load_encoder,
            )
        if self.config.policy_kind == "learned" and self.config.shared_cache:
            self.decisions = PromptDecisions(
                self.actor_id, load_encoder, cache, self.config.similarity_threshold
            )
        planner = None
        if not self.per_row_trees and self.config.policy_kind not in ("static", "plain"):
            planner = build_load_planner(
                self.model.target, self.model.ea_layer, self.config.max_batch_size, log=self._log
            )
        self.planner = planner
        self.runner = EngineRunner(
            self.model.target,
            self.model.ea_layer,
            self.context_limit,
            1 if self.per_row_trees else self.config.max_batch_size,
            planner,
            before_request,
        )
        # Ray Data may call a threaded actor with several batches at once: tokenizing, statistics and reports
        # take this lock; only the wait for the engine runs unlocked.
        self.lock = threading.Lock()
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        run_id = run_id or f"{self.config.job_name}-{uuid.uuid4().hex[:8]}"
        self.metrics = ActorMetrics(run_id, self.config.job_name, self.actor_id) if in_actor else None
        self.totals = GenerationTotals()
        self.init_seconds = time.perf_counter() - init_started
        self.first_batch_started_at: float | None = None  # wall-clock (time.time()) so the driver can compare
        self.last_batch_finished_at: float | None = None

    @staticmethod
    def _log(message: str) -> None:
        print(f"[eagleray actor] {message}", flush=True)

    def _actor_id(self) -> str:
        if ray.is_initialized():
            actor_id = ray.get_runtime_context().get_actor_id()
            if actor_id:
                return actor_id[:12]  # the unique part; the tail is the job id
        return uuid.uuid4().hex[:8]

    def _build_controller(self):
        kind = self.config.policy_kind
        if kind == "plain":
            return PlainController()
        if kind == "static" or not self.per_row_trees:
            return StaticController(self.config.static_tree)
        if kind == "heuristic":
            return HeuristicController(DEFAULT_ACTIONS)
        self.optimizer = RLInferenceOptimizer(
            AdaptiveParameterPredictor(self.config.policy), fallback=self.config.static_tree
        )
        return self.optimizer

    # ---- one batch ----------------------------------------------------------------------------------------------

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        with self.lock:
            if self.first_batch_started_at is None:
                self.first_batch_started_at = time.time()
            rows, todo, keys, controllers, requests = self._plan_requests(table)
        results = self.runner.generate(requests)
        with self.lock:
            return self._finish_batch(table, rows, todo, keys, controllers, results, started)

    def _plan_requests(self, table: pa.Table):
        """The batch's rows, tokenized, and one engine request per row that is not an error row."""
        rows = self._read_rows(table)
        todo = [index for index, row in enumerate(rows) if row.error is None]
        ids_column = self._row_keys(table)
        controllers: list = [self.controller] * len(todo)
        keys: list[str] = []
        if self.decisions is not None and todo:
            keys = [content_key(rows[index].prompt_ids).hex() for index in todo]
            lookups = self.decisions.submit([rows[index].prompt for index in todo], keys)
            controllers = [PromptController(lookup, self.controller, self.decisions) for lookup in lookups]
        proposals: list = [None] * len(todo)
        if self.cross_drafts is not None and todo:
            proposals = self.cross_drafts.start(
                [rows[index].prompt or "" for index in todo], [rows[index].prompt_ids for index in todo]
            )
        requests = [
            GenerationRequest(
                prompt_ids=rows[index].prompt_ids,
                max_new_tokens=rows[index].max_new_tokens,
                controller=controller,
                sampling=rows[index].sampling,
                seed=(
                    row_seed(self.config.seed, ids_column[index])
                    if rows[index].seed is None
                    else rows[index].seed
                ),
                timeout_s=self.config.row_timeout_s,
                # A learned policy and the prompt decisions read each step's measured seconds; on CUDA the
                # engine times steps only when asked (on the CPU it always does, at no cost).
                time_steps=True if self.config.policy_kind == "learned" else None,
                eos_token_ids=rows[index].eos_token_ids,
                stop_check=rows[index].stop,
                proposals=row_proposals,
            )
            for index, controller, row_proposals in zip(todo, controllers, proposals, strict=True)
        ]
        return rows, todo, keys, controllers, requests

    def _finish_batch(self, table, rows, todo, keys, controllers, results, started) -> pa.Table:
        outputs: list[RequestResult | None] = [None] * len(rows)
        for index, result in zip(todo, results, strict=True):
            outputs[index] = result
        if self.decisions is not None and todo:
            fresh_keys, fresh_steps = [], []
            for key, controller, result in zip(keys, controllers, results, strict=True):
                if result.output is None:
                    continue
                if controller.cached is not None:
                    self.decisions.record(len(result.output.steps))
                else:
                    fresh_keys.append(key)
                    fresh_steps.append(result.output.steps)
            try:  # a few milliseconds: the counters reported below then include this batch
                self.decisions.publish(fresh_keys, fresh_steps).result(timeout=10.0)
            except TimeoutError:
                pass  # still publishing; the next report counts it
        if self.cross_drafts is not None:
            self.cross_drafts.publish()
        columns = self._result_columns(rows, outputs)
        self.totals.generation_seconds = self.runner.busy_seconds
        self.totals.batch_seconds += time.perf_counter() - started
        self.totals.num_batches += 1
        self.last_batch_finished_at = time.time()
        self._report(columns["time_taken_llm"])
        table = table.drop_columns(list(PLAN_COLUMNS))
        for field in RESULT_SCHEMA:
            table = table.append_column(field, pa.array(columns[field.name], type=field.type))
        return table

    def _row_keys(self, table: pa.Table) -> list[str]:
        """Per-row keys for sampling seeds: the id column when there is one, else the prompt (or messages)."""
        column = next(
            (
                name
                for name in (self.config.id_column, self.config.messages_column)
                if name in table.column_names
            ),
            self.config.prompt_column,
        )
        return [str(value) for value in table.column(column).to_pylist()]

    def _read_rows(self, table: pa.Table) -> list[ActorRow]:
        """The rows as the row stage planned them, tokenized, with the limits that need the tokenizer checked."""
        missing = [name for name in PLAN_COLUMNS if name not in table.column_names]
        if missing:
            raise ValueError(
                f"the batch has no plan column(s) {missing}: GenerationActor takes the rows that the row stage "
                "(pipeline.rows.validate_rows) planned"
            )
        is_messages = self.config.messages_column in table.column_names
        prompt_column = self.config.messages_column if is_messages else self.config.prompt_column
        prompts = (
            table.column(prompt_column).to_pylist()
            if prompt_column in table.column_names
            else [None] * table.num_rows
        )
        plans = zip(
            prompts,
            table.column(PLAN_MAX_NEW_TOKENS_COLUMN).to_pylist(),
            table.column(PLAN_TEMPERATURE_COLUMN).to_pylist(),
            table.column(PLAN_TOP_P_COLUMN).to_pylist(),
            table.column(PLAN_TOP_K_COLUMN).to_pylist(),
            table.column(PLAN_SEED_COLUMN).to_pylist(),
            table.column(PLAN_STOP_COLUMN).to_pylist(),
            table.column(ERROR_COLUMN).to_pylist(),
            strict=True,
        )
        return [self._plan_row(*plan, is_messages=is_messages) for plan in plans]

    def _plan_row(
        self, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, error, is_messages: bool
    ) -> ActorRow:
        """One planned row (its plan columns' values) as an ActorRow, tokenized."""
        if error is not None:
            return ActorRow(None, [], max_new_tokens, None, error)
        try:
            sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        except ValueError as problem:  # the row stage checked these; a hand-made plan may still be wrong
            return ActorRow(None, [], max_new_tokens, None, str(problem))
        row = self._tokenize(prompt, max_new_tokens, sampling, is_messages=is_messages)
        if row.error is not None:
            return row
        return replace(row, seed=seed, stop=StopStrings(self.tokenizer, tuple(stop)) if stop else None)

    def prompt_ids(self, prompt, is_messages: bool) -> tuple[str, list[int], tuple[int, ...] | None]:
        """(the row's text, its prompt ids, its eos ids) for a prompt, or for a messages value the row stage
        validated. ValueError when messages meet a tokenizer without a chat template or the template refuses
        them."""
        if not self.use_chat_template:
            if is_messages:
                raise ValueError(
                    "messages need a chat template, and the tokenizer of --model has none (give prompts instead)"
                )
            return prompt, self.tokenizer(prompt).input_ids, None
        if is_messages:
            messages = [{"role": message["role"], "content": message["content"]} for message in prompt]
            text = "\n".join(message["content"] for message in messages)
        else:
            messages, text = [{"role": "user", "content": prompt}], prompt
        try:
            ids = chat_ids(self.tokenizer, messages)
        except TemplateError as error:  # a template may refuse a conversation (e.g. a system message last)
            raise ValueError(f"the chat template refused the messages: {error}") from error
        return text, list(ids), self.chat_eos_token_ids

    def _tokenize(
        self, prompt, max_new_tokens: int, sampling: SamplingParams, is_messages: bool = False
    ) -> ActorRow:
        try:
            text, ids, eos_ids = self.prompt_ids(prompt, is_messages)
        except ValueError as problem:
            return ActorRow(None, [], max_new_tokens, sampling, str(problem))
        row = ActorRow(text, ids, max_new_tokens, sampling, eos_token_ids=eos_ids)
        num_tokens = len(row.prompt_ids)
        cap = self.config.max_prompt_tokens
        if cap is not None and num_tokens > cap:
            return replace(row, error=f"prompt has {num_tokens} tokens, above max_prompt_tokens={cap}")
        if num_tokens >= self.context_limit:
            error = (
                f"prompt has {num_tokens} tokens; the model's context holds {self.context_limit} "
                "(prompt plus new tokens)"
            )
            return replace(row, error=error)
        return row

    def _result_columns(self, rows: list[ActorRow], outputs: list[RequestResult | None]) -> dict[str, list]:
        columns: dict[str, list] = {field.name: [] for field in RESULT_SCHEMA}
        totals = self.totals
        for row, result in zip(rows, outputs, strict=True):
            prompt_ids = row.prompt_ids
            error = row.error if result is None else result.error
            output: GenerationOutput | None = None if result is None else result.output
            if output is None:
                totals.rows_error += 1
                values = dict.fromkeys(columns)
                values[ERROR_COLUMN] = error
                values["num_input_tokens"] = len(prompt_ids) if prompt_ids else None
            else:
                finish_reason = FINISH_REASONS[output.finish_reason]
                totals.rows_ok += 1
                totals.count_finish(finish_reason)
                totals.input_tokens += len(prompt_ids)
                totals.generated_tokens += output.num_new_tokens
                totals.steps += len(output.steps)
                totals.emitted_in_steps += sum(step.num_emitted for step in output.steps)
                for step in output.steps:
                    if step.retrieved_source is not None:
                        totals.count_retrieved(
                            step.retrieved_source, step.retrieved_proposed, step.retrieved_accepted
                        )
                text = self.tokenizer.decode(output.new_token_ids, skip_special_tokens=True)
                if output.finish_reason == "stop" and row.stop is not None:
                    text = row.stop.cut(text)
                values = {
                    "generated_text": text,
                    "num_input_tokens": len(prompt_ids),
                    "num_generated_tokens": output.num_new_tokens,
                    "finish_reason": finish_reason,
                    "num_steps": len(output.steps),
                    "mean_accepted_tokens": output.mean_accepted_tokens,
                    "time_taken_llm": output.wall_seconds,
                    "tree_params": compact_trees(output.steps),
                    ERROR_COLUMN: None,
                }
            for name in columns:
                columns[name].append(values[name])
        return columns

    # ---- statistics -------------------------------------------------------------------------------------------

    def stats(self) -> ActorStats:
        """This actor's cumulative statistics (a copy): totals, the optimizer's and the prompt decisions'."""
        totals = replace(self.totals)
        totals.planner_failures = self.runner.engine.planner_failures
        totals.proposal_failures = self.runner.engine.proposal_failures
        if self.cross_drafts is not None:
            counters = self.cross_drafts.counters
            totals.retrieval_seconds = counters.embed_seconds + counters.fetch_seconds
            totals.outputs_fetched = counters.fetched_outputs
            totals.outputs_published = counters.published_outputs
            totals.retrieval_failures = counters.fetch_failures + counters.publish_failures
        optimizer = None
        if self.optimizer is not None:
            optimizer = copy.deepcopy(self.optimizer.snapshot())
            totals.decision_seconds = optimizer.decision_seconds
        return ActorStats(
            actor_id=self.actor_id,
            pid=os.getpid(),
            device=self.device,
            node_id=self.node_id,
            num_threads=self.num_threads,
            policy=self.config.policy_kind,
            init_seconds=self.init_seconds,
            first_batch_started_at=self.first_batch_started_at,
            last_batch_finished_at=self.last_batch_finished_at,
            totals=totals,
            optimizer=optimizer,
            decisions=None if self.decisions is None else copy.copy(self.decisions.counters),
            batch_trees={} if self.planner is None else dict(self.planner.chosen),
        )

    def _report(self, row_seconds: list) -> None:
        """Publish metrics and send the cumulative stats to the job's stats collector."""
        stats = self.stats()
        if self.metrics is not None:
            self.metrics.publish(stats, [seconds for seconds in row_seconds if seconds is not None])
        if self.stats_collector is None:
            return
        try:
            ray.get(self.stats_collector.report.remote(self.reporter, stats.to_dict()), timeout=5.0)
        except (ray.exceptions.RayError, TimeoutError):
            self.totals.stats_report_failures += 1  # the next report carries the cumulative totals again
