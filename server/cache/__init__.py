"""Tiered adapter cache: one LRU class (:mod:`.lru`) for every tier, host-RAM
adapter weights (:mod:`.loaded`), the disk tier (:mod:`.disk`), reference
resolution (:mod:`.resolver`) and the host <- disk <- registry store (:mod:`.store`)."""
from __future__ import annotations

from adapterctl.server.cache.loaded import LoadedAdapter, load_peft_dir
from adapterctl.server.cache.lru import LRUCache
from adapterctl.server.cache.store import AdapterStore, AdapterStoreConfig

__all__ = ["AdapterStore", "AdapterStoreConfig", "LRUCache", "LoadedAdapter", "load_peft_dir"]
