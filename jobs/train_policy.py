"""Train the learned tree policy on real generation steps of the speculative engine.

    python -m jobs.train_policy (--prompts PARQUET | --sharegpt N) --out DIR
        [--model models/smollm2/target] [--draft models/smollm2/draft] [--epochs N] [--max-new-tokens M]
        [--num-prompts N] [--skip-prompts S] [--threads T]

Prompts come from a Parquet file, or with --sharegpt N from the first turns of ShareGPT's train split (after the
first --skip-prompts of them, e.g. those the head was trained on); held-out prompts are never read. With a chat
template each prompt is one user message, and generation stops at the end of the turn, as in the job. Writes
policy.safetensors, policy.json, latency.json, train_report.json and learning_curve.png to --out. With --prompts,
--skip-prompts holds out the first prompts of the file for evaluation.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from assets.draft_data import first_turn_prompts
from engine.chat import chat_eos_token_ids, has_chat_template, prompt_ids
from engine.heads import load_draft_head
from engine.target import TargetModel
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT
from jobs.prompts import read_prompt_column
from jobs.train_draft import SHAREGPT_MAX_PROMPT_TOKENS
from training.train_policy import PolicyTrainConfig, train_policy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("train_policy"), description=__doc__, formatter_class=HelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="Parquet file with a prompt column")
    source.add_argument("--sharegpt", type=int, metavar="N", help="N first turns of ShareGPT's train split")
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument("--out", required=True, help="output folder for the policy checkpoint")
    parser.add_argument("--model", default=os.path.join(DEFAULT_ROOT, "target"), help="target folder")
    parser.add_argument("--draft", default=os.path.join(DEFAULT_ROOT, "draft"), help="draft head folder")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt and epoch")
    parser.add_argument("--num-prompts", type=int, default=None, help="train on N prompts (default: all)")
    parser.add_argument("--skip-prompts", type=int, default=0, help="hold out the first S prompts")
    parser.add_argument(
        "--exploration",
        type=float,
        default=PolicyTrainConfig.exploration,
        help="Thompson-sampling scale, in normalised reward units (larger explores more trees)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the bandit's sampling and the prompt order"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("epochs", "max_new_tokens", "num_prompts", "sharegpt"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.skip_prompts < 0:
        parser.error(f"--skip-prompts must be >= 0, got {args.skip_prompts}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.sharegpt:
        prompts = first_turn_prompts(tokenizer, args.skip_prompts + args.sharegpt, SHAREGPT_MAX_PROMPT_TOKENS)
        prompts = prompts[args.skip_prompts :]
    else:
        texts = read_prompt_column(args.prompts, args.prompt_column)[args.skip_prompts :]
        prompts = [prompt_ids(tokenizer, text) for text in texts]
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]
    if not prompts:
        raise SystemExit(f"jobs.train_policy: no prompts left after skipping {args.skip_prompts}")
    eos = chat_eos_token_ids(model, tokenizer) if has_chat_template(tokenizer) else ()
    target = TargetModel(model)
    head = load_draft_head(args.draft, model)
    head = head.to(target.device).requires_grad_(False)
    config = PolicyTrainConfig(
        epochs=args.epochs, max_new_tokens=args.max_new_tokens, exploration=args.exploration, seed=args.seed
    )
    report = train_policy(target, head, prompts, config, args.out, eos_token_ids=eos)
    print(f"trained on {len(prompts)} prompts, {report.num_transitions} steps, {report.train_seconds:.0f} s")
    for epoch in report.epochs:
        print(
            f"epoch {epoch.epoch}: reward {epoch.mean_reward:.1f} tok/s (modelled), "
            f"measured {epoch.tokens_per_s:.1f} tok/s, tau {epoch.mean_accepted_tokens:.2f}"
        )
    print(f"last epoch's actions: {report.final_action_counts}")
    print(f"wrote {args.out}/policy.safetensors, policy.json, learning_curve.png")


if __name__ == "__main__":
    main()
