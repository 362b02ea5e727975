"""A client built only from the .proto (grpc_tools.protoc into a temp dir), run in a
subprocess that cannot import the adapterctl package, talks to the server."""
from __future__ import annotations

import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{gen!r}]
    sys.path += {site!r}
    import grpc
    from adapterctl.v1 import adapterctl_pb2 as pb, adapterctl_pb2_grpc as rpc
    import adapterctl
    assert not hasattr(adapterctl, "__version__"), "the real adapterctl package leaked in"
    channel = grpc.insecure_channel({address!r})
    stub = rpc.InferenceStub(channel)
    reply = stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="alpha:1", max_new_tokens=3), timeout=60)
    events = list(stub.GenerateStream(pb.GenerateRequest(prompt="Hello", max_new_tokens=3), timeout=60))
    assert events[-1].WhichOneof("event") == "final" and all(e.HasField("chunk") for e in events[:-1])
    try:
        stub.Generate(pb.GenerateRequest(prompt="Hello", adapter="nosuch"), timeout=60)
    except grpc.RpcError as err:
        code = err.code().name
    admin = rpc.AdminStub(channel).ListAdapters(pb.ListAdaptersRequest(name="alpha"), timeout=60)
    print(reply.adapter.name, reply.adapter.version, reply.usage.completion_tokens, code, len(admin.adapters))
    assert not [m for m in sys.modules if m.startswith("adapterctl.") and not m.startswith("adapterctl.v1")]
""")


def test_client_generated_from_the_proto_alone(server, tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(ROOT / "proto/adapterctl/v1/adapterctl.proto")])
    assert rc == 0
    script = SCRIPT.format(gen=str(tmp_path), site=site.getsitepackages(), address=server.address)
    # -S: no site-packages .pth files, so the editable adapterctl install is invisible; only
    # the generated modules and the site-packages directory itself (grpc, protobuf) are on the path.
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["alpha", "1", "3", "NOT_FOUND", "2"]
