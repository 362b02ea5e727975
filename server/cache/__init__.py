"""Tiered adapter cache: host-RAM adapter weights (:mod:`.loaded`), the disk tier
(:mod:`.disk`), reference resolution (:mod:`.resolver`) and the host <- disk <- registry
store (:mod:`.store`), configured by :mod:`.config`. Every tier is an instance of the one
LRU class, :mod:`adapterctl.server.lru`."""
