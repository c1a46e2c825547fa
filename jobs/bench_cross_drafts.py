"""Benchmark cross-request drafts: the same job with --cross-request-drafts and --no-cross-request-drafts, in one run.

    python -m jobs.bench_cross_drafts [--workload templated|chat] [--num-prompts N] [--num-actors 2] [--json OUT]

Workloads (greedy):
  templated  --num-prompts extraction prompts (`bench.templated`): one instruction, a different made-up record
             each, answered as JSON; the kind of job whose outputs share long spans;
  chat       the first --num-prompts held-out ShareGPT prompts of --prompts (nothing shared on purpose).

Each pass runs the job (`pipeline.build.run_generate`, --num-actors actors on a local Ray) with the flag on and
off, in alternating order; the figures are medians over --repeats passes. Reported per mode: generation speed
(generated tokens / the rows' summed time_taken_llm, the per-row rate the job's rows saw), tokens per second of
wall time after start-up, and the retrieved tokens accepted per source (the row's own prompt, its actor's
earlier outputs, another actor's through the cache actor). Outputs are compared per id: they must be identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from bench.templated import extraction_prompts
from common.config import GenerateConfig
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.prompts import read_prompt_column
from jobs.results import write_json
from pipeline.build import run_generate

MODES = {"on": True, "off": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("bench_cross_drafts"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--workload", choices=("templated", "chat"), default="templated", help="what the prompts are"
    )
    parser.add_argument("--num-prompts", type=int, default=200, help="rows of the job")
    parser.add_argument(
        "--prompts",
        default="examples/chat_prompts.parquet",
        help="Parquet with a prompt column (chat workload)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per row at most")
    parser.add_argument("--num-actors", type=int, default=2, help="generation actors")
    parser.add_argument("--repeats", type=int, default=1, help="passes of both modes; medians are reported")
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="rows an actor decodes together (default: the job's)"
    )
    parser.add_argument("--model", default=None, help=f"target folder (default: {DEFAULT_ROOT}/target)")
    parser.add_argument("--draft", default=None, help=f"draft head folder (default: {DEFAULT_ROOT}/draft)")
    parser.add_argument("--policy", default=None, help=f"policy folder (default: {DEFAULT_ROOT}/policy)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "num_actors", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    return args


def run_mode(config: GenerateConfig, mode: str, workdir: str, repeat: int) -> dict:
    """One job with the flag `mode`; its figures and its outputs by id."""
    tag = f"{mode}-{repeat}"
    config = config.model_copy(
        update={
            "cross_request_drafts": MODES[mode],
            "output": os.path.join(workdir, tag),
            "cache_name": f"bench-cross-{tag}",
        }
    )
    summary = run_generate(config)
    table = pq.read_table(config.output).sort_by("id")
    tokens = sum(table.column("num_generated_tokens").to_pylist())
    llm_seconds = sum(seconds or 0.0 for seconds in table.column("time_taken_llm").to_pylist())
    span = summary["last_batch_finished_at"] - summary["first_batch_started_at"]
    return {
        "tokens": tokens,
        "generation_speed": tokens / llm_seconds if llm_seconds else None,
        "tokens_per_s_after_startup": tokens / span if span > 0 else None,
        "wall_seconds": summary["wall_seconds"],
        "tau": summary["mean_accepted_tokens"],
        "errors": summary["rows_error_in_output"],
        "cross_request_drafts": summary["cross_request_drafts"],
        "retrieval_seconds": summary["retrieval_seconds"],
        "retrieval_failures": summary["retrieval_failures"],
        "batch_trees": summary["batch_trees"],
        "texts": dict(
            zip(table.column("id").to_pylist(), table.column("generated_text").to_pylist(), strict=True)
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.model is None or args.draft is None or args.policy is None:
        paths = ensure_models(DEFAULT_ROOT)
        args.model, args.draft, args.policy = (
            args.model or paths["target"],
            args.draft or paths["draft"],
            args.policy or paths["policy"],
        )
    if args.workload == "templated":
        prompts = extraction_prompts(args.num_prompts)
    else:
        prompts = read_prompt_column(args.prompts, "prompt", args.num_prompts)
    workdir = tempfile.mkdtemp(prefix="eagleray-bench-cross-")
    input_path = os.path.join(workdir, "input.parquet")
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), input_path)
    updates = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
    config = GenerateConfig(
        input=input_path,
        output=workdir,
        model=args.model,
        draft=args.draft,
        policy=args.policy,
        max_new_tokens=args.max_new_tokens,
        num_actors=args.num_actors,
        progress=False,
        overwrite=True,
        **updates,
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]:
            print(f"pass {repeat + 1}/{args.repeats}: cross-request drafts {mode}", flush=True)
            runs[mode].append(run_mode(config, mode, workdir, repeat))
    reference = runs["off"][0]["texts"]
    results: dict = {
        "config": {
            "workload": args.workload,
            "num_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "num_actors": args.num_actors,
            "max_batch_size": config.max_batch_size,
            "repeats": args.repeats,
            "policy": config.policy_kind,
        },
        "modes": {},
    }
    for mode, mode_runs in runs.items():
        record = {
            key: statistics.median(run[key] for run in mode_runs)
            for key in ("generation_speed", "tokens_per_s_after_startup", "wall_seconds", "tau")
        }
        record["runs"] = [{k: v for k, v in run.items() if k != "texts"} for run in mode_runs]
        record["identical_ids"] = min(
            sum(run["texts"].get(row_id) == text for row_id, text in reference.items()) for run in mode_runs
        )
        results["modes"][mode] = record
    on, off = results["modes"]["on"], results["modes"]["off"]
    results["generation_speed_ratio"] = on["generation_speed"] / off["generation_speed"]
    results["after_startup_ratio"] = on["tokens_per_s_after_startup"] / off["tokens_per_s_after_startup"]
    print(format_results(results))
    if args.json:
        write_json(args.json, results)
    return results


def format_results(results: dict) -> str:
    config = results["config"]
    lines = [
        f"cross-request drafts bench: {config['workload']} workload, {config['num_prompts']} prompts x up to "
        f"{config['max_new_tokens']} new tokens, greedy, {config['num_actors']} actors, up to "
        f"{config['max_batch_size']} rows together, median of {config['repeats']} pass(es)",
        f"{'mode':<5} {'generation tok/s':>17} {'after start-up tok/s':>21} {'tau':>6} {'identical':>10}",
    ]
    for mode, record in results["modes"].items():
        lines.append(
            f"{mode:<5} {record['generation_speed']:>17.2f} {record['tokens_per_s_after_startup']:>21.1f} "
            f"{record['tau']:>6.2f} {record['identical_ids']:>5}/{config['num_prompts']}"
        )
    lines.append(
        f"on / off: generation speed {results['generation_speed_ratio']:.2f}x, after start-up "
        f"{results['after_startup_ratio']:.2f}x"
    )
    drafts = results["modes"]["on"]["runs"][0]["cross_request_drafts"]
    sources = ", ".join(f"{s} {v['accepted']}/{v['proposed']}" for s, v in drafts["by_source"].items())
    lines.append(f"retrieved tokens accepted/proposed (first 'on' pass): {sources}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
