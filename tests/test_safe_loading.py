"""Loading a model, draft head or policy never runs code that came with the files.

A pickle can run any function while it loads, so a `pytorch_model.bin` from an untrusted folder must be read
with a restricted unpickler (`torch.load(weights_only=True)`, which transformers also uses by default), policies
must be safetensors + JSON only, and a target folder's own Python code (`auto_map`) must not be imported unless
`trust_remote_code=True` is asked for. Each payload here makes a marker folder; every test also shows, as a
control, that the payload does run when loaded the unsafe way, so a missing marker means something.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import GenerateConfig
from engine.draft_head import BIN_NAME, SAFETENSORS_NAME, DraftHead, DraftHeadConfig
from engine.ea_model import EaModel
from policy.checkpoint import CONFIG_NAME as POLICY_CONFIG_NAME
from policy.checkpoint import WEIGHTS_NAME as POLICY_WEIGHTS_NAME
from policy.checkpoint import load_policy
from policy.optimizer import AdaptiveParameterPredictor

REPO_ROOT = Path(__file__).resolve().parent.parent
PICKLE_FORMATS = ["torch.save", "pickle"]  # torch's zip format, and a bare pickle as older checkpoints are


class MakesMarkerWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def write_malicious_checkpoint(path: Path, marker: Path, pickle_format: str) -> None:
    """A state dict whose first tensor is a payload, in `pickle_format`."""
    state = {"fc.weight": MakesMarkerWhenUnpickled(marker), "model.embed_tokens.weight": torch.zeros(2, 2)}
    if pickle_format == "torch.save":
        torch.save(state, path)
    else:
        # Protocol 2, as torch's legacy format: the restricted unpickler then reaches the payload's GLOBAL.
        path.write_bytes(pickle.dumps(state, protocol=2))


def unpickle_unsafely(path: Path, pickle_format: str) -> None:
    """The control: the same file loaded with an unrestricted unpickler runs the payload."""
    if pickle_format == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())


@pytest.fixture(scope="module")
def tiny_model(tiny_lm_factory):
    return tiny_lm_factory("llama", seed=0)


@pytest.fixture
def head_folder(tmp_path, tiny_model) -> Path:
    """A valid EAGLE head for `tiny_model` (config.json + model.safetensors)."""
    folder = tmp_path / "draft"
    DraftHead(DraftHeadConfig.for_target(tiny_model.config)).save_pretrained(str(folder))
    return folder


@pytest.fixture
def target_folder(tmp_path, tiny_model) -> Path:
    folder = tmp_path / "target"
    tiny_model.save_pretrained(str(folder))
    return folder


# ---- pickled checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pickle_format", PICKLE_FORMATS)
def test_draft_head_bin_with_a_payload_is_refused(head_folder, tiny_model, tmp_path, pickle_format):
    embeddings = tiny_model.get_input_embeddings().weight.detach()
    # A valid pytorch_model.bin loads (so the refusal below is the unpickler's, not a missing-file error) ...
    state = load_file(head_folder / SAFETENSORS_NAME)
    (head_folder / SAFETENSORS_NAME).unlink()
    torch.save(state, head_folder / BIN_NAME)
    loaded = DraftHead.from_pretrained(str(head_folder), target_embeddings=embeddings)
    assert torch.equal(loaded.state_dict()["fc.weight"], state["fc.weight"])
    # ... and one whose pickle calls a function is refused before the call.
    marker = tmp_path / "draft-payload-ran"
    write_malicious_checkpoint(head_folder / BIN_NAME, marker, pickle_format)
    with pytest.raises(pickle.UnpicklingError):
        DraftHead.from_pretrained(str(head_folder), target_embeddings=embeddings)
    assert not marker.exists()
    unpickle_unsafely(head_folder / BIN_NAME, pickle_format)
    assert marker.exists()


@pytest.mark.parametrize("pickle_format", PICKLE_FORMATS)
def test_target_bin_with_a_payload_is_refused(
    target_folder, head_folder, tiny_model, tmp_path, pickle_format
):
    # transformers 5 saves safetensors even when asked for safe_serialization=False, so write the .bin here.
    (target_folder / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), target_folder / "pytorch_model.bin")
    model = EaModel.from_pretrained(base_model_path=str(target_folder), ea_model_path=str(head_folder))
    weight = model.base_model.get_input_embeddings().weight
    assert torch.equal(weight, tiny_model.get_input_embeddings().weight)  # read from the .bin
    marker = tmp_path / "target-payload-ran"
    write_malicious_checkpoint(target_folder / "pytorch_model.bin", marker, pickle_format)
    with pytest.raises(pickle.UnpicklingError):
        EaModel.from_pretrained(base_model_path=str(target_folder), ea_model_path=str(head_folder))
    assert not marker.exists()
    unpickle_unsafely(target_folder / "pytorch_model.bin", pickle_format)
    assert marker.exists()


def test_policy_loads_from_safetensors_and_json_only(tiny_demo, tmp_path):
    folder = tmp_path / "policy"
    shutil.copytree(Path(tiny_demo) / "policy", folder)
    for path in folder.iterdir():  # every file is plain data: JSON, safetensors, or the training plot
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG\r\n"), path.name
        else:
            assert path.suffix == ".safetensors", path.name
            with safe_open(str(path), framework="numpy") as weights:
                assert list(weights.keys())
    assert {POLICY_CONFIG_NAME, POLICY_WEIGHTS_NAME} <= {path.name for path in folder.iterdir()}
    marker = tmp_path / "policy-payload-ran"
    for name in ("policy.pkl", "policy.pt", "pytorch_model.bin", "bandit.npy"):  # names a loader might try
        write_malicious_checkpoint(folder / name, marker, "pickle")
    checkpoint = load_policy(str(folder))
    assert len(checkpoint.actions) > 1
    AdaptiveParameterPredictor(str(folder))  # what a generation actor loads (policy + latency table)
    assert not marker.exists()
    # The weights file itself replaced by a pickle: refused, not unpickled.
    write_malicious_checkpoint(folder / POLICY_WEIGHTS_NAME, marker, "pickle")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_policy(str(folder))
    assert not marker.exists()
    unpickle_unsafely(folder / POLICY_WEIGHTS_NAME, "pickle")
    assert marker.exists()


# ---- code shipped with a target folder --------------------------------------------------------------------------


def add_custom_code(folder: Path, marker: Path, model_type: str) -> None:
    """Make `folder` a target whose config.json points (auto_map) at its own modeling file, which makes
    `marker` when imported."""
    code = f"""
        import os

        from transformers import LlamaConfig, LlamaForCausalLM

        os.makedirs({str(marker)!r}, exist_ok=True)


        class CustomConfig(LlamaConfig):
            model_type = {model_type!r}


        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig
    """
    (folder / "modeling_custom.py").write_text(textwrap.dedent(code))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_custom_code_of_an_unknown_architecture_is_refused(target_folder, head_folder, tmp_path):
    marker = tmp_path / "custom-code-ran"
    add_custom_code(target_folder, marker, model_type="custom_llama")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        EaModel.from_pretrained(base_model_path=str(target_folder), ea_model_path=str(head_folder))
    assert not marker.exists()
    assert GenerateConfig.model_fields["trust_remote_code"].default is False  # the job's default too


def test_custom_code_runs_only_when_trusted(target_folder, head_folder, tmp_path):
    """A Llama folder that also names custom code loads as stock Llama; the code runs only with
    trust_remote_code=True (in a subprocess, so that its module cache lands in tmp_path)."""
    marker = tmp_path / "custom-code-ran"
    add_custom_code(target_folder, marker, model_type="llama")
    model = EaModel.from_pretrained(base_model_path=str(target_folder), ea_model_path=str(head_folder))
    assert type(model.base_model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    trusted = f"""
        from engine.ea_model import EaModel
        model = EaModel.from_pretrained(
            base_model_path={str(target_folder)!r}, ea_model_path={str(head_folder)!r}, trust_remote_code=True
        )
        print(type(model.base_model).__name__)
    """
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(trusted)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "CustomForCausalLM"
    assert marker.exists()


# ---- the source never loads unsafely -----------------------------------------------------------------------------

PACKAGES = ("engine", "policy", "actors", "pipeline", "jobs")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib", "marshal"}


def _dotted(node: ast.expr) -> str:
    """'torch.load' for the expression torch.load; '' for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is_constant(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loading(source: str, filename: str) -> list[str]:
    """Each place in `source` that could unpickle or run shipped code, as 'file:line: what'."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            problems += [
                f"{where}: import {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] in UNPICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {alias.name for alias in node.names}
            if module.split(".")[0] in UNPICKLING_MODULES or names & UNPICKLING_MODULES:
                problems.append(f"{where}: from {module} import {sorted(names)}")
            if module.startswith("torch") and "load" in names:
                problems.append(
                    f"{where}: from {module} import load (call torch.load with weights_only=True)"
                )
        elif isinstance(node, ast.Call):
            function = _dotted(node.func)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords if keyword.arg}
            if function.startswith("torch") and function.endswith(".load"):
                if not _is_constant(keywords.get("weights_only"), True):
                    problems.append(f"{where}: {function}(...) without weights_only=True")
            if function.endswith(("read_pickle", "pickle.load", "pickle.loads")):
                problems.append(f"{where}: {function}(...)")
            if "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"], False):
                problems.append(f"{where}: allow_pickle other than False")
            if "weights_only" in keywords and not _is_constant(keywords["weights_only"], True):
                problems.append(f"{where}: weights_only other than True")
            if _is_constant(keywords.get("trust_remote_code"), True):
                problems.append(f"{where}: trust_remote_code=True hard-coded")
    return problems


UNSAFE_LINES = [
    "import pickle",
    "import cloudpickle as cp",
    "from ray import cloudpickle",
    "from torch import load",
    'torch.load("a.bin")',
    'torch.load("a.bin", weights_only=False)',
    'torch.serialization.load("a.bin", weights_only=flag)',
    'np.load("a.npy", allow_pickle=True)',
    'pd.read_pickle("a.pkl")',
    "pickle.loads(data)",
    'AutoModel.from_pretrained("m", trust_remote_code=True)',
    'load_state_dict("a.bin", weights_only=False)',
]
SAFE_LINES = [
    "import json",
    'torch.load("a.bin", map_location="cpu", weights_only=True)',
    'np.load("a.npy", allow_pickle=False)',
    'np.save("a.npy", array, allow_pickle=False)',
    'AutoModel.from_pretrained("m", trust_remote_code=args.trust_remote_code)',
    "json.load(file)",
]


@pytest.mark.parametrize("line", UNSAFE_LINES)
def test_the_audit_finds_an_unsafe_line(line):
    assert unsafe_loading(line, "example.py")


@pytest.mark.parametrize("line", SAFE_LINES)
def test_the_audit_passes_a_safe_line(line):
    assert unsafe_loading(line, "example.py") == []


def test_no_package_loads_unsafely():
    files = sorted(path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))
    assert len(files) > 30, files  # the packages were found
    problems = []
    for path in files:
        problems += unsafe_loading(path.read_text(), str(path.relative_to(REPO_ROOT)))
    assert problems == []
