"""Train an EAGLE-1/2 draft head for any supported target on the target's own continuations.

    python -m jobs.train_draft --target PATH --prompts PARQUET --out DIR

The last --eval-fraction of the prompts is held out to report acceptance (tau) after training.
"""

from __future__ import annotations

import argparse
import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.types import TreeParams
from jobs import HelpFormatter
from jobs.prompts import read_prompt_column
from training.train_draft import DraftTrainConfig, train_draft_head


def main(argv: list[str] | None = None) -> None:
    defaults = DraftTrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train_draft", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--target", required=True, help="folder of a HF causal LM (save_pretrained layout)")
    parser.add_argument("--prompts", required=True, help="Parquet file with a prompt column")
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument("--out", required=True, help="output folder for the head (official EAGLE layout)")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out for tau")
    parser.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="passes over the training prompts"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="continuation length"
    )
    parser.add_argument(
        "--time-budget", type=float, default=None, help="stop training after this many seconds"
    )
    parser.add_argument("--eval-tree", default=defaults.eval_tree.compact, help="total/depth/top_k for tau")
    parser.add_argument(
        "--draft-vocab-size",
        type=int,
        default=None,
        help="train and draft over the N most frequent tokens of the training data (default: the whole "
        "vocabulary)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the target's own modelling code"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.eval_fraction < 1.0:
        parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if not os.path.isdir(args.target):
        parser.error(f"--target {args.target!r} is not a folder")
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        parser.error(f"--draft-vocab-size must be >= 1, got {args.draft_vocab_size}")

    texts = read_prompt_column(args.prompts, args.prompt_column)
    num_eval = int(len(texts) * args.eval_fraction)
    tokenizer = AutoTokenizer.from_pretrained(args.target, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.target, attn_implementation="sdpa", trust_remote_code=args.trust_remote_code
    ).eval()
    ids = [tokenizer(text).input_ids for text in texts]
    train_ids, eval_ids = ids[: len(ids) - num_eval], ids[len(ids) - num_eval :]
    config = DraftTrainConfig(
        epochs=args.epochs,
        max_new_tokens=args.max_new_tokens,
        time_budget_s=args.time_budget,
        eval_tree=TreeParams.parse(args.eval_tree),
        draft_vocab_size=args.draft_vocab_size,
    )
    _, report = train_draft_head(model, train_ids, eval_ids, args.out, config)
    summary = {k: v for k, v in report.to_dict().items() if k != "losses"}
    with open(os.path.join(args.out, "training_report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
