"""The `eagleray` command: `eagleray <command> [options]`, each command the same as its `python -m jobs.<module>`.

    eagleray generate --input prompts.parquet --output out/     # = python -m jobs.generate ...
    eagleray <command> --help                                    # that command's options

`python -m jobs.<module>` stays the form for `ray job submit`, whose driver runs in the uploaded working dir.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it does)
COMMANDS = {
    "generate": ("jobs.generate", "generate text for a Parquet prompt set on Ray (the main job)"),
    "bench": ("jobs.bench", "benchmark decoding methods side by side on the same prompts"),
    "bench-batch": ("jobs.bench_batch", "benchmark batched decoding against HF generate on padded batches"),
    "bench-pipeline": ("jobs.bench_pipeline", "benchmark the Ray pipeline against direct and batched HF"),
    "bench-cache": ("jobs.bench_cache", "benchmark the shared context cache's look-ups"),
    "bench-cross-drafts": (
        "jobs.bench_cross_drafts",
        "benchmark a job with and without cross-request drafts (templated or chat prompts)",
    ),
    "serve": ("jobs.serve", "serve the model on an OpenAI-compatible endpoint (Ray Serve)"),
    "bench-serve": ("jobs.bench_serve", "load-test the endpoint with and without speculation, side by side"),
    "build-models": ("jobs.build_models", "build the default model (SmolLM2) folders from registry packages"),
    "build-demo": ("jobs.build_demo", "build the tiny offline demo models"),
    "gpu-check": ("jobs.gpu_check", "greedy identity and speed of the real model on an accelerator"),
    "soak": ("jobs.soak", "run the pipeline while killing actors, and check nothing is lost"),
    "train-draft": ("jobs.train_draft", "train an EAGLE draft head for a target"),
    "train-policy": ("jobs.train_policy", "train the learned tree policy on real generation steps"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: eagleray <command> [options]",
        "",
        "Lossless EAGLE speculative decoding for batch generation on Ray. Each command is the same as",
        "`python -m jobs.<module>` (the form `ray job submit` takes); `eagleray <command> --help` lists its options.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {what} ({module})" for name, (module, what) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this message",
        "  --version      show eagleray's version",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (a command's own SystemExit passes through)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command == "--version":
        from eagleray import __version__

        print(f"eagleray {__version__}")
        return 0
    if command not in COMMANDS:
        near = [name for name in COMMANDS if name.replace("-", "_") == command or name.startswith(command)]
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        print(f"eagleray: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    import jobs

    module = importlib.import_module(COMMANDS[command][0])
    jobs.command_name = f"eagleray {command}"  # the command's --help and errors name it as typed
    try:
        module.main(rest)
    finally:
        jobs.command_name = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
