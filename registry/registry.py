"""The registry API: publish, resolve, pull, list, aliases, delete, gc — over any ObjectStore.

Publish order is what makes it safe: validate everything, upload blobs, then
write the manifest last with a create-only write. Readers therefore see a
version completely or not at all.
"""
from __future__ import annotations

import getpass
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from adapterctl import __version__
from adapterctl.errors import NotFound
from adapterctl.refs import AdapterRef, parse_ref, validate_name
from adapterctl.registry.aliases import Aliases, AliasState
from adapterctl.registry.gc import DEFAULT_GRACE_SECONDS, GcReport, collect_garbage, delete_version
from adapterctl.registry.labels import Labels
from adapterctl.registry.manifest import Manifest
from adapterctl.registry.store import ObjectStore
from adapterctl.registry.transfer import pull_files, upload_blobs
from adapterctl.registry.validate import validate_adapter, validate_labels
from adapterctl.registry.versions import Versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where a reference sends traffic: ``primary``, and ``canary`` for ``weight``
    percent of it (None / 0 for anything but a weighted alias)."""

    primary: Manifest
    canary: Manifest | None = None
    weight: float = 0.0


@runtime_checkable
class RegistryReader(Protocol):
    """The read side the server depends on (never a backend module)."""

    def resolve(self, ref: str | AdapterRef) -> Manifest: ...

    def pull(self, ref_or_manifest: str | AdapterRef | Manifest, dest: Path, *, progress: bool = False) -> Path: ...

    def list_names(self) -> list[str]: ...

    def list_versions(self, name: str) -> list[Manifest]: ...

    def aliases(self, name: str) -> dict[str, int]: ...

    def resolve_route(self, ref: str | AdapterRef) -> Route: ...


class Registry:
    """A registry over ``store``. ``quiet`` turns progress bars off by default;
    ``progress=True`` on a call turns them on (they still need a TTY on stderr)."""

    def __init__(self, store: ObjectStore, *, quiet: bool = True) -> None:
        self.store = store
        self.quiet = quiet
        self._versions = Versions(store)
        self._aliases = Aliases(self._versions)
        self._labels = Labels(self._versions)

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # -- write ---------------------------------------------------------------
    def publish(
        self,
        adapter_dir: Path,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        base_model: str | None = None,
        progress: bool = False,
    ) -> Manifest:
        """Store ``adapter_dir`` as the next integer version of ``name``.

        Refuses (InvalidArgument / FailedPrecondition / NotFound) before writing
        anything when the directory, its config, tensors or base model do not check out.
        """
        validate_name(name)
        labels = validate_labels(labels)
        show = self._show(progress)
        adapter = validate_adapter(Path(adapter_dir), base_model, progress=show)
        uploaded = upload_blobs(self.store, adapter.files, progress=show)
        fields = {
            "files": [{"path": f.name, "digest": f.digest, "size": f.size} for f in adapter.files],
            "base_model": adapter.base_model,
            "lora": adapter.lora,
            "total_bytes": adapter.total_bytes,
            "training": adapter.training,
            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "publisher": _publisher(),
            "labels": labels,
        }
        manifest = self._versions.claim_next(name, fields)
        log.info("published %s (%s, %d new blobs)", manifest.ref, manifest.digest, uploaded)
        return manifest

    def promote(self, name: str, version: int, alias: str, *, canary: float | None = None) -> int | None:
        """Point ``alias`` at ``name:version`` (compare-and-swap; Conflict if it moved
        concurrently). Returns the previous primary, None for a new alias.

        With ``canary`` (a percentage in (0, 100)) the primary stays and ``name:version``
        gets that share of the traffic instead; without it a canary is dropped."""
        if canary is not None:
            return self._aliases.set_canary(name, int(version), alias, canary, by=_publisher_id()).version
        return self._aliases.promote(name, int(version), alias, by=_publisher_id())

    def rollback(self, name: str, alias: str) -> int:
        """Drop ``alias``'s canary if it has one, else move it back to the version it
        pointed to before; returns the primary now."""
        return self._aliases.rollback(validate_name(name), alias, by=_publisher_id())

    def set_labels(
        self, name: str, version: int, labels: dict[str, str], remove: tuple[str, ...] = ()
    ) -> dict[str, str]:
        """Set (merge) and remove labels of a published version, beside its immutable
        manifest (compare-and-swap); returns every label of the version now."""
        name = validate_name(name)
        self._labels.update(name, int(version), labels, tuple(remove), by=_publisher_id())
        return self.labels(f"{name}:{int(version)}")

    def delete(self, name: str, version: int, force: bool = False) -> None:
        """Delete ``name:version`` (its number is never reused); FailedPrecondition
        while an alias points at it unless ``force``."""
        delete_version(self._versions, self._aliases, validate_name(name), int(version), force=force)

    def gc(self, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> GcReport:
        """Remove blobs no manifest references, older than ``grace_seconds``."""
        return collect_garbage(self._versions, grace_seconds=grace_seconds, dry_run=dry_run)

    # -- read ----------------------------------------------------------------
    def resolve(self, ref: str | AdapterRef) -> Manifest:
        """The manifest ``ref`` names (NAME, NAME:VERSION, NAME:ALIAS, NAME@sha256:...)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.digest is not None:
            return self._versions.by_digest(ref.name, ref.digest)
        if ref.version is not None:
            return self._versions.read(ref.name, ref.version)
        if ref.is_latest:
            return self._versions.latest(ref.name)
        assert ref.alias is not None  # not a digest, a version or latest: an alias
        version = self._aliases.target(ref.name, ref.alias)
        try:
            return self._versions.read(ref.name, version)
        except NotFound as exc:  # forced delete of an aliased version
            raise NotFound(f"{ref} -> {exc}") from None

    def pull(self, ref_or_manifest: str | AdapterRef | Manifest, dest: Path, *, progress: bool = False) -> Path:
        """Write the version as a plain PEFT directory at ``dest`` (absent or empty),
        verifying every sha256; IntegrityError on mismatch, leaving nothing behind."""
        manifest = ref_or_manifest if isinstance(ref_or_manifest, Manifest) else self.resolve(ref_or_manifest)
        return pull_files(self.store, manifest, Path(dest), progress=self._show(progress))

    def list_names(self) -> list[str]:
        return self._versions.names()

    def list_versions(self, name: str) -> list[Manifest]:
        """Live manifests of ``name``, ascending by version (NotFound for an unknown name)."""
        return self._versions.live(validate_name(name))

    def latest_version(self, name: str) -> int | None:
        """The highest version number ever taken for ``name`` (cheap: keys only)."""
        numbers = self._versions.numbers(validate_name(name))
        return numbers[-1] if numbers else None

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: primary version}``."""
        return self._aliases.all(validate_name(name))

    def alias_states(self, name: str) -> dict[str, AliasState]:
        """``{alias: state}``: primary, canary and weight, history."""
        return self._aliases.states(validate_name(name))

    def resolve_route(self, ref: str | AdapterRef) -> Route:
        """The primary and (for a weighted alias) canary manifests ``ref`` sends traffic
        to, from one read of the alias document."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.alias is None or ref.is_latest or ref.version is not None or ref.digest is not None:
            return Route(self.resolve(ref))
        state = self._aliases.state(ref.name, ref.alias)
        try:
            primary = self._versions.read(ref.name, state.version)
        except NotFound as exc:  # forced delete of an aliased version
            raise NotFound(f"{ref} -> {exc}") from None
        canary = None
        if state.canary is not None:
            try:
                canary = self._versions.read(ref.name, state.canary.version)
            except NotFound as exc:  # canary deleted with --force: the primary keeps all traffic
                log.warning("%s: canary %s; routing everything to %s", ref, exc, primary.ref)
        return Route(primary, canary, state.canary.weight if canary else 0.0)

    def labels(self, ref: str | AdapterRef) -> dict[str, str]:
        """Every label of the version ``ref`` names: publish-time ones overlaid with those set since."""
        manifest = self.resolve(ref)
        return self._labels.effective(manifest.name, manifest.version, manifest.labels)

    def _show(self, progress: bool) -> bool:
        return progress or not self.quiet


def _publisher() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = os.environ.get("USER", "unknown")
    return {"user": user, "host": socket.gethostname(), "tool": f"adapterctl/{__version__}"}


def _publisher_id() -> str:
    who = _publisher()
    return f"{who['user']}@{who['host']}"

