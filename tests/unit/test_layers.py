"""The import rules of pyproject.toml ([tool.importlinter]) hold, and they catch a deliberate upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("rlhf", "tasks", "flows", "models")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the packages under ``root`` (its pyproject.toml's contracts)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(dst: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_build(tmp_path) -> None:
    root = copy_tree(tmp_path)
    tiny = root / "models" / "tiny.py"
    tiny.write_text(tiny.read_text() + "\nfrom rlhf.config import PipelineConfig  # deliberate: models/ -> rlhf/\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "models.tiny -> rlhf.config" in result.stdout


def test_the_library_may_not_reach_the_builtin_task(tmp_path) -> None:
    root = copy_tree(tmp_path)
    stats = root / "rlhf" / "drift" / "stats.py"
    stats.write_text(stats.read_text() + "\nfrom rlhf.builtin import support  # deliberate: library -> demo task\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "rlhf.drift.stats -> rlhf.builtin" in result.stdout
