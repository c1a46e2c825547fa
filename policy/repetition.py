"""How much of a growing token sequence repeats its own past: the longest suffix that also occurs earlier.

Long draft acceptance on the demo models comes mostly from text that repeats itself (a loop in greedy output, a
list, boilerplate, code that restates a signature). The draft head's own probabilities hardly show it, but the
context does: steps whose context ends in a long repeat accept far longer drafted chains than other steps. So the
observation carries the repeat length.

`SuffixMatcher` keeps an index of the sequence's n-grams (n-gram -> the latest few positions where one ended) and
extends it with the tokens appended since the previous call, so each step costs a dictionary insert per new token
and at most `max_candidates` backward comparisons of up to `max_length` tokens. A new sequence (shorter than the
one indexed, or after `reset`) starts a new index.
"""

from __future__ import annotations

from collections.abc import Sequence


class SuffixMatcher:
    """Length of the longest suffix (at least `ngram`, at most `max_length` tokens) of `tokens` that also ends at
    an earlier position; 0 when the last `ngram` tokens never occurred before.

    Example: tokens 1 2 3 4 5 9 1 2 3 4 5 with ngram=4 -> 5 (the suffix 1 2 3 4 5 also ends at position 5).
    """

    def __init__(self, ngram: int = 4, max_length: int = 32, max_candidates: int = 8) -> None:
        if ngram < 1 or max_length < ngram or max_candidates < 1:
            raise ValueError(
                f"need 1 <= ngram <= max_length and max_candidates >= 1, got {ngram}, {max_length}, {max_candidates}"
            )
        self.ngram = ngram
        self.max_length = max_length
        self.max_candidates = max_candidates
        self.reset()

    def reset(self) -> None:
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> exclusive end positions, oldest first
        self._indexed = 0  # n-grams ending before this (exclusive end) position are in the index

    def match_length(self, tokens: Sequence[int]) -> int:
        n, size = len(tokens), self.ngram
        if n < self._indexed:
            self.reset()
        # Index every n-gram that ends before the current suffix's own end, so the suffix never matches itself.
        for end in range(max(self._indexed, size), n):
            ends = self._ends.setdefault(tuple(tokens[end - size : end]), [])
            ends.append(end)
            if len(ends) > self.max_candidates:
                del ends[0]
        self._indexed = n
        if n <= size:
            return 0
        best = 0
        for end in reversed(self._ends.get(tuple(tokens[n - size : n]), ())):
            length = size
            while (
                length < self.max_length
                and end - length - 1 >= 0
                and tokens[end - length - 1] == tokens[n - length - 1]
            ):
                length += 1
            best = max(best, length)
            if best >= self.max_length:
                break
        return best
