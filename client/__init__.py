"""Python clients for the adapterctl gRPC API and the adapterctl CLI.

``from adapterctl.client import Client, AsyncClient`` (imported lazily, so the CLI
does not load gRPC for commands that do not need it).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "adapterctl.client.client", "GenerationStream": "adapterctl.client.client",
    "AsyncClient": "adapterctl.client.aio", "AsyncGenerationStream": "adapterctl.client.aio",
    **{name: "adapterctl.client.types" for name in (
        "Connection", "GenerateResult", "Chunk", "Message", "ServedAdapter", "AdapterInfo", "AliasChange",
        "DeadlineExceeded", "RpcFailed")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adapterctl.client' has no attribute {name!r}")
