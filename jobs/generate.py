"""Generate text for a Parquet prompt set on Ray: EAGLE speculative decoding in every actor, results to Parquet.

    python -m jobs.generate [--input PATH] [--output DIR] [--policy PATH|static|heuristic] [--num-actors N] ...

Locally it starts a Ray of its own; under `ray job submit --working-dir . -- python -m jobs.generate ...` (or with
--address) it joins that cluster. Without --model/--draft/--policy it uses the demo models in models/demo/,
building them first when they are missing. The output folder gets Parquet files with every input column plus
generated_text, num_input_tokens, num_generated_tokens, num_steps, mean_accepted_tokens, time_taken_llm,
tree_params and __inference_error__ (null on success), and _stats.json with the job summary. Exit status: 0 when
the job ran (error rows included), 2 for a bad config or input, which is reported before any work starts.

Rerunning the same command with the same --output resumes an interrupted job: rows already in the output are
not generated again (ids from --id-column, or computed from each row's file and position when the input has
no such column). --overwrite starts afresh instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from common.config import GenerateConfig, describe_validation_error
from demo.build import DEFAULT_DEMO_ROOT
from pipeline.inputs import InputError

DEFAULT_INPUT = "examples/prompts.parquet"
DEFAULT_OUTPUT = "outputs/generate"


def _help(name: str) -> str:
    return GenerateConfig.model_fields[name].description or ""


def _optional_float(text: str) -> float | None:
    """A number, or 'none' for no limit."""
    return None if text.lower() == "none" else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", default=DEFAULT_INPUT, help=f"{_help('input')} (default: %(default)s)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"{_help('output')} (default: %(default)s)")
    parser.add_argument("--prompt-column", default="prompt", help=_help("prompt_column"))
    parser.add_argument("--id-column", default="id", help=_help("id_column"))
    parser.add_argument(
        "--demo-root",
        default=DEFAULT_DEMO_ROOT,
        help="where the demo models are, or get built, when --model/--draft/--policy are left out; under "
        "`ray job submit` give an absolute path, e.g. $PWD/models/demo (default: %(default)s)",
    )
    parser.add_argument("--model", default=None, help=f"{_help('model')} (default: the demo target)")
    parser.add_argument("--draft", default=None, help=f"{_help('draft')} (default: the demo draft head)")
    parser.add_argument("--policy", default=None, help=f"{_help('policy')} (default: the demo policy)")
    parser.add_argument("--tree", default="8/4/2", help=_help("tree"))
    parser.add_argument("--max-new-tokens", type=int, default=128, help=_help("max_new_tokens"))
    parser.add_argument("--max-new-tokens-cap", type=int, default=4096, help=_help("max_new_tokens_cap"))
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help=_help("max_prompt_tokens"))
    parser.add_argument(
        "--row-timeout-s",
        type=_optional_float,
        default=600.0,
        help=f"{_help('row_timeout_s')} (default: %(default)s)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help=_help("temperature"))
    parser.add_argument("--num-actors", type=int, default=1, help=_help("num_actors"))
    parser.add_argument("--batch-size", type=int, default=16, help=_help("batch_size"))
    parser.add_argument(
        "--shared-cache", action=argparse.BooleanOptionalAction, default=False, help=_help("shared_cache")
    )
    parser.add_argument(
        "--similarity-threshold", type=float, default=0.85, help=_help("similarity_threshold")
    )
    parser.add_argument("--address", default=None, help=_help("address"))
    parser.add_argument("--namespace", default=None, help=_help("namespace"))
    parser.add_argument("--cache-memory-mb", type=float, default=256.0, help=_help("cache_memory_mb"))
    parser.add_argument("--trust-remote-code", action="store_true", help=_help("trust_remote_code"))
    parser.add_argument("--num-gpus-per-actor", type=float, default=None, help=_help("num_gpus_per_actor"))
    parser.add_argument("--cpus-per-actor", type=float, default=None, help=_help("cpus_per_actor"))
    parser.add_argument("--job-name", default="eagleray", help=_help("job_name"))
    parser.add_argument("--seed", type=int, default=0, help=_help("seed"))
    parser.add_argument("--overwrite", action="store_true", help=_help("overwrite"))
    parser.add_argument("--no-progress", action="store_true", help="hide the Ray Data progress bars")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> GenerateConfig:
    """The validated config. Model paths left out are the demo's (checked, not built, here)."""
    from demo.build import demo_paths

    demo = demo_paths(args.demo_root)
    return GenerateConfig(
        input=args.input,
        output=args.output,
        prompt_column=args.prompt_column,
        id_column=args.id_column,
        model=args.model or demo["target"],
        draft=args.draft or demo["draft"],
        policy=args.policy or demo["policy"],
        tree=args.tree,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_cap=args.max_new_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens,
        row_timeout_s=args.row_timeout_s,
        temperature=args.temperature,
        num_actors=args.num_actors,
        batch_size=args.batch_size,
        shared_cache=args.shared_cache,
        similarity_threshold=args.similarity_threshold,
        address=args.address,
        namespace=args.namespace,
        cache_memory_mb=args.cache_memory_mb,
        trust_remote_code=args.trust_remote_code,
        num_gpus_per_actor=args.num_gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        job_name=args.job_name,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def check_model_folders(config: GenerateConfig) -> None:
    """The model, draft and policy folders exist where the driver runs (actors load them from the same paths)."""
    folders = {"--model": config.model, "--draft": config.draft}
    if config.policy_kind == "learned":
        folders["--policy"] = config.policy
    for option, folder in folders.items():
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {folder!r} is not a folder")
    if not os.path.isfile(os.path.join(config.model, "config.json")):
        raise ValueError(f"--model {config.model!r} has no config.json; is it a Hugging Face model folder?")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ValidationError as error:
        print(f"jobs.generate: invalid configuration:\n{describe_validation_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    # Fatal input problems are found before anything is built or started.
    from pipeline.inputs import resolve_input

    try:
        resolve_input(config.input, config.prompt_column)
    except InputError as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.model is None or args.draft is None or args.policy is None:
        from jobs.demo import ensure_demo

        ensure_demo(args.demo_root)
    try:
        check_model_folders(config)
    except ValueError as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from pipeline.build import run_generate

    try:
        return run_generate(config)
    except InputError as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
