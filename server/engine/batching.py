"""Entry point the server uses for ``--engine batched``: builds a :class:`BatchingEngine`
over the adapter store from a :class:`~adapterctl.server.config.ServerConfig`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from adapterctl.basemodel import BaseModel
from adapterctl.server.cache.store import AdapterStore, AdapterStoreConfig
from adapterctl.server.engine.api import EngineObserver
from adapterctl.server.engine.config import EngineConfig
from adapterctl.server.engine.engine import BatchingEngine

if TYPE_CHECKING:
    from adapterctl.registry import RegistryReader
    from adapterctl.server.config import ServerConfig

__all__ = ["BatchingEngine", "EngineConfig", "build_engine"]

# ServerConfig field -> EngineConfig field, for the settings both know.
_SHARED = {"max_adapters": "num_slots", "max_lora_rank": "max_lora_rank", "max_waiting": "max_queue",
           "max_new_tokens_limit": "max_new_tokens_limit", "device": "device", "dtype": "dtype"}


def engine_config_from(server: "ServerConfig") -> EngineConfig:
    """Map the server's settings onto EngineConfig; engine-only fields that the server
    config also carries (same name) are passed through."""
    values = {dst: getattr(server, src) for src, dst in _SHARED.items() if hasattr(server, src)}
    for name in EngineConfig.help():
        if name not in values and hasattr(server, name):
            values[name] = getattr(server, name)
    return EngineConfig(**values)


def build_engine(server: "ServerConfig", base: BaseModel, reader: "RegistryReader",
                 observer: EngineObserver) -> BatchingEngine:
    """The batching engine with an AdapterStore (host RAM <- disk <- registry) in front."""
    config = engine_config_from(server)
    store = AdapterStore(AdapterStoreConfig(disk_dir=server.cache_dir, max_lora_rank=config.max_lora_rank,
                                            alias_refresh_seconds=server.alias_refresh), reader, base, observer)
    return BatchingEngine(base, store, config, observer)
