"""Benchmark batched generation: HF generate on left-padded batches against eagleray's batched engine.

    python -m jobs.bench_batch [--batch-sizes 1,4,8,16,32] [--num-prompts 32] [--max-new-tokens 64] [--json OUT]

Defaults: SmolLM2-135M-Instruct with its committed head (models/smollm2/), held-out ShareGPT chat prompts through
the chat template, greedy, every method stopping at the template's end-of-turn token. For each batch size B, in
this order on the same prompts:

- hf_batched: HF `generate` on consecutive chunks of B prompts, left-padded (static batching: a chunk decodes
  until its longest row ends);
- eagleray_plain: eagleray's engine with B rows at a time, continuous batching, plain decoding (no draft);
- eagleray: the same with speculation, every step's tree chosen for the load (`policy.load_planner`) from a
  latency table measured at start-up and cached per machine.

Reported per B and method: new tokens/s (all new tokens / wall seconds, median over --repeats passes), the ratio
to hf_batched, tau (tokens per row-step), the share of wasted slots (HF: padding plus rows decoding past their
end; eagleray: cache holes), the trees chosen, and whether every output is identical to HF's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.planning import load_latency_table
from engine.batch import GenerationRequest, PlainController, generate_batch
from engine.chat import chat_eos_token_ids, has_chat_template, prompt_ids
from engine.heads import load_draft_head
from engine.packed_linear import stock_linears
from engine.target import TargetModel
from engine.types import StaticController, TreeParams
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.prompts import read_prompt_column
from jobs.results import write_json
from policy.load_planner import LoadPlanner

DEFAULT_PROMPTS = "examples/chat_prompts.parquet"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("bench_batch"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help="Parquet file with a prompt column")
    parser.add_argument(
        "--prompt-column", default="prompt", help="column of --prompts holding the prompt text"
    )
    parser.add_argument("--num-prompts", type=int, default=32, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32", help="comma-separated batch sizes B")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed passes per B and method; tokens/s is the median"
    )
    parser.add_argument("--model", default=None, help="target folder (default: models/smollm2/target)")
    parser.add_argument("--draft", default=None, help="draft head folder (default: models/smollm2/draft)")
    parser.add_argument(
        "--static-tree", default=None, help="use this tree on every step instead of the planner"
    )
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each prompt as one user message through the tokenizer's chat template, when it has one "
        "(default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs batch sizes >= 1")
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        parser.error("--num-prompts, --max-new-tokens and --repeats must be >= 1")
    return args


def cut_at_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def run_hf(model, prompts: list[list[int]], batch_size: int, max_new_tokens: int, eos, pad_id: int) -> dict:
    outputs, slots, started = [], 0, time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with stock_linears(model):  # HF as it runs alone, not on the engine's prepacked linears
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=list(eos) or None,
                pad_token_id=pad_id,
            )[:, width:]
        slots += generated.numel() + int((mask == 0).sum())
        outputs.extend(cut_at_eos(row.tolist(), eos)[:max_new_tokens] for row in generated)
    seconds = time.perf_counter() - started
    new_tokens = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "outputs": outputs,
        "new_tokens": new_tokens,
        "wasted": 1 - new_tokens / max(slots, 1),
    }


def run_eagleray(target, head, prompts, batch_size, max_new_tokens, eos, controller, planner) -> dict:
    requests = [
        GenerationRequest(p, max_new_tokens, controller, eos_token_ids=tuple(eos) or None) for p in prompts
    ]
    started = time.perf_counter()
    results = generate_batch(target, head, requests, max_batch_size=batch_size, planner=planner)
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} generations failed, e.g. {failed[0]}")
    outputs = [r.output.new_token_ids for r in results]
    steps = sum(len(r.output.steps) for r in results)
    new_tokens = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "outputs": outputs,
        "new_tokens": new_tokens,
        "tau": (new_tokens - len(results)) / max(steps, 1),  # the prefill's token is not a step's
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| B | method | tok/s | vs HF | tau | wasted | identical | trees |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        wasted = "-" if r["wasted"] is None else f"{r['wasted']:.0%}"
        lines.append(
            f"| {r['batch_size']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {tau} | "
            f"{wasted} | {r['identical']} | {r['trees']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None or args.draft is None:
        paths = ensure_models(DEFAULT_ROOT)
        args.model, args.draft = args.model or paths["target"], args.draft or paths["draft"]
    texts = read_prompt_column(args.prompts, args.prompt_column, args.num_prompts)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    target = TargetModel(model)
    head = load_draft_head(args.draft, model)
    prompts = [prompt_ids(tokenizer, text, args.chat_template) for text in texts]
    eos = (
        tuple(chat_eos_token_ids(model, tokenizer))
        if args.chat_template and has_chat_template(tokenizer)
        else ()
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    table = None if args.static_tree else load_latency_table(target, head, max(args.batch_sizes))
    rows = []
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            runs: dict[str, list[dict]] = {"hf_batched": [], "eagleray_plain": [], "eagleray": []}
            for _ in range(args.repeats):
                runs["hf_batched"].append(
                    run_hf(model, prompts, batch_size, args.max_new_tokens, eos, pad_id)
                )
                runs["eagleray_plain"].append(
                    run_eagleray(
                        target, head, prompts, batch_size, args.max_new_tokens, eos, PlainController(), None
                    )
                )
                if args.static_tree:
                    controller, planner = StaticController(TreeParams.parse(args.static_tree)), None
                else:
                    controller, planner = PlainController(), LoadPlanner(table)
                record = run_eagleray(
                    target, head, prompts, batch_size, args.max_new_tokens, eos, controller, planner
                )
                record["trees"] = (
                    args.static_tree
                    if planner is None
                    else ", ".join(
                        f"{k} {v}" for k, v in sorted(planner.chosen.items(), key=lambda kv: -kv[1])
                    )
                )
                runs["eagleray"].append(record)
            reference = runs["hf_batched"][0]["outputs"]
            hf_speed = statistics.median(r["new_tokens"] / r["seconds"] for r in runs["hf_batched"])
            for method, records in runs.items():
                speed = statistics.median(r["new_tokens"] / r["seconds"] for r in records)
                row = {
                    "batch_size": batch_size,
                    "method": method,
                    "tokens_per_s": speed,
                    "ratio": speed / hf_speed,
                    "new_tokens": records[0]["new_tokens"],
                    "identical": all(r["outputs"] == reference for r in records),
                    "wasted": records[0].get("wasted"),
                    "tau": records[0].get("tau"),
                    "trees": records[-1].get("trees", "-"),
                }
                rows.append(row)
                print(
                    f"B={batch_size:>3} {method:<15} {speed:7.1f} tok/s  {row['ratio']:.2f}x HF  "
                    f"identical={row['identical']}  {row['trees']}",
                    flush=True,
                )
    payload = {
        "rows": rows,
        "config": {
            "prompts": args.prompts,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "model": args.model,
            "draft": args.draft,
        },
    }
    print(format_table(rows))
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
