"""Driver-side checks that a job's models fit together, before any actor starts; they read no weights.

A draft head fits its target when both have the same hidden size and vocabulary size (read from the two
config.json files; an EAGLE-3 head names the target's width `target_hidden_size`): the head reads target features
of hidden_size and embeds target tokens, so any other head fails in every actor at start-up. A policy folder fits when it loads (policy.json, policy.safetensors and
latency.json: what each actor would load) and every tree the job may run branches at most vocab_size ways
(`top_k`). What else a policy learned about its target (how often drafts are accepted) only changes speed,
never text, and its latency table records the target only as a hash of a config that includes the folder's path
and the transformers version, which is no reliable identity; neither is checked.

Every problem raises `ModelCheckError` with one line that names the folders (by their options) and the
mismatch.
"""

from __future__ import annotations

import json
import os

from common.config import ProcessorConfig
from engine.types import TreeParams
from policy.actions import DEFAULT_ACTIONS
from policy.checkpoint import load_policy
from policy.latency import LATENCY_NAME, LatencyTable

CONFIG_NAME = "config.json"
SHARED_SIZES = ("hidden_size", "vocab_size")


class ModelCheckError(ValueError):
    """The model, draft head and policy of a job do not fit together."""


def read_config(option: str, folder: str) -> dict:
    """A model folder's config.json as a dict; a multimodal config's `text_config` sizes count as its own."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ModelCheckError(f"{option} {folder!r}: cannot read {CONFIG_NAME}: {error}") from error
    if not isinstance(config, dict):
        raise ModelCheckError(f"{option} {folder!r}: {CONFIG_NAME} does not hold a JSON object")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        config = {**text_config, **{key: value for key, value in config.items() if key in SHARED_SIZES}}
    return config


def check_draft_fits_target(model: str, draft: str) -> dict:
    """ModelCheckError unless the head's hidden_size and vocab_size equal the target's. Returns the target's
    config (read once for the other checks)."""
    target, head = read_config("--model", model), read_config("--draft", draft)
    for option, folder, config in (("--model", model, target), ("--draft", draft, head)):
        missing = [key for key in SHARED_SIZES if not isinstance(config.get(key), int)]
        if missing:
            raise ModelCheckError(f"{option} {folder!r}: {CONFIG_NAME} has no integer {' or '.join(missing)}")
    # An EAGLE-3 head's own width may differ from the target's: it names the target's as target_hidden_size.
    head = {**head, "hidden_size": head.get("target_hidden_size", head["hidden_size"])}
    mismatches = [f"{key} {head[key]} vs {target[key]}" for key in SHARED_SIZES if head[key] != target[key]]
    if mismatches:
        raise ModelCheckError(
            f"--draft {draft!r} does not fit --model {model!r}: {', '.join(mismatches)} (draft vs model); "
            "give the draft head trained for this model with --draft"
        )
    # Trees branch over what the head proposes from: an EAGLE-3 head's draft vocabulary may be smaller.
    return {
        **target,
        "vocab_size": min(target["vocab_size"], head.get("draft_vocab_size", target["vocab_size"])),
    }


def policy_trees(config: ProcessorConfig) -> list[TreeParams]:
    """The trees the job's policy may choose (none for 'static', which runs --tree, or 'plain'). Loads a policy
    folder as each actor will; ModelCheckError naming it when that fails."""
    kind = config.policy_kind
    if kind in ("static", "plain"):
        return []
    if kind == "heuristic":
        return list(DEFAULT_ACTIONS)
    try:
        checkpoint = load_policy(config.policy)
        LatencyTable.load(os.path.join(config.policy, LATENCY_NAME))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelCheckError(f"--policy {config.policy!r} cannot be loaded: {error}") from error
    return list(checkpoint.actions)


def check_model_folders(config: ProcessorConfig) -> None:
    """ModelCheckError unless the model and draft folders (and a learned policy's) exist here, where the
    driver runs; actors load them from the same paths."""
    folders = {"--model": config.model, "--draft": config.draft}
    if config.policy_kind == "learned":
        folders["--policy"] = config.policy
    for option, folder in folders.items():
        if not os.path.isdir(folder):
            raise ModelCheckError(f"{option} {folder!r} is not a folder")
    if not os.path.isfile(os.path.join(config.model, CONFIG_NAME)):
        raise ModelCheckError(
            f"--model {config.model!r} has no config.json; is it a Hugging Face model folder?"
        )


def check_models(config: ProcessorConfig) -> None:
    """Run every check above on a config (the model folders are known to exist)."""
    vocab_size = check_draft_fits_target(config.model, config.draft)["vocab_size"]
    for option, trees in (
        ("--tree", [config.static_tree]),
        (f"--policy {config.policy!r}", policy_trees(config)),
    ):
        too_wide = sorted({tree.compact for tree in trees if tree.top_k > vocab_size})
        if too_wide:
            raise ModelCheckError(
                f"{option} does not fit --model {config.model!r}: tree(s) {too_wide} branch top_k wider than its "
                f"vocab_size {vocab_size}"
            )
