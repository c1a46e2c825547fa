"""Soak the pipeline under faults: N rows through the generation actors while a random actor's process is
killed every K seconds; then count what came out.

    python -m jobs.soak [--rows 2000] [--kill-every-s 20] [--num-actors 2] [--output outputs/soak] [--json OUT]

It starts a local Ray, writes an input of --rows prompts (examples/prompts.parquet cycled, each row made
distinct, with an `id` column) and runs the job (`pipeline.build.run_generate`, the demo models and policy,
shared cache on) on a thread. Meanwhile it kills, every --kill-every-s seconds (+-25% jitter), the process of
one actor drawn at random from the job's generation actors (their pids come from the stats they report to the
job's stats collector) and, unless --no-kill-cache, the shared cache actor. Ray restarts them: Ray Data retries
a dead actor's batch on its restarted self, and the cache actor comes back from its snapshot.

It reports rows in, rows out, unique ids, duplicate rows, lost ids, error rows, kills and wall time, and exits
1 if any row was lost or duplicated. Not a test: it runs for minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.stats import ActorStats
from actors.stats_collector import find_stats_collectors
from common.columns import ERROR_COLUMN
from common.config import GenerateConfig
from demo.build import DEFAULT_DEMO_ROOT, demo_paths
from jobs import HelpFormatter, program
from jobs.demo import ensure_demo
from jobs.prompts import read_prompt_column
from jobs.results import write_json
from pipeline.build import run_generate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program("soak"), description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="input rows (default: %(default)s)")
    parser.add_argument(
        "--kill-every-s",
        type=float,
        default=20.0,
        help="seconds between kills, +-25%% (default: %(default)s)",
    )
    parser.add_argument("--num-actors", type=int, default=2, help="generation actors (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="new tokens per row (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows per actor batch (default: %(default)s)"
    )
    parser.add_argument(
        "--no-kill-cache",
        action="store_true",
        help="kill only generation actors, never the shared cache actor",
    )
    parser.add_argument(
        "--prompts", default="examples/prompts.parquet", help="prompt source (default: %(default)s)"
    )
    parser.add_argument("--demo-root", default=DEFAULT_DEMO_ROOT, help="demo models (default: %(default)s)")
    parser.add_argument("--output", default="outputs/soak", help="work folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice and timing of kills")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    for name in ("rows", "num_actors", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kill_every_s <= 0:
        parser.error(f"--kill-every-s must be > 0, got {args.kill_every_s}")
    return args


def write_input(prompt_source: str, path: str, num_rows: int) -> list[str]:
    """num_rows distinct prompts (the source cycled, each with its row number) with ids 'soak-<i>'."""
    source = read_prompt_column(prompt_source)
    ids = [f"soak-{i}" for i in range(num_rows)]
    prompts = [f"{source[i % len(source)]}\n# request {i}" for i in range(num_rows)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)
    return ids


class Killer:
    """Kills one of the job's actor processes every interval (+-25%) until stopped; remembers each kill."""

    def __init__(self, config: GenerateConfig, interval_s: float, kill_cache: bool, seed: int) -> None:
        self.config = config
        self.interval_s = interval_s
        self.kill_cache = kill_cache
        self.random = random.Random(seed)
        self.kills: list[dict] = []
        self.stopped = threading.Event()

    def targets(self) -> list[tuple[str, int]]:
        """(kind, pid) of the live actor processes: each generation actor's latest incarnation, and the cache."""
        try:
            cache = ray.get_actor(self.config.cache_name, namespace=self.config.namespace)
            collectors = find_stats_collectors(self.config.namespace)
            reports = ray.get(collectors[0].reports.remote(), timeout=10) if collectors else {}
            cache_pid = ray.get(cache.stats.remote(), timeout=10)["pid"]
        except (ValueError, ray.exceptions.RayError, TimeoutError):
            return []  # not up yet, or restarting: try again at the next tick
        latest: dict[str, ActorStats] = {}
        for stats in map(ActorStats.from_dict, reports.values()):
            seen = latest.get(stats.actor_id)
            if seen is None or (stats.last_batch_finished_at or 0) > (seen.last_batch_finished_at or 0):
                latest[stats.actor_id] = stats
        found = [("generation", stats.pid) for stats in latest.values()]
        return found + ([("cache", cache_pid)] if self.kill_cache else [])

    def run(self, started: float) -> None:
        while not self.stopped.wait(self.interval_s * self.random.uniform(0.75, 1.25)):
            targets = self.targets()
            if not targets:
                continue
            kind, pid = self.random.choice(targets)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it had already gone (Ray is restarting it)
            self.kills.append({"at_s": round(time.perf_counter() - started, 1), "kind": kind, "pid": pid})
            print(f"soak: killed {kind} actor pid {pid} at {self.kills[-1]['at_s']} s", flush=True)


def count_output(output: str, input_ids: list[str]) -> dict:
    table = pq.read_table(output, columns=["id", ERROR_COLUMN])
    ids = table.column("id").to_pylist()
    unique = set(ids)
    return {
        "rows_in": len(input_ids),
        "rows_out": len(ids),
        "unique_ids_out": len(unique),
        "duplicate_rows": len(ids) - len(unique),
        "lost_ids": len(set(input_ids) - unique),
        "unknown_ids": len(unique - set(input_ids)),
        "error_rows": table.num_rows - table.column(ERROR_COLUMN).null_count,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ensure_demo(args.demo_root)
    paths = demo_paths(args.demo_root)
    input_path = os.path.join(args.output, "input", "prompts.parquet")
    input_ids = write_input(args.prompts, input_path, args.rows)
    config = GenerateConfig(
        input=input_path,
        output=os.path.join(args.output, "results"),
        model=paths["target"],
        draft=paths["draft"],
        policy=paths["policy"],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        shared_cache=True,
        namespace=f"soak-{uuid.uuid4().hex[:8]}",
        overwrite=True,
        progress=False,
    )
    ray.init(log_to_driver=False)
    killer = Killer(config, args.kill_every_s, not args.no_kill_cache, args.seed)
    started = time.perf_counter()
    thread = threading.Thread(target=killer.run, args=(started,), daemon=True)
    thread.start()
    try:
        summary = run_generate(config)
    finally:
        killer.stopped.set()
        thread.join()
    wall_s = time.perf_counter() - started
    report = {
        **count_output(config.output, input_ids),
        "kills": len(killer.kills),
        "kills_of_generation_actors": sum(kill["kind"] == "generation" for kill in killer.kills),
        "kills_of_cache_actor": sum(kill["kind"] == "cache" for kill in killer.kills),
        "wall_s": round(wall_s, 1),
        "actor_restarts_seen_in_stats": summary["actor_restarts"],
        "settings": {key: value for key, value in vars(args).items() if key != "json"},
        "kill_log": killer.kills,
    }
    print(
        "soak: rows in {rows_in}, rows out {rows_out}, unique ids {unique_ids_out}, duplicates {duplicate_rows}, "
        "lost {lost_ids}, errors {error_rows}; {kills} kills ({kills_of_generation_actors} generation, "
        "{kills_of_cache_actor} cache) in {wall_s} s".format(**report)
    )
    if args.json:
        write_json(args.json, report)
    if report["lost_ids"] or report["duplicate_rows"] or report["unknown_ids"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
