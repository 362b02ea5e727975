"""The registry's adapters as ``ListAdapters`` rows (tier "registry"), listed on one
thread of its own and shared between concurrent callers.

A listing costs a few registry round trips per adapter name (versions, manifests,
aliases): seconds for a few hundred names on S3. Without sharing, every concurrent
``GET /v1/models`` or ``ListAdapters`` ran its own listing on the event loop's default
executor, and a burst of them occupied all its threads, so the alias resolutions that
requests need queued behind them (found by ``make reliability``'s HTTP fuzz: 124
requests stuck, ``/v1/models`` over 60 s). Now listings run on a dedicated thread, and
a caller is answered by the first listing that *started after it asked* (so it never
sees a registry older than its own request) — a burst costs one or two listings.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING

from adapterctl.server.types import AdapterStatus

if TYPE_CHECKING:
    from adapterctl.registry import RegistryReader


class RegistryListing:
    """``await rows(name)``: every registry version of ``name`` (all names when None)."""

    def __init__(self, reader: "RegistryReader") -> None:
        self._reader = reader
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry-list")
        self._lock = threading.Lock()
        self._latest: dict[str | None, tuple[int, list[AdapterStatus]]] = {}  # name -> (listing number, rows)
        self.listings = 0  # listings started so far (numbered 1, 2, ...); the other calls were shared

    async def rows(self, name: str | None) -> list[AdapterStatus]:
        with self._lock:
            asked = self.listings  # any listing numbered above this one started after this call
        loop = asyncio.get_running_loop()
        return list(await loop.run_in_executor(self._executor, self._rows_since, name, asked))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _rows_since(self, name: str | None, asked: int) -> list[AdapterStatus]:
        """On the listing thread: rows of a listing numbered above ``asked``, run now if none."""
        with self._lock:
            hit = self._latest.get(name)
            if hit is not None and hit[0] > asked:
                return hit[1]
            self.listings += 1
            number = self.listings
        rows = self._list(name)
        with self._lock:
            if len(self._latest) > 256:  # names asked for one by one: keep the map small
                self._latest.clear()
            self._latest[name] = (number, rows)
        return rows

    def _list(self, name: str | None) -> list[AdapterStatus]:
        rows = []
        for adapter in [name] if name else self._reader.list_names():
            versions = self._reader.list_versions(adapter)
            by_version: dict[int, list[str]] = {}
            for alias, version in self._reader.aliases(adapter).items():
                by_version.setdefault(version, []).append(alias)
            if versions:
                by_version.setdefault(versions[-1].version, []).append("latest")
            for m in versions:
                rank = int((m.lora or {}).get("rank") or 0)
                aliases = tuple(sorted(set(by_version.get(m.version, ()))))
                rows.append(AdapterStatus(m.name, m.version, m.digest, "registry", bytes=m.total_bytes, rank=rank,
                                          aliases=aliases))
        return rows
