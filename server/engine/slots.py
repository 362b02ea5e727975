"""Device adapter slots: preallocated (A, B, scale) banks per LoRA-targeted linear, and
the device tier (one :class:`LRUCache` over slot numbers) that decides which adapter
lives in which slot. Only the decode thread mutates banks, so a forward never sees a
half-written slot; an acquired (in-use) adapter is never evicted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from adapterctl.errors import FailedPrecondition, NotFound, ResourceExhausted
from adapterctl.server.engine.lora import LoraLinear, LoraWeights
from adapterctl.server.lru import LRUCache
from adapterctl.server.types import EngineObserver, HostAdapter, ServedAdapter

log = logging.getLogger(__name__)


def short_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


class SlotBank:
    """Slot tensors for every wrapped linear. Banks of a module type (``q_proj``…) are
    allocated the first time an adapter targets that type, so a q/v-only fleet never
    pays for MLP banks. Slot 0 stays zero (rows without adapter)."""

    def __init__(self, modules: dict[str, LoraLinear], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.modules = modules
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device, self.dtype = device, dtype
        # [num_slots + 1] fp32 in every dtype: PEFT multiplies a bf16/fp16 delta by its Python float scaling
        # (fp32 arithmetic), which a bf16 scale (e.g. 16/12 -> 1.3359) would change on ~1/3 of the values
        self.scale = torch.zeros(num_slots + 1, dtype=torch.float32, device=device)
        self.generation = 0  # counts bank allocations (decode_layer re-points its plan when it moves)
        self._by_type: dict[str, list[str]] = {}
        for path in modules:
            self._by_type.setdefault(short_name(path), []).append(path)

    @property
    def module_types(self) -> tuple[str, ...]:
        return tuple(self._by_type)

    def check(self, adapter: HostAdapter) -> None:
        """FailedPrecondition naming the problem if ``adapter`` cannot live in a slot."""
        if adapter.rank > self.max_rank:
            raise FailedPrecondition(f"adapter {adapter.served.name}:{adapter.served.version} has rank {adapter.rank}, "
                                     f"above this server's max LoRA rank {self.max_rank}")
        for path, (a, b) in adapter.weights.items():
            mod = self.modules.get(path)
            if mod is None:
                raise FailedPrecondition(f"adapter {adapter.served.name} targets {path}, which this engine does not "
                                         f"serve with LoRA (served module types: {', '.join(self.module_types)})")
            r = a.shape[0]
            if a.shape != (r, mod.in_features) or b.shape != (mod.out_features, r) or r > self.max_rank:
                raise FailedPrecondition(f"adapter {adapter.served.name}: {path} has A {tuple(a.shape)} / B "
                                         f"{tuple(b.shape)}, expected [r, {mod.in_features}] / [{mod.out_features}, r]")

    def write(self, slot: int, adapter: HostAdapter) -> None:
        """Copy ``adapter`` into ``slot`` and zero what it does not target (only the
        previously written rank range is touched, so loads cost O(adapter + old rank))."""
        self.check(adapter)
        for t in {short_name(p) for p in adapter.weights}:
            self._allocate(t)
        with torch.no_grad():
            for path, mod in self.modules.items():
                w = mod.weights
                if w is None:
                    continue
                old = w.ranks[slot]
                pair = adapter.weights.get(path)
                r = 0 if pair is None else pair[0].shape[0]
                if pair is not None:
                    w.A[slot, :r].copy_(pair[0])
                    w.Bt[slot, :r].copy_(pair[1].T)
                if old > r:
                    w.A[slot, r:old].zero_()
                    w.Bt[slot, r:old].zero_()
                w.set_rank(slot, r)
            self.scale[slot] = float(adapter.scale)

    def _allocate(self, module_type: str) -> None:
        for path in self._by_type.get(module_type, ()):
            mod = self.modules[path]
            if mod.weights is None:
                n = self.num_slots + 1
                mod.weights = LoraWeights(
                    A=torch.zeros(n, self.max_rank, mod.in_features, dtype=self.dtype, device=self.device),
                    Bt=torch.zeros(n, self.max_rank, mod.out_features, dtype=self.dtype, device=self.device),
                    scale=self.scale,
                    ranks=[0] * n,
                )
                self.generation += 1


@dataclass
class Resident:
    """An adapter resident in a device slot."""

    served: ServedAdapter
    slot: int
    rank: int
    nbytes: int

    @property
    def label(self) -> str:
        return f"{self.served.name}:{self.served.version}"


class DeviceSlots:
    """The device tier: ServedAdapter -> :class:`Resident`, an LRU bounded by slot count.
    Eviction (LRU, never pinned or acquired entries) returns the slot to the free list."""

    def __init__(self, bank: SlotBank, observer: EngineObserver | None = None) -> None:
        self.bank = bank
        self.observer = observer or EngineObserver()
        self._free = list(range(bank.num_slots, 0, -1))  # pop() hands out 1, 2, ...
        self.lru: LRUCache[ServedAdapter, Resident] = LRUCache(
            max_items=bank.num_slots, sizeof=lambda r: r.nbytes, on_evict=self._on_evict)

    def lookup(self, served: ServedAdapter) -> Resident | None:
        """The resident entry (marked recently used) or None."""
        return self.lru.get(served)

    def can_load(self) -> bool:
        """A slot is free or held by an evictable adapter."""
        return bool(self._free) or any(self.lru.refcount(k) == 0 and not self.lru.is_pinned(k) for k in self.lru.keys())

    def ensure(self, adapter: HostAdapter) -> Resident | None:
        """Resident entry for ``adapter``, loading it into a free (or evicted LRU) slot on
        a miss; None when every slot is pinned or in use. Does not acquire."""
        hit = self.lru.get(adapter.served)
        label = f"{adapter.served.name}:{adapter.served.version}"
        if hit is not None:
            self.observer.on_cache("device", "hit", label)
            return hit
        self.bank.check(adapter)
        if not self._free and not self._evict_one():
            return None
        self.observer.on_cache("device", "miss", label)
        slot = self._free.pop()
        started = time.perf_counter()
        try:
            self.bank.write(slot, adapter)
        except Exception:
            self._free.append(slot)
            raise
        self.observer.on_load("host", time.perf_counter() - started, label)
        entry = Resident(adapter.served, slot, adapter.rank, adapter.nbytes)
        self.lru.put(adapter.served, entry)
        self._report()
        log.debug("adapter %s loaded into device slot %d", label, slot)
        return entry

    def acquire(self, served: ServedAdapter) -> Resident:
        return self.lru.acquire(served)

    def release(self, served: ServedAdapter) -> None:
        self.lru.release(served)

    def pin(self, served: ServedAdapter, pinned: bool) -> None:
        (self.lru.pin if pinned else self.lru.unpin)(served)
        self._report()

    def unload(self, served: ServedAdapter) -> None:
        """Drop from the device tier; FailedPrecondition while pinned or in use."""
        if served not in self.lru:
            raise NotFound(f"adapter {served.name}:{served.version} is not resident on the device")
        if self.lru.is_pinned(served):
            raise FailedPrecondition(f"adapter {served.name}:{served.version} is pinned; unpin it first")
        self.lru.pop(served)
        self._report()

    def _evict_one(self) -> bool:
        for key in self.lru.keys():  # LRU first
            if self.lru.refcount(key) == 0 and not self.lru.is_pinned(key):
                try:
                    self.lru.pop(key)
                except (FailedPrecondition, ResourceExhausted):  # raced with an acquire
                    continue
                return True
        return False

    def _on_evict(self, served: ServedAdapter, entry: Resident) -> None:
        self._free.append(entry.slot)
        self.observer.on_cache("device", "evict", entry.label)

    def _report(self) -> None:
        items = self.lru.items()
        self.observer.on_residency("device", len(items), sum(r.nbytes for _, r in items), self.lru.pinned_count)
