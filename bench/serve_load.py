"""Load on an OpenAI-compatible endpoint: C clients, each sending its next streamed chat request as soon as
its last one ends, through the official `openai` client; per request its time to first token, latency, new
tokens and text, and per level the rates and percentiles.

Time to first token is measured to the first chunk that carries text; latency to the end of the stream; new
tokens are the server's `usage.completion_tokens`. A request that raises, or ends without usage, is an error
(its message kept). HTTP only: nothing here knows how the server is built.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    prompt_index: int
    error: str | None
    first_token_s: float | None
    latency_s: float
    completion_tokens: int
    text: str


async def _one(client, model: str, prompt: str, index: int, max_tokens: int) -> Timing:
    started = time.perf_counter()
    first, pieces, usage = None, [], None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if first is None:
                        first = time.perf_counter() - started
                    pieces.append(choice.delta.content)
        if usage is None:
            raise RuntimeError("the stream ended without usage")
    except Exception as error:  # counted, kept, and the client goes on
        return Timing(index, f"{type(error).__name__}: {error}", first, time.perf_counter() - started, 0, "")
    return Timing(index, None, first, time.perf_counter() - started, usage.completion_tokens, "".join(pieces))


async def _level(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900.0)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(prompts)):
        queue.put_nowait(index)
    timings: list[Timing] = []

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            timings.append(await _one(client, model, prompts[index], index, max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return sorted(timings, key=lambda timing: timing.prompt_index), wall


def run_level(
    base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[list[Timing], float]:
    """Every prompt once, `concurrency` at a time; (timings in prompt order, wall seconds)."""
    return asyncio.run(_level(base_url, model, prompts, concurrency, max_tokens))


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(timings: list[Timing], wall: float) -> dict:
    """Requests/s and new tokens/s over the level's wall time, p50/p99 of first-token time and latency (of the
    requests that succeeded), and the errors."""
    ok = [timing for timing in timings if timing.error is None]
    firsts = [timing.first_token_s for timing in ok if timing.first_token_s is not None]
    latencies = [timing.latency_s for timing in ok]
    tokens = sum(timing.completion_tokens for timing in ok)
    return {
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "error_messages": sorted({timing.error for timing in timings if timing.error})[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": _percentile(firsts, 50),
        "ttft_p99_s": _percentile(firsts, 99),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
    }
