"""Build the offline demo models (tokenizer, target LM, EAGLE draft head), held-out prompts, and the tree policy.

python -m jobs.build_demo [--preset full|tiny] [--out models/demo]
"""

from __future__ import annotations

import argparse

from demo.build import DEFAULT_DEMO_ROOT, PRESETS, format_report
from jobs import HelpFormatter, program
from jobs.demo import build_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=program("build_demo"), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="full", help="full (~10 min) or tiny (for the tests)"
    )
    parser.add_argument("--out", default=DEFAULT_DEMO_ROOT, help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    report = build_all(args.preset, args.out, progress=not args.no_progress)
    print(format_report(report))


if __name__ == "__main__":
    main()
