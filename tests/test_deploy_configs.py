"""The deployment files parse, validate offline with Ray's own checks, and keep their structural promises.

- cluster.yaml: Ray's `prepare_config` then `validate_config` (what `ray up` runs before it contacts AWS), with
  networking switched off to prove that this step is offline; a CPU-only head and an autoscaling GPU worker type.
- deploy/rayjob.yaml: a KubeRay RayJob whose entrypoint runs jobs.generate on a CPU head and GPU workers.
- deploy/serve.yaml: a Ray Serve config that Serve's own schema accepts, whose builder makes the application
  with autoscaling replicas and consistent request limits.
- jobs/generate.yaml: a runtime_env that `ray.runtime_env.RuntimeEnv` accepts, alone and merged with
  `--working-dir .` the way `ray job submit` merges them, and whose upload stays small.
- Every key in these YAML files carries a comment (on its line or the line above).

No cluster, no cloud and no network are needed; the whole module runs in a few seconds.
"""

from __future__ import annotations

import re
import socket
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from ray._private.ray_constants import get_runtime_env_default_excludes
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
RUNTIME_ENV_YAML = REPO / "jobs" / "generate.yaml"
SERVE_YAML = REPO / "deploy" / "serve.yaml"
COMMENTED_FILES = [CLUSTER_YAML, RAYJOB_YAML, RUNTIME_ENV_YAML, SERVE_YAML]

# A mapping key at the start of a line, possibly as the first key of a list item: `key:`, `- key:`, `"~/x":`.
KEY_LINE = re.compile(
    r"""^(?P<indent>\s*)(?:-\s+)?(?P<key>"[^"]*"|'[^']*'|[\w.~/-]+)\s*:(?:\s|$)(?P<value>.*)$"""
)
# A block scalar (`key: |`, `key: >-`, `- >-`): the more-indented lines after it are text, not YAML keys.
BLOCK_SCALAR_START = re.compile(
    r"""^(?P<indent>\s*)(?:-\s+)?(?:(?:"[^"]*"|'[^']*'|[\w.~/-]+)\s*:\s*)?[|>][-+]?\s*(?:#.*)?$"""
)


def _has_inline_comment(line: str) -> bool:
    """True when a `#` outside quotes, preceded by whitespace, starts a comment."""
    unquoted = re.sub(r""""[^"]*"|'[^']*'""", '""', line)
    return re.search(r"\s#", unquoted) is not None


def uncommented_keys(text: str) -> list[tuple[int, str]]:
    """(line number, key) of every key line without a comment on the same line or on the line just above.

    Comment lines, blank lines, plain list items and the text inside block scalars are not keys.
        >>> uncommented_keys("# the name\\nname: x\\nsize: 3  # GiB\\nkind: y\\n")
        [(4, 'kind')]
    """
    lines = text.splitlines()
    missing = []
    block_indent = None  # indentation of the line that opened the block scalar we are inside, if any
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        if BLOCK_SCALAR_START.match(line):
            block_indent = indent
        match = KEY_LINE.match(line)
        if match is None:
            continue
        above = lines[number - 2].strip() if number > 1 else ""
        if not (_has_inline_comment(line) or above.startswith("#")):
            missing.append((number, match.group("key").strip("\"'")))
    return missing


def _load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (AWS, a package index) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_comment_checker_finds_missing_comments_and_skips_block_text():
    text = (
        "# what runs\n"
        "entrypoint: >-\n"
        "  python -m jobs.generate\n"
        "  --input: not-a-key\n"
        "spec:\n"
        "  # fine\n"
        "  - name: x\n"
        "    image: y  # fine too\n"
        "    ports:\n"
        "      - 6379\n"
        '  "~/eagleray": "."\n'
    )
    assert uncommented_keys(text) == [(5, "spec"), (9, "ports"), (11, "~/eagleray")]


@pytest.mark.parametrize("path", COMMENTED_FILES, ids=lambda path: path.name)
def test_every_key_carries_a_comment(path: Path):
    missing = uncommented_keys(path.read_text())
    assert not missing, f"{path.name}: keys without a comment (line, key): {missing}"


def test_cluster_yaml_validates_offline_with_ray(no_network):
    config = prepare_config(_load(CLUSTER_YAML))
    validate_config(config)

    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "the head must offer no GPU, so generation actors never land on it"
    assert head["resources"]["CPU"] >= 1
    assert head["max_workers"] == 0

    gpu_workers = [
        node
        for name, node in node_types.items()
        if name != config["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    ]
    assert gpu_workers, "expected an autoscaling GPU worker type"
    for node in gpu_workers:
        assert node["min_workers"] == 0 and 1 <= node["max_workers"] <= config["max_workers"]

    # prepare_config prepends setup_commands to the head and worker lists.
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert "pip install -e ~/eagleray" in commands
    assert config["file_mounts"]["~/eagleray"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]

    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start


def test_cluster_and_rayjob_images_match_the_installed_ray():
    """The cluster must run the Ray version that submits to it."""
    cluster_image = _load(CLUSTER_YAML)["docker"]["image"]
    assert cluster_image.split(":")[1].startswith(f"{ray.__version__}-"), cluster_image
    assert _load(RAYJOB_YAML)["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_rayjob_manifest_runs_generate_on_a_cpu_head_and_gpu_workers():
    documents = [document for document in yaml.safe_load_all(RAYJOB_YAML.read_text()) if document]
    assert len(documents) == 1
    rayjob = documents[0]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"

    spec = rayjob["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python -m jobs.generate ")
    assert "--input " in entrypoint and "--output " in entrypoint
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"

    cluster = spec["rayClusterSpec"]
    head_template = cluster["headGroupSpec"]["template"]
    assert all(_gpus(container) == 0 for container in _containers(head_template))
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"

    worker_groups = cluster["workerGroupSpecs"]
    gpu_groups = [
        group for group in worker_groups if any(_gpus(c) >= 1 for c in _containers(group["template"]))
    ]
    assert gpu_groups, "expected a worker group that requests nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    # Every pod mounts declared volumes, and the paths the entrypoint passes live under a mount on every pod.
    paths = re.findall(r"--(?:input|output|model|draft|policy) (\S+)", entrypoint)
    for template in [head_template] + [group["template"] for group in worker_groups]:
        volumes = {volume["name"] for volume in template["spec"]["volumes"]}
        for container in _containers(template):
            mounts = container["volumeMounts"]
            assert {mount["name"] for mount in mounts} <= volumes
            for path in paths:
                assert any(path.startswith(mount["mountPath"] + "/") for mount in mounts), path


def test_runtime_env_yaml_is_accepted_by_ray_alone_and_merged_with_working_dir():
    runtime_env = _load(RUNTIME_ENV_YAML)
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"] == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert "working_dir" not in runtime_env, "the command line's --working-dir supplies it"

    # What `ray job submit --runtime-env jobs/generate.yaml --working-dir . -- ...` builds before uploading.
    merged = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=".")
    assert merged == {**runtime_env, "working_dir": "."}
    RuntimeEnv(**merged)


def test_working_dir_upload_holds_the_code_and_stays_small(tmp_path: Path):
    """Package the repository exactly as the job submission client does (.gitignore, default and yaml excludes)."""
    excludes = get_runtime_env_default_excludes() + _load(RUNTIME_ENV_YAML)["excludes"]
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=True, excludes=excludes)

    names = zipfile.ZipFile(package).namelist()
    assert {"pyproject.toml", "jobs/__init__.py", "jobs/generate.yaml"} <= set(names)
    leaked = [name for name in names if name.split("/")[0] in {".git", ".venv", "models", "outputs"}]
    assert not leaked, leaked[:10]
    size = package.stat().st_size
    assert size < 20 * 1024 * 1024, f"{size} bytes: something large slipped into the upload"
    assert size < GCS_STORAGE_MAX_SIZE


def test_serve_config_validates_with_serve_schema_and_builds_its_application(tiny_demo):
    from ray.serve.schema import ServeDeploySchema

    from common.config import ServeConfig
    from demo.build import demo_paths
    from jobs.serve import app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "jobs.serve:app_builder" and app.route_prefix == "/"
    (deployment,) = app.deployments
    assert deployment.name == "EaglerayServer"
    scaling = deployment.autoscaling_config
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert deployment.ray_actor_options.num_gpus == 1
    # The file's request limits agree with the replica's own: it answers the one past its limit with 429.
    args = app.args
    limit = ServeConfig(
        model="m", draft="d", policy="static", **{k: v for k, v in args.items() if k != "models_root"}
    )
    assert deployment.max_ongoing_requests == limit.max_requests + 1
    # The builder turns the file's args (with model folders that exist here) into the application.
    paths = demo_paths(tiny_demo)
    values = {**args, "model": paths["target"], "draft": paths["draft"], "policy": paths["policy"]}
    application = app_builder(values)
    assert type(application).__name__ == "Application"
