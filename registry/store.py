"""The object-store interface the registry is written against: create-only and
compare-and-swap writes, paginated listing, streamed blob transfer.

Keys are ``/``-separated relative paths (``blobs/sha256/<hex>``); a backend maps
them under its own root (a directory, or an S3 bucket prefix).
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapterctl.errors import InvalidArgument, NotFound

CHUNK_SIZE = 1 << 20
ProgressCallback = Callable[[int], None]  # called with the number of bytes just moved


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or ``head`` knows about one object (no content, no etag)."""

    key: str
    size: int
    last_modified: float  # seconds since the epoch, as the store records it


class ObjectStore(ABC):
    """Minimal storage semantics the registry needs; every method is thread-safe.

    Errors: NotFound (missing key), AlreadyExists (create-only lost), Conflict
    (compare-and-swap lost), Unavailable (storage unreachable).
    """

    uri: str

    @abstractmethod
    def get(self, key: str) -> tuple[bytes, str]:
        """Return ``(content, etag)``; the etag is what :meth:`put_if_match` compares."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and modification time of ``key`` (NotFound if missing)."""

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    @abstractmethod
    def put(self, key: str, data: bytes) -> str:
        """Unconditional write; returns the new etag."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str:
        """Create-only write: exactly one of several concurrent callers wins,
        the others get AlreadyExists. Readers see all of ``data`` or nothing."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """Compare-and-swap: replace ``key`` only if its etag is still ``etag``,
        else raise Conflict (also when the key was deleted meanwhile)."""

    @abstractmethod
    def put_file(self, key: str, fileobj: BinaryIO, size: int, callback: ProgressCallback | None = None) -> None:
        """Stream ``size`` bytes from ``fileobj`` to ``key`` (unconditional; used for
        content-addressed blobs). A reader never sees a partial object."""

    @abstractmethod
    def read_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream the content of ``key`` (NotFound if missing)."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in ascending key order,
        fetched page by page (no limit on the count)."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> Iterator[str]:
        """Names of the immediate "subdirectories" below ``prefix`` (which ends in ``/``)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Refresh the modification time of ``key`` (so gc's grace period restarts)."""

    def purge_incomplete(self, older_than: float) -> int:
        """Remove leftovers of interrupted writes started before ``older_than``
        (epoch seconds); returns how many. Default: nothing to purge."""
        return 0


def check_key(key: str) -> str:
    """Keys are relative, ``/``-separated, without empty, ``.``-leading or ``..`` parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(not p or p.startswith(".") for p in parts):
        raise InvalidArgument(f"invalid storage key {key!r}")
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (create, rename) made inside ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
