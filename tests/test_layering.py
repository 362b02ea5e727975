"""Import boundaries between layers, checked from the source with ast.

registry knows nothing of gRPC, models or training; trainer may use the registry;
server may use the registry's read API but never a backend module directly;
client imports server/trainer only lazily (inside functions). Inside the server, the
shared modules (``types``, ``lru``, ``textstream``, ``omp``) import no other server module, and
``cache/`` and ``engine/`` import only those and themselves, never each other: the
composition root (``build.py``) and the modules above it wire them together.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "adapterctl", "registry": "adapterctl.registry", "trainer": "adapterctl.trainer",
           "server": "adapterctl.server", "client": "adapterctl.client"}
FORBIDDEN = {
    "core": ("adapterctl.registry", "adapterctl.trainer", "adapterctl.server", "adapterctl.client", "grpc"),
    "registry": (
        "adapterctl.trainer",
        "adapterctl.server",
        "adapterctl.client",
        "adapterctl.v1",
        "grpc",
        "torch",
        "transformers",
        "peft",
    ),
    "trainer": ("adapterctl.server", "adapterctl.client", "adapterctl.v1", "grpc"),
    "server": ("adapterctl.trainer", "adapterctl.client", "adapterctl.registry.s3", "adapterctl.registry.local"),
    "client": (),
}
# Module-level imports the client may not make (lazy imports inside functions are fine).
CLIENT_TOP_LEVEL_FORBIDDEN = ("adapterctl.server", "adapterctl.trainer", "torch", "transformers")


def _imports(tree: ast.AST, top_level_only: bool = False):
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _violations(folder: str, forbidden, top_level_only=False):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imports(tree, top_level_only):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_layers_respect_boundaries():
    bad = [v for folder, forbidden in FORBIDDEN.items() for v in _violations(folder, forbidden)]
    assert not bad, "\n".join(bad)


def test_client_imports_heavy_layers_only_lazily():
    bad = _violations("client", CLIENT_TOP_LEVEL_FORBIDDEN, top_level_only=True)
    assert not bad, "\n".join(bad)


SERVER_SHARED = ("adapterctl.server.types", "adapterctl.server.lru", "adapterctl.server.textstream",
                 "adapterctl.server.omp")


def _server_violations() -> list[str]:
    bad = []
    for path in (ROOT / "server").rglob("*.py"):
        rel = path.relative_to(ROOT / "server")
        module = "adapterctl.server." + ".".join(rel.with_suffix("").parts)
        if module in SERVER_SHARED:
            allowed: tuple[str, ...] = ()
        elif rel.parts[0] in ("cache", "engine"):
            allowed = (*SERVER_SHARED, f"adapterctl.server.{rel.parts[0]}")
        else:
            continue  # the top: config, build, app, servicer, ... may use everything below
        for name in _imports(ast.parse(path.read_text(), filename=str(path))):
            if name.startswith("adapterctl.server.") and not any(name == a or name.startswith(a + ".")
                                                                 for a in allowed):
                bad.append(f"server/{rel} imports {name}")
    return bad


def test_server_shared_types_below_cache_and_engine():
    bad = _server_violations()
    assert not bad, "\n".join(bad)
