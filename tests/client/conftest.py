"""Client tests reuse the gRPC test fixtures (model-free echo server, tiny-model server)
from tests/server/grpc/conftest.py, loaded by path (tests have no packages)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_grpc_fixtures", Path(__file__).parents[1] / "server/grpc/conftest.py")
_grpc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_grpc)

make_server = _grpc.make_server
echo_server = _grpc.echo_server
