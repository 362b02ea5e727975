"""Every ``make`` target the README (or BENCHMARKS.md) names has a recipe: a documented
command that prints "Nothing to be done" or "No rule" is a lost target."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md")


def _documented_targets() -> set[str]:
    text = "\n".join((ROOT / name).read_text() for name in DOCS if (ROOT / name).exists())
    return set(re.findall(r"\bmake ([a-z][a-z0-9_-]*)", text))


def _recipes() -> set[str]:
    """Targets with at least one command line in the Makefile (make's own database)."""
    out = subprocess.run(["make", "-pnq", "-f", "Makefile", "-C", str(ROOT), "__no_such_target__"],
                         capture_output=True, text=True, timeout=60).stdout
    targets, current = set(), None
    for line in out.splitlines():
        m = re.match(r"^([a-zA-Z0-9_.-]+):", line)
        if m:
            current = m.group(1)
        elif line.startswith("\t") and current:
            targets.add(current)
        elif not line.strip():
            current = None
    return targets


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_every_documented_make_target_has_a_recipe():
    documented = _documented_targets()
    assert {"demo", "test"} <= documented, "the README must show make demo and make test"
    missing = sorted(documented - _recipes())
    assert not missing, f"documented but without a recipe in the Makefile: {missing}"
