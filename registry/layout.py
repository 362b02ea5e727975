"""Storage keys of the registry layout (documented in the README's "Storage layout").

    blobs/sha256/<hex>                           file content, stored once
    adapters/<name>/versions/<000000001>.json    manifest (or tombstone), create-only
    adapters/<name>/aliases/<alias>.json         alias target + history, moved with CAS
    adapters/<name>/digests/<hex>                manifest digest -> version (an index)
    adapters/<name>/labels/<000000001>.json      labels set after publish, moved with CAS

Version numbers are zero-padded so lexical key order is numeric order.
"""
from __future__ import annotations

from adapterctl.errors import InvalidArgument
from adapterctl.refs import validate_alias, validate_digest, validate_name

ADAPTERS = "adapters/"
BLOBS = "blobs/sha256/"
VERSION_WIDTH = 9
MAX_VERSION = 10**VERSION_WIDTH - 1


def blob_key(digest: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256/<hex>``."""
    return BLOBS + validate_digest(digest).partition(":")[2]


def digest_of_blob_key(key: str) -> str:
    return "sha256:" + key.rpartition("/")[2]


def versions_prefix(name: str) -> str:
    return f"{ADAPTERS}{validate_name(name)}/versions/"


def version_key(name: str, version: int) -> str:
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {version} out of range 1..{MAX_VERSION}")
    return f"{versions_prefix(name)}{version:0{VERSION_WIDTH}d}.json"


def version_of_key(key: str) -> int | None:
    """The version number of a ``.../versions/<n>.json`` key, None for anything else."""
    stem, dot, ext = key.rpartition("/")[2].partition(".")
    return int(stem) if dot and ext == "json" and stem.isdigit() else None


def aliases_prefix(name: str) -> str:
    return f"{ADAPTERS}{validate_name(name)}/aliases/"


def alias_key(name: str, alias: str) -> str:
    return f"{aliases_prefix(name)}{validate_alias(alias)}.json"


def alias_of_key(key: str) -> str | None:
    stem, _, ext = key.rpartition("/")[2].rpartition(".")
    return stem if ext == "json" and stem else None


def digest_key(name: str, digest: str) -> str:
    return f"{ADAPTERS}{validate_name(name)}/digests/{validate_digest(digest).partition(':')[2]}"


def labels_key(name: str, version: int) -> str:
    """Mutable labels of ``name:version``, kept beside its immutable manifest."""
    return version_key(name, version).replace("/versions/", "/labels/", 1)
