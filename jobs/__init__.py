"""Entry points for `python -m jobs.<name>` and `ray job submit`. Each parses arguments and calls a builder.

`HelpFormatter` is their argparse formatter. The few modules here that are helpers of the entry points, not entry
points themselves (`HELPER_MODULES`), say so and exit with status 2 when run (`refuse_to_run`).
"""

from __future__ import annotations

import argparse
import sys

# How the running command is spelled in its --help and errors: `eagleray.cli` sets it (e.g. 'eagleray generate');
# None: `python -m jobs.<module>`.
command_name: str | None = None

ENTRY_POINTS = (
    "bench",
    "bench_batch",
    "bench_cache",
    "bench_cross_drafts",
    "bench_pipeline",
    "bench_serve",
    "build_demo",
    "build_models",
    "generate",
    "gpu_check",
    "serve",
    "soak",
    "train_draft",
    "train_policy",
)
HELPER_MODULES = ("demo", "models", "prompts", "results")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description (the module docstring) as written, and each option's default after its help text.
    No default is shown for a flag without a value (store_true), a required option, or a default of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            "%(default)" in help_text
            or action.default is None
            or action.default is argparse.SUPPRESS
            or action.nargs == 0
            or action.required
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"


def program(module: str) -> str:
    """The `prog` of an entry point's parser: 'python -m jobs.<module>', or the `eagleray` command that runs it."""
    return command_name or f"python -m jobs.{module}"


def refuse_to_run(module: str, what: str) -> None:
    """What a helper module does when run as `python -m jobs.<name>`: say what it is, name the entry points,
    exit with status 2."""
    commands = ", ".join(f"python -m jobs.{name}" for name in ENTRY_POINTS)
    print(f"{module} is {what}, not an entry point; run one of: {commands}", file=sys.stderr)
    raise SystemExit(2)
