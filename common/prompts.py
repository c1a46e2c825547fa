"""What makes a prompt or a chat `messages` value generatable: the checks the job's row stage and the Serve
replica share, so a request is refused for the same reasons, in the same words, as a row.

Plain Python on plain values; nothing here imports ray or torch.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.config import ProcessorConfig

MESSAGE_ROLES = ("system", "user", "assistant")


def prompt_error(prompt) -> str | None:
    """Why a prompt value cannot be generated, or None when it can."""
    if prompt is None:
        return "prompt is null"
    if not isinstance(prompt, str):
        return f"prompt must be text, got {type(prompt).__name__}"
    if not prompt.strip():
        return "prompt is empty or whitespace" if prompt else "prompt is empty"
    return None


def messages_error(messages, config: ProcessorConfig) -> str | None:
    """Why a messages value cannot be generated, or None when it can. A valid value is a non-empty list of
    mappings, each with a `role` in MESSAGE_ROLES and non-blank string `content` (other keys are ignored),
    e.g. [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]."""
    if not config.chat_template:
        return "messages need a chat template; the job runs with --no-chat-template (give prompts instead)"
    if messages is None:
        return "messages is null"
    if not isinstance(messages, list | tuple):
        return f"messages must be a list of {{role, content}} messages, got {type(messages).__name__}"
    if not messages:
        return "messages is empty"
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            return f"{where} must be a {{role, content}} mapping, got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return f"{where} has no role"
        if role not in MESSAGE_ROLES:
            return f"{where} has unknown role {role!r}; allowed: {', '.join(MESSAGE_ROLES)}"
        if content is None:
            return f"{where} has no content"
        if not isinstance(content, str):
            return f"{where} content must be text, got {type(content).__name__}"
        if not content.strip():
            return f"{where} content is empty or whitespace" if content else f"{where} content is empty"
    return None
