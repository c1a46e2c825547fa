"""Train an EAGLE-1/2 draft head (or with --eagle3 an EAGLE-3 one) for any supported target.

    python -m jobs.train_draft --target PATH --prompts PARQUET --out DIR
    python -m jobs.train_draft --target models/smollm2/target --sharegpt 2000 --out models/smollm2/draft
    python -m jobs.train_draft --eagle3 --draft-vocab-size 8192 --target models/smollm2/target --sharegpt 600 \
        --responses dataset --out models/smollm2/draft-eagle3

With --prompts, the target continues each prompt and the head learns from that text; the last --eval-fraction of
the prompts is held out to report acceptance (tau). With --sharegpt N, the data are the first exchanges of N
ShareGPT conversations of the train split, chat-templated: either continued by the target (--responses target)
or with ShareGPT's own answers (--responses dataset); tau is then measured on --eval-prompts, held-out prompts
that no training read.
"""

from __future__ import annotations

import argparse
import json
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

from assets.draft_data import (
    RESPONSE_SOURCES,
    first_exchanges,
    first_turn_prompts,
    load_sequences,
    save_sequences,
)
from engine.chat import chat_eos_token_ids, prompt_ids
from engine.heads import load_draft_head
from engine.types import TreeParams
from jobs import HelpFormatter, program
from jobs.prompts import read_prompt_column
from training.fit import PRECISIONS
from training.train_draft import DraftTrainConfig, target_continuations, train_draft_head

DEFAULT_EVAL_PROMPTS = "examples/chat_prompts.parquet"
SHAREGPT_MAX_PROMPT_TOKENS = 256  # longer first turns are skipped, not cut (a cut loses the template header)


def _parser() -> argparse.ArgumentParser:
    defaults = DraftTrainConfig()
    parser = argparse.ArgumentParser(
        prog=program("train_draft"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--target", required=True, help="folder of a HF causal LM (save_pretrained layout)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--prompts", help="Parquet file with a prompt column, continued by the target")
    data.add_argument(
        "--sharegpt", type=int, metavar="N", help="use N first exchanges of ShareGPT's train split"
    )
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument(
        "--skip-exchanges",
        type=int,
        default=0,
        metavar="K",
        help="with --sharegpt: start after the first K exchanges of the train split (e.g. those an --init-head "
        "was trained on)",
    )
    parser.add_argument(
        "--init-head",
        default=None,
        metavar="DIR",
        help="train further from this EAGLE-1/2 head (its draft vocabulary kept) instead of a fresh one",
    )
    parser.add_argument("--out", required=True, help="output folder for the head (official EAGLE layout)")
    parser.add_argument(
        "--responses",
        choices=RESPONSE_SOURCES,
        default="target",
        help="with --sharegpt: the target's own greedy answers, or ShareGPT's answers",
    )
    parser.add_argument(
        "--data-cache",
        default=None,
        help="with --sharegpt: JSON file keeping the training sequences between runs (reused when made with the "
        "same settings)",
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="with --prompts: share held out for tau"
    )
    parser.add_argument(
        "--eval-prompts", default=DEFAULT_EVAL_PROMPTS, help="with --sharegpt: held-out prompts for tau"
    )
    parser.add_argument("--num-eval", type=int, default=20, help="with --sharegpt: how many --eval-prompts")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training data")
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="continuation length"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=384,
        help="with --responses dataset: cut each exchange to this length",
    )
    parser.add_argument(
        "--time-budget", type=float, default=None, help="stop training after this many seconds"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW rate")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    parser.add_argument(
        "--token-loss-weight",
        type=float,
        default=defaults.token_loss_weight,
        help="weight of the distillation loss against the feature loss's 1.0",
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
        "--eagle3",
        action="store_true",
        help="train an EAGLE-3 head (three target layers, training-time test), saved in the official EAGLE-3 "
        "layout",
    )
    parser.add_argument(
        "--ttt-steps",
        type=int,
        default=defaults.ttt_steps,
        help="with --eagle3: steps the training-time test unrolls",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="feature passes and losses in fp32, or under bf16 autocast (weights stay fp32); auto: bf16 where "
        "the device multiplies bf16 in hardware (CUDA with bf16, CPUs with AMX or AVX512-BF16)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the target's own modelling code"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.eval_fraction < 1.0:
        parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if not os.path.isdir(args.target):
        parser.error(f"--target {args.target!r} is not a folder")
    if args.draft_vocab_size is not None and args.draft_vocab_size < 1:
        parser.error(f"--draft-vocab-size must be >= 1, got {args.draft_vocab_size}")
    if args.ttt_steps < 1:
        parser.error(f"--ttt-steps must be >= 1, got {args.ttt_steps}")
    if args.sharegpt is not None and args.sharegpt < 1:
        parser.error(f"--sharegpt must be >= 1, got {args.sharegpt}")
    if args.skip_exchanges < 0:
        parser.error(f"--skip-exchanges must be >= 0, got {args.skip_exchanges}")
    if args.skip_exchanges and not args.sharegpt:
        parser.error("--skip-exchanges needs --sharegpt")
    if args.init_head is not None and args.eagle3:
        parser.error("--init-head trains an EAGLE-1/2 head further; it cannot be combined with --eagle3")
    if args.init_head is not None and not os.path.isdir(args.init_head):
        parser.error(f"--init-head {args.init_head!r} is not a folder")
    try:
        eval_tree = TreeParams.parse(args.eval_tree)
        eval_texts = read_prompt_column(args.eval_prompts, "prompt", args.num_eval) if args.sharegpt else None
        texts = read_prompt_column(args.prompts, args.prompt_column) if args.prompts else None
    except ValueError as error:
        parser.error(str(error))

    tokenizer = AutoTokenizer.from_pretrained(args.target, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.target, attn_implementation="sdpa", trust_remote_code=args.trust_remote_code
    ).eval()
    config = DraftTrainConfig(
        epochs=args.epochs,
        max_new_tokens=args.max_new_tokens,
        time_budget_s=args.time_budget,
        eval_tree=eval_tree,
        draft_vocab_size=args.draft_vocab_size,
        eagle3=args.eagle3,
        ttt_steps=args.ttt_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        token_loss_weight=args.token_loss_weight,
        precision=args.precision,
        max_prompt_tokens=SHAREGPT_MAX_PROMPT_TOKENS
        if args.sharegpt
        else DraftTrainConfig().max_prompt_tokens,
    )
    init_head = None
    if args.init_head is not None:
        try:
            init_head = load_draft_head(args.init_head, model, use_eagle3=False)
        except (OSError, ValueError) as error:
            parser.error(f"--init-head: {error}")
        if args.draft_vocab_size is not None and args.draft_vocab_size != init_head.num_proposal_tokens:
            parser.error(
                f"--draft-vocab-size {args.draft_vocab_size} contradicts --init-head, which drafts over "
                f"{init_head.num_proposal_tokens} tokens (leave it out to keep the head's)"
            )
    eos_ids = chat_eos_token_ids(model, tokenizer)
    sequences = None
    if args.sharegpt:
        train_ids, eval_ids = [], [prompt_ids(tokenizer, text) for text in eval_texts]
        sequences = _sharegpt_sequences(args, tokenizer, model, config, eos_ids)
    else:
        num_eval = int(len(texts) * args.eval_fraction)
        ids = [tokenizer(text).input_ids for text in texts]
        train_ids, eval_ids = ids[: len(ids) - num_eval], ids[len(ids) - num_eval :]
    _, report = train_draft_head(
        model,
        train_ids,
        eval_ids,
        args.out,
        config,
        sequences=sequences,
        eos_token_ids=eos_ids,
        init_head=init_head,
    )
    summary = {k: v for k, v in report.to_dict().items() if k != "losses"}
    summary["responses"] = args.responses if args.sharegpt else "target"
    summary["kind"] = "eagle3" if args.eagle3 else "eagle"
    with open(os.path.join(args.out, "training_report.json"), "w") as f:
        record = {**report.to_dict(), **summary, "command": argv_text(argv)}
        if args.init_head is not None:
            record["earlier_commands"] = _commands_behind(args.init_head)
        json.dump(record, f, indent=2)
    print(json.dumps(summary, indent=2))


def _sharegpt_sequences(args, tokenizer, model, config: DraftTrainConfig, eos_ids) -> list[list[int]]:
    meta = {
        "target": os.path.abspath(args.target),
        "sharegpt": args.sharegpt,
        "skip_exchanges": args.skip_exchanges,
        "responses": args.responses,
        "max_tokens": args.max_tokens if args.responses == "dataset" else None,
        "max_new_tokens": config.max_new_tokens if args.responses == "target" else None,
    }
    cached = load_sequences(args.data_cache, meta) if args.data_cache else None
    if cached is not None:
        print(f"jobs.train_draft: {len(cached)} training sequences from {args.data_cache}")
        return cached
    if args.responses == "dataset":
        sequences = first_exchanges(tokenizer, args.sharegpt, args.max_tokens, args.skip_exchanges)
    else:
        prompts = first_turn_prompts(tokenizer, args.sharegpt, config.max_prompt_tokens, args.skip_exchanges)
        sequences = target_continuations(model, prompts, config, eos_ids)
    if args.data_cache:
        save_sequences(sequences, args.data_cache, meta)
    return sequences


def _commands_behind(head_dir: str) -> list[str]:
    """The commands that trained the head in `head_dir`, first to last, from its training report (none when it
    has no report), so a head trained further still names every command behind it."""
    path = os.path.join(head_dir, "training_report.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        report = json.load(f)
    return [*report.get("earlier_commands", []), *([report["command"]] if "command" in report else [])]


def argv_text(argv: list[str] | None) -> str:
    import shlex
    import sys

    return "python -m jobs.train_draft " + shlex.join(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
