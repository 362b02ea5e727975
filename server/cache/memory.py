"""``MemoryStore``: an adapter source over adapters already in memory (name ->
``LoadedAdapter``), for embedding the engine (benchmarks, notebooks, tests) without a
registry. The second implementation of :class:`~adapterctl.server.types.AdapterSource`
beside :class:`~adapterctl.server.cache.store.AdapterStore`; it has no tiers to fill or
evict, so pin/unpin/unload only track state and aliases never move."""
from __future__ import annotations

from typing import Mapping

from adapterctl.errors import NotFound
from adapterctl.refs import parse_ref
from adapterctl.server.cache.loaded import LoadedAdapter
from adapterctl.server.types import AdapterStatus, ServedAdapter


class MemoryStore:
    """Every reference to ``NAME`` (any version, alias or digest) resolves to the one
    adapter held under that name; unknown names are NotFound."""

    def __init__(self, adapters: Mapping[str, LoadedAdapter]) -> None:
        self.adapters = dict(adapters)
        self.gets = 0  # get() calls, for tests of the engine's fetch path
        self._pinned: set[str] = set()

    async def resolve(self, ref: str, routing_key: str = "") -> ServedAdapter:
        name = parse_ref(ref).name
        if name not in self.adapters:
            raise NotFound(f"adapter {name!r} not found")
        return self.adapters[name].served

    def route_role(self, ref: str, served: ServedAdapter) -> str:
        return ""  # no aliases, so no canaries

    async def get(self, served: ServedAdapter) -> LoadedAdapter:
        self.gets += 1
        return self.adapters[served.name]

    async def pin(self, served: ServedAdapter) -> LoadedAdapter:
        self._pinned.add(served.digest)
        return await self.get(served)

    def unpin(self, served: ServedAdapter) -> None:
        self._pinned.discard(served.digest)

    def unload(self, served: ServedAdapter) -> bool:
        return False  # nothing to drop: the caller owns these weights

    async def status(self, name: str | None = None, include_registry: bool = False) -> list[AdapterStatus]:
        rows = [AdapterStatus(a.served.name, a.served.version, a.served.digest, "host", a.served.digest in self._pinned,
                              a.nbytes, a.rank) for a in self.adapters.values() if name in (None, a.served.name)]
        return sorted(rows, key=lambda r: (r.name, r.version))

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        return []

    def close(self) -> None:
        pass
