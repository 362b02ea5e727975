"""Local-directory backend: keys are files below a root directory.

Every write goes to a fully written, fsynced temp file in ``<root>/.tmp`` first;
create-only is ``os.link`` (fails if the target exists), compare-and-swap is an
``flock`` on a per-key lock file plus a comparison of the content's sha256 (the
etag), and replacement is ``os.replace`` — so readers never see partial files.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from adapterctl.errors import AlreadyExists, Conflict, IntegrityError, NotFound, Unavailable
from adapterctl.registry.store import (
    CHUNK_SIZE,
    ObjectInfo,
    ObjectStore,
    ProgressCallback,
    check_key,
    fsync_dir,
    sha256_hex,
)

log = logging.getLogger(__name__)

_TMP = ".tmp"
_LOCKS = ".locks"


class LocalStore(ObjectStore):
    """An :class:`ObjectStore` over the directory ``root`` (created if missing)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        try:
            (self.root / _TMP).mkdir(parents=True, exist_ok=True)
            (self.root / _LOCKS).mkdir(exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot use registry directory {self.root}: {exc.strerror}") from exc
        self.uri = f"file://{self.root}"

    # -- reads ---------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        data = self._read(key)
        return data, sha256_hex(data)

    def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key} not found in {self.uri}") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{key} not found in {self.uri}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def read_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            fh = self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} not found in {self.uri}") from None
        with fh:
            yield from iter(lambda: fh.read(chunk_size), b"")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        _check_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for fname in filenames:
                key = fname if rel == "." else f"{rel}/{fname}"
                if not fname.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield self.head(key)
            except NotFound:  # deleted since the walk
                continue

    def list_dirs(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        try:
            names = sorted(os.listdir(self.root / prefix))
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if not name.startswith(".") and (self.root / prefix / name).is_dir():
                yield name

    # -- writes --------------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        target = self._path(key)
        tmp = self._write_temp(target, [data])
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return sha256_hex(data)

    def put_if_absent(self, key: str, data: bytes) -> str:
        target = self._path(key)
        tmp = self._write_temp(target, [data])
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise AlreadyExists(f"{key} already exists in {self.uri}") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return sha256_hex(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        target = self._path(key)
        with self._lock(key):
            try:
                current = sha256_hex(target.read_bytes())
            except FileNotFoundError:
                raise Conflict(f"{key} was deleted concurrently") from None
            if current != etag:
                raise Conflict(f"{key} was changed concurrently")
            tmp = self._write_temp(target, [data])
            os.replace(tmp, target)
        fsync_dir(target.parent)
        return sha256_hex(data)

    def put_file(self, key: str, fileobj: BinaryIO, size: int, callback: ProgressCallback | None = None) -> None:
        target = self._path(key)

        def chunks() -> Iterator[bytes]:
            moved = 0
            for block in iter(lambda: fileobj.read(CHUNK_SIZE), b""):
                moved += len(block)
                yield block
                if callback:
                    callback(len(block))
            if moved != size:
                raise IntegrityError(f"{key}: expected {size} bytes, read {moved} (file changed during publish?)")

        tmp = self._write_temp(target, chunks())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.uri}") from None

    def purge_incomplete(self, older_than: float) -> int:
        removed = 0
        for entry in os.scandir(self.root / _TMP):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- helpers -------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} not found in {self.uri}") from None

    def _write_temp(self, target: Path, chunks) -> Path:
        """Write ``chunks`` to an fsynced temp file on the same filesystem as ``target``."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.root / _TMP, prefix=target.name[:40] + ".")
        try:
            with os.fdopen(fd, "wb") as fh:
                for block in chunks:
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            os.unlink(name)
            raise
        return Path(name)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """An exclusive ``flock`` for ``key`` (per open file, so it also excludes
        other threads of this process)."""
        path = self.root / _LOCKS / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _check_prefix(prefix: str) -> None:
    """A listing prefix must stay inside the root, like a key."""
    if prefix.strip("/"):
        check_key(prefix.rstrip("/"))
