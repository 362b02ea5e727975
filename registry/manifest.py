"""Version manifests: what one published adapter version is, and its exact stored bytes.

The manifest digest is ``sha256:`` of the stored bytes, which hold every field
except the digest itself. A deleted version keeps its key as a small tombstone,
so its number is never reused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterctl.errors import IntegrityError

MANIFEST_FORMAT = "adapterctl.manifest/v1"
TOMBSTONE_FORMAT = "adapterctl.tombstone/v1"
# The only files a version may hold; pull refuses any other path in a manifest.
ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapterctl.json", "README.md")


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: ``path`` (a plain file name), ``digest`` ``sha256:<hex>``, ``size`` bytes."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """One immutable adapter version; JSON round-trip via :meth:`to_json` / :meth:`from_json`."""

    name: str
    version: int
    digest: str  # sha256 of the stored manifest bytes
    files: list[FileEntry]
    base_model: dict[str, Any]  # {"id", "fingerprint"}
    lora: dict[str, Any]  # {"rank", "alpha", "use_rslora", "target_modules", "dtype", "use_dora", "modules_to_save"}
    total_bytes: int
    training: dict[str, Any] | None
    created: str  # ISO 8601, UTC
    publisher: dict[str, str]  # {"user", "host", "tool"}
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``NAME:VERSION``."""
        return f"{self.name}:{self.version}"

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        """Every field, digest included (what ``show --json`` prints)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, digest: str | None = None) -> Manifest:
        """Parse :meth:`to_json` output or stored manifest bytes. Without a ``digest``
        field or argument the digest is computed over ``text`` (the stored form)."""
        raw = text.encode() if isinstance(text, str) else text
        data = _loads(raw)
        digest = digest or data.get("digest") or "sha256:" + hashlib.sha256(raw).hexdigest()
        return _from_dict(data, digest)

    @classmethod
    def build(cls, fields: dict[str, Any]) -> tuple[Manifest, bytes]:
        """Encode ``fields`` (everything but the digest) canonically; return the
        manifest and the exact bytes to store."""
        raw = encode({"format": MANIFEST_FORMAT, **fields})
        return cls.from_json(raw), raw


@dataclass(frozen=True)
class Tombstone:
    """What remains of a deleted version: its number stays taken."""

    name: str
    version: int
    digest: str  # of the manifest it replaced
    deleted: str


def encode(data: dict[str, Any]) -> bytes:
    """Canonical stored form: sorted keys, 2-space indent, trailing newline."""
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def decode_version(raw: bytes) -> Manifest | Tombstone:
    """Parse the object stored under a version key."""
    data = _loads(raw)
    if data.get("format") == TOMBSTONE_FORMAT:
        return Tombstone(data["name"], int(data["version"]), data.get("digest", ""), data.get("deleted", ""))
    return _from_dict(data, "sha256:" + hashlib.sha256(raw).hexdigest())


def tombstone_bytes(manifest: Manifest, deleted: str) -> bytes:
    return encode({"format": TOMBSTONE_FORMAT, "name": manifest.name, "version": manifest.version,
                   "digest": manifest.digest, "deleted": deleted})


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"stored manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise IntegrityError("stored manifest is not a JSON object")
    return data


def _from_dict(data: dict[str, Any], digest: str) -> Manifest:
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise IntegrityError(f"unsupported manifest format {fmt!r} (this adapterctl reads {MANIFEST_FORMAT})")
    try:
        files = [FileEntry(f["path"], f["digest"], int(f["size"])) for f in data["files"]]
        manifest = Manifest(
            name=data["name"], version=int(data["version"]), digest=digest, files=files,
            base_model=dict(data["base_model"]), lora=dict(data["lora"]), total_bytes=int(data["total_bytes"]),
            training=data.get("training"), created=data["created"], publisher=dict(data.get("publisher") or {}),
            labels=dict(data.get("labels") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"stored manifest is missing or has a malformed field: {exc}") from None
    bad = [f.path for f in files if f.path not in ALLOWED_FILES]
    if bad:
        raise IntegrityError(f"manifest {manifest.ref} lists unexpected file(s) {bad}")
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):  # publish never writes one; a second entry would overwrite the first
        raise IntegrityError(
            f"manifest {manifest.ref} lists a file twice: {sorted(p for p in set(paths) if paths.count(p) > 1)}"
        )
    return manifest
