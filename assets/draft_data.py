"""Training sequences for a chat target's draft head, from ShareGPT's train split only.

Two sources, both chat-templated as the job templates its rows:
- `first_turn_prompts`: each conversation's first user turn with the generation prompt, for the target to continue
  itself (`training.train_draft.target_continuations`; HASS and EAGLE-3 train on the target's own text).
- `first_exchanges`: the first user turn and ShareGPT's own answer, teacher-forced (EAGLE-1's data).

The held-out split (`assets.sharegpt.split_of`) is never read here, so no evaluation prompt is trained on.
Sequences are token-id lists; `save_sequences`/`load_sequences` keep them between runs, since continuing
thousands of prompts is the slow part of training.
"""

from __future__ import annotations

import json
import os

from assets.sharegpt import is_plain_english, iter_conversations
from engine.chat import chat_ids

RESPONSE_SOURCES = ("target", "dataset")


def _train_exchanges(limit: int, skip: int = 0, min_chars: int = 16, max_chars: int = 4000):
    """(user text, assistant text) of the first exchange of train-split conversations, plain English, each user
    text once, in file order: `limit` of them after the first `skip`."""
    seen: set[str] = set()
    for conversation in iter_conversations(split="train"):
        messages = conversation.messages
        if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
            continue
        user, answer = messages[0]["content"].strip(), messages[1]["content"].strip()
        if not min_chars <= len(user) <= max_chars or not answer or user in seen:
            continue
        if not is_plain_english(user + answer):
            continue
        seen.add(user)
        if len(seen) > skip:
            yield user, answer
        if len(seen) == skip + limit:
            return


def first_turn_prompts(tokenizer, limit: int, max_prompt_tokens: int, skip: int = 0) -> list[list[int]]:
    """Up to `limit` first user turns after the first `skip` exchanges, templated with the generation prompt;
    longer ones are skipped (a prompt cut at the front would lose its template header)."""
    prompts = []
    for user, _ in _train_exchanges(limit * 2, skip):
        ids = chat_ids(tokenizer, [{"role": "user", "content": user}])
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
            if len(prompts) == limit:
                break
    return prompts


def first_exchanges(tokenizer, limit: int, max_tokens: int, skip: int = 0) -> list[list[int]]:
    """Up to `limit` templated (user, ShareGPT answer) exchanges after the first `skip`, each cut to its first
    `max_tokens` tokens."""
    sequences = []
    for user, answer in _train_exchanges(limit, skip):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        sequences.append(chat_ids(tokenizer, messages, add_generation_prompt=False)[:max_tokens])
    return sequences


def save_sequences(sequences: list[list[int]], path: str, meta: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump({"meta": meta, "sequences": sequences}, f)
    os.replace(path + ".partial", path)


def load_sequences(path: str, meta: dict) -> list[list[int]] | None:
    """The sequences saved at `path` when they were made with the same `meta`, else None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return data["sequences"] if data.get("meta") == meta else None
