"""The Serve replica: the OpenAI routes over one generation actor's engine, shared by every request in flight.

`ServingEngine` is the replica without Ray Serve: a `GenerationActor` built from the server's config (the same
model, head, tokenizer, chat template, load planner and engine thread as the offline job's actors), fed one
request at a time by the HTTP handlers. Every request in flight joins that engine's continuous batch at the
next step boundary, so concurrent clients decode together (`max_batch_size` rows; the rest wait, up to
`max_queued_requests`, and one more is answered 429 at once). Streaming rides on the row's stop check, which
the engine runs after every step: it hands the tokens so far to the request's stream, applies the request's
stop strings, and ends the row once its client has gone (a closed stream, a cancelled request), so a
disconnected client frees its row at the next step. The engine decides every token; what the client sees is
decoded from them, so a greedy answer is the offline job's for the same prompt.

`EaglerayServer` is the Serve deployment (a FastAPI ingress) around it, and `build_app` / `app_builder` make the
application (`jobs.serve` runs it, and its `app_builder` is what `serve run` / `serve deploy` call with
deploy/serve.yaml).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time.
import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from actors.generation import GenerationActor
from actors.metrics import ServeMetrics
from actors.openai_api import (
    DONE_EVENT,
    FINISH_REASONS,
    Answer,
    ApiError,
    Completion,
    Responses,
    TextDeltas,
    event,
    parse_request,
)
from actors.stops import StopStrings
from common.config import ServeConfig
from engine.batch import GenerationRequest, RequestResult
from engine.types import SamplingParams

DEPLOYMENT_NAME = "EaglerayServer"
APP_NAME = "eagleray"


class _Served:
    """One request while the engine works on it. Called by the engine thread after every step as the row's
    stop check (`engine.generate.StopCheck`): the request's stop strings, its cancel switch, and the feed of its
    tokens so far to its stream."""

    def __init__(self, completion: Completion, stops: StopStrings | None, loop, prompt_tokens: int) -> None:
        self.completion, self.stops, self.loop = completion, stops, loop
        self.prompt_tokens = prompt_tokens
        self.tokens: asyncio.Queue | None = asyncio.Queue() if completion.stream else None
        self.cancelled = False
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.future: asyncio.Future | None = None

    def __call__(self, new_ids: list[int]) -> int | None:
        keep = None if self.stops is None else self.stops(new_ids)
        if self.cancelled:
            keep = len(new_ids) if keep is None else keep
        kept = new_ids if keep is None else new_ids[:keep]
        if kept and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.tokens is not None:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, list(kept))
        return keep


@dataclass
class ServeTotals:
    """A replica's counts since it started."""

    requests: dict[str, int] = field(default_factory=dict)  # by HTTP status, as text
    cancelled: int = 0  # requests whose client went away before the answer was complete
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    emitted_in_steps: int = 0

    def count(self, status: int) -> None:
        self.requests[str(status)] = self.requests.get(str(status), 0) + 1


class ServingEngine:
    """The replica's engine and its bookkeeping; everything but the HTTP framing (tests call it directly)."""

    def __init__(self, config: ServeConfig, before_request=None) -> None:
        self.config = config
        self.actor = GenerationActor(config.model_dump(), before_request=before_request, run_id=APP_NAME)
        self.tokenizer = self.actor.tokenizer
        self.model_name = config.model_name
        self.created = int(time.time())
        self.active = 0  # requests held: decoding or waiting
        self.totals = ServeTotals()
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        self.metrics = ServeMetrics(APP_NAME, self.actor.actor_id) if in_actor else None

    # ---- starting a request -----------------------------------------------------------------------------------

    def _prompt(self, completion: Completion) -> tuple[list[int], tuple[int, ...] | None]:
        """The request's prompt ids and the tokens that end it: messages through the chat template (as the
        job's messages rows), a completion prompt as raw text (as the job with --no-chat-template)."""
        if not completion.chat:
            return self.tokenizer(completion.prompt).input_ids, None
        try:
            _, ids, eos = self.actor.prompt_ids(completion.prompt, is_messages=True)
        except ValueError as problem:
            raise ApiError(400, str(problem), "messages") from None
        return ids, eos

    def _max_tokens(self, completion: Completion, num_prompt: int) -> int:
        limit, param = self.actor.context_limit, "messages" if completion.chat else "prompt"
        cap = self.config.max_prompt_tokens
        if cap is not None and num_prompt > cap:
            raise ApiError(400, f"the prompt has {num_prompt} tokens, above this server's {cap}", param)
        if num_prompt >= limit:
            raise ApiError(
                400,
                f"the prompt has {num_prompt} tokens; the model's context holds {limit} (prompt plus new tokens)",
                param,
                code="context_length_exceeded",
            )
        if completion.max_tokens is None:
            return min(self.config.max_new_tokens, limit - num_prompt)
        if num_prompt + completion.max_tokens > limit:
            raise ApiError(
                400,
                f"the prompt has {num_prompt} tokens and max_tokens is {completion.max_tokens}: together above "
                f"the model's context of {limit} tokens",
                "max_tokens",
                code="context_length_exceeded",
            )
        return completion.max_tokens

    def start(self, completion: Completion) -> _Served:
        """Hand a checked request to the engine; ApiError 400 for a prompt the context cannot hold, 429 when the
        replica already holds max_batch_size + max_queued_requests requests."""
        if self.active >= self.config.max_requests:
            raise ApiError(
                429,
                f"this replica holds its limit of {self.config.max_requests} requests (--max-batch-size "
                f"{self.config.max_batch_size} decoding, --max-queued-requests {self.config.max_queued_requests} "
                "waiting); retry shortly",
                kind="rate_limit_exceeded",
                code="rate_limit_exceeded",
            )
        prompt_ids, eos = self._prompt(completion)
        max_tokens = self._max_tokens(completion, len(prompt_ids))
        stops = StopStrings(self.tokenizer, completion.stop) if completion.stop else None
        served = _Served(completion, stops, asyncio.get_running_loop(), len(prompt_ids))
        request = GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_tokens,
            controller=self.actor.controller,
            sampling=SamplingParams(
                temperature=completion.temperature, top_p=completion.top_p, top_k=self.config.top_k
            ),
            seed=random.getrandbits(63) if completion.seed is None else completion.seed,
            timeout_s=self.config.row_timeout_s,
            eos_token_ids=eos,
            stop_check=served,
        )
        served.future = asyncio.wrap_future(self.actor.runner.submit([request])[0])
        self.active += 1
        served.future.add_done_callback(self._released)
        self._gauges()
        return served

    def _released(self, _future) -> None:
        self.active -= 1
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(self.actor.runner.num_waiting, self.active)

    # ---- answering -------------------------------------------------------------------------------------------

    def _answer(self, served: _Served, result: RequestResult) -> Answer:
        """The finished row as an answer, counted; ApiError 500 when its generation failed."""
        if result.output is None:
            raise ApiError(500, f"the generation failed: {result.error}", kind="server_error")
        output = result.output
        text = self.tokenizer.decode(output.new_token_ids, skip_special_tokens=True)
        if served.stops is not None and output.finish_reason == "stop":
            text = served.stops.cut(text)
        totals = self.totals
        totals.prompt_tokens += served.prompt_tokens
        totals.generated_tokens += output.num_new_tokens
        totals.steps += len(output.steps)
        totals.emitted_in_steps += sum(step.num_emitted for step in output.steps)
        if self.metrics is not None:
            finished = time.perf_counter()
            first = served.first_token_at or finished
            per_token = (
                (finished - first) / (output.num_new_tokens - 1) if output.num_new_tokens > 1 else None
            )
            self.metrics.observe_answer(
                output.num_new_tokens, first - served.started, per_token, finished - served.started, self.tau
            )
        return Answer(text, FINISH_REASONS[output.finish_reason], served.prompt_tokens, output.num_new_tokens)

    async def answer(self, served: _Served) -> Answer:
        """Wait for the whole answer. A cancelled wait (the client went away) ends the row at its next step."""
        try:
            result = await asyncio.shield(served.future)
        except asyncio.CancelledError:
            self._cancel(served)
            raise
        return self._answer(served, result)

    async def stream(self, served: _Served, responses: Responses) -> AsyncIterator[str]:
        """The answer as server-sent events: text deltas as the engine accepts tokens, the finish reason, usage
        (when asked for), then [DONE]. A stream closed early ends the row at its next step."""
        deltas = TextDeltas(
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), served.completion.stop
        )
        served.future.add_done_callback(lambda _: served.tokens.put_nowait(None))
        status = 200
        try:
            if served.completion.chat:
                yield responses.chunk("", first=True)  # the role, as OpenAI's first chunk has it
            while (ids := await served.tokens.get()) is not None:
                text = deltas.push(ids)
                if text:
                    yield responses.chunk(text)
            try:
                answer = self._answer(served, served.future.result())
            except ApiError as error:
                status = error.status
                yield event(error.body())
            else:
                yield responses.chunk(deltas.finish(answer.text), answer.finish_reason)
                if served.completion.include_usage:
                    yield responses.usage_chunk(answer)
            yield DONE_EVENT
        finally:
            if not served.future.done():
                self._cancel(served)
            else:
                self.count(status, "stream")

    def _cancel(self, served: _Served) -> None:
        served.cancelled = True
        self.totals.cancelled += 1
        self.count(499, "stream" if served.completion.stream else "whole")

    def count(self, status: int, kind: str) -> None:
        self.totals.count(status)
        if self.metrics is not None:
            self.metrics.count_request(kind, status)

    @property
    def tau(self) -> float | None:
        steps = self.totals.steps
        return self.totals.emitted_in_steps / steps if steps else None

    def stats(self) -> dict:
        """The replica's counts, tau and the trees its planner chose (GET /eagleray/stats)."""
        planner = self.actor.planner
        return {
            "model": self.model_name,
            "policy": self.config.policy_kind,
            "max_batch_size": self.config.max_batch_size,
            **asdict(self.totals),
            "tau": self.tau,
            "active": self.active,
            "waiting": self.actor.runner.num_waiting,
            "busy_seconds": self.actor.runner.busy_seconds,
            "engine_steps": self.actor.runner.engine.num_steps,  # batch steps: rows decoding together share one
            "batch_trees": {} if planner is None else dict(planner.chosen),
        }

    def close(self) -> None:
        self.actor.runner.close()


api = FastAPI(title="eagleray", description="OpenAI-compatible endpoint on eagleray's batched EAGLE engine")


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class EaglerayServer:
    """The Serve deployment: the OpenAI routes over one `ServingEngine` (its config given as a dict)."""

    def __init__(self, config: dict) -> None:
        self.engine = ServingEngine(ServeConfig(**config))

    @api.get("/v1/models")
    async def models(self) -> dict:
        engine = self.engine
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": engine.created,
                    "owned_by": "eagleray",
                }
            ],
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    @api.get("/eagleray/stats")
    async def stats(self) -> dict:
        return self.engine.stats()

    async def _complete(self, request: Request, chat: bool):
        engine = self.engine
        try:
            completion = parse_request(await request.body(), chat, engine.model_name, engine.config)
            served = engine.start(completion)
        except ApiError as error:
            engine.count(error.status, "refused")
            return _error(error)
        responses = Responses(chat, engine.model_name)
        if completion.stream:
            return StreamingResponse(engine.stream(served, responses), media_type="text/event-stream")
        try:
            answer = await engine.answer(served)
        except ApiError as error:
            engine.count(error.status, "whole")
            return _error(error)
        engine.count(200, "whole")
        return JSONResponse(responses.whole(answer))


def build_app(
    config: ServeConfig, num_cpus: float | None = None, num_gpus: float | None = None, replicas: bool = True
):
    """The Serve application for a config. Ray Serve holds at most the replica's own limit per replica, plus as
    many again queued at the proxy, so overload is answered (429 from the replica, 503 from Serve) rather than
    held. replicas: set num_replicas from the config (False when a Serve config file sets autoscaling)."""
    options: dict = {
        "max_ongoing_requests": config.max_requests + 1,  # the replica answers the one past its limit itself
        "max_queued_requests": config.max_requests,
        "ray_actor_options": {"num_cpus": num_cpus if num_cpus is not None else 1, "num_gpus": num_gpus or 0},
    }
    if replicas:
        options["num_replicas"] = config.num_replicas
    return EaglerayServer.options(**options).bind(config.model_dump())
