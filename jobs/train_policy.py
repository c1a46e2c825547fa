"""Train the learned tree policy on real generation steps of the speculative engine.

    python -m jobs.train_policy --prompts models/demo/train_prompts.parquet --out outputs/policy
        [--model models/demo/target] [--draft models/demo/draft] [--epochs N] [--max-new-tokens M]
        [--num-prompts N] [--skip-prompts S] [--threads T]

Writes policy.safetensors, policy.json, latency.json, train_report.json and learning_curve.png to --out. Use
--skip-prompts to hold out the first prompts of the file for evaluation.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.build import DEFAULT_DEMO_ROOT
from engine.draft_head import DraftHead
from engine.target import TargetModel
from jobs import HelpFormatter
from jobs.prompts import read_prompt_column
from training.train_policy import PolicyTrainConfig, train_policy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_policy", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--prompts", required=True, help="Parquet file with a prompt column")
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument("--out", required=True, help="output folder for the policy checkpoint")
    parser.add_argument("--model", default=os.path.join(DEFAULT_DEMO_ROOT, "target"), help="target folder")
    parser.add_argument("--draft", default=os.path.join(DEFAULT_DEMO_ROOT, "draft"), help="draft head folder")
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
    for name in ("epochs", "max_new_tokens", "num_prompts"):
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
    texts = read_prompt_column(args.prompts, args.prompt_column)[args.skip_prompts :]
    if args.num_prompts is not None:
        texts = texts[: args.num_prompts]
    if not texts:
        raise ValueError(f"no prompts left after skipping {args.skip_prompts}")
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    target = TargetModel(model)
    head = DraftHead.from_pretrained(args.draft, target_embeddings=model.get_input_embeddings().weight)
    head = head.to(target.device).requires_grad_(False)
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    config = PolicyTrainConfig(
        epochs=args.epochs, max_new_tokens=args.max_new_tokens, exploration=args.exploration, seed=args.seed
    )
    report = train_policy(target, head, prompts, config, args.out)
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
