"""Crash safety and storage hygiene: a SIGKILLed publish leaves no version and gc
collects its orphans after the grace period; corrupted blobs fail pull with
nothing left behind; gc keeps what versions use. Both backends."""
from __future__ import annotations

import select
import subprocess
import sys

import pytest
import registry_testkit

from adapterctl.errors import IntegrityError, NotFound
from adapterctl.registry.layout import BLOBS, blob_key


def _blob_keys(registry) -> set[str]:
    return {o.key for o in registry.store.list(BLOBS)}


def test_publish_killed_mid_upload_leaves_no_version_and_gc_collects_orphans(registry, registry_uri, adapter_dir):
    child = subprocess.Popen(
        [sys.executable, registry_testkit.__file__, registry_uri, str(adapter_dir), "killed"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)  # bounded wait for the child's signal
        line = child.stdout.readline() if ready else ""
        assert line.strip() == "blocked-mid-upload", f"child did not reach the upload: {line!r} {child.poll()}"
        child.kill()  # SIGKILL: no cleanup handlers run
    finally:
        child.kill()
        child.wait(timeout=30)
    orphans = _blob_keys(registry)
    assert len(orphans) == 1, "the first blob was uploaded before the kill"
    assert "killed" not in registry.list_names()
    with pytest.raises(NotFound):
        registry.resolve("killed")

    kept = registry.gc(grace_seconds=3600)
    assert kept.deleted == [] and len(kept.kept_recent) == 1
    assert _blob_keys(registry) == orphans
    dry = registry.gc(grace_seconds=0, dry_run=True)
    assert len(dry.deleted) == 1 and _blob_keys(registry) == orphans
    collected = registry.gc(grace_seconds=0)
    assert collected.deleted == dry.deleted and collected.freed_bytes > 0
    assert _blob_keys(registry) == set()
    if registry_uri.startswith("/"):  # the local backend's half-written temp file is purged too
        assert collected.purged_incomplete == 1
        assert list((registry.store.root / ".tmp").iterdir()) == []


def test_gc_keeps_blobs_that_live_versions_use(registry, adapter_dir, tmp_path):
    shared = registry.publish(adapter_dir, "a")
    registry.publish(adapter_dir, "b")
    other = registry.publish(registry_testkit.make_adapter(tmp_path / "other", seed=7), "a")
    report = registry.gc(grace_seconds=0)
    assert report.deleted == [] and report.referenced == 4  # 3 shared + the other weights
    registry.delete("a", other.version)
    report = registry.gc(grace_seconds=0)
    assert report.deleted == [other.file("adapter_model.safetensors").digest]
    registry.delete("a", shared.version)
    assert registry.gc(grace_seconds=0).deleted == [], "b:1 still uses the shared blobs"
    assert registry.pull("b", tmp_path / "b").is_dir()


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "remove"])
def test_damaged_blob_fails_pull_and_leaves_nothing(registry, adapter_dir, tmp_path, damage):
    m = registry.publish(adapter_dir, "reviews")
    key = blob_key(m.file("adapter_model.safetensors").digest)
    data, _ = registry.store.get(key)
    if damage == "flip-byte":
        registry.store.put(key, data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    elif damage == "truncate":
        registry.store.put(key, data[:-1])
    else:
        registry.store.delete(key)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        registry.pull("reviews:1", out / "reviews")
    assert list(out.iterdir()) == [], "no partial or temp directory may remain"


def test_gc_aborts_interrupted_s3_multipart_uploads(s3_registry_uri):
    from adapterctl.registry import open_registry

    registry = open_registry(s3_registry_uri)
    client, bucket = registry.store._client, registry.store.bucket
    client.create_multipart_upload(Bucket=bucket, Key="adapters/blobs/sha256/" + "0" * 64)
    client.create_multipart_upload(Bucket=bucket, Key="elsewhere/not-ours")  # outside the registry prefix
    # (moto reports every upload as initiated in 2010, so the grace period itself is not exercised here)
    assert registry.gc(grace_seconds=0, dry_run=True).purged_incomplete == 0
    assert registry.gc(grace_seconds=0).purged_incomplete == 1
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["elsewhere/not-ours"]
