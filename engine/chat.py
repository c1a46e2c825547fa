"""Chat prompts as token ids, and the tokens that end a turn: one place for the actors, benches and training.

A prompt becomes one user message through the tokenizer's chat template, with the generation prompt, so the
model answers it as a chat model would. Generation then stops at any of the target config's, the generation
config's and the tokenizer's eos tokens (a template's end of turn is often only one of them).
"""

from __future__ import annotations


def eos_token_ids(*sources: int | list[int] | None) -> tuple[int, ...]:
    """The union of eos settings, each an id, a list of ids or None: (2, [2, 7], None) -> (2, 7)."""
    ids: set[int] = set()
    for eos in sources:
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return tuple(sorted(ids))


def chat_eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token that ends a chat turn for this HF model and tokenizer."""
    generation_config = getattr(model, "generation_config", None)
    return eos_token_ids(
        model.config.eos_token_id,
        getattr(generation_config, "eos_token_id", None),
        tokenizer.eos_token_id,
    )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """`messages` ({role, content} dicts) through the chat template, by default with the generation prompt."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


def prompt_ids(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """A prompt as one user message when the tokenizer has a chat template (and `chat_template`), else raw."""
    if chat_template and has_chat_template(tokenizer):
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text).input_ids
