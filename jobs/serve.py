"""Serve the model online: an OpenAI-compatible endpoint on Ray Serve, on eagleray's batched EAGLE engine.

    python -m jobs.serve [--host 127.0.0.1] [--port 8000] [--model DIR --draft DIR --policy DIR|static|plain]
        [--num-replicas N] [--address ADDRESS] [--max-batch-size 16] [--max-queued-requests 64] ...

Starts a local Ray (or joins --address, or the cluster in RAY_ADDRESS), deploys the application and serves
until Ctrl-C or SIGTERM, then removes it and stops the Ray it started. Without --model/--draft/--policy it
serves SmolLM2-135M-Instruct with its committed EAGLE head and policy (models/smollm2/, the target converted
first when it is missing), under the name 'smollm2'.

Routes (base URL http://HOST:PORT/v1): GET /v1/models, POST /v1/completions (a raw-text prompt), POST
/v1/chat/completions (messages, through the model's chat template), with max_tokens, temperature, top_p, seed,
stop and stream (server-sent events ending with `data: [DONE]`); GET /eagleray/stats has the replica's counts,
tau and the trees its planner chose. A request without temperature is greedy (--temperature) and gets the
offline job's answer for the same prompt. Concurrent requests decode together in each replica's continuous
batch (--max-batch-size rows); up to --max-queued-requests more wait, and one beyond that is answered 429.
--policy plain serves with speculation off (plain batched decoding), the baseline of `jobs.bench_serve`.

On a cluster, `serve deploy deploy/serve.yaml` (or `serve run deploy/serve.yaml`) runs the same application
with autoscaling replicas; its builder is `jobs.serve:app_builder`.
"""

from __future__ import annotations

import argparse
import sys

from common.config import ServeConfig
from jobs import program
from jobs.generate import add_config_options, check_model_folders, validated
from jobs.models import DEFAULT_ROOT
from pipeline.checks import check_models
from pipeline.resources import ResourceError

# The ProcessorConfig fields that mean something to a server; the row-column and job fields do not.
SERVE_OPTIONS = (
    "host",
    "port",
    "address",
    "num_replicas",
    "served_model_name",
    "max_queued_requests",
    "cpus_per_replica",
    "num_gpus_per_replica",
    "model",
    "draft",
    "policy",
    "tree",
    "chat_template",
    "max_new_tokens",
    "max_new_tokens_cap",
    "max_prompt_tokens",
    "row_timeout_s",
    "temperature",
    "top_k",
    "max_batch_size",
    "trust_remote_code",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("serve"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_options(parser, ServeConfig, SERVE_OPTIONS)
    parser.add_argument(
        "--models-root",
        default=DEFAULT_ROOT,
        help="folder with target/, draft/ and policy/, used when --model/--draft/--policy are left out (the "
        "default is SmolLM2-135M-Instruct, its target converted on first use) (default: %(default)s)",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> ServeConfig:
    """The validated config; model folders left out are --models-root's (built when missing)."""
    values = {name: getattr(args, name) for name in SERVE_OPTIONS}
    if args.model is None or args.draft is None or args.policy is None:
        from jobs.models import ModelsMissingError, ensure_models, implicit_build_refusal

        try:
            paths = ensure_models(args.models_root, refusal=implicit_build_refusal(args.address))
        except ModelsMissingError as error:
            print(f"jobs.serve: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        values["model"] = values["model"] or paths["target"]
        values["draft"] = values["draft"] or paths["draft"]
        values["policy"] = values["policy"] or paths["policy"]
    return ServeConfig(**values)


def checked_config(argv: list[str] | None) -> ServeConfig:
    """The config, every check done before Ray starts; exit status 2 with the problem named otherwise."""
    config = validated(build_config, parse_args(argv), "jobs.serve")
    try:
        # The name is the one given (a folder's, or a hub id), not the cache folder a hub id resolves to.
        config = check_model_folders(config.model_copy(update={"served_model_name": config.model_name}))
        check_models(config)
    except ValueError as error:
        print(f"jobs.serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def app_builder(args: dict):
    """The application for a Serve config file (deploy/serve.yaml) or `serve run jobs.serve:app_builder k=v`:
    `args` are ServeConfig fields (model, draft and policy default to the committed SmolLM2 folders under
    models_root, default models/smollm2); replicas and their resources come from the file's deployment options."""
    from actors.serve_replica import build_app
    from jobs.models import ensure_models

    values = dict(args)
    root = values.pop("models_root", DEFAULT_ROOT)
    if not {"model", "draft", "policy"} <= set(values):
        paths = ensure_models(root)
        values.setdefault("model", paths["target"])
        values.setdefault("draft", paths["draft"])
        values.setdefault("policy", paths["policy"])
    return build_app(ServeConfig(**values), replicas=False)


def main(argv: list[str] | None = None) -> int:
    config = checked_config(argv)
    from pipeline.serve import run_server

    try:
        return run_server(config)
    except ResourceError as error:
        print(f"jobs.serve: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
