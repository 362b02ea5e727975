"""Removal: delete a version (leaving a tombstone) and collect unreferenced blobs.

gc lists blobs first and manifests second, so any manifest written before the
manifest listing protects its blobs; blobs younger than the grace period are
kept because an in-flight publish may not have written its manifest yet
(publish refreshes the modification time of blobs it reuses for the same reason).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from adapterctl.errors import FailedPrecondition, NotFound
from adapterctl.registry import layout
from adapterctl.registry.aliases import Aliases
from adapterctl.registry.manifest import Tombstone, tombstone_bytes
from adapterctl.registry.versions import Versions

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 3600


@dataclass
class GcReport:
    """What gc removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    deleted: list[str] = field(default_factory=list)  # blob digests
    freed_bytes: int = 0
    kept_recent: list[str] = field(default_factory=list)  # unreferenced but inside the grace period
    referenced: int = 0  # blobs still used by some version
    purged_incomplete: int = 0  # interrupted uploads / temp files removed


def delete_version(versions: Versions, aliases: Aliases, name: str, version: int, force: bool = False) -> None:
    """Replace ``name:version``'s manifest by a tombstone (the number stays taken);
    refused while an alias points at it unless ``force``."""
    item, etag = versions.read_any(name, version)
    if isinstance(item, Tombstone):
        raise NotFound(f"{name}:{version} was already deleted ({item.deleted})")
    pointing = sorted(a for a, state in aliases.states(name).items() if version in state.versions())
    if pointing and not force:
        raise FailedPrecondition(
            f"{name}:{version} is the target of alias {', '.join(pointing)} (primary or canary); "
            "promote another version first or pass --force"
        )
    deleted = datetime.now(timezone.utc).isoformat(timespec="seconds")
    versions.store.put_if_match(layout.version_key(name, version), tombstone_bytes(item, deleted), etag)
    versions.store.delete(layout.digest_key(name, item.digest))
    log.info("deleted %s (aliases left dangling: %s)", item.ref, pointing or "none")


def collect_garbage(
    versions: Versions, grace_seconds: float = DEFAULT_GRACE_SECONDS, dry_run: bool = False
) -> GcReport:
    """Delete blobs that no live manifest references and that are older than
    ``grace_seconds`` (by the store's modification time)."""
    store = versions.store
    cutoff = time.time() - grace_seconds
    blobs = list(store.list(layout.BLOBS))  # before the manifests: see the module docstring
    used = {f.digest for m in versions.all_live() for f in m.files}
    report = GcReport(dry_run=dry_run)
    for blob in blobs:
        digest = layout.digest_of_blob_key(blob.key)
        if digest in used:
            report.referenced += 1
            continue
        try:  # re-check just before deleting: a publish may have reused the blob meanwhile
            recent = blob.last_modified > cutoff or store.head(blob.key).last_modified > cutoff
        except NotFound:
            continue
        if recent:
            report.kept_recent.append(digest)
            continue
        if not dry_run:
            store.delete(blob.key)
        report.deleted.append(digest)
        report.freed_bytes += blob.size
    if not dry_run:
        report.purged_incomplete = store.purge_incomplete(cutoff)
    log.info("gc%s: %d blobs deleted (%d bytes), %d kept in grace period, %d referenced",
             " (dry run)" if dry_run else "", len(report.deleted), report.freed_bytes,
             len(report.kept_recent), report.referenced)
    return report

