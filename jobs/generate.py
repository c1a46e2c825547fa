"""Generate text for a Parquet prompt set on Ray: EAGLE speculative decoding in every actor, results to Parquet.

    python -m jobs.generate [--input PATH] [--output DIR] [--policy PATH|static|heuristic|plain] [--num-actors N] ...

Locally it starts a Ray of its own; under `ray job submit --working-dir . -- python -m jobs.generate ...` (or with
--address) it joins that cluster. Without --model/--draft/--policy it uses SmolLM2-135M-Instruct with its
committed EAGLE head and policy in models/smollm2/ (--models-root), converting the target first when it is
missing (a plain local run only: a submitted job, or one that joins a cluster, stops with exit status 2 and the
command that builds it). The default input is examples/chat_prompts.parquet, held-out ShareGPT first turns. --model also takes a Hugging Face model
id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) that is in the local HF cache; the job never downloads one.
Rows come from the input's messages column (--messages-column, default messages: a list of {role, content})
when it has one, else from its prompt column; both go through the tokenizer's chat template, a prompt as one
user message, unless the tokenizer has none or --no-chat-template is given. A row may carry its own
sampling_params struct (max_tokens, temperature, top_p, top_k, seed, stop), as Ray Data LLM rows do; the flags
are the defaults. The output folder gets Parquet files with
every input column plus generated_text, num_input_tokens, num_generated_tokens, finish_reason (stop, length or
context), num_steps, mean_accepted_tokens, time_taken_llm, tree_params and __inference_error__ (null on
success), and _stats.json with the job summary. Exit status: 0 when the job ran (error rows included), 1 when
every row in the output is an error row, 2 for a bad config, input or model pairing, which is reported before
any work starts.

Rerunning the same command with the same --output resumes an interrupted job: rows already in the output are
not generated again (ids from --id-column, or computed from each row's file and position when the input has
no such column). --overwrite starts afresh instead. Ctrl-C stops the job with exit status 130 and one line
saying how many rows are safely written. A second driver on the same output folder stops with exit status 2
while the first holds the folder's lock.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from pydantic import ValidationError

from common.config import GenerateConfig, ProcessorConfig, describe_validation_error
from jobs import program
from jobs.models import DEFAULT_ROOT
from pipeline import checks as pipeline_checks
from pipeline.checks import check_models
from pipeline.inputs import InputError, resolve_input
from pipeline.resources import ResourceError
from pipeline.resume import count_written_rows
from pipeline.summary import all_rows_failed

DEFAULT_INPUT = "examples/chat_prompts.parquet"
DEFAULT_OUTPUT = "outputs/generate"
# Required config fields that the command line fills in itself when they are left out.
JOB_DEFAULTS = {"input": DEFAULT_INPUT, "output": DEFAULT_OUTPUT}
MODEL_DEFAULTS = {"model": "MODELS_ROOT/target", "draft": "MODELS_ROOT/draft", "policy": "MODELS_ROOT/policy"}


def option_name(field_name: str) -> str:
    """The command-line flag of a config field: 'num_actors' -> '--num-actors'."""
    return "--" + field_name.replace("_", "-")


def _value_type(annotation) -> tuple[type, bool]:
    """(the value's type, whether None is allowed) of a field annotation such as `int | None`."""
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    if arguments:
        assert len(arguments) == 1, f"no command-line form for {annotation}"
        return arguments[0], True
    return annotation, False


def _parser_type(kind: type, optional: bool):
    """What argparse converts a value with. An optional number also takes 'none' (no limit, or automatic)."""
    assert kind in (str, int, float), f"no command-line form for {kind}"
    if not optional or kind is str:
        return kind

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = f"{kind.__name__} or 'none'"  # argparse names it in its messages
    return convert


def add_config_options(
    parser: argparse.ArgumentParser,
    config_class: type[ProcessorConfig] = GenerateConfig,
    only: tuple[str, ...] | None = None,
) -> None:
    """One option per field of `config_class` (a ProcessorConfig; default the job's), or per field in `only`,
    named `option_name(field)`, with the field's description as help and its default (booleans as --x / --no-x),
    the command's own (input, output, ...) first, then the processor's."""
    fields = config_class.model_fields
    names = [name for name in fields if only is None or name in only]
    job_first = [name for name in names if name not in ProcessorConfig.model_fields] + [
        name for name in names if name in ProcessorConfig.model_fields
    ]
    for name in job_first:
        field = fields[name]
        help_text = (field.description or "").replace("%", "%%")
        kind, optional = _value_type(field.annotation)
        if kind is bool:
            parser.add_argument(
                option_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=f"{help_text} (default: %(default)s)",
            )
            continue
        if name in MODEL_DEFAULTS:
            default, help_text = None, f"{help_text} (default: {MODEL_DEFAULTS[name]})"
        elif field.is_required():
            default = JOB_DEFAULTS[name]
        else:
            default = field.default
        if default is not None and name not in MODEL_DEFAULTS:
            help_text += " (default: %(default)s)"
        parser.add_argument(
            option_name(name), dest=name, type=_parser_type(kind, optional), default=default, help=help_text
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("generate"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(parser)
    parser.add_argument(
        "--models-root",
        default=DEFAULT_ROOT,
        help="folder with target/, draft/ and policy/, used when --model/--draft/--policy are left out (the "
        "default is SmolLM2-135M-Instruct, its target converted on first use); under `ray job submit` give an "
        "absolute path every node sees, e.g. $PWD/models/smollm2 (default: %(default)s)",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> GenerateConfig:
    """The validated config. Model paths left out are --models-root's (checked, not built, here)."""
    from jobs.models import model_paths

    values = {name: getattr(args, name) for name in GenerateConfig.model_fields}
    paths = model_paths(args.models_root)
    values["model"] = values["model"] or paths["target"]
    values["draft"] = values["draft"] or paths["draft"]
    values["policy"] = values["policy"] or paths["policy"]
    return GenerateConfig(**values)


def resolve_model(model: str) -> str:
    """The folder `--model` names: `model` itself unless it is no folder but a Hugging Face model id, which
    resolves to its snapshot folder in the local HF cache (HF_HUB_CACHE, or HF_HOME/hub). Never downloads.
    ValueError, saying how to provide the model, when an id is not cached."""
    if os.path.isdir(model):
        return model
    try:
        validate_repo_id(model)
    except HFValidationError:
        return model  # a path, not an id: the folder check names it
    try:
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"--model {model!r} is not a folder, nor a Hugging Face model id in the local cache "
            f"{hub_constants.HF_HUB_CACHE}{offline}; download it first (`hf download {model}`, "
            "online) or give --model a folder holding its config.json, weights and tokenizer"
        ) from None


def check_model_folders(config: GenerateConfig) -> GenerateConfig:
    """The model, draft and policy folders exist where the driver runs (actors load them from the same paths).
    Returns the config with --model as a folder (`resolve_model`)."""
    config = config.model_copy(update={"model": resolve_model(config.model)})
    pipeline_checks.check_model_folders(config)
    return config


def validated(build, args: argparse.Namespace, command: str):
    """build(args), or exit status 2 with one line per invalid option, spelled as on the command line."""
    try:
        return build(args)
    except ValidationError as error:
        problems = describe_validation_error(error, option_name)
        print(f"{command}: invalid configuration:\n{problems}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = validated(build_config, args, "jobs.generate")
    # Fatal input problems are found before anything is built or started.
    try:
        inputs = resolve_input(config.input, config.prompt_column, config.messages_column)
    except InputError as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.model is None or args.draft is None or args.policy is None:
        from jobs.models import ModelsMissingError, ensure_models, implicit_build_refusal

        try:
            ensure_models(args.models_root, refusal=implicit_build_refusal(config.address))
        except ModelsMissingError as error:
            print(f"jobs.generate: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    try:
        config = check_model_folders(config)
        check_models(config)  # the draft head and the policy fit the target, before any actor starts
    except ValueError as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from pipeline.build import run_generate

    try:
        summary = run_generate(config)
    except (InputError, ResourceError) as error:
        print(f"jobs.generate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Ctrl-C: the complete result files stay (a file cut off mid-write is redone), and the same command
        # resumes from them.
        sys.stdout.flush()
        written = count_written_rows(config.output)
        print(
            f"jobs.generate: interrupted; {written} of {inputs.num_rows} rows are safely written in "
            f"{config.output}; rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    failure = all_rows_failed(summary)
    if failure:
        sys.stdout.flush()  # the line comes after the printed summary
        print(f"jobs.generate: {failure}", file=sys.stderr)
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
