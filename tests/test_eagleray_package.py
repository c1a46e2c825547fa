"""The `eagleray` import name and command: the public API imports lazily, `eagleray <command>` runs the same entry
point as `python -m jobs.<module>`, and a built wheel ships the package and declares the command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import eagleray
from eagleray import cli

REPO = Path(__file__).resolve().parent.parent
# The packages pyproject.toml declares ("engine*" -> "engine").
PACKAGES = tuple(
    pattern.removesuffix("*")
    for pattern in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]["include"]
)


def test_import_eagleray_loads_neither_torch_nor_ray():
    code = "import sys, eagleray; print('torch' in sys.modules, 'ray' in sys.modules, eagleray.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["False", "False", eagleray.__version__]


def test_the_public_names_are_the_products_own():
    from common.config import ProcessorConfig
    from engine.ea_model import EaModel
    from pipeline.processor import build_processor

    assert eagleray.EaModel is EaModel
    assert eagleray.build_processor is build_processor
    assert eagleray.ProcessorConfig is ProcessorConfig
    assert set(eagleray.__all__) >= {"EaModel", "build_processor", "ProcessorConfig", "GenerateConfig"}
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = eagleray.Nope


def test_help_lists_every_command_and_each_is_an_entry_point(capsys):
    from jobs import ENTRY_POINTS

    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, (module, _) in cli.COMMANDS.items():
        assert f"  {name} " in text and module.removeprefix("jobs.") in ENTRY_POINTS
    assert {module for module, _ in cli.COMMANDS.values()} == {f"jobs.{name}" for name in ENTRY_POINTS}


def test_a_command_runs_its_module_with_the_rest_of_the_arguments(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: eagleray generate ") and "--max-new-tokens" in text
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--max-new-tokens", "-1"])
    assert exited.value.code == 2
    assert "--max-new-tokens: Input should be greater than 0" in capsys.readouterr().err


def test_a_wrong_or_missing_command_says_what_there_is(capsys):
    assert cli.main(["launch"]) == 2
    assert "unknown command 'launch'" in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert "did you mean train-draft or train-policy?" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "usage: eagleray <command>" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"eagleray {eagleray.__version__}"


def test_the_wheel_ships_the_package_and_declares_the_command(tmp_path):
    # Built from a copy of the sources, so that setuptools' build/ folder is not left in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
    ]
    subprocess.run([*command, "."], check=True, capture_output=True, cwd=source)
    (wheel,) = wheels.glob("eagleray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(name for name in names if name.endswith("entry_points.txt"))
        declared = archive.read(entry_points).decode()
    assert "eagleray" in PACKAGES and "eagleray/cli.py" in names
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
    assert "[console_scripts]" in declared and "eagleray = eagleray.cli:main" in declared
