"""The disk tier when its directory cannot be written (full, read-only, replaced) or holds
entries it did not make: serving goes on from the registry, nothing outside is touched."""
from __future__ import annotations

import asyncio
import logging
import shutil

from adapterctl.registry import open_registry
from adapterctl.server.cache.config import AdapterStoreConfig
from adapterctl.server.cache.store import AdapterStore


def _store(tmp_path, tiny_base, observer, reader) -> AdapterStore:
    return AdapterStore(AdapterStoreConfig(cache_dir=tmp_path / "disk"), reader, tiny_base, observer, max_lora_rank=64)


def test_unwritable_disk_tier_serves_from_the_registry_with_one_warning(tmp_path, tiny_base, observer, make_adapter,
                                                                         caplog):
    reg = open_registry(f"file://{tmp_path / 'registry'}")
    reg.publish(make_adapter("unusable-disk", meta=False, seed=3), "nodisk", base_model=str(tiny_base.path))
    store = _store(tmp_path, tiny_base, observer, reg)
    try:
        shutil.rmtree(tmp_path / "disk")
        (tmp_path / "disk").write_text("not a directory any more")  # mkdtemp in it fails like a full disk
        caplog.set_level(logging.WARNING, logger="adapterctl.server.cache.disk")
        served = asyncio.run(store.resolve("nodisk:1"))
        loaded = asyncio.run(store.get(served))
        assert loaded.served == served and loaded.nbytes > 0
        warnings = [r.getMessage() for r in caplog.records if "disk tier" in r.getMessage()]
        assert len(warnings) == 1 and "nodisk:1" in warnings[0] and "without caching" in warnings[0]
        assert (tmp_path / "disk").read_text() == "not a directory any more"
    finally:
        store.close()


def test_symlinked_disk_entry_is_ignored_and_its_target_kept(tmp_path, tiny_base, observer, make_adapter):
    outside = tmp_path / "outside"
    shutil.copytree(make_adapter("symlinked-entry", seed=4), outside)
    (outside / ".adapterctl-cache.json").write_text('{"name": "x", "version": 1, "digest": "sha256:%s"}' % ("a" * 64))
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / ("a" * 64)).symlink_to(outside, target_is_directory=True)
    reg = open_registry(f"file://{tmp_path / 'registry'}")
    store = _store(tmp_path, tiny_base, observer, reg)
    try:
        assert asyncio.run(store.status()) == []  # not indexed, so never served nor evicted
        assert (outside / "adapter_model.safetensors").is_file()
    finally:
        store.close()
