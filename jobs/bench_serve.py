"""Load-test the online endpoint: the same server with speculation on and off, side by side in one run.

    python -m jobs.bench_serve [--concurrency 1,4,16,64] [--max-tokens 64] [--requests-per-client 2] ...

One local Ray, one Serve instance, two applications on the same model: `speculative` (--policy, default the
committed learned policy: every batch step's tree chosen for the load) and `plain` (--policy plain: plain
batched decoding, no draft), each one replica with all of this machine's cores, at /speculative/v1 and
/plain/v1. Only one of them is driven at a time. At every concurrency level C, C clients (the official
`openai` client, streaming) send held-out chat prompts, each its next as soon as its last ends, max(C x
--requests-per-client, --min-requests) requests in all, greedy; the same prompts go to both servers, in turns
whose order alternates by level. Printed per level and server: requests/s, new tokens/s, p50/p99 time to first
token and latency, errors, tau (the replica's tokens per row-step over the level), and speculative's tokens/s
over plain's; plus whether both servers answered every prompt identically (greedy: they must).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request

from bench.serve_load import run_level, summarize
from jobs import HelpFormatter, program
from jobs.models import DEFAULT_ROOT, ensure_models
from jobs.prompts import read_prompt_column
from jobs.results import write_json

SERVERS = ("plain", "speculative")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("bench_serve"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--prompts", default="examples/chat_prompts.parquet", help="held-out chat prompts (Parquet)"
    )
    parser.add_argument(
        "--prompt-column", default="prompt", help="the column of --prompts holding the prompt text"
    )
    parser.add_argument(
        "--concurrency", default="1,4,16,64", help="concurrent clients per level, comma-separated"
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=2, help="requests per client at each level"
    )
    parser.add_argument("--min-requests", type=int, default=8, help="fewest requests at a level")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows each server decodes together")
    parser.add_argument(
        "--max-queued-requests", type=int, default=64, help="requests each server holds waiting for a row"
    )
    parser.add_argument("--port", type=int, default=8020, help="port of the benchmark's Serve instance")
    parser.add_argument("--model", help=f"target folder (default: {DEFAULT_ROOT}/target)")
    parser.add_argument("--draft", help=f"draft head folder (default: {DEFAULT_ROOT}/draft)")
    parser.add_argument(
        "--policy",
        help=f"the speculative server's policy: a folder, static or heuristic (default: {DEFAULT_ROOT}/policy)",
    )
    parser.add_argument("--models-root", default=DEFAULT_ROOT, help="folder with target/, draft/ and policy/")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error(f"--concurrency levels must be at least 1, got {args.concurrency!r}")
    for name in ("requests_per_client", "min_requests", "max_tokens", "max_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.policy == "plain":
        parser.error("--policy is the speculative server's; the plain server is always there")
    return args


def _stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/eagleray/stats", timeout=30) as response:
        return json.load(response)


def _tau(before: dict, after: dict) -> float | None:
    steps = after["steps"] - before["steps"]
    return (after["emitted_in_steps"] - before["emitted_in_steps"]) / steps if steps else None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import ray
    from ray import serve

    from common.config import ServeConfig
    from pipeline.serve import deploy

    paths = ensure_models(args.models_root) if None in (args.model, args.draft, args.policy) else {}
    models = {
        "model": args.model or paths["target"],
        "draft": args.draft or paths["draft"],
        "policy": args.policy or paths["policy"],
    }
    prompts = read_prompt_column(args.prompts, args.prompt_column)
    cores = os.cpu_count() or 1
    # Both replicas get every core: only one server is driven at a time (the idle one's engine thread sleeps).
    ray.init(num_cpus=2 * cores, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    urls, model_names = {}, {}
    try:
        for server in SERVERS:
            config = ServeConfig(
                **{**models, "policy": "plain" if server == "plain" else models["policy"]},
                max_batch_size=args.max_batch_size,
                max_queued_requests=args.max_queued_requests,
                port=args.port,
            )
            print(f"bench_serve: deploying {server} ({config.tree_choice}) ...", flush=True)
            deploy(config, server, f"/{server}", float(cores), 0.0)
            urls[server], model_names[server] = f"http://127.0.0.1:{args.port}/{server}/v1", config.model_name
            run_level(urls[server], config.model_name, prompts[:2], 2, 8)  # warm-up, not measured
        results = []
        for position, clients in enumerate(args.levels):
            count = max(clients * args.requests_per_client, args.min_requests)
            level_prompts = [prompts[i % len(prompts)] for i in range(count)]
            order = SERVERS if position % 2 == 0 else SERVERS[::-1]
            level = {"clients": clients, "requests": count}
            texts = {}
            for server in order:
                before = _stats(urls[server])
                timings, wall = run_level(
                    urls[server], model_names[server], level_prompts, clients, args.max_tokens
                )
                after = _stats(urls[server])
                summary = summarize(timings, wall)
                summary["tau"] = _tau(before, after)
                summary["batch_trees"] = {
                    tree: count - before["batch_trees"].get(tree, 0)
                    for tree, count in after["batch_trees"].items()
                    if count - before["batch_trees"].get(tree, 0)
                }
                level[server] = summary
                texts[server] = [timing.text if timing.error is None else None for timing in timings]
                print(_line(clients, server, summary), flush=True)
            plain, spec = level["plain"]["tokens_per_s"], level["speculative"]["tokens_per_s"]
            level["speedup"] = spec / plain if plain and spec else None
            level["identical"] = sum(
                a is not None and a == b for a, b in zip(texts["plain"], texts["speculative"], strict=True)
            )
            print(
                f"  C={clients}: speculative/plain tokens/s {level['speedup']:.2f}x; identical answers "
                f"{level['identical']}/{count}",
                flush=True,
            )
            results.append(level)
    finally:
        serve.shutdown()
        ray.shutdown()
    payload = {
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "cores": cores,
        "models": models,
        "levels": results,
    }
    _table(results)
    if args.json:
        write_json(args.json, payload)
        print(f"bench_serve: wrote {args.json}")
    return payload


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _line(clients: int, server: str, s: dict) -> str:
    tau = "-" if s["tau"] is None else f"{s['tau']:.2f}"
    return (
        f"  C={clients:<3} {server:<11} {s['requests_per_s']:.2f} req/s  {s['tokens_per_s']:.1f} tok/s  "
        f"TTFT p50/p99 {_ms(s['ttft_p50_s'])}/{_ms(s['ttft_p99_s'])} ms  latency p50/p99 "
        f"{_ms(s['latency_p50_s'])}/{_ms(s['latency_p99_s'])} ms  errors {s['errors']}  tau {tau}"
    )


def _table(results: list[dict]) -> None:
    print(
        "\n| clients | server | req/s | tok/s | TTFT p50 / p99 ms | latency p50 / p99 ms | errors | tau | "
        "spec / plain | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for level in results:
        for server in SERVERS:
            s = level[server]
            ratio = f"**{level['speedup']:.2f}x**" if server == "speculative" and level["speedup"] else ""
            same = f"{level['identical']}/{level['requests']}" if server == "speculative" else ""
            tau = "-" if s["tau"] is None else f"{s['tau']:.2f}"
            print(
                f"| {level['clients']} | {server} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p99_s'])} | {_ms(s['latency_p50_s'])} / "
                f"{_ms(s['latency_p99_s'])} | {s['errors']} | {tau} | {ratio} | {same} |"
            )


if __name__ == "__main__":
    main()
