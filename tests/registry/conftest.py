"""Registry fixtures: the ``registry`` fixture is parametrized over the local and
S3 (moto over HTTP) backends so every test body runs against both."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # registry_testkit, also for spawned worker processes
    sys.path.insert(0, str(HERE))

from registry_testkit import make_adapter  # noqa: E402


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    return make_adapter(tmp_path / "adapter")


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path) -> str:
    """The same test body against a directory and against the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_registry_uri")


@pytest.fixture
def registry(registry_uri):
    from adapterctl.registry import open_registry

    return open_registry(registry_uri)
