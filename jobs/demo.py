"""The stdlib demo builder: a small target trained from scratch, its draft head, then the tree policy.

The tests build its tiny preset in seconds (`python -m jobs.build_demo --preset tiny`); the jobs default to the
real model (jobs/models.py). It sits in jobs/ because it joins the engine (models) and the policy (trained on the
engine's real steps); each half is built by its own package.
"""

from __future__ import annotations

import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.build import DEFAULT_DEMO_ROOT, build_demo, demo_is_built, demo_paths, format_report
from engine.heads import load_draft_head
from engine.target import TargetModel
from jobs.prompts import read_prompt_column
from policy.actions import DEFAULT_ACTIONS
from policy.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_policy
from training.train_policy import PolicyTrainConfig, train_policy

POLICY_PRESETS = {
    "full": PolicyTrainConfig(epochs=3, max_new_tokens=128),
    "tiny": PolicyTrainConfig(epochs=1, max_new_tokens=16, latency_repeats=1),
}


def policy_is_built(out_root: str = DEFAULT_DEMO_ROOT) -> bool:
    """The demo policy is there and fits this version: it loads (same observation features) and chooses among
    DEFAULT_ACTIONS. A policy from an older version is trained again rather than failing every job."""
    folder = demo_paths(out_root)["policy"]
    if not all(os.path.isfile(os.path.join(folder, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)):
        return False
    try:
        return load_policy(folder).actions == DEFAULT_ACTIONS
    except ValueError:
        return False


def build_demo_policy(out_root: str = DEFAULT_DEMO_ROOT, preset: str = "full", progress: bool = True) -> dict:
    """Train the demo tree policy on the demo models with the real engine; returns the training report."""
    if preset not in POLICY_PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(POLICY_PRESETS)}")
    paths = demo_paths(out_root)
    tokenizer = AutoTokenizer.from_pretrained(paths["target"])
    model = AutoModelForCausalLM.from_pretrained(paths["target"], attn_implementation="sdpa").eval()
    head = load_draft_head(paths["draft"], model)
    prompts = [tokenizer(text).input_ids for text in read_prompt_column(paths["train_prompts"])]
    report = train_policy(
        TargetModel(model), head, prompts, POLICY_PRESETS[preset], paths["policy"], progress
    )
    return report.to_dict()


def build_all(preset: str = "full", out_root: str = DEFAULT_DEMO_ROOT, progress: bool = True) -> dict:
    """Models, then policy. Returns the combined report (also written to build_report.json)."""
    report = build_demo(preset, out_root, progress)
    policy_report = build_demo_policy(out_root, preset, progress)
    epochs = policy_report["epochs"]
    report["policy"] = {
        "train_seconds": policy_report["train_seconds"],
        "num_transitions": policy_report["num_transitions"],
        "epoch_tokens_per_s": [e["tokens_per_s"] for e in epochs],
        "epoch_mean_reward": [e["mean_reward"] for e in epochs],
    }
    report["timings"]["policy_s"] = policy_report["train_seconds"]
    report["timings"]["total_s"] += policy_report["train_seconds"]
    with open(demo_paths(out_root)["report"], "w") as f:
        json.dump(report, f, indent=2)
    return report


def ensure_demo(
    out_root: str = DEFAULT_DEMO_ROOT, preset: str = "full", progress: bool = True
) -> dict[str, str]:
    """The demo paths, building whatever is missing first (models and policy, or just the policy)."""
    if not demo_is_built(out_root):
        print(
            f"demo models missing under {out_root!r}: building them now (preset {preset!r}, ~10 min on 2 cores)"
        )
        print(format_report(build_all(preset, out_root, progress)))
    elif not policy_is_built(out_root):
        print(f"demo policy missing or from an older version under {out_root!r}: training it now")
        build_demo_policy(out_root, preset, progress)
    return demo_paths(out_root)


if __name__ == "__main__":
    from jobs import refuse_to_run

    refuse_to_run("jobs.demo", "the demo builder the entry points share (python -m jobs.build_demo runs it)")
