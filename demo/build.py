"""Build the offline demo models: corpus -> tokenizer -> target LM -> draft head -> held-out prompts.

Everything comes from this machine's Python standard library (code) and pydoc topics (prose); nothing is
downloaded. Output layout under `out_root` (default `models/demo/`):

    target/                 tokenizer + LlamaForCausalLM (save_pretrained, safetensors)
    draft/                  EAGLE-1/2 head, official layout (config.json + model.safetensors)
    heldout_prompts.parquet prompts cut from held-out modules (id, prompt, kind)
    build_report.json       what was built, how long each stage took, held-out loss/accuracy, draft tau

This module orchestrates; each stage lives in its own module.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.corpus import build_corpus, make_prompts, write_prompts_parquet
from demo.target import target_preset, tokenize_corpus, train_target
from demo.tokenizer import train_tokenizer
from engine.types import TreeParams
from training.train_draft import DraftTrainConfig, train_draft_head

DEFAULT_DEMO_ROOT = "models/demo"
REPORT_NAME = "build_report.json"
PROMPTS_NAME = "heldout_prompts.parquet"


@dataclass(frozen=True)
class DemoPreset:
    name: str
    max_train_chars: int | None
    tokenizer_train_chars: int
    num_draft_train_prompts: int
    num_eval_prompts: int
    num_heldout_prompts: int
    num_policy_train_prompts: int
    draft: DraftTrainConfig


PRESETS = {
    "full": DemoPreset(
        name="full",
        max_train_chars=None,
        tokenizer_train_chars=6_000_000,
        num_draft_train_prompts=512,
        num_eval_prompts=16,
        num_heldout_prompts=200,
        num_policy_train_prompts=96,
        draft=DraftTrainConfig(epochs=5, time_budget_s=120.0),
    ),
    "tiny": DemoPreset(
        name="tiny",
        max_train_chars=400_000,
        tokenizer_train_chars=400_000,
        num_draft_train_prompts=48,
        num_eval_prompts=4,
        num_heldout_prompts=24,
        num_policy_train_prompts=4,
        draft=DraftTrainConfig(
            max_new_tokens=32,
            epochs=2,
            batch_size=8,
            time_budget_s=8.0,
            eval_tree=TreeParams(8, 3, 2),
            eval_max_new_tokens=24,
            max_prompt_tokens=96,
        ),
    ),
}


def demo_paths(out_root: str = DEFAULT_DEMO_ROOT) -> dict[str, str]:
    return {
        "target": os.path.join(out_root, "target"),
        "draft": os.path.join(out_root, "draft"),
        "prompts": os.path.join(out_root, PROMPTS_NAME),
        "report": os.path.join(out_root, REPORT_NAME),
        "policy": os.path.join(out_root, "policy"),
        "train_prompts": os.path.join(out_root, "train_prompts.parquet"),
    }


def demo_is_built(out_root: str = DEFAULT_DEMO_ROOT) -> bool:
    paths = demo_paths(out_root)
    return all(
        os.path.isfile(path)
        for path in (
            os.path.join(paths["target"], "config.json"),
            os.path.join(paths["target"], "model.safetensors"),
            os.path.join(paths["draft"], "config.json"),
            os.path.join(paths["draft"], "model.safetensors"),
            paths["report"],
        )
    )


def build_demo(preset: str = "full", out_root: str = DEFAULT_DEMO_ROOT, progress: bool = True) -> dict:
    """Build every demo artefact under `out_root` and return the report (also written as JSON)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    paths = demo_paths(out_root)
    os.makedirs(out_root, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    stage = time.perf_counter()
    corpus = build_corpus(max_train_chars=spec.max_train_chars)
    timings["corpus_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    tokenizer = train_tokenizer(
        _cap_texts(corpus.train_documents, spec.tokenizer_train_chars), target_preset(preset).vocab_size
    )
    timings["tokenizer_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    target_config = target_preset(preset)
    train_ids = tokenize_corpus(corpus.train_documents, tokenizer)
    heldout_ids = tokenize_corpus(corpus.heldout_documents, tokenizer)
    target_report = train_target(
        train_ids, heldout_ids, tokenizer, target_config, paths["target"], progress=progress
    )
    timings["target_s"] = time.perf_counter() - stage

    stage = time.perf_counter()
    max_prompt = target_config.seq_len - 8
    heldout_rows = make_prompts(
        corpus.heldout_documents,
        tokenizer,
        num_prompts=spec.num_heldout_prompts,
        max_prompt_tokens=min(200, max_prompt),
    )
    write_prompts_parquet(heldout_rows, paths["prompts"])
    # Training prompts for the tree policy: cut from training documents the same way as the held-out prompts
    # (code from a def/class, prose from a paragraph), so the policy learns on prompts shaped like the ones it
    # serves and never sees held-out text. Random windows of the train stream, used before, start mid-line and
    # repeat their own context less; a policy trained on them under-used the deep chains.
    policy_rows = [
        {**row, "id": f"train-{row['id']}"}
        for row in make_prompts(
            corpus.train_documents,
            tokenizer,
            num_prompts=spec.num_policy_train_prompts,
            seed=1,
            max_prompt_tokens=min(200, max_prompt),
        )
    ]
    write_prompts_parquet(policy_rows, paths["train_prompts"])
    model = AutoModelForCausalLM.from_pretrained(paths["target"], attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["target"])
    train_prompts = sample_windows(
        train_ids, spec.num_draft_train_prompts, 32, max_prompt, tokenizer.bos_token_id
    )
    eval_prompts = [tokenizer(row["prompt"]).input_ids for row in heldout_rows[: spec.num_eval_prompts]]
    _, draft_report = train_draft_head(
        model, train_prompts, eval_prompts, paths["draft"], spec.draft, progress
    )
    timings["draft_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - started

    report = {
        "preset": preset,
        "corpus": {
            "num_train_documents": len(corpus.train_documents),
            "num_heldout_documents": len(corpus.heldout_documents),
            "num_train_tokens": int(train_ids.numel()),
            "num_heldout_tokens": int(heldout_ids.numel()),
        },
        "target": asdict(target_report),
        "draft": {k: v for k, v in draft_report.to_dict().items() if k != "losses"},
        "num_heldout_prompts": len(heldout_rows),
        "timings": timings,
    }
    with open(paths["report"], "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    target, draft, timings = report["target"], report["draft"], report["timings"]
    lines = [
        f"demo build ({report['preset']}) finished in {timings['total_s']:.0f} s",
        f"  corpus     {report['corpus']['num_train_documents']} train / {report['corpus']['num_heldout_documents']} "
        f"held-out documents, {report['corpus']['num_train_tokens']:,} train tokens",
        f"  target     {target['num_parameters'] / 1e6:.1f}M params, {target['num_steps']} steps, "
        f"{target['num_train_tokens']:,} tokens in {target['train_seconds']:.0f} s; held-out loss "
        f"{target['heldout_loss']:.3f}, top-1 accuracy {target['heldout_top1_accuracy']:.1%}",
        f"  draft      {draft['num_train_sequences']} sequences, {draft['num_steps']} steps; held-out tau "
        f"{draft['eval_mean_accepted_tokens']:.2f} at tree {draft['eval_tree']} on {draft['eval_num_prompts']} prompts",
        *(
            [
                f"  policy     {report['policy']['num_transitions']} training steps; measured tokens/s by epoch "
                + ", ".join(f"{v:.0f}" for v in report["policy"]["epoch_tokens_per_s"])
            ]
            if "policy" in report
            else []
        ),
        "  timings    " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()),
    ]
    return "\n".join(lines)


def _cap_texts(documents, max_chars: int) -> list[str]:
    """About `max_chars` of text spread evenly over the documents (every k-th), so code and prose both appear."""
    total = sum(len(document.text) for document in documents)
    stride = max(1, -(-total // max_chars))
    return [document.text for document in documents[::stride]]


def sample_windows(
    token_ids: torch.Tensor, count: int, min_length: int, max_length: int, bos_token_id: int, seed: int = 1
) -> list[list[int]]:
    """`count` random windows of the train stream [num_tokens], each prefixed with bos, as training prompts."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (count,), generator=generator)
    starts = torch.randint(0, max(1, token_ids.numel() - max_length), (count,), generator=generator)
    return [
        [bos_token_id, *token_ids[s : s + n].tolist()]
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)
    ]
