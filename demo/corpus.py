"""The offline demo corpus: Python standard library sources (code) and `pydoc_data` topics (prose).

This module collects documents, splits them into train and held-out sets by whole module (or pydoc topic), and
cuts evaluation prompts from the held-out documents only, writing them to Parquet. It does not tokenize for
training or train anything; see `demo.tokenizer` and `demo.target`.

The split is a stable hash of the module name, so it never depends on the seed, the machine or file order:
the same modules are held out for every preset.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

DocumentKind = Literal["code", "prose"]

# Folder names anywhere in a path that exclude a file: tests, caches, third-party packages, and `pydoc_data`
# (its `topics.py` holds the prose topics as a Python literal, so keeping it would leak held-out prose).
EXCLUDED_FOLDER_NAMES = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
)
PROSE_NAME_PREFIX = "pydoc:"
# Code prompts end this many lines after a `def`/`class` line, chosen uniformly.
MAX_LINES_AFTER_DEFINITION = 4
# Upper bound of characters per token, used only to size the text window that is tokenized while cutting.
MAX_CHARS_PER_TOKEN = 16

DEFINITION_PATTERN = re.compile(r"[ \t]*(async[ \t]+def|def|class)[ \t]")
SENTENCE_END_PATTERN = re.compile(r"[.!?:](?=\s)")


@dataclass(frozen=True)
class Document:
    """One source file (`kind="code"`, named by its path relative to the stdlib folder) or one pydoc topic
    (`kind="prose"`, named `pydoc:<topic>`)."""

    name: str
    kind: DocumentKind
    text: str


@dataclass(frozen=True)
class Corpus:
    train_documents: list[Document]
    heldout_documents: list[Document]


def split_key(document: Document) -> str:
    """The unit the train/held-out split is made on: the top-level module or package of a source file
    (`email/mime/text.py` -> `email`, `json/decoder.py` -> `json`, `os.py` -> `os.py`), or the pydoc topic."""
    if document.kind == "prose":
        return document.name
    return document.name.split("/", 1)[0]


def is_heldout_key(key: str, heldout_fraction: float = 0.1) -> bool:
    """Stable hash split: the first 32 bits of sha1(key), read as a fraction of 2**32, below `heldout_fraction`."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32 < heldout_fraction


def iter_stdlib_code_documents(stdlib_dir: str | None = None) -> Iterator[Document]:
    """Yield the stdlib's `.py` files in sorted path order, skipping excluded folders, empty files and files
    that are not valid UTF-8."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for folder, folder_names, file_names in os.walk(root):
        # Prune in place so os.walk does not descend; sort for a deterministic order.
        folder_names[:] = sorted(name for name in folder_names if name not in EXCLUDED_FOLDER_NAMES)
        for file_name in sorted(file_names):
            if not file_name.endswith(".py"):
                continue
            path = Path(folder) / file_name
            relative_name = path.relative_to(root).as_posix()
            if "/test/" in f"/{relative_name}":
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield Document(name=relative_name, kind="code", text=text)


def iter_pydoc_prose_documents() -> Iterator[Document]:
    """Yield one prose document per `pydoc_data.topics.topics` entry, in sorted topic order."""
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        text = topics[topic]
        if text.strip():
            yield Document(name=f"{PROSE_NAME_PREFIX}{topic}", kind="prose", text=text)


def build_corpus(max_train_chars: int | None = None, seed: int = 0, heldout_fraction: float = 0.1) -> Corpus:
    """Collect the corpus and split it by module into train and held-out documents.

    With `max_train_chars`, the train documents are a deterministic subset: shuffled with `seed`, then taken
    whole until the cap is reached (at least one document is kept). The held-out set is never capped, and
    it does not depend on `seed`.
    """
    if max_train_chars is not None and max_train_chars <= 0:
        raise ValueError(f"max_train_chars must be positive or None, got {max_train_chars}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train_documents: list[Document] = []
    heldout_documents: list[Document] = []
    for document in [*iter_stdlib_code_documents(), *iter_pydoc_prose_documents()]:
        if is_heldout_key(split_key(document), heldout_fraction):
            heldout_documents.append(document)
        else:
            train_documents.append(document)
    if max_train_chars is not None:
        train_documents = _take_subset(train_documents, max_train_chars, seed)
    return Corpus(train_documents=train_documents, heldout_documents=heldout_documents)


def _take_subset(documents: list[Document], max_chars: int, seed: int) -> list[Document]:
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    subset: list[Document] = []
    num_chars = 0
    for document in shuffled:
        if subset and num_chars + len(document.text) > max_chars:
            continue
        subset.append(document)
        num_chars += len(document.text)
    return subset


def make_prompts(
    heldout_documents: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int = 200,
    seed: int = 0,
    min_prompt_tokens: int = 40,
    max_prompt_tokens: int = 200,
) -> list[dict[str, str]]:
    """Cut `num_prompts` distinct prompts from held-out documents: about 2/3 code and 1/3 prose.

    Code prompts start at a line start and end at the end of a line 1-4 lines after a `def`/`class` line.
    Prose prompts start at a paragraph and end at a sentence end (or a line end). Prompts carry no trailing
    newline, because the byte-level tokenizer merges a newline with the next line's indentation: a prompt that
    ended in a bare newline would start generation from a token sequence never seen in training.

    Token counts (without bos) lie in [min_prompt_tokens, max_prompt_tokens]. Rows are
    `{"id": "code-0007", "prompt": ..., "kind": "code"}`, shuffled so that kinds mix; deterministic for a seed.
    """
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    if not 0 < min_prompt_tokens <= max_prompt_tokens:
        raise ValueError(
            f"need 0 < min_prompt_tokens <= max_prompt_tokens, got {min_prompt_tokens}, {max_prompt_tokens}"
        )
    rng = random.Random(seed)
    num_code = round(num_prompts * 2 / 3)
    token_range = (min_prompt_tokens, max_prompt_tokens)
    code_documents = [document for document in heldout_documents if document.kind == "code"]
    prose_documents = [document for document in heldout_documents if document.kind == "prose"]
    code_prompts = _collect_prompts(code_documents, "code", num_code, tokenizer, rng, token_range)
    prose_prompts = _collect_prompts(
        prose_documents, "prose", num_prompts - num_code, tokenizer, rng, token_range
    )
    rows = [
        {"id": f"{kind}-{index:04d}", "prompt": prompt, "kind": kind}
        for kind, prompts in (("code", code_prompts), ("prose", prose_prompts))
        for index, prompt in enumerate(prompts)
    ]
    rng.shuffle(rows)
    return rows


def _collect_prompts(
    documents: Sequence[Document],
    kind: DocumentKind,
    num_wanted: int,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    token_range: tuple[int, int],
) -> list[str]:
    anchor_finder = _definition_line_starts if kind == "code" else _paragraph_starts
    cutter = _cut_code_prompt if kind == "code" else _cut_prose_prompt
    # Anchors: (document index, character offset), shuffled so prompts spread over documents.
    anchors = [
        (index, offset) for index, document in enumerate(documents) for offset in anchor_finder(document.text)
    ]
    rng.shuffle(anchors)
    prompts: list[str] = []
    seen: set[str] = set()
    for document_index, offset in anchors:
        if len(prompts) == num_wanted:
            break
        prompt = cutter(documents[document_index].text, offset, tokenizer, rng, token_range)
        if prompt is not None and prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    if len(prompts) < num_wanted:
        raise ValueError(
            f"only {len(prompts)} distinct {kind} prompts could be cut from {len(documents)} held-out documents, "
            f"{num_wanted} were requested; lower num_prompts or widen the token range"
        )
    return prompts


def _definition_line_starts(text: str) -> list[int]:
    """Offsets of lines that open a function or class."""
    return [offset for offset in _line_starts(text) if DEFINITION_PATTERN.match(text, offset)]


def _paragraph_starts(text: str) -> list[int]:
    """Offsets of paragraphs that begin with a letter at column 0 (indented blocks are code examples)."""
    return [
        offset
        for offset in _line_starts(text)
        if (offset == 0 or text.startswith("\n\n", offset - 2)) and text[offset : offset + 1].isalpha()
    ]


def _line_starts(text: str) -> list[int]:
    return [0, *(match.end() for match in re.finditer("\n", text) if match.end() < len(text))]


def _count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _cut_code_prompt(
    text: str,
    definition_offset: int,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    token_range: tuple[int, int],
) -> str | None:
    """Fix the end 1-4 lines after the definition line, then pick a line start before it whose cut fits."""
    lines_after = text[definition_offset:].split("\n")[: MAX_LINES_AFTER_DEFINITION + 1]
    end_line_index = rng.randint(1, MAX_LINES_AFTER_DEFINITION)
    if end_line_index >= len(lines_after) or not lines_after[end_line_index].strip():
        return None
    end = (
        definition_offset
        + sum(len(line) + 1 for line in lines_after[:end_line_index])
        + len(lines_after[end_line_index])
    )
    min_tokens, max_tokens = token_range
    window_start = max(0, end - max_tokens * MAX_CHARS_PER_TOKEN)
    token_starts = _token_start_offsets(tokenizer, text[window_start:end], window_start)
    candidate_starts = [
        offset
        for offset in _line_starts(text[:end])
        if window_start <= offset <= definition_offset
        and text[offset : offset + 1].strip()
        and min_tokens <= len(token_starts) - bisect.bisect_left(token_starts, offset) <= max_tokens
    ]
    if not candidate_starts:
        return None
    prompt = text[rng.choice(candidate_starts) : end]
    return prompt if min_tokens <= _count_tokens(tokenizer, prompt) <= max_tokens else None


def _cut_prose_prompt(
    text: str,
    paragraph_offset: int,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    token_range: tuple[int, int],
) -> str | None:
    """Fix the start at a paragraph, then pick a sentence end (or line end) after it whose cut fits."""
    min_tokens, max_tokens = token_range
    window = text[paragraph_offset : paragraph_offset + max_tokens * MAX_CHARS_PER_TOKEN]
    token_ends = _token_end_offsets(tokenizer, window)
    sentence_ends = {match.end() for match in SENTENCE_END_PATTERN.finditer(window)}
    line_ends = {match.start() for match in re.finditer("\n", window)}
    candidate_ends = [
        end
        for end in sorted(sentence_ends | line_ends)
        if window[end - 1 : end].strip() and min_tokens <= bisect.bisect_right(token_ends, end) <= max_tokens
    ]
    if not candidate_ends:
        return None
    # Prefer sentence ends; fall back to line ends only when no sentence end fits.
    sentence_candidates = [end for end in candidate_ends if end in sentence_ends]
    prompt = window[: rng.choice(sentence_candidates or candidate_ends)]
    return prompt if min_tokens <= _count_tokens(tokenizer, prompt) <= max_tokens else None


def _token_start_offsets(tokenizer: PreTrainedTokenizerBase, text: str, base_offset: int) -> list[int]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [base_offset + start for start, _ in encoding["offset_mapping"]]


def _token_end_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [end for _, end in encoding["offset_mapping"]]


def write_prompts_parquet(rows: Sequence[dict[str, str]], path: str | os.PathLike[str]) -> None:
    """Write prompt rows to one Parquet file with string columns id, prompt and kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("id", "prompt", "kind")
    for row in rows:
        if set(row) != set(columns):
            raise ValueError(f"prompt rows need exactly the keys {columns}, got {sorted(row)}")
    table = pa.table(
        {column: pa.array([row[column] for row in rows], type=pa.string()) for column in columns}
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
