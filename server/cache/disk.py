"""The disk tier: verified registry pulls kept as plain PEFT dirs under
``<cache_dir>/<digest-hex>/``, budgeted in bytes, least recently used removed."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from adapterctl.errors import IntegrityError, NotFound, ResourceExhausted
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import EngineObserver

if TYPE_CHECKING:
    from adapterctl.registry import Manifest, RegistryReader

log = logging.getLogger(__name__)

MARKER = ".adapterctl-cache.json"  # written last inside a pulled dir: name, version, digest, rank
STAGING_PREFIX = ".pull-"
STALE_STAGING_SECONDS = 3600.0
_HEX_DIR = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DiskEntry:
    """One cached adapter version on disk; ``nbytes`` is the sum of its file sizes."""

    path: Path
    name: str
    version: int
    digest: str
    rank: int
    nbytes: int


class DiskTier:
    """Directory LRU over ``root``. Thread-safe, provided checkouts of the same digest
    do not overlap (AdapterStore's single-flight ensures it); one server per directory.

    A ``<hex>`` dir exists only complete: pulls land in a ``.pull-*`` staging dir and
    are renamed in after the registry verified every sha256, so a corrupt or
    interrupted pull never enters the tier. Eviction (``on_evict``) deletes the dir;
    :meth:`checkout` holds a reference so a dir being read is never deleted.
    """

    def __init__(self, root: Path, max_bytes: int | None, observer: EngineObserver, verify: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer = observer
        self._verify = verify
        self.lru: LRUCache[str, DiskEntry] = LRUCache(
            None, max_bytes, sizeof=lambda e: e.nbytes, on_evict=self._evicted
        )
        self._scan()

    @contextlib.contextmanager
    def checkout(self, manifest: "Manifest", reader: "RegistryReader") -> Iterator[tuple[Path, str]]:
        """Yield ``(dir, source)`` holding ``manifest``'s files, ``source`` being "disk"
        (cache hit, re-verified) or "registry" (pulled now). The dir stays until the
        block exits. A hit that fails verification is removed and pulled again."""
        key = _hex(manifest.digest)
        entry = self._acquire(key)
        if entry is not None:
            try:
                if self._intact(entry, manifest):
                    self._observer.on_cache("disk", "hit", manifest.name)
                    yield entry.path, "disk"
                    return
            finally:
                self.lru.release(key)
            log.warning("disk cache copy of %s:%d is corrupt; pulling it again", manifest.name, manifest.version)
            self.lru.pop(key)
        self._observer.on_cache("disk", "miss", manifest.name)
        try:
            staging = Path(tempfile.mkdtemp(dir=self.root, prefix=STAGING_PREFIX))
        except OSError as exc:
            yield from self._uncached(manifest, reader, exc)
            return
        try:
            try:
                pulled = self._pull(manifest, reader, staging / "adapter")
                entry = self._admit(key, manifest, pulled)
            except OSError as exc:  # the tier's filesystem is full or read-only
                shutil.rmtree(staging, ignore_errors=True)
                yield from self._uncached(manifest, reader, exc)
                return
            if entry is None:  # no room on disk: serve from staging, keep nothing
                yield pulled, "registry"
                return
            try:
                yield entry.path, "registry"
            finally:
                self.lru.release(key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def entries(self) -> list[DiskEntry]:
        """Cached versions, least recently used first."""
        return [e for _, e in self.lru.items()]

    def report(self) -> None:
        self._observer.on_residency("disk", len(self.lru), self.lru.nbytes, self.lru.pinned_count)

    # ---- internals ---------------------------------------------------------------
    def _uncached(self, manifest: "Manifest", reader: "RegistryReader", exc: OSError) -> Iterator[tuple[Path, str]]:
        """Serve a pull from a temporary directory outside the unusable tier; cache nothing."""
        log.warning("disk tier %s is unusable (%s); loading %s:%d from the registry without caching it",
                    self.root, exc, manifest.name, manifest.version)
        with tempfile.TemporaryDirectory(prefix="adapterctl-pull-") as tmp:
            yield self._pull(manifest, reader, Path(tmp) / "adapter"), "registry"

    def _acquire(self, key: str) -> DiskEntry | None:
        try:
            entry = self.lru.acquire(key)
        except NotFound:
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path / MARKER)  # recency survives a restart
        return entry

    def _pull(self, manifest: "Manifest", reader: "RegistryReader", dest: Path) -> Path:
        try:
            reader.pull(manifest, dest)
        except NotFound:
            self._observer.on_cache("registry", "miss", manifest.name)
            raise
        self._observer.on_cache("registry", "hit", manifest.name)
        return dest

    def _admit(self, key: str, manifest: "Manifest", pulled: Path) -> DiskEntry | None:
        """Move a verified pull into the tier (acquired); None when it cannot fit."""
        nbytes = sum(p.stat().st_size for p in pulled.rglob("*") if p.is_file())
        rank = int((manifest.lora or {}).get("rank") or 0)
        meta = {"name": manifest.name, "version": manifest.version, "digest": manifest.digest, "rank": rank}
        (pulled / MARKER).write_text(json.dumps(meta))
        entry = DiskEntry(self.root / key, manifest.name, manifest.version, manifest.digest, rank, nbytes)
        try:
            self.lru.put(key, entry, acquire=True)
        except ResourceExhausted as exc:
            log.warning(
                "disk tier cannot hold %s:%d (%s); loading without caching", manifest.name, manifest.version, exc
            )
            return None
        try:
            shutil.rmtree(entry.path, ignore_errors=True)  # a leftover not in the index
            os.replace(pulled, entry.path)
        except OSError:
            self.lru.release(key)
            self.lru.pop(key)
            raise
        self.report()
        return entry

    def _intact(self, entry: DiskEntry, manifest: "Manifest") -> bool:
        if not self._verify:
            return (entry.path / MARKER).is_file()
        for file in manifest.files:
            digest = hashlib.sha256()
            try:
                with (entry.path / file.path).open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
            except OSError:
                return False
            if digest.hexdigest() != _hex(file.digest):
                return False
        return True

    def _evicted(self, key: str, entry: DiskEntry) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)
        self._observer.on_cache("disk", "evict", entry.name)
        self.report()

    def _scan(self) -> None:
        """Index complete dirs left by an earlier run (oldest use first); drop stale staging."""
        found: list[tuple[float, DiskEntry]] = []
        now = time.time()
        for child in self.root.iterdir():
            if child.name.startswith(STAGING_PREFIX):
                if now - child.stat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(child, ignore_errors=True)
                continue
            if child.is_symlink() or not (_HEX_DIR.match(child.name) and (child / MARKER).is_file()):
                continue  # only dirs this tier made (a symlink could point anywhere; eviction deletes)
            try:
                meta = json.loads((child / MARKER).read_text())
                nbytes = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
                entry = DiskEntry(
                    child, meta["name"], int(meta["version"]), meta["digest"], int(meta.get("rank", 0)), nbytes
                )
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable disk cache entry %s: %s", child, exc)
                continue
            found.append(((child / MARKER).stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda item: item[0]):
            with contextlib.suppress(ResourceExhausted):
                self.lru.put(entry.path.name, entry)
        self.report()


def _hex(digest: str) -> str:
    hexpart = digest.split(":", 1)[-1]
    if not _HEX_DIR.match(hexpart):
        raise IntegrityError(f"invalid sha256 digest {digest!r}")
    return hexpart
