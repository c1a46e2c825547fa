"""Benchmark greedy generation methods side by side on the same prompts, in one process.

    python -m jobs.bench [--prompts examples/chat_prompts.parquet] [--num-prompts N] [--max-new-tokens M] [--json OUT]

Defaults: SmolLM2-135M-Instruct with its committed head and policy (models/smollm2/, the target converted on
first use), held-out ShareGPT chat prompts, each a user message through the chat template; every method stops
at the template's end-of-turn token.

Methods: hf_greedy (HF generate, the baseline), hf_greedy_packed (HF generate on the prepacked oneDNN linear
layers eagleray decodes with on a CPU, `engine.packed_linear`: what the kernels alone gain, so that the rest is
what speculation gains), hf_prompt_lookup (HF prompt-lookup decoding), eagle_defaults
(the official 60/5/10 tree), eagle_best_static (the best TreeParams of a small grid, searched on the first
--grid-prompts prompts of the same set), and with a policy (--policy, default models/smollm2/policy): heuristic (moving
average with hysteresis), learned (the trained policy behind its caches and adaptive decision interval) and
learned_unoptimized (the prototype's way: decode + embed + policy on every step). --quick runs a small smoke
version.

--compare-draft DIR runs a second head beside the first, on the same prompts in the same run: its own grid
search, then eagle3_defaults, eagle3_best_static, eagle3_heuristic and eagle3_learned (prefixed by the head's
kind, `eagle3` for an EAGLE-3 head), e.g. `--compare-draft models/smollm2/draft-eagle3`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.benchmark import (
    default_grid,
    eagle_method,
    grid_search,
    hf_method,
    run_benchmark,
    static_eagle_method,
)
from engine.chat import chat_eos_token_ids, has_chat_template, prompt_ids
from engine.heads import load_draft_head
from engine.target import TargetModel
from engine.types import EAGLE_DEFAULT_TREE, TreeParams
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.prompts import read_prompt_column
from jobs.results import write_json
from policy.actions import DEFAULT_ACTIONS
from policy.controllers import HeuristicController
from policy.optimizer import AdaptiveParameterPredictor, PrototypeStyleController, RLInferenceOptimizer
from policy.stats import format_stats

DEFAULT_PROMPTS = "examples/chat_prompts.parquet"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("bench"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help="Parquet file with a prompt column")
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="use the first N prompts (default: all)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes; tokens/s is the median")
    parser.add_argument(
        "--grid-prompts", type=int, default=24, help="prompts used to grid-search static trees"
    )
    parser.add_argument(
        "--grid", default=None, help="comma list of total/depth/top_k (default: built-in grid)"
    )
    parser.add_argument("--model", default=None, help=f"target folder (default: {DEFAULT_ROOT}/target)")
    parser.add_argument("--draft", default=None, help=f"draft head folder (default: {DEFAULT_ROOT}/draft)")
    parser.add_argument(
        "--policy", default=None, help=f"trained policy folder (default: {DEFAULT_ROOT}/policy)"
    )
    parser.add_argument(
        "--compare-draft",
        default=None,
        help="a second draft head folder (EAGLE-1/2 or EAGLE-3) to run beside --draft, methods prefixed by its "
        "kind",
    )
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each prompt as one user message through the tokenizer's chat template, when it has one "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-policy", action="store_true", help="skip the heuristic and learned methods")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 prompts, 48 tokens, grid searched on 4 prompts"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_prompts = args.num_prompts or 8
        args.max_new_tokens = min(args.max_new_tokens, 48)
        args.grid_prompts = min(args.grid_prompts, 4)
    for name in ("num_prompts", "max_new_tokens", "repeats", "grid_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def add_policy_methods(
    methods: list,
    target,
    head,
    tokenizer,
    policy_path: str,
    eos: tuple[int, ...] = (),
    prefix: str = "",
    prototype: bool = True,
) -> RLInferenceOptimizer:
    """Append heuristic, learned and (with `prototype`) learned_unoptimized, their names after `prefix`; return
    the learned method's optimizer (for its stats)."""
    actions = DEFAULT_ACTIONS
    optimizer = RLInferenceOptimizer(AdaptiveParameterPredictor(policy_path))
    methods.append(
        eagle_method(
            f"{prefix}heuristic",
            target,
            head,
            lambda: HeuristicController(actions),
            "adaptive",
            eos_token_ids=eos,
        )
    )
    methods.append(
        eagle_method(
            f"{prefix}learned",
            target,
            head,
            lambda: optimizer,
            "adaptive",
            lambda: optimizer.stats.decision_seconds,
            eos,
        )
    )
    if prototype:
        unoptimized = PrototypeStyleController(AdaptiveParameterPredictor(policy_path), tokenizer.decode)
        methods.append(
            eagle_method(
                f"{prefix}learned_unoptimized",
                target,
                head,
                lambda: unoptimized,
                "adaptive",
                lambda: unoptimized.decision_seconds,
                eos,
            )
        )
    return optimizer


def format_table(results: dict) -> str:
    header = (
        f"{'method':<20} {'tokens/s':>9} {'speedup':>8} {'tau':>6} {'identical':>10} {'draft':>6} {'verify':>7} "
        f"{'decide':>7}  tree"
    )
    rows = [header, "-" * len(header)]

    def share(record: dict, key: str, digits: int) -> str:
        value = record.get("extra_fractions", {}).get(key)
        return "-" if value is None else f"{value:.{digits}%}"

    for name, r in results.items():
        tau = "-" if r["mean_accepted_tokens"] is None else f"{r['mean_accepted_tokens']:.2f}"
        rows.append(
            f"{name:<20} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f}x {tau:>6} {r['identical_fraction']:>9.0%} "
            f"{share(r, 'draft', 0):>6} {share(r, 'verify', 0):>7} {share(r, 'decision', 2):>7}  "
            f"{r['tree_params'] or '-'}"
        )
    return "\n".join(rows)


def method_record(result) -> dict:
    record = result.to_dict()
    if "decision" in result.extra_fractions:
        record["decision_overhead_fraction"] = result.extra_fractions["decision"]
    return record


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None or args.draft is None or (args.policy is None and not args.no_policy):
        paths = ensure_models(DEFAULT_ROOT)
        args.model = args.model or paths["target"]
        args.draft = args.draft or paths["draft"]
        args.policy = args.policy or paths["policy"]
    texts = read_prompt_column(args.prompts, args.prompt_column, args.num_prompts)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    target = TargetModel(model)
    head = load_draft_head(args.draft, model)
    prompts = [prompt_ids(tokenizer, text, args.chat_template) for text in texts]
    chat = args.chat_template and has_chat_template(tokenizer)
    eos = chat_eos_token_ids(model, tokenizer) if chat else ()

    grid = [TreeParams.parse(p) for p in args.grid.split(",")] if args.grid else default_grid()
    if not args.no_policy:
        # The static baseline may use every tree the policy can choose, so the comparison is like for like.
        grid += [params for params in DEFAULT_ACTIONS if params not in grid]
    searches = {}
    heads = [("eagle_", "", head)]
    if args.compare_draft:
        other = load_draft_head(args.compare_draft, model)
        prefix = f"{other.kind}_" if other.kind != head.kind else "compare_"
        heads.append((prefix, prefix, other))
    for static_prefix, _, each in heads:
        best, grid_table = grid_search(
            target, each, prompts[: args.grid_prompts], args.max_new_tokens, grid, eos_token_ids=eos
        )
        searches[static_prefix.rstrip("_")] = {"best": best.compact, "tokens_per_s": grid_table}
        print(
            f"{each.kind} head: grid search over {len(grid)} trees on {min(args.grid_prompts, len(prompts))} "
            f"prompts: best {best.compact}"
        )

    methods = [
        hf_method(model, "hf_greedy", eos),
        hf_method(model, "hf_greedy_packed", eos, packed=True),
        hf_method(model, "hf_prompt_lookup", eos, prompt_lookup_num_tokens=10),
    ]
    optimizer = None
    for static_prefix, policy_prefix, each in heads:
        best = TreeParams.parse(searches[static_prefix.rstrip("_")]["best"])
        methods += [
            static_eagle_method(f"{static_prefix}defaults", target, each, EAGLE_DEFAULT_TREE, eos),
            static_eagle_method(f"{static_prefix}best_static", target, each, best, eos),
        ]
        if not args.no_policy:
            learned = add_policy_methods(
                methods, target, each, tokenizer, args.policy, eos, policy_prefix, prototype=not policy_prefix
            )
            optimizer = optimizer or learned
    results = run_benchmark(methods, prompts, args.max_new_tokens, repeats=args.repeats)
    payload = {
        "methods": {name: method_record(r) for name, r in results.items()},
        "config": {
            "prompts": args.prompts,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "model": args.model,
            "draft": args.draft,
            "compare_draft": args.compare_draft,
            "chat_template": chat,
        },
        "grid": {
            "num_prompts": min(args.grid_prompts, len(prompts)),
            "tokens_per_s": searches["eagle"]["tokens_per_s"],
            "best": searches["eagle"]["best"],
        },
        "grids": searches,
    }
    if optimizer is not None:
        payload["learned_stats"] = optimizer.snapshot().to_dict()
        print(format_stats(optimizer.snapshot()))
    print(format_table(payload["methods"]))
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
