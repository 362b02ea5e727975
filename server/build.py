"""The composition root of a server: base model + registry reader -> adapter store ->
batching engine, from one :class:`~adapterctl.server.config.ServerConfig`. The only
module that wires ``cache/`` and ``engine/`` together."""
from __future__ import annotations

from adapterctl.server.cache.store import AdapterStore
from adapterctl.server.config import ServerConfig
from adapterctl.server.engine.engine import BatchingEngine
from adapterctl.server.types import EngineObserver


def build_engine(config: ServerConfig, observer: EngineObserver) -> BatchingEngine:
    """The batching engine over the configured base model, with an :class:`AdapterStore`
    (host RAM <- disk <- registry) in front of its device slots."""
    from adapterctl.basemodel import resolve_base_model

    base = resolve_base_model(config.base_model, progress=False)
    reader = config.registry.open()
    store = AdapterStore(config.store, reader, base, observer, max_lora_rank=config.engine.max_lora_rank)
    return BatchingEngine(base, store, config.engine, observer)
