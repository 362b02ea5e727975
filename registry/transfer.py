"""Moving file bytes: blob upload at publish, verified download at pull, progress bars.

Upload skips blobs already stored (content addressing) and only refreshes their
modification time so gc's grace period covers this publish. Download hashes
while streaming into a temp directory next to the destination and renames it
into place only when every digest matched.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from adapterctl.errors import AlreadyExists, IntegrityError, NotFound
from adapterctl.registry.layout import blob_key
from adapterctl.registry.manifest import ALLOWED_FILES, FileEntry, Manifest
from adapterctl.registry.store import ObjectStore, fsync_dir
from adapterctl.registry.validate import LocalFile

log = logging.getLogger(__name__)

PROGRESS_MIN_BYTES = 1 << 20  # smaller transfers finish before a bar is worth drawing


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A byte-counting bar on stderr, disabled unless asked for, large, and on a TTY."""
    show = enabled and total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not show, leave=False)


def upload_blobs(store: ObjectStore, files: list[LocalFile], progress: bool = False) -> int:
    """Store each file under ``blobs/sha256/<hex>`` unless already there; returns
    how many were uploaded (the rest are shared with earlier versions)."""
    todo = []
    for f in files:
        key = blob_key(f.digest)
        try:
            stored = store.head(key)
        except NotFound:
            todo.append(f)
            continue
        if stored.size != f.size:  # a damaged blob must not be shared by new versions
            log.warning("blob %s has %d bytes, expected %d; uploading it again", key, stored.size, f.size)
            todo.append(f)
        else:
            store.touch(key)
    with progress_bar(sum(f.size for f in todo), "publish", progress) as bar:
        for f in todo:
            with f.path.open("rb") as fh:
                store.put_file(blob_key(f.digest), fh, f.size, bar.update)
    log.debug("uploaded %d of %d blobs", len(todo), len(files))
    return len(todo)


def pull_files(store: ObjectStore, manifest: Manifest, dest: Path, progress: bool = False) -> Path:
    """Write ``manifest``'s files to ``dest`` (absent or an empty directory),
    verifying size and sha256 of each; ``dest`` appears complete or not at all."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AlreadyExists(f"{dest} already exists and is not an empty directory")
    for entry in manifest.files:  # manifests are data: never let one name a path outside dest
        if entry.path not in ALLOWED_FILES:
            raise IntegrityError(f"manifest {manifest.ref} lists unexpected file {entry.path!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pull-"))
    try:
        with progress_bar(manifest.total_bytes, f"pull {manifest.ref}", progress) as bar:
            for entry in manifest.files:
                _download(store, manifest, entry, tmp / entry.path, bar)
        fsync_dir(tmp)
        try:
            os.rename(tmp, dest)  # replaces an empty directory atomically
        except OSError as exc:
            raise AlreadyExists(f"{dest} appeared while pulling {manifest.ref}: {exc.strerror}") from None
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _download(store: ObjectStore, manifest: Manifest, entry: FileEntry, target: Path, bar: tqdm) -> None:
    digest = hashlib.sha256()
    size = 0
    try:
        with target.open("wb") as fh:
            for chunk in store.read_chunks(blob_key(entry.digest)):
                size += len(chunk)
                if size > entry.size:
                    break
                digest.update(chunk)
                fh.write(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    except NotFound:
        raise IntegrityError(
            f"{manifest.ref}: blob {entry.digest} of {entry.path} is missing from the registry"
        ) from None
    actual = "sha256:" + digest.hexdigest()
    if size != entry.size or actual != entry.digest:
        raise IntegrityError(
            f"{manifest.ref}: {entry.path} does not match its digest "
            f"(expected {entry.digest}, {entry.size} bytes; got {actual if size <= entry.size else 'more data'}, "
            f"{size}{'+' if size > entry.size else ''} bytes)"
        )
