"""Reference -> manifest resolution for the server: immutable refs (version, digest)
cached for good, aliases (``latest``, ``prod``) cached for a refresh interval and
re-resolved together by :meth:`RefResolver.refresh` (hot reload after a promote)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from adapterctl.errors import NotFound, Unavailable
from adapterctl.refs import LATEST, AdapterRef, parse_ref
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import ServedAdapter

if TYPE_CHECKING:
    from adapterctl.registry import Manifest, RegistryReader

log = logging.getLogger(__name__)


@dataclass
class _AliasEntry:
    manifest: "Manifest"
    resolved_at: float


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

    def cached(self, ref: str | AdapterRef) -> "Manifest | None":
        """The answer :meth:`resolve` would give without any registry call, or None
        (unknown or alias due for refresh). Never blocks: safe on the event loop."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest is not None:
            return self._by_digest.get(parsed.digest)
        if parsed.version is not None:
            digest = self._by_version.get((parsed.name, parsed.version))
            return self._by_digest.get(digest) if digest else None
        entry = self._aliases.get((parsed.name, parsed.alias or LATEST))
        if entry is not None and self._clock() - entry.resolved_at < self._refresh_seconds:
            return entry.manifest
        return None

    def resolve(self, ref: str | AdapterRef) -> "Manifest":
        """The manifest ``ref`` names now. NotFound / Unavailable / InvalidArgument."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest is not None:
            return self._immutable(parsed, self._by_digest.get(parsed.digest))
        if parsed.version is not None:
            digest = self._by_version.get((parsed.name, parsed.version))
            return self._immutable(parsed, self._by_digest.get(digest) if digest else None)
        key = (parsed.name, parsed.alias or LATEST)
        entry = self._aliases.get(key)
        if entry is not None and self._clock() - entry.resolved_at < self._refresh_seconds:
            return entry.manifest
        try:
            manifest = self._fetch(parsed)
        except Unavailable as exc:
            if entry is None:
                raise
            log.warning(
                "registry unreachable; serving %s:%s as version %d (stale): %s", *key, entry.manifest.version, exc
            )
            return entry.manifest
        except NotFound:
            self._aliases.pop(key)
            raise
        if entry is not None and entry.manifest.digest != manifest.digest:
            log.info("alias %s:%s moved from version %d to %d", *key, entry.manifest.version, manifest.version)
        self._aliases.put(key, _AliasEntry(manifest, self._clock()))
        return manifest

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
                    manifest = self._fetch(ref)
                except Unavailable as exc:
                    log.warning(
                        "alias refresh of %s:%s failed, keeping version %d: %s",
                        name,
                        alias,
                        entry.manifest.version,
                        exc,
                    )
                    continue
                except NotFound:
                    log.info("alias %s:%s no longer exists; forgetting it", name, alias)
                    self._aliases.pop((name, alias))
                    continue
                if manifest.digest != entry.manifest.digest:
                    changes.append((name, alias, entry.manifest.version, manifest.version))
                    log.info(
                        "alias %s:%s moved from version %d to %d", name, alias, entry.manifest.version, manifest.version
                    )
                self._aliases.put((name, alias), _AliasEntry(manifest, self._clock()))
        return changes

    def aliases_of(self, name: str, version: int) -> tuple[str, ...]:
        """Cached aliases that currently point at ``name:version`` (sorted)."""
        return tuple(sorted(a for (n, a), e in self._aliases.items() if n == name and e.manifest.version == version))

    def _immutable(self, ref: AdapterRef, cached: "Manifest | None") -> "Manifest":
        if cached is not None:
            return cached
        return self._fetch(ref)

    def _fetch(self, ref: AdapterRef) -> "Manifest":
        manifest = self._reader.resolve(ref)
        if manifest.name != ref.name or (ref.digest is not None and manifest.digest != ref.digest):
            raise NotFound(f"registry answered {manifest.name}@{manifest.digest} for {ref}")
        self._by_digest.put(manifest.digest, manifest)
        self._by_version.put((manifest.name, manifest.version), manifest.digest)
        return manifest
