"""Drafts from token sequences already seen: the longest match of the context's suffix proposes what followed it.

Prompt lookup, REST and SuffixDecoding all draft this way; verification decides, so a wrong proposal costs only
the width it takes in a step. A `TokenIndex` keeps sequences (a prompt, earlier outputs, the row's own output
as it grows) and a table from every n-gram (n in [min_match, max_match]) to the last OCCURRENCES places it
ended, so a look-up is at most max_match - min_match + 1 dictionary probes whatever the index holds. Of a
match's places the one nearest the same offset into its output wins (outputs of one template put the same
field at about the same offset, and the most recent place breaks ties). Keys are hashes of the n-grams: a
collision only makes a wrong proposal, which verification rejects.

Example: the index holds [5, 6, 7, 8, 9]; a context ending [.., 6, 7] matches 2 tokens and proposes [8, 9].

Not here: where the sequences come from (`actors.cross_drafts`), how many proposed tokens a step verifies (the
planner), merging them into the draft tree (`engine.tree.merge_branch`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

MIN_MATCH = 1  # one-token matches are often wrong; the planner learns how often, per match length
MAX_MATCH = 8
OCCURRENCES = 4  # places kept per n-gram


@dataclass(frozen=True)
class Match:
    """A proposal: the tokens that followed the context's suffix in `source`, and how many context tokens
    matched (longer matches are more often right)."""

    tokens: tuple[int, ...]
    match_length: int
    source: str


@dataclass
class _Sequence:
    tokens: list[int]
    source: str
    start: int = 0  # the position of the first output token (a prompt's length; 0 for an output)
    indexed: int = 0  # n-grams ending before this position are in the table


class TokenIndex:
    """Sequences of token ids and their n-grams; `match` finds the longest suffix match. Thread safe.

    max_sequences: beyond it the oldest sequence is dropped (None: no bound)."""

    def __init__(
        self, max_sequences: int | None = None, min_match: int = MIN_MATCH, max_match: int = MAX_MATCH
    ) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        self.max_sequences, self.min_match, self.max_match = max_sequences, min_match, max_match
        self._sequences: OrderedDict[int, _Sequence] = OrderedDict()
        self._table: dict[int, list[tuple[int, int]]] = {}  # n-gram hash -> [(sequence id, position after)]
        self._next_id = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(sequence.tokens) for sequence in self._sequences.values())

    def add(self, tokens: Sequence[int], source: str, start: int = 0) -> int:
        """Index a sequence whose output begins at `start`; returns its id (for `extend`)."""
        with self._lock:
            sequence_id = self._next_id
            self._next_id += 1
            self._sequences[sequence_id] = _Sequence(list(tokens), source, start)
            self._index(sequence_id)
            while self.max_sequences is not None and len(self._sequences) > self.max_sequences:
                self._drop_oldest()
            return sequence_id

    def extend(self, sequence_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to a sequence (a row's own output as it grows)."""
        with self._lock:
            sequence = self._sequences.get(sequence_id)
            if sequence is not None:
                sequence.tokens.extend(tokens)
                self._index(sequence_id)

    def match(self, context: Sequence[int], max_tokens: int, offset: int | None = None) -> Match | None:
        """What followed the longest suffix of `context` (max_match tokens at most) seen in a sequence, up to
        max_tokens of it; None when no suffix of min_match tokens or more was seen, or nothing followed it.
        offset: how far into its output the context is (prefers places as far into theirs)."""
        if max_tokens < 1:
            return None
        tail = tuple(context[-self.max_match :])
        with self._lock:
            for length in range(min(len(tail), self.max_match), self.min_match - 1, -1):
                places = self._table.get(hash(tail[-length:]))
                if not places:
                    continue
                best = None
                for sequence_id, position in reversed(places):  # newest first: it wins ties
                    sequence = self._sequences.get(sequence_id)
                    if sequence is None or position >= len(sequence.tokens):
                        continue
                    distance = 0 if offset is None else abs(position - sequence.start - offset)
                    if best is None or distance < best[0]:
                        best = (distance, sequence, position)
                if best is not None:
                    _, sequence, position = best
                    proposed = tuple(sequence.tokens[position : position + max_tokens])
                    return Match(proposed, length, sequence.source)
        return None

    def _index(self, sequence_id: int) -> None:
        """Add the n-grams that end before the sequence's last token (each needs a token after it)."""
        sequence = self._sequences[sequence_id]
        tokens = sequence.tokens
        for end in range(max(sequence.indexed, self.min_match), len(tokens)):
            for length in range(self.min_match, min(self.max_match, end) + 1):
                places = self._table.setdefault(hash(tuple(tokens[end - length : end])), [])
                places.append((sequence_id, end))
                if len(places) > OCCURRENCES:
                    del places[0]
        sequence.indexed = max(sequence.indexed, len(tokens))

    def _drop_oldest(self) -> None:
        sequence_id, sequence = self._sequences.popitem(last=False)
        tokens = sequence.tokens
        for end in range(self.min_match, min(len(tokens), sequence.indexed)):
            for length in range(self.min_match, min(self.max_match, end) + 1):
                key = hash(tuple(tokens[end - length : end]))
                places = self._table.get(key)
                if places is None:
                    continue
                places[:] = [place for place in places if place[0] != sequence_id]
                if not places:
                    del self._table[key]


class RowProposals:
    """One row's proposals from three indexes: the outputs fetched for it (similar prompts' outputs), the
    actor's recent outputs (`shared`, one index for all its rows), and its own prompt followed by its output as
    it grows. The longest match wins; on a tie, in that order: other outputs of a similar request predict an
    output better than its own prompt does.

    The engine calls `match(output, max_tokens)` before a step and `finish(output)` once the row is done."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        fetched: Sequence[tuple[Sequence[int], str]] = (),
        shared: TokenIndex | None = None,
        on_finish=None,
    ) -> None:
        self.fetched = TokenIndex()
        for tokens, source in fetched:
            self.fetched.add(tokens, source)
        self.own = TokenIndex()
        self.prompt_length = len(prompt_ids)
        self._output_id = self.own.add(
            prompt_ids, "prompt", start=len(prompt_ids)
        )  # the prompt, then the output
        self._seen = len(prompt_ids)
        self.shared = shared
        self._on_finish = on_finish

    def match(self, output: Sequence[int], max_tokens: int) -> Match | None:
        if len(output) > self._seen:
            self.own.extend(self._output_id, output[self._seen :])
            self._seen = len(output)
        best = None
        for index in (self.fetched, self.shared, self.own):
            found = (
                None
                if index is None or not len(index)
                else index.match(output, max_tokens, len(output) - self.prompt_length)
            )
            if found is not None and (best is None or found.match_length > best.match_length):
                best = found
        return best

    def finish(self, output: Sequence[int]) -> None:
        """The row's full sequence (prompt and new tokens) is done: hand its new tokens on."""
        if self._on_finish is not None:
            self._on_finish(list(output[self.prompt_length :]))
