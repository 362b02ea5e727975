"""The project installs as one namespace, adapterctl.*, with no generic top-level names."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    # A clean interpreter in a neutral cwd, so the repo root is not on sys.path.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_namespace_imports_and_generic_names_do_not(tmp_path):
    ok = _run(
        "import adapterctl, adapterctl.server, adapterctl.registry, adapterctl.trainer, "
        "adapterctl.client, adapterctl.v1.adapterctl_pb2; print(adapterctl.__version__)",
        tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    for generic in ("server", "registry", "trainer", "client", "core", "v1"):
        res = _run(f"import {generic}", tmp_path)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, generic


def test_console_script_runs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "adapterctl.client.cli.main", "--version"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "adapterctl" in res.stdout
