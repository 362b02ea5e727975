"""Static checks that keep the code base as it is: ruff (lint + import order + the 120-column
limit) and mypy, both configured in pyproject.toml, on every package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in this environment (it is a test dependency in pyproject.toml)")
    return str(path)


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr


def _namespace_tree(dest: Path) -> Path:
    """``dest/adapterctl`` laid out as the installed namespace (setup.py's folder mapping) with
    symlinks, so mypy sees ``adapterctl.server`` where the source says ``server/``."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ROOTS")
    pkg = dest / "adapterctl"
    pkg.mkdir(parents=True)
    for item in (ROOT / roots["adapterctl"]).iterdir():
        (pkg / item.name).symlink_to(item)
    for name, folder in roots.items():
        if name != "adapterctl":
            (pkg / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return dest


def test_mypy_is_clean(tmp_path):
    tree = _namespace_tree(tmp_path / "src")
    proc = subprocess.run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                           str(tmp_path / "cache"), "-p", "adapterctl"], cwd=tree, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr
