"""AdapterStore: host-RAM LRU (bytes) <- disk tier (bytes) <- registry, with
single-flight loads off the event loop, alias resolution and cache metrics."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from adapterctl.basemodel import BaseModel
from adapterctl.errors import NotFound
from adapterctl.refs import parse_ref, validate_name
from adapterctl.server import omp
from adapterctl.server.cache.config import AdapterStoreConfig
from adapterctl.server.cache.disk import DiskTier
from adapterctl.server.cache.listing import RegistryListing
from adapterctl.server.cache.loaded import LoadedAdapter, check_base_fingerprint, check_lora_config, load_peft_dir
from adapterctl.server.cache.resolver import RefResolver, served_of
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import AdapterStatus, EngineObserver, ServedAdapter

if TYPE_CHECKING:
    from adapterctl.registry import RegistryReader

log = logging.getLogger(__name__)


class AdapterStore:
    """Where the engine gets adapter weights.

    ``resolve(ref)`` turns a reference into an exact :class:`ServedAdapter`;
    ``get(served)`` returns its :class:`LoadedAdapter` from host RAM, else loads it
    from the disk tier, else pulls it from the registry. Concurrent ``get`` calls for
    the same version share one load (single-flight per digest); loads run on a
    thread pool so the event loop never blocks. A failed load caches nothing and the
    next ``get`` tries again. Cache labels passed to the observer are adapter names.
    """

    def __init__(
        self,
        config: AdapterStoreConfig,
        reader: "RegistryReader",
        base: BaseModel,
        observer: EngineObserver | None = None,
        *,
        max_lora_rank: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.max_lora_rank = max_lora_rank  # the engine's limit: adapters above it are refused before a pull
        self._reader = reader
        self._base = base
        self._observer = observer or EngineObserver()
        self._resolver = RefResolver(reader, config.alias_refresh, config.max_cached_refs, clock)
        self._listing = RegistryListing(reader)
        self._host: LRUCache[str, LoadedAdapter] = LRUCache(
            config.host_max_items, config.host_max_bytes, sizeof=lambda a: a.nbytes, on_evict=self._host_evicted
        )
        assert config.cache_dir is not None  # AdapterStoreConfig defaults it
        self._disk = DiskTier(config.cache_dir, config.disk_max_bytes, self._observer, verify=config.verify_disk)
        # serial torch on the load threads: no OpenMP pool beside the decode thread's (server/omp.py)
        self._executor = concurrent.futures.ThreadPoolExecutor(config.load_workers, thread_name_prefix="adapter-load",
                                                               initializer=omp.serial_thread)
        self._inflight: dict[str, concurrent.futures.Future[LoadedAdapter]] = {}
        self._inflight_lock = threading.RLock()
        self._report_host()

    # ---- resolution ----------------------------------------------------------------
    async def resolve(self, ref: str, routing_key: str = "") -> ServedAdapter:
        """The exact version ``ref`` names (aliases cached ``alias_refresh`` seconds; a
        weighted alias routes by ``routing_key``, see resolver.canary_bucket).
        NotFound, InvalidArgument, Unavailable (registry unreachable, nothing cached)."""
        manifest = self._resolver.cached(ref, routing_key)
        if manifest is None:
            manifest = await asyncio.to_thread(self._resolver.resolve, ref, routing_key)
        return served_of(manifest)

    def route_role(self, ref: str, served: ServedAdapter) -> str:
        """``primary`` / ``canary``: the part of alias ``ref`` that ``served`` is; "" if none."""
        return self._resolver.route_role(ref, served.version) if served.name == parse_ref(ref).name else ""

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve every alias in use now; ``(name, alias, old, new)`` per move. The old
        version stays cached and usable by running requests until evicted as unused."""
        return await asyncio.to_thread(self._resolver.refresh)

    # ---- weights -------------------------------------------------------------------
    async def get(self, served: ServedAdapter) -> LoadedAdapter:
        """Host-RAM weights of ``served``, loading them if needed. FailedPrecondition for
        adapters this server cannot serve; NotFound, Unavailable, IntegrityError from
        the registry; ResourceExhausted when pinned adapters fill the host budget."""
        loaded = self._host.get(served.digest)
        if loaded is not None:
            self._observer.on_cache("host", "hit", served.name)
            return loaded
        self._observer.on_cache("host", "miss", served.name)
        # shield: a cancelled waiter must not cancel the load other waiters share.
        return await asyncio.shield(asyncio.wrap_future(self._load_future(served)))

    def peek(self, served: ServedAdapter) -> LoadedAdapter | None:
        """Host-RAM weights if resident (no load, no recency change)."""
        return self._host.peek(served.digest)

    async def pin(self, served: ServedAdapter) -> LoadedAdapter:
        """Load ``served`` and keep it in host RAM until :meth:`unpin`."""
        loaded = await self.get(served)
        try:
            self._host.pin(served.digest)
        except NotFound:  # evicted between the load and the pin
            self._host.put(served.digest, loaded, pin=True)
        self._report_host()
        return loaded

    def unpin(self, served: ServedAdapter) -> None:
        self._host.unpin(served.digest)
        self._report_host()

    def is_pinned(self, served: ServedAdapter) -> bool:
        return self._host.is_pinned(served.digest)

    def unload(self, served: ServedAdapter) -> bool:
        """Drop ``served`` from host RAM (pinned or not; the disk copy stays); False if it
        was not resident. FailedPrecondition while in use."""
        return self._host.pop(served.digest) is not None

    async def status(self, name: str | None = None, include_registry: bool = False) -> list[AdapterStatus]:
        """``ListAdapters`` rows for the host and disk tiers (and, with
        ``include_registry``, every other registry version as tier "registry"),
        sorted by name then version. The engine overlays its "device" rows."""
        if name is not None:
            validate_name(name)
        rows: dict[str, AdapterStatus] = {}
        for digest, loaded in self._host.items():
            s = loaded.served
            if name in (None, s.name):
                rows[digest] = AdapterStatus(
                    s.name, s.version, digest, "host", self._host.is_pinned(digest), loaded.nbytes, loaded.rank,
                    self._host.refcount(digest), self._resolver.aliases_of(s.name, s.version),
                )
        for entry in self._disk.entries():
            if entry.digest not in rows and name in (None, entry.name):
                aliases = self._resolver.aliases_of(entry.name, entry.version)
                rows[entry.digest] = AdapterStatus(
                    entry.name,
                    entry.version,
                    entry.digest,
                    "disk",
                    bytes=entry.nbytes,
                    rank=entry.rank,
                    aliases=aliases,
                )
        if include_registry:
            for row in await self._listing.rows(name):
                if row.digest in rows:  # resident: the registry knows all its aliases
                    rows[row.digest].aliases = row.aliases
                else:
                    rows[row.digest] = row
        return sorted(rows.values(), key=lambda r: (r.name, r.version))

    def close(self) -> None:
        """Stop the load threads (queued loads are cancelled)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._listing.close()

    # ---- internals -----------------------------------------------------------------
    def _load_future(self, served: ServedAdapter) -> concurrent.futures.Future[LoadedAdapter]:
        with self._inflight_lock:
            future = self._inflight.get(served.digest)
            if future is None:
                future = self._executor.submit(self._load, served)
                self._inflight[served.digest] = future
                future.add_done_callback(lambda f, d=served.digest: self._forget(d, f))
            return future

    def _forget(self, digest: str, future: concurrent.futures.Future) -> None:
        with self._inflight_lock:
            if self._inflight.get(digest) is future:
                del self._inflight[digest]

    def _load(self, served: ServedAdapter) -> LoadedAdapter:
        """Worker thread: disk or registry -> validated LoadedAdapter -> host tier."""
        started = time.perf_counter()
        loaded = self._host.peek(served.digest)  # loaded while this task was queued
        if loaded is not None:
            return loaded
        where = f"adapter {served.name}:{served.version}"
        manifest = self._resolver.manifest_for(served)
        fingerprint = (manifest.base_model or {}).get("fingerprint")
        check_lora_config(manifest.lora or {}, self.max_lora_rank, where)
        check_base_fingerprint(fingerprint, self._base, where)
        with self._disk.checkout(manifest, self._reader) as (path, source):
            loaded = load_peft_dir(
                path, self._base, self.max_lora_rank, served=served, expected_fingerprint=fingerprint
            )
        self._host.put(served.digest, loaded)
        seconds = time.perf_counter() - started
        self._observer.on_load(source, seconds, served.name)
        self._report_host()
        log.info(
            "loaded adapter %s:%d from %s in %.1f ms (%d bytes)",
            served.name,
            served.version,
            source,
            seconds * 1e3,
            loaded.nbytes,
        )
        return loaded

    def _host_evicted(self, digest: str, loaded: LoadedAdapter) -> None:
        self._observer.on_cache("host", "evict", loaded.served.name)
        self._report_host()

    def _report_host(self) -> None:
        self._observer.on_residency("host", len(self._host), self._host.nbytes, self._host.pinned_count)
