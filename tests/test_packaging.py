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


def test_wheel_ships_the_chat_template_and_the_kernel_source(tmp_path):
    """A non-editable install (the Docker image's ``pip install /src``) keeps the package data:
    Gemma's chat template and the C sources that cpu_gemv and cpu_fused compile."""
    import shutil
    import zipfile
    from pathlib import Path

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    src.mkdir()  # a clean tree: no stale build/ for setuptools to reuse
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    for folder in ("core", "proto", "registry", "trainer", "server", "client"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("adapterctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"adapterctl/server/engine/gemv_bf16.c", "adapterctl/server/engine/cpu_fused.c"} <= set(names)
    assert any(n.startswith("adapterctl/templates/") and n.endswith(".jinja") for n in names)
