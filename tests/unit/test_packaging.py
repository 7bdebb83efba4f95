"""Packaging: torch as a range that the Makefile's CPU wheel satisfies, every imported dependency declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rlhf", "tasks", "flows", "models")


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def test_torch_is_a_range_the_makefiles_cpu_wheel_satisfies_and_is_installed_first():
    torch = declared()["torch"]
    assert not any(s.operator in ("==", "===") for s in torch.specifier), torch  # a CUDA torch already there is kept
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M)
    assert pin and torch.specifier.contains(pin.group(1)), "the Makefile's torch must satisfy pyproject's range"
    recipe = makefile[makefile.index("$(VENV)/.installed:") :]
    assert recipe.index('pip install --quiet "$(TORCH)"') < recipe.index('pip install --quiet -e ".[test]"')


def test_every_third_party_import_of_the_package_is_declared():
    modules: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}
    dists = packages_distributions()
    names = set(declared())
    undeclared = {m for m in third_party if not {canonicalize_name(d) for d in dists.get(m, [m])} & names}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {sorted(undeclared)}"
