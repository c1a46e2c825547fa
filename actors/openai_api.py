"""The OpenAI API as eagleray's Serve replica speaks it: request bodies checked into a `Completion`, and the
answers built (a whole response, or server-sent event chunks).

Routes: `/v1/completions` (a raw-text `prompt`, as the job reads prompts with --no-chat-template) and
`/v1/chat/completions` (`messages` through the model's chat template, as the job reads a messages row). Fields
read: `model`, `messages` / `prompt`, `max_tokens` (chat: also `max_completion_tokens`), `temperature`, `top_p`,
`seed`, `stop`, `stream`, `stream_options.include_usage` and `n` (1 only). Fields this server cannot honour
(`logprobs`, `echo`, `best_of` above 1, `suffix`, `tools`) are refused by name rather than ignored; other fields
(`user`, `presence_penalty`, ...) are accepted and have no effect. A request without `temperature` gets the
server's (--temperature, default 0: greedy, the same answer the offline job gives).

A problem is an `ApiError` (HTTP status, message naming the field, OpenAI's error body). Plain Python: nothing
here imports ray or torch, so it is tested without a server.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from common.config import ProcessorConfig
from common.prompts import messages_error, prompt_error

MAX_OPENAI_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 4
UNSUPPORTED = {
    "logprobs": "logprobs are not returned by this server",
    "top_logprobs": "logprobs are not returned by this server",
    "echo": "echo is not supported by this server",
    "suffix": "suffix is not supported by this server",
    "tools": "tool calls are not supported by this server",
    "functions": "function calls are not supported by this server",
}
# Finish reasons of the engine (`engine.types.GenerationOutput.finish_reason`) as OpenAI names them.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Completion:
    """One checked request. prompt: the text (completions) or the messages (chat); max_tokens None: the
    server's default, capped by the room left in the context; seed None: a fresh one per request."""

    chat: bool
    prompt: str | list[dict]
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, kind: type, low: float, high: float, low_open: bool = False):
    """body[key] as a number in [low, high] ((low, high] with low_open), None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and isinstance(value, float))
    ):
        raise ApiError(
            400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key
        )
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise ApiError(400, f"{key} must be {bound}, got {value!r}", key)
    return kind(value)


def _text_parts(messages) -> list:
    """Messages whose content is a list of text parts ({"type": "text", "text": ...}, as OpenAI allows) with
    that content joined into one string; anything else is left for `messages_error` to name."""
    if not isinstance(messages, list):
        return messages
    joined = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ApiError(
                        400, f"messages[{index}] content parts must be text parts, got {part!r}", "messages"
                    )
            message = {**message, "content": "".join(part["text"] for part in content)}
        joined.append(message)
    return joined


def parse_request(raw: bytes, chat: bool, model_name: str, config: ProcessorConfig) -> Completion:
    """A request body checked against the API and the server's limits; ApiError(400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            400,
            f"model {model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
            "model",
            code="model_not_found",
        )
    for key, why in UNSUPPORTED.items():
        if body.get(key):
            raise ApiError(400, why, key)
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise ApiError(
                400, f"{key} must be 1: this server returns one choice per request, got {body[key]!r}", key
            )
    if chat:
        messages = _text_parts(body.get("messages"))
        problem = messages_error(messages, config)
        if problem is not None:
            raise ApiError(400, problem, "messages")
        prompt: str | list[dict] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif isinstance(prompt, list):
            raise ApiError(400, "prompt must be one text; send one request per prompt", "prompt")
        problem = prompt_error(prompt)
        if problem is not None:
            raise ApiError(400, problem, "prompt")
    cap = config.max_new_tokens_cap
    max_tokens = _number(body, "max_tokens", int, 1, cap)
    if chat and max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", int, 1, cap)
    temperature = _number(body, "temperature", float, 0.0, MAX_OPENAI_TEMPERATURE)
    top_p = _number(body, "top_p", float, 0.0, 1.0, low_open=True)
    seed = _number(body, "seed", int, -(2**63), 2**64 - 1)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    if stops is None:
        stops = ()
    if (
        not isinstance(stops, tuple)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            400, f"stop must be a string or a list of at most 4 non-empty strings, got {stop!r}", "stop"
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", "stream_options")
    return Completion(
        chat=chat,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=config.temperature if temperature is None else temperature,
        top_p=0.0 if top_p is None or top_p >= 1.0 else top_p,  # the engine's 0 is OpenAI's 1: no filter
        seed=None if seed is None else seed & 0x7FFF_FFFF_FFFF_FFFF,
        stop=stops,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


class TextDeltas:
    """The text of a growing token sequence, handed out in pieces that never need taking back.

    `push(ids)` takes all the new tokens so far and returns the text not yet handed out, holding back a tail
    that could still change: an unfinished UTF-8 character (decoded as U+FFFD) and any end of the text that
    begins a stop string. `finish(text)` returns the rest of the final text (the engine's, cut at its stop)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> None:
        self.decode, self.stops = decode, stops
        self.sent = ""

    def _safe_length(self, text: str) -> int:
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stops:
            for length in range(min(len(stop), end), 0, -1):  # the longest end of the text that starts `stop`
                if text[end - length : end] == stop[:length]:
                    end -= length
                    break
        return end

    def push(self, ids: list[int]) -> str:
        text = self.decode(ids)
        end = self._safe_length(text)
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) : end], text[:end]
        return delta

    def finish(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


@dataclass(frozen=True)
class Answer:
    """What a finished request produced."""

    text: str
    finish_reason: str  # OpenAI's: stop or length
    prompt_tokens: int
    completion_tokens: int


class Responses:
    """The bodies of one request's answer, whole or chunked, all with one id and creation time."""

    def __init__(self, chat: bool, model_name: str) -> None:
        self.chat, self.model = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @staticmethod
    def usage(answer: Answer) -> dict:
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, answer: Answer) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}}
        else:
            choice = {"index": 0, "text": answer.text}
        choice.update(finish_reason=answer.finish_reason, logprobs=None)
        return {**self._head(False), "choices": [choice], "usage": self.usage(answer)}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> str:
        """One server-sent event carrying a text delta (the first chat chunk also names the role)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=finish_reason, logprobs=None)
        return event({**self._head(True), "choices": [choice]})

    def usage_chunk(self, answer: Answer) -> str:
        return event({**self._head(True), "choices": [], "usage": self.usage(answer)})


def event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"
