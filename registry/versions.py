"""Version manifests in a store: claim the next number, read one, many, latest, by digest.

A version key holds a manifest or, after ``delete``, a tombstone; either way
its number is taken for good. Listing reads many manifests in parallel.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from adapterctl.errors import AlreadyExists, Conflict, IntegrityError, NotFound
from adapterctl.registry import layout
from adapterctl.registry.manifest import Manifest, Tombstone, decode_version
from adapterctl.registry.store import ObjectStore

log = logging.getLogger(__name__)

MAX_CLAIM_ATTEMPTS = 100  # each lost race means another publisher took a number
READ_WORKERS = 16


class Versions:
    """Reads and creates version manifests of one store (thread-safe, stateless)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def names(self) -> list[str]:
        return sorted(self.store.list_dirs(layout.ADAPTERS))

    def numbers(self, name: str) -> list[int]:
        """Every taken version number of ``name`` (deleted ones too), ascending."""
        found = (layout.version_of_key(o.key) for o in self.store.list(layout.versions_prefix(name)))
        return sorted(v for v in found if v is not None)

    def read_any(self, name: str, version: int) -> tuple[Manifest | Tombstone, str]:
        """The manifest or tombstone stored for ``name:version`` and its etag."""
        try:
            raw, etag = self.store.get(layout.version_key(name, version))
        except NotFound:
            raise NotFound(f"{name}:{version} not found in registry {self.store.uri}") from None
        item = decode_version(raw)
        if item.name != name or item.version != version:
            raise IntegrityError(f"version key of {name}:{version} holds {item.name}:{item.version}")
        return item, etag

    def read(self, name: str, version: int) -> Manifest:
        item, _ = self.read_any(name, version)
        if isinstance(item, Tombstone):
            raise NotFound(f"{name}:{version} was deleted ({item.deleted})")
        return item

    def read_many(self, name: str, numbers: Iterable[int]) -> list[Manifest]:
        """The live manifests among ``numbers``, in the same order (tombstones and
        versions deleted meanwhile are skipped)."""
        def one(version: int) -> Manifest | None:
            try:
                return self.read(name, version)
            except NotFound:
                return None

        numbers = list(numbers)
        if len(numbers) <= 1:
            found = [one(v) for v in numbers]
        else:
            with ThreadPoolExecutor(min(READ_WORKERS, len(numbers))) as pool:
                found = list(pool.map(one, numbers))
        return [m for m in found if m is not None]

    def live(self, name: str) -> list[Manifest]:
        """Live manifests of ``name`` ascending; NotFound if the name was never published."""
        numbers = self.numbers(name)
        if not numbers:
            raise NotFound(f"adapter {name!r} not found in registry {self.store.uri}")
        return self.read_many(name, numbers)

    def latest(self, name: str) -> Manifest:
        numbers = self.numbers(name)
        for version in reversed(numbers):
            try:
                return self.read(name, version)
            except NotFound:
                continue
        what = "has no live versions" if numbers else "not found"
        raise NotFound(f"adapter {name!r} {what} in registry {self.store.uri}")

    def by_digest(self, name: str, digest: str) -> Manifest:
        """Via the digest index when it is there and right; otherwise by scanning."""
        try:
            raw, _ = self.store.get(layout.digest_key(name, digest))
            manifest = self.read(name, int(json.loads(raw)["version"]))
            if manifest.digest == digest:
                return manifest
        except (NotFound, ValueError, KeyError, TypeError):
            pass
        for manifest in self.live(name):
            if manifest.digest == digest:
                return manifest
        raise NotFound(f"{name}@{digest} not found in registry {self.store.uri}")

    def claim_next(self, name: str, fields: dict[str, Any]) -> Manifest:
        """Write ``fields`` as the next free version of ``name`` with a create-only
        write; a publisher that loses the race re-lists and tries the next number."""
        for _ in range(MAX_CLAIM_ATTEMPTS):
            numbers = self.numbers(name)
            version = (numbers[-1] if numbers else 0) + 1
            manifest, raw = Manifest.build({**fields, "name": name, "version": version})
            try:
                self.store.put_if_absent(layout.version_key(name, version), raw)
            except AlreadyExists:
                log.debug("version %s:%d taken by a concurrent publish; retrying", name, version)
                continue
            self._index_digest(manifest)
            return manifest
        raise Conflict(f"could not claim a version number for {name!r} after {MAX_CLAIM_ATTEMPTS} attempts")

    def all_live(self) -> list[Manifest]:
        """Every live manifest of every name (for gc)."""
        return [m for name in self.names() for m in self.read_many(name, self.numbers(name))]

    def _index_digest(self, manifest: Manifest) -> None:
        """Best effort: the version is already published; by_digest falls back to a scan."""
        try:
            self.store.put(
                layout.digest_key(manifest.name, manifest.digest), json.dumps({"version": manifest.version}).encode()
            )
        except Exception as exc:  # noqa: BLE001 - never fail a publish that already happened
            log.warning("could not index digest of %s: %s", manifest.ref, exc)
