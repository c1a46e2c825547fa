"""Imports flow one way: eagleray -> jobs -> pipeline -> actors -> {engine, policy}, with the layers that need both
above them.

Every import of every module is read with `ast`, the ones inside functions too, so a lazy import cannot hide an
arrow that runs the wrong way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = (
    "engine",
    "policy",
    "training",
    "bench",
    "demo",
    "assets",
    "common",
    "actors",
    "pipeline",
    "jobs",
    "eagleray",
)

# package -> the packages of ours it may import (itself always). Third-party imports are free except `ray`.
ALLOWED = {
    "engine": set(),
    "policy": {"engine.types"},
    "common": {"engine.types"},
    "training": {"engine", "policy"},
    "bench": {"engine", "policy", "training"},
    "demo": {"engine", "policy", "training"},
    "assets": {"engine", "policy", "training"},
    "actors": {"engine", "policy", "common"},
    "pipeline": {"actors", "common", "engine", "policy"},
    "jobs": set(OURS) - {"eagleray"},
    "eagleray": set(OURS),  # the public API and the command, above everything
}
NO_RAY = ("engine", "policy", "training", "bench", "demo", "assets", "common")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            # `from engine import draft` imports engine.draft
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def is_allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top == "ray":
        return package not in NO_RAY
    if top not in OURS or top == package:
        return True
    for allowed in ALLOWED[package]:
        if module == allowed or module.startswith(allowed + ".") or allowed == top:
            return True
    return False


def violations() -> list[str]:
    problems = []
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imported_modules(path):
                if not is_allowed(package, module):
                    problems.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return problems


def test_every_import_runs_the_allowed_way():
    assert violations() == []


@pytest.mark.parametrize(
    ("package", "module", "allowed"),
    [
        ("policy", "engine.types", True),
        ("policy", "engine.draft", False),
        ("engine", "policy.controllers", False),
        ("engine", "ray", False),
        ("actors", "pipeline.rows", False),
        ("actors", "ray.util", True),
        ("pipeline", "actors.generation", True),
        ("pipeline", "jobs.generate", False),
        ("training", "engine.generate", True),
    ],
)
def test_the_rule_itself(package, module, allowed):
    assert is_allowed(package, module) is allowed


def test_the_scanner_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from engine import draft\n    import ray.data\n")
    modules = {module for _, module in imported_modules(source)}
    assert {"engine", "engine.draft", "ray.data"} <= modules


def test_the_job_driver_starts_without_the_engine():
    """A job's driver (the command line and the pipeline it builds) never imports torch or transformers: only the
    actors need them, and importing them took the driver about 8 s on two cores before it could start Ray."""
    code = (
        "import sys, jobs.generate, pipeline.build; "
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert process.stdout.strip() == "[]", process.stdout + process.stderr
