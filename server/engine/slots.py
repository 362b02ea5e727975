"""Device adapter slots: preallocated (A, B, scale) banks per LoRA-targeted linear, and
the device tier (one :class:`LRUCache` plus a page map) that decides which adapter lives
where. The banks are paged: ``num_slots x max_rank`` rank rows (rounded up to whole pages of
``page_rank`` rows), and an adapter of rank ``r`` takes ``ceil(r / page_rank)`` contiguous pages,
so low-rank adapters share what one max-rank slot would reserve (S-LoRA's unified paging, for
LoRA weights). An adapter's slot number is its first page. Only the decode thread mutates banks,
so a forward never sees a half-written slot; an acquired (in-use) adapter is never evicted.
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
    """Page tensors for every wrapped linear: ``A`` [num_pages + 1, page_rank, in] and ``Bt``
    [num_pages + 1, page_rank, out]. Banks of a module type (``q_proj``…) are allocated the first
    time an adapter targets that type, so a q/v-only fleet never pays for MLP banks. Page 0 stays
    zero (rows without adapter). Invariant: the rows of an adapter's pages beyond its rank (per
    module) are zero, so a page read up to ``page_rank`` rows adds nothing past the rank.
    ``page_rank`` None (or >= ``max_rank``): one page per slot, i.e. one adapter per slot."""

    def __init__(self, modules: dict[str, LoraLinear], num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, page_rank: int | None = None) -> None:
        self.modules = modules
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.page_rank = min(page_rank or max_rank, max_rank)
        self.num_pages = num_slots * self.pages_for(max_rank)
        self.device, self.dtype = device, dtype
        # [num_pages + 1] fp32 in every dtype: PEFT multiplies a bf16/fp16 delta by its Python float scaling
        # (fp32 arithmetic), which a bf16 scale (e.g. 16/12 -> 1.3359) would change on ~1/3 of the values
        self.scale = torch.zeros(self.num_pages + 1, dtype=torch.float32, device=device)
        self.generation = 0  # counts bank allocations (decode_layer re-points its plan when it moves)
        self._by_type: dict[str, list[str]] = {}
        for path in modules:
            self._by_type.setdefault(short_name(path), []).append(path)

    @property
    def module_types(self) -> tuple[str, ...]:
        return tuple(self._by_type)

    def pages_for(self, rank: int) -> int:
        """Pages an adapter of ``rank`` takes (at least one, for its scale)."""
        return max(1, -(-rank // self.page_rank))

    def pages_of(self, adapter: HostAdapter) -> int:
        """Pages ``adapter`` takes: its largest module rank (``rank_pattern`` may vary it) rounded up."""
        return self.pages_for(max([adapter.rank, *(a.shape[0] for a, _ in adapter.weights.values())]))

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
        """Copy ``adapter`` into the pages ``slot .. slot + pages_for(rank) - 1`` (the caller owns
        them) and zero the rest of those pages' rows, in every allocated bank; the pages after the
        first get rank 0, so a stale rank never outlives the adapter that wrote it."""
        self.check(adapter)
        pages = self.pages_of(adapter)
        if slot < 1 or slot + pages - 1 > self.num_pages:
            raise ValueError(f"pages {slot}..{slot + pages - 1} are outside 1..{self.num_pages}")
        for t in {short_name(p) for p in adapter.weights}:
            self._allocate(t)
        lo, span = slot * self.page_rank, pages * self.page_rank
        with torch.no_grad():
            for path, mod in self.modules.items():
                w = mod.weights
                if w is None:
                    continue
                a, bt = w.A.view(-1, w.A.shape[-1]), w.Bt.view(-1, w.Bt.shape[-1])  # [pages * page_rank, in|out]
                pair = adapter.weights.get(path)
                r = 0 if pair is None else pair[0].shape[0]
                if pair is not None:
                    a[lo: lo + r].copy_(pair[0])
                    bt[lo: lo + r].copy_(pair[1].T)
                a[lo + r: lo + span].zero_()
                bt[lo + r: lo + span].zero_()
                w.set_rank(slot, r)
                for page in range(slot + 1, slot + pages):
                    w.set_rank(page, 0)
            self.scale[slot: slot + pages] = float(adapter.scale)

    def _allocate(self, module_type: str) -> None:
        for path in self._by_type.get(module_type, ()):
            mod = self.modules[path]
            if mod.weights is None:
                n, page = self.num_pages + 1, self.page_rank
                mod.weights = LoraWeights(
                    A=torch.zeros(n, page, mod.in_features, dtype=self.dtype, device=self.device),
                    Bt=torch.zeros(n, page, mod.out_features, dtype=self.dtype, device=self.device),
                    scale=self.scale,
                    ranks=[0] * n,
                )
                self.generation += 1


@dataclass
class Resident:
    """An adapter resident in a device slot."""

    served: ServedAdapter
    slot: int  # its first page
    rank: int
    nbytes: int
    pages: int = 1

    @property
    def label(self) -> str:
        return f"{self.served.name}:{self.served.version}"


class DeviceSlots:
    """The device tier: ServedAdapter -> :class:`Resident`, an LRU over the bank's pages. An
    adapter takes the first run of free pages that fits it; where none is free, the window of pages
    whose evictable occupants were used least recently is freed (never pinned or acquired ones)."""

    def __init__(self, bank: SlotBank, observer: EngineObserver | None = None) -> None:
        self.bank = bank
        self.observer = observer or EngineObserver()
        self._owner: list[ServedAdapter | None] = [None] * (bank.num_pages + 1)  # page -> occupant; page 0 unused
        self.lru: LRUCache[ServedAdapter, Resident] = LRUCache(sizeof=lambda r: r.nbytes, on_evict=self._on_evict)
        # page counts known not to fit until something is released, unpinned or evicted (the scheduler asks
        # once per waiting request and step; loads and acquires only take pages, so a "no" stays true)
        self._no_fit: set[int] = set()
        self._pinned_out: dict[int, bool] = {}  # blocked_by_pins per page count, until a pin or eviction changes it
        self.observer.on_device_pages(0, bank.num_pages)

    def lookup(self, served: ServedAdapter) -> Resident | None:
        """The resident entry (marked recently used) or None."""
        return self.lru.get(served)

    def can_load(self, adapter: HostAdapter) -> bool:
        """``adapter`` would find pages, free or held by evictable adapters."""
        pages = self.bank.pages_of(adapter)
        if pages in self._no_fit:
            return False
        if self._window(pages) is None:
            self._no_fit.add(pages)
            return False
        return True

    def blocked_by_pins(self, adapter: HostAdapter) -> bool:
        """No run of pages for ``adapter`` avoids pinned adapters: it cannot load until one is unpinned.
        Only pins (and evictions) change the answer, so it is kept per page count until they do."""
        pages = self.bank.pages_of(adapter)
        if pages not in self._pinned_out:
            self._pinned_out[pages] = not self.unpinned_runs(adapter)
        return self._pinned_out[pages]

    def ensure(self, adapter: HostAdapter) -> Resident | None:
        """Resident entry for ``adapter``, loading it into free pages (evicting LRU adapters if
        need be) on a miss; None when no run of pages can be freed for it. Does not acquire."""
        hit = self.lru.get(adapter.served)
        label = f"{adapter.served.name}:{adapter.served.version}"
        if hit is not None:
            self.observer.on_cache("device", "hit", label)
            return hit
        self.bank.check(adapter)
        pages = self.bank.pages_of(adapter)
        first = self._window(pages)
        if first is None or not self._evict_range(first, pages):
            return None
        self.observer.on_cache("device", "miss", label)
        started = time.perf_counter()
        self.bank.write(first, adapter)  # a failed write leaves the pages free (no owner set yet)
        self.observer.on_load("host", time.perf_counter() - started, label)
        entry = Resident(adapter.served, first, adapter.rank, adapter.nbytes, pages)
        self._owner[first: first + pages] = [adapter.served] * pages
        self.lru.put(adapter.served, entry)
        self._report()
        log.debug("adapter %s loaded into device pages %d-%d", label, first, first + pages - 1)
        return entry

    def acquire(self, served: ServedAdapter) -> Resident:
        return self.lru.acquire(served)

    def release(self, served: ServedAdapter) -> None:
        self.lru.release(served)
        self._no_fit.clear()

    def pin(self, served: ServedAdapter, pinned: bool) -> None:
        (self.lru.pin if pinned else self.lru.unpin)(served)
        self._no_fit.clear()
        self._pinned_out.clear()
        self._report()

    def unload(self, served: ServedAdapter) -> None:
        """Drop from the device tier; FailedPrecondition while pinned or in use."""
        if served not in self.lru:
            raise NotFound(f"adapter {served.name}:{served.version} is not resident on the device")
        if self.lru.is_pinned(served):
            raise FailedPrecondition(f"adapter {served.name}:{served.version} is pinned; unpin it first")
        self.lru.pop(served)
        self._report()

    def unpinned_runs(self, adapter: HostAdapter) -> list[frozenset[ServedAdapter]]:
        """The occupants of every run of pages that would fit ``adapter`` and holds no pinned adapter."""
        return [held for _, held in self._runs(self.bank.pages_of(adapter)) if not self._any_pinned(held)]

    def _runs(self, pages: int) -> list[tuple[int, frozenset[ServedAdapter]]]:
        """(first page, occupants) of every run of ``pages`` pages."""
        owner = self._owner
        return [(lo, frozenset(o for o in owner[lo: lo + pages] if o is not None))
                for lo in range(1, self.bank.num_pages - pages + 2)]

    def _any_pinned(self, held: frozenset[ServedAdapter]) -> bool:
        return any(self.lru.is_pinned(o) for o in held)

    def _window(self, pages: int) -> int | None:
        """First page of the best run of ``pages`` pages: a free run first; else the run whose
        occupants are all evictable and were used least recently (oldest last use, then fewest to
        evict); None if none."""
        run = 0
        for page in range(1, self.bank.num_pages + 1):  # a free run first (no sets built)
            run = run + 1 if self._owner[page] is None else 0
            if run == pages:
                return page - pages + 1
        order = {k: i for i, k in enumerate(self.lru.keys())}  # LRU first
        best: tuple[tuple[int, int], int] | None = None
        for lo, held in self._runs(pages):
            if self._any_pinned(held) or any(self.lru.refcount(o) for o in held):
                continue
            score = (max(order[o] for o in held), len(held))
            if best is None or score < best[0]:
                best = (score, lo)
        return None if best is None else best[1]

    def _evict_range(self, first: int, pages: int) -> bool:
        """Evict the occupants of pages ``first .. first + pages - 1``; False if one was acquired meanwhile."""
        for served in {o for o in self._owner[first: first + pages] if o is not None}:
            try:
                self.lru.pop(served)
            except (FailedPrecondition, ResourceExhausted):  # raced with an acquire
                return False
        return True

    def _on_evict(self, served: ServedAdapter, entry: Resident) -> None:
        self._owner[entry.slot: entry.slot + entry.pages] = [None] * entry.pages
        self._no_fit.clear()
        self._pinned_out.clear()
        self.observer.on_cache("device", "evict", entry.label)

    def _report(self) -> None:
        items = self.lru.items()
        self.observer.on_residency("device", len(items), sum(r.nbytes for _, r in items), self.lru.pinned_count)
        self.observer.on_device_pages(sum(r.pages for _, r in items), self.bank.num_pages)
