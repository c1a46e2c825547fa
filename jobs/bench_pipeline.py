"""Benchmark the Ray pipeline against the engine's direct loop and batched HF generate, on the same prompts, in
one run; then measure the cross-actor cache on a workload of repeated and paraphrased prompts.

    python -m jobs.bench_pipeline [--prompts PARQUET] [--num-prompts N] [--max-new-tokens M] [--json OUT]

Throughput methods (greedy, same prompts, each timed from loading its models to the last token):
  direct       the engine's loop in this process: GenerationActor's engine and controller, no Ray;
  pipeline_1   `run_generate` with 1 generation actor (shared cache off, as a job runs by default, unless
               --shared-cache);
  pipeline_2   the same with 2 actors;
  hf_batched   HF `generate` on left-padded batches of --hf-batch-size, the baseline a user would otherwise pick.
--methods picks some of them (default: all four). Ratios are tokens/s over the first method's (the direct loop by
default), and over hf_batched's when it ran, each the median over --repeats passes; every other pass runs the
methods in reverse order. Every method's outputs are checked against the first method's text.

Cache workload: --cache-prompts distinct prompts, each sent as itself, an exact repeat and two paraphrases
(an edited line, changed whitespace), shuffled; run with 2 actors with the shared cache on and off. It reports
look-ups, local / shared / cross-actor hits, the engine steps decided by a cached tree (no policy call), and
tokens/s both ways. Every figure is measured; nothing is estimated.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import statistics
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.generation import GenerationActor
from common.config import GenerateConfig
from engine.chat import chat_eos_token_ids, eos_token_ids, has_chat_template, prompt_ids
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.prompts import read_prompt_column
from jobs.results import write_json
from pipeline.build import run_generate
from pipeline.resources import plan_actor_resources
from pipeline.rows import validate_rows

METHODS = ("direct", "pipeline_1", "pipeline_2", "hf_batched")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("bench_pipeline"),
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--prompts", default="examples/chat_prompts.parquet", help="Parquet file with a prompt column"
    )
    parser.add_argument("--num-prompts", type=int, default=32, help="prompts for the throughput methods")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per throughput prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch for the pipeline")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="rows per padded batch for HF generate")
    parser.add_argument("--cache-prompts", type=int, default=8, help="distinct prompts of the cache workload")
    parser.add_argument(
        "--cache-max-new-tokens", type=int, default=64, help="new tokens per prompt of the cache workload"
    )
    parser.add_argument(
        "--cache-batch-size",
        type=int,
        default=4,
        help="rows per batch in the cache workload (small batches "
        "let one actor's results reach the other within the run)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed passes of each method; the median is kept"
    )
    parser.add_argument("--skip-cache-workload", action="store_true", help="run the throughput methods only")
    parser.add_argument(
        "--shared-cache",
        action="store_true",
        help="turn the shared cache on for pipeline_1 and pipeline_2 (the cache workload runs both ways anyway)",
    )
    parser.add_argument("--model", default=None, help=f"target folder (default: {DEFAULT_ROOT}/target)")
    parser.add_argument("--draft", default=None, help=f"draft head folder (default: {DEFAULT_ROOT}/draft)")
    parser.add_argument(
        "--policy",
        default=None,
        help=f"policy folder, static or heuristic (default: {DEFAULT_ROOT}/policy)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma list of the throughput methods to run, the first being the reference for ratios and identity",
    )
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods or len(set(args.methods)) != len(args.methods):
        parser.error(
            f"--methods must name each of {', '.join(METHODS)} at most once, got {','.join(args.methods)!r}"
        )
    for name in ("num_prompts", "max_new_tokens", "batch_size", "hf_batch_size", "cache_prompts", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---- the methods ---------------------------------------------------------------------------------------------------


def pass_order(names: list[str], repeat: int) -> list[str]:
    """The methods' order in pass `repeat`: as listed, reversed on every other pass, so that a machine getting
    faster or slower during the run does not favour whichever method always runs first."""
    return names if repeat % 2 == 0 else names[::-1]


def run_direct(config: GenerateConfig, prompts: list[str]) -> dict:
    """The engine's loop without Ray: the generation actor's own engine and controller, called in this process
    on batches of the same size, so the only difference from the pipeline is Ray."""
    started = time.perf_counter()
    engine_only = config.model_copy(
        update={"shared_cache": False}
    )  # no prompt embedding: the bare engine loop
    actor = GenerationActor(engine_only.model_dump(), cache=None)
    loaded = time.perf_counter()
    table = validate_rows(pa.table({"prompt": prompts}), config)
    texts: list[str] = []
    tokens = 0
    for offset in range(0, table.num_rows, config.batch_size):
        out = actor(table.slice(offset, config.batch_size))
        texts += out.column("generated_text").to_pylist()
        tokens += sum(out.column("num_generated_tokens").to_pylist())
    finished = time.perf_counter()
    return {
        "tokens": tokens,
        "seconds": finished - started,
        "steady_seconds": finished - loaded,
        "texts": texts,
        "threads": torch.get_num_threads(),
    }


def run_pipeline(config: GenerateConfig, prompts: list[str], workdir: str, tag: str) -> dict:
    input_path = os.path.join(workdir, f"{tag}-input.parquet")
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), input_path)
    config = config.model_copy(
        update={"input": input_path, "output": os.path.join(workdir, tag), "cache_name": f"bench-{tag}"}
    )
    summary = run_generate(config)
    table = pq.read_table(config.output).sort_by("id")
    return {
        "tokens": summary["generated_tokens"],
        "seconds": summary["wall_seconds"],
        "steady_seconds": summary["last_batch_finished_at"] - summary["first_batch_started_at"],
        "texts": table.column("generated_text").to_pylist(),
        "summary": summary,
    }


@torch.inference_mode()
def run_hf_batched(model_path: str, prompts: list[str], max_new_tokens: int, batch_size: int) -> dict:
    """HF generate, greedy, left-padded batches of the prompts as the job sends them (through the chat template
    when the tokenizer has one); new tokens counted up to and including the first end token."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa").eval()
    chat = has_chat_template(tokenizer)
    eos = chat_eos_token_ids(model, tokenizer) if chat else eos_token_ids(model.config.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    texts: list[str] = []
    tokens = 0
    for offset in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, text) for text in prompts[offset : offset + batch_size]]
        width = max(len(row) for row in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids])
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=list(eos),
        )
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in eos), None)
            row = row if end is None else row[: end + 1]
            tokens += len(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "texts": texts}


# ---- the cache workload --------------------------------------------------------------------------------------------


def paraphrase(text: str, variant: int) -> str:
    """A light, deterministic rewrite: variant 0 edits one line (renames its first identifier or appends a
    word), variant 1 changes whitespace (tabs for indents, doubled blank lines, trailing spaces)."""
    lines = text.split("\n")
    if variant == 0:
        index = max(range(len(lines)), key=lambda i: len(lines[i]))
        match = re.search(r"[A-Za-z_][A-Za-z0-9_]{2,}", lines[index])
        if match:
            word = match.group(0)
            lines[index] = lines[index].replace(word, word + "_v2", 1)
        else:
            lines[index] += " again"
        return "\n".join(lines)
    return "\n".join(line.replace("    ", "\t") + ("  " if line else "") for line in lines).replace(
        "\n\n", "\n\n\n"
    )


def cache_workload(prompts: list[str], seed: int = 0) -> list[str]:
    """Each prompt as itself, an exact repeat and two paraphrases, shuffled."""
    rows = [
        variant
        for prompt in prompts
        for variant in (prompt, prompt, paraphrase(prompt, 0), paraphrase(prompt, 1))
    ]
    random.Random(seed).shuffle(rows)
    return rows


# ---- reporting -----------------------------------------------------------------------------------------------------


def median_record(runs: list[dict], reference: list[str] | None) -> dict:
    rates = [run["tokens"] / run["seconds"] for run in runs]
    steady = [run["tokens"] / run["steady_seconds"] for run in runs if run.get("steady_seconds")]
    record = {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_runs": rates,
        # after start-up: from the first batch (the models loaded) to the last token
        "steady_tokens_per_s": statistics.median(steady) if steady else None,
        "tokens": runs[0]["tokens"],
        "seconds": statistics.median(run["seconds"] for run in runs),
    }
    if reference is not None:
        texts = runs[0]["texts"]
        record["identical_to_reference"] = sum(a == b for a, b in zip(texts, reference, strict=True)) / len(
            texts
        )
    return record


def decisions_record(summary: dict) -> dict:
    decisions = summary.get("prompt_decisions") or {}
    optimizer = summary.get("optimizer") or {}
    return {
        "rows": summary["rows_out"],
        "tokens_per_s": summary["tokens_per_wall_second"],
        "lookups": decisions.get("lookups", 0),
        "local_hits": decisions.get("local_hits", 0),
        "shared_lookups": decisions.get("shared_lookups", 0),
        "shared_hits": decisions.get("shared_hits", 0),
        "link_lookups": decisions.get("link_lookups", 0),
        "cross_actor_hits": decisions.get("cross_actor_hits", 0),
        "cross_actor_hit_rate": decisions.get("cross_actor_hit_rate", 0.0),
        "hit_rate": (decisions.get("local_hits", 0) + decisions.get("shared_hits", 0))
        / max(decisions.get("lookups", 0), 1),
        "steps_decided_by_cache": decisions.get("steps_served", 0),
        "generations_decided_by_cache": decisions.get("generations_served", 0),
        "policy_decisions": optimizer.get("decisions", 0),
        "policy_calls": optimizer.get("policy_calls", 0),
        "embedding_seconds": decisions.get("embedding_seconds", 0.0),
        "generation_seconds": summary["generation_seconds"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model is None or args.draft is None or args.policy is None:
        paths = ensure_models(DEFAULT_ROOT)
        args.model = args.model or paths["target"]
        args.draft = args.draft or paths["draft"]
        args.policy = args.policy or paths["policy"]
    prompts = read_prompt_column(args.prompts, "prompt", args.num_prompts)
    workdir = tempfile.mkdtemp(prefix="eagleray-bench-pipeline-")
    config = GenerateConfig(
        input=args.prompts,
        output=workdir,
        model=args.model,
        draft=args.draft,
        policy=args.policy,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=False,
        overwrite=True,
        shared_cache=args.shared_cache,
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    # The direct loop and HF get the torch threads that one pipeline actor gets, so only Ray differs.
    actor_cpus = plan_actor_resources(config, ray.cluster_resources()).num_cpus
    torch.set_num_threads(max(1, math.floor(actor_cpus)))
    # The actors' load planner reads a latency table measured once per machine and cached; measure it here,
    # untimed, so that no method's time includes that one-off (later runs on this machine find it cached).
    GenerationActor(config.model_copy(update={"shared_cache": False}).model_dump(), cache=None).runner.close()
    runners = {
        "direct": ("direct loop", lambda repeat: run_direct(config, prompts)),
        **{
            f"pipeline_{n}": (
                f"pipeline with {n} actor(s)",
                lambda repeat, n=n: run_pipeline(
                    config.model_copy(update={"num_actors": n}), prompts, workdir, f"pipeline{n}-{repeat}"
                ),
            )
            for n in (1, 2)
        },
        "hf_batched": (
            f"HF generate, batches of {args.hf_batch_size}",
            lambda repeat: run_hf_batched(args.model, prompts, args.max_new_tokens, args.hf_batch_size),
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in args.methods}
    for repeat in range(args.repeats):
        for name in pass_order(args.methods, repeat):
            label, run = runners[name]
            print(f"pass {repeat + 1}/{args.repeats}: {label}")
            runs[name].append(run(repeat))
    first = args.methods[0]
    methods = {name: median_record(name_runs, runs[first][0]["texts"]) for name, name_runs in runs.items()}
    first_rate = methods[first]["tokens_per_s"]
    first_steady = methods[first]["steady_tokens_per_s"]
    for record in methods.values():
        record["ratio_to_reference"] = record["tokens_per_s"] / first_rate
        if record["steady_tokens_per_s"] is not None and first_steady:
            record["steady_ratio_to_reference"] = record["steady_tokens_per_s"] / first_steady
        if "hf_batched" in methods:
            record["ratio_to_hf_batched"] = record["tokens_per_s"] / methods["hf_batched"]["tokens_per_s"]
    results: dict = {
        "config": {
            "prompts": args.prompts,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "hf_batch_size": args.hf_batch_size,
            "repeats": args.repeats,
            "reference": first,
            "threads": torch.get_num_threads(),
            "policy": config.policy_kind,
        },
        "methods": methods,
    }
    if "pipeline_1" in runs:
        results["pipeline_1_generation_tokens_per_s"] = runs["pipeline_1"][0]["summary"][
            "tokens_per_generation_second"
        ]
        results["pipeline_1_startup_seconds"] = statistics.median(
            run["summary"]["startup_seconds"] for run in runs["pipeline_1"]
        )
        results["pipeline_1_startup_seconds_runs"] = [
            run["summary"]["startup_seconds"] for run in runs["pipeline_1"]
        ]
    if not args.skip_cache_workload:
        distinct = read_prompt_column(args.prompts, "prompt", args.cache_prompts)
        workload = cache_workload(distinct)
        cache_config = config.model_copy(
            update={
                "num_actors": 2,
                "max_new_tokens": args.cache_max_new_tokens,
                "batch_size": args.cache_batch_size,
            }
        )
        results["cache_workload"] = {"distinct_prompts": len(distinct), "rows": len(workload)}
        for shared in (True, False):
            label = "shared_cache_on" if shared else "shared_cache_off"
            print(f"cache workload: 2 actors, {label}")
            run = run_pipeline(
                cache_config.model_copy(update={"shared_cache": shared}), workload, workdir, label
            )
            results["cache_workload"][label] = decisions_record(run["summary"])
    print(format_results(results))
    if args.json:
        write_json(args.json, results)
    return results


def format_results(results: dict) -> str:
    config = results["config"]
    lines = [
        f"pipeline bench: {config['num_prompts']} prompts x {config['max_new_tokens']} new tokens, greedy, policy "
        f"{config['policy']}, median of {config['repeats']} pass(es); ratios and identity against "
        f"{config['reference']}",
        "end to end: from loading the models to the last token; after start-up: from the first batch",
        f"{'method':<12} {'tokens/s':>9} {'vs ref':>8} {'vs HF':>7} {'after start-up':>15} {'vs ref':>8} "
        f"{'identical':>10}",
    ]
    for name, record in results["methods"].items():
        steady = record["steady_tokens_per_s"]
        steady_ratio = record.get("steady_ratio_to_reference")
        steady_text = f"{steady:>15.1f} " if steady else f"{'-':>15} "
        steady_text += f"{steady_ratio:>7.2f}x" if steady_ratio else f"{'-':>8}"
        hf_ratio = record.get("ratio_to_hf_batched")
        hf_text = f"{hf_ratio:>6.2f}x" if hf_ratio else f"{'-':>7}"
        lines.append(
            f"{name:<12} {record['tokens_per_s']:>9.1f} {record['ratio_to_reference']:>7.2f}x {hf_text} "
            f"{steady_text} {record['identical_to_reference']:>9.0%}"
        )
    if "pipeline_1_startup_seconds" in results:
        lines.append(
            f"pipeline_1 start-up (to its first batch): median {results['pipeline_1_startup_seconds']:.1f} s, "
            "runs " + ", ".join(f"{seconds:.1f}" for seconds in results["pipeline_1_startup_seconds_runs"])
        )
    cache = results.get("cache_workload")
    if cache:
        lines.append(
            f"cache workload: {cache['distinct_prompts']} prompts -> {cache['rows']} rows (repeats + paraphrases), "
            "2 actors"
        )
        for label in ("shared_cache_on", "shared_cache_off"):
            r = cache[label]
            lines.append(
                f"  {label:<17} {r['tokens_per_s']:.1f} tokens/s; look-ups {r['lookups']}, local hits {r['local_hits']}, "
                f"shared hits {r['shared_hits']} (cross-actor {r['cross_actor_hits']}, "
                f"{r['cross_actor_hit_rate']:.1%} of look-ups); {r['steps_decided_by_cache']} steps in "
                f"{r['generations_decided_by_cache']} generations decided by a cached tree; policy path decisions "
                f"{r['policy_decisions']}; embedding {r['embedding_seconds']:.1f} s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
