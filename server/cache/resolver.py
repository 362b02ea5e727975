"""Reference -> manifest resolution for the server: immutable refs (version, digest)
cached for good, aliases (``latest``, ``prod``) cached for a refresh interval and
re-resolved together by :meth:`RefResolver.refresh` (hot reload after a promote).

A weighted alias (a primary plus a canary taking ``weight`` percent) is resolved
per request: with a routing key, the canary serves iff
``canary_bucket(NAME:ALIAS, key) < weight``, a stable sha256-based point in
[0, 100) -- so one key always gets the same version while the weight stands, and
raising the weight only moves keys from primary to canary; without a key the
choice is random per request."""
from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable

from adapterctl.errors import NotFound, Unavailable
from adapterctl.refs import LATEST, AdapterRef, parse_ref
from adapterctl.server.cache.flight import SingleFlight
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import ServedAdapter

if TYPE_CHECKING:
    from adapterctl.registry import Manifest, RegistryReader

log = logging.getLogger(__name__)


def canary_bucket(alias: str, routing_key: str) -> float:
    """Where ``routing_key`` falls for ``alias`` (``NAME:ALIAS``), in [0, 100): the first
    8 bytes of sha256(alias NUL key) as a fraction (stable across processes and
    hosts, unlike ``hash()``); a random point when the key is empty."""
    if not routing_key:
        return random.random() * 100.0
    digest = hashlib.sha256(f"{alias}\0{routing_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * 100.0


@dataclass
class _AliasEntry:
    manifest: "Manifest"  # the primary
    resolved_at: float
    canary: "Manifest | None" = None
    weight: float = 0.0  # percent of traffic to the canary

    def pick(self, alias: str, routing_key: str) -> "Manifest":
        if self.canary is not None and canary_bucket(alias, routing_key) < self.weight:
            return self.canary
        return self.manifest

    def targets(self) -> tuple:
        return (self.manifest.digest, self.canary.digest if self.canary else None, self.weight)

    def describe(self) -> str:
        if self.canary is None:
            return f"version {self.manifest.version}"
        return f"version {self.manifest.version} + canary {self.canary.version} at {self.weight:g}%"


def served_of(manifest: "Manifest") -> ServedAdapter:
    return ServedAdapter(manifest.name, manifest.version, manifest.digest)


class RefResolver:
    """Blocking (call from a worker thread); thread-safe.

    * ``NAME:VERSION`` and ``NAME@sha256:…`` never change: cached (bounded LRU).
    * ``NAME`` / ``NAME:ALIAS`` are re-resolved when older than ``refresh_seconds``;
      if the registry is unreachable then, the last answer is served (stale-if-error)
      and a warning logged, so a registry outage does not stop serving known aliases.
    """

    def __init__(
        self,
        reader: "RegistryReader",
        refresh_seconds: float,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._by_digest: LRUCache[str, "Manifest"] = LRUCache(max_items=max_entries)
        self._by_version: LRUCache[tuple[str, int], str] = LRUCache(max_items=max_entries)
        self._aliases: LRUCache[tuple[str, str], _AliasEntry] = LRUCache(max_items=max_entries)
        self._refresh_lock = threading.Lock()
        # concurrent misses on one ref share one registry read and its answer or error: N requests
        # hitting a cold (or just expired) alias at once cost one list + get, not N. Keyed by an
        # alias's (name, alias), else by the ref.
        self._reads: SingleFlight[Hashable, Any] = SingleFlight()

    def cached(self, ref: str | AdapterRef, routing_key: str = "") -> "Manifest | None":
        """The answer :meth:`resolve` would give without any registry call, or None
        (unknown or alias due for refresh). Never blocks: safe on the event loop."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest is not None:
            return self._by_digest.get(parsed.digest)
        if parsed.version is not None:
            digest = self._by_version.get((parsed.name, parsed.version))
            return self._by_digest.get(digest) if digest else None
        key = (parsed.name, parsed.alias or LATEST)
        entry = self._aliases.get(key)
        if entry is not None and self._clock() - entry.resolved_at < self._refresh_seconds:
            return entry.pick("%s:%s" % key, routing_key)
        return None

    def resolve(self, ref: str | AdapterRef, routing_key: str = "") -> "Manifest":
        """The manifest ``ref`` names now (for a weighted alias: the version
        ``routing_key`` is routed to). NotFound / Unavailable / InvalidArgument."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest is not None:
            return self._immutable(parsed, self._by_digest.get(parsed.digest))
        if parsed.version is not None:
            digest = self._by_version.get((parsed.name, parsed.version))
            return self._immutable(parsed, self._by_digest.get(digest) if digest else None)
        key = (parsed.name, parsed.alias or LATEST)
        entry = self._aliases.get(key)
        if entry is not None and self._clock() - entry.resolved_at < self._refresh_seconds:
            return entry.pick("%s:%s" % key, routing_key)
        try:
            fresh, read = self._reads.do(key, lambda: self._fetch_alias(parsed))
        except Unavailable as exc:
            if entry is None:
                raise
            log.warning("registry unreachable; serving %s:%s as %s (stale): %s", *key, entry.describe(), exc)
            return entry.pick("%s:%s" % key, routing_key)
        except NotFound:
            self._aliases.pop(key)
            raise
        if read:  # the caller that read the registry records the answer, once
            if entry is not None and entry.targets() != fresh.targets():
                log.info("alias %s:%s moved from %s to %s", *key, entry.describe(), fresh.describe())
            self._aliases.put(key, fresh)
        return fresh.pick("%s:%s" % key, routing_key)

    def manifest_for(self, served: ServedAdapter) -> "Manifest":
        """The manifest of exactly ``served`` (by digest)."""
        return self.resolve(AdapterRef(served.name, digest=served.digest))

    def refresh(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve every cached alias now; returns ``(name, alias, old, new)`` for
        those that moved. Unreachable -> keep the old answer; deleted -> forget it."""
        changes: list[tuple[str, str, int, int]] = []
        with self._refresh_lock:
            for (name, alias), entry in self._aliases.items():
                ref = AdapterRef(name, alias=None if alias == LATEST else alias)
                try:
                    fresh = self._fetch_alias(ref)
                except Unavailable as exc:
                    log.warning("alias refresh of %s:%s failed, keeping %s: %s", name, alias, entry.describe(), exc)
                    continue
                except NotFound:
                    log.info("alias %s:%s no longer exists; forgetting it", name, alias)
                    self._aliases.pop((name, alias))
                    continue
                if fresh.targets() != entry.targets():  # a canary change reports primary -> primary
                    changes.append((name, alias, entry.manifest.version, fresh.manifest.version))
                    log.info("alias %s:%s moved from %s to %s", name, alias, entry.describe(), fresh.describe())
                self._aliases.put((name, alias), fresh)
        return changes

    def aliases_of(self, name: str, version: int) -> tuple[str, ...]:
        """Cached aliases that currently route to ``name:version``, as primary or canary (sorted)."""
        return tuple(sorted(a for (n, a), e in self._aliases.items() if n == name and (
            e.manifest.version == version or (e.canary is not None and e.canary.version == version))))

    def route_role(self, ref: str | AdapterRef, version: int) -> str:
        """``canary`` when ``version`` is the canary of the cached alias ``ref``,
        ``primary`` when it is its primary, "" otherwise (not an alias, not cached)."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.alias is None or parsed.version is not None or parsed.digest is not None:
            return ""
        entry = self._aliases.peek((parsed.name, parsed.alias))
        if entry is None:
            return ""
        if entry.canary is not None and entry.canary.version == version:
            return "canary"
        return "primary" if entry.manifest.version == version else ""

    def _immutable(self, ref: AdapterRef, cached: "Manifest | None") -> "Manifest":
        if cached is not None:
            return cached
        return self._reads.do(ref, lambda: self._fetch(ref))[0]

    def waiting(self, ref: str | AdapterRef) -> int:
        """Threads blocked on a registry read of ``ref`` that another thread is running."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest is None and parsed.version is None:
            return self._reads.waiters((parsed.name, parsed.alias or LATEST))
        return self._reads.waiters(parsed)

    def _fetch_alias(self, ref: AdapterRef) -> _AliasEntry:
        """Primary and canary of an alias from one registry read; readers without
        ``resolve_route`` (no weighted aliases) give the primary only."""
        route = getattr(self._reader, "resolve_route", None)
        if ref.is_latest or route is None:
            return _AliasEntry(self._fetch(ref), self._clock())
        found = route(ref)
        canary = self._remember(ref, found.canary) if found.canary is not None else None
        return _AliasEntry(self._remember(ref, found.primary), self._clock(), canary, found.weight if canary else 0.0)

    def _fetch(self, ref: AdapterRef) -> "Manifest":
        return self._remember(ref, self._reader.resolve(ref))

    def _remember(self, ref: AdapterRef, manifest: "Manifest") -> "Manifest":
        if manifest.name != ref.name or (ref.digest is not None and manifest.digest != ref.digest):
            raise NotFound(f"registry answered {manifest.name}@{manifest.digest} for {ref}")
        self._by_digest.put(manifest.digest, manifest)
        self._by_version.put((manifest.name, manifest.version), manifest.digest)
        return manifest
