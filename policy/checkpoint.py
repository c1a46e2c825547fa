"""Save and load a learned tree policy: `policy.safetensors` (bandit arrays) + `policy.json` (everything else).

policy.json holds the actions as 'total/depth/top_k' strings, the feature names and NUM_FEATURES, the algorithm
and its hyper-parameters, the reward reference seconds, and a free-form training summary. Nothing is pickled.
Loading validates the actions, the feature layout and every array shape, and raises ValueError naming the
problem. It does not build a controller's latency table: that is per machine (see `latency.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from policy.actions import ActionSet
from policy.bandit import LinearBandit
from policy.observation import FEATURE_NAMES, NUM_FEATURES

WEIGHTS_NAME = "policy.safetensors"
CONFIG_NAME = "policy.json"
FORMAT_VERSION = 1


@dataclass
class PolicyCheckpoint:
    """A loaded policy: the bandit, its action set, and the metadata of policy.json."""

    bandit: LinearBandit
    actions: ActionSet
    reference_seconds: float | None = None
    ema_decay: float = 0.7
    training_summary: dict = field(default_factory=dict)


def save_policy(
    out_dir: str,
    bandit: LinearBandit,
    actions: ActionSet,
    reference_seconds: float | None = None,
    ema_decay: float = 0.7,
    training_summary: dict | None = None,
) -> None:
    if bandit.num_actions != len(actions) or bandit.num_features != NUM_FEATURES:
        raise ValueError(
            f"bandit is {bandit.num_actions} actions x {bandit.num_features} features; expected "
            f"{len(actions)} x {NUM_FEATURES}"
        )
    os.makedirs(out_dir, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in bandit.state_dict().items()}
    save_file(arrays, os.path.join(out_dir, WEIGHTS_NAME))
    meta = {
        "format_version": FORMAT_VERSION,
        "algorithm": bandit.algorithm,
        "actions": actions.compact,
        "feature_names": list(FEATURE_NAMES),
        "num_features": NUM_FEATURES,
        "hyper_parameters": bandit.hyper_parameters(),
        "reference_seconds": reference_seconds,
        "ema_decay": ema_decay,
        "training_summary": training_summary or {},
    }
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_policy(path: str, seed: int = 0) -> PolicyCheckpoint:
    """Load from a folder holding policy.json and policy.safetensors."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise ValueError(f"policy folder {path!r} has no {os.path.basename(needed)}")
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    try:
        actions = ActionSet.parse(meta["actions"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{config_path}: 'actions' must be a list of 'total/depth/top_k' strings") from error
    if meta.get("num_features") != NUM_FEATURES or meta.get("feature_names") != list(FEATURE_NAMES):
        raise ValueError(
            f"{config_path}: features {meta.get('feature_names')} ({meta.get('num_features')}) do not match this "
            f"version's {list(FEATURE_NAMES)} ({NUM_FEATURES})"
        )
    hyper = meta.get("hyper_parameters", {})
    bandit = LinearBandit(
        num_actions=len(actions),
        num_features=NUM_FEATURES,
        ridge_lambda=float(hyper.get("ridge_lambda", 1.0)),
        exploration=float(hyper.get("exploration", 0.5)),
        algorithm=meta.get("algorithm", "thompson"),
        seed=seed,
    )
    try:
        arrays = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
    bandit.load_state_dict(arrays)  # ValueError naming a missing or mis-shaped array
    if not np.all(np.isfinite(bandit.theta)):
        raise ValueError(f"{weights_path}: theta holds non-finite values")
    return PolicyCheckpoint(
        bandit=bandit,
        actions=actions,
        reference_seconds=meta.get("reference_seconds"),
        ema_decay=float(meta.get("ema_decay", 0.7)),
        training_summary=meta.get("training_summary", {}),
    )
