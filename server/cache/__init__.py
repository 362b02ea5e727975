"""Tiered adapter cache: one LRU class (:mod:`.lru`) for every tier, host-RAM
adapter weights (:mod:`.loaded`) and the host <- disk <- registry store (:mod:`.store`)."""
from __future__ import annotations

from adapterctl.server.cache.loaded import LoadedAdapter, load_peft_dir
from adapterctl.server.cache.lru import LRUCache

__all__ = ["LRUCache", "LoadedAdapter", "load_peft_dir"]
