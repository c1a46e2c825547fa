"""Stop strings: a row's `sampling_params.stop` as the engine's stop rule on tokens, and the text cut there.

The engine works on token ids; a stop string is text, and one may span tokens or end inside one. `StopStrings`
decodes the new tokens after every step (the tokenizer's decode, as the output column is decoded), and once a stop
string appears it keeps the fewest tokens whose text holds it; `cut` then ends the text before it, as OpenAI's
`stop` does. Tokens past the stop were accepted by the target and are dropped, so a speculative row stops exactly
where plain decoding with the same rule would.
"""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


class StopStrings:
    """An `engine.generate.StopCheck`: None while no stop string is in the new text, else how many tokens to
    keep."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        if not stops or not all(stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, new_ids: list[int]) -> int | None:
        if first_stop(self.decode(new_ids), self.stops) is None:
            return None
        keep = len(new_ids)
        while keep > 1 and first_stop(self.decode(new_ids[: keep - 1]), self.stops) is not None:
            keep -= 1
        return keep

    def cut(self, text: str) -> str:
        """`text` up to its first stop string (all of it when it holds none)."""
        index = first_stop(text, self.stops)
        return text if index is None else text[:index]
