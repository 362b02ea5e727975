"""The committed generated code matches the .proto (regenerated into a temp dir)."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "adapterctl/v1/adapterctl.proto"


def test_generated_code_has_no_drift(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / PROTO)])
    assert rc == 0
    for name in ("adapterctl_pb2.py", "adapterctl_pb2.pyi", "adapterctl_pb2_grpc.py"):
        fresh, committed = tmp_path / "adapterctl/v1" / name, ROOT / "proto/adapterctl/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{name} is stale: run `make proto`"


def test_generated_imports_use_the_package_path():
    text = (ROOT / "proto/adapterctl/v1/adapterctl_pb2_grpc.py").read_text()
    assert "from adapterctl.v1 import adapterctl_pb2" in text
