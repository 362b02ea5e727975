"""Paged device slots (slots.py): adapters of different ranks share the LoRA memory in pages,
every LoRA backend reads a paged bank as the formula says (C kernel and ATen), writes leave no
stale rows of an earlier occupant, and the page allocator keeps its invariants under a random
sequence of loads, acquires, pins and unloads."""
from __future__ import annotations

import random
import types

import pytest
import torch
from torch import nn

from adapterctl.errors import FailedPrecondition
from adapterctl.server.engine.batch import LoraBatch
from adapterctl.server.engine.lora import BACKENDS, LoraLinear, make_backend
from adapterctl.server.engine.slots import DeviceSlots, SlotBank
from adapterctl.server.types import ServedAdapter

D_IN, D_OUT, PATH = 24, 72, "model.layers.0.self_attn.q_proj"


def _adapter(name: str, rank: int, seed: int, scale: float = 1.0, targets: bool = True):
    """A host adapter (slots.HostAdapter's fields) of ``rank`` on the one q_proj."""
    g = torch.Generator().manual_seed(seed)
    weights = {PATH: (torch.randn(rank, D_IN, generator=g), torch.randn(D_OUT, rank, generator=g))} if targets else {}
    return types.SimpleNamespace(served=ServedAdapter(name, 1, f"sha256:{seed:064x}"), rank=rank, scale=scale,
                                 target_modules=("q_proj",), weights=weights, nbytes=4 * rank * (D_IN + D_OUT))


def _bank(num_slots: int = 2, max_rank: int = 16, page_rank: int = 4, device: str = "cpu") -> SlotBank:
    module = LoraLinear(nn.Linear(D_IN, D_OUT, bias=False), PATH, make_backend("auto"))
    return SlotBank({PATH: module}, num_slots, max_rank, torch.device(device), torch.float32, page_rank)


def test_pages_and_their_invariants():
    bank = _bank()  # 2 slots x rank 16 = 8 pages of 4
    assert (bank.num_pages, bank.page_rank, bank.pages_for(3), bank.pages_for(4), bank.pages_for(5)) == (8, 4, 1, 1, 2)
    assert _bank(page_rank=64).num_pages == 2  # a page above max rank: one page per slot
    assert _bank(max_rank=12, page_rank=8).num_pages == 4  # 12 rounds up to two pages of 8 per slot
    bank.write(2, _adapter("big", 16, seed=1))  # pages 2-5
    bank.write(3, _adapter("small", 3, seed=2, scale=0.5))  # over big's old rows (as after its eviction)
    w = bank.modules[PATH].weights
    a = w.A.view(-1, D_IN)
    assert torch.equal(a[12:15], _adapter("small", 3, seed=2).weights[PATH][0])
    assert not a[15].any()  # small's page past its rank: zeroed, not big's old row
    assert (w.ranks[3], bank.scale[3].item()) == (3, 0.5)
    bank.write(6, _adapter("untargeted", 8, seed=3, targets=False))  # pages 6-7, rank 0 on this module
    assert w.ranks[6] == 0 and w.ranks[7] == 0 and not a[24:32].any()
    with pytest.raises(ValueError, match="outside"):
        bank.write(8, _adapter("too-far", 8, seed=4))  # pages 8-9 of 8


# slot -> (rank, seed, scale) in a bank of 12 pages of 4: 1 (r4), 2-5 (r16), 6-7 (r8), 8 (r3), 9-10 (r6)
LAYOUT = {1: (4, 11, 2.0), 2: (16, 12, 0.5), 6: (8, 13, 1.0), 8: (3, 14, 0.25), 9: (6, 15, 1.5)}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("token_slots", [
    [1, 2, 6, 8, 9, 0],  # one token per adapter: rows past a page read on into the next adapter's (masked)
    [8, 9],  # consecutive first pages, a two-page adapter among them: gathered, not sliced
    [1, 2],  # consecutive pages 1-2, where 2 spans four: gathered
    [2] * 9 + [1, 9],  # a long run (segment matmul in "auto") and decode rows
    [9, 9, 8],
])
def test_backends_read_a_paged_bank_as_the_formula_says(backend, token_slots, kernel, test_device):
    bank = _bank(num_slots=3, max_rank=16, page_rank=4, device=test_device)  # 12 pages
    adapters = {}
    for slot, (rank, seed, scale) in LAYOUT.items():
        adapters[slot] = _adapter(f"a{slot}", rank, seed, scale)
        bank.write(slot, adapters[slot])
    w = bank.modules[PATH].weights
    x = torch.randn(len(token_slots), D_IN, generator=torch.Generator().manual_seed(1))
    y0 = torch.randn(len(token_slots), D_OUT, generator=torch.Generator().manual_seed(2))
    want = y0.clone()
    for t, s in enumerate(token_slots):
        if s:
            a, b = adapters[s].weights[PATH]
            want[t] += adapters[s].scale * (x[t] @ a.T) @ b.T
    y = y0.to(test_device)
    make_backend(backend).apply(y, x.to(test_device), w, LoraBatch.from_token_slots(token_slots, test_device))
    torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)
    if kernel is not None and backend == "gather":
        assert kernel and all(kernel)  # the C kernel read the pages in place


@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_a_rewritten_slot_is_read_with_its_new_rank(backend, kernel, test_device):
    """Slot 2 held a rank-16 adapter (pages 2-5), then a rank-3 one: pages 3-5 keep the old rows, and
    a gather over 8 rows (slot 6's rank) must stop at the new rank (the rank table is re-read)."""
    bank = _bank(num_slots=3, max_rank=16, page_rank=4, device=test_device)
    big, small, other = _adapter("big", 16, seed=21), _adapter("small", 3, seed=22, scale=0.5), _adapter("o", 8, 23)
    w = None
    x = torch.randn(2, D_IN, generator=torch.Generator().manual_seed(3))
    for current in (big, small):
        bank.write(2, current)
        bank.write(6, other)
        w = bank.modules[PATH].weights
        y = torch.zeros(2, D_OUT, device=test_device)
        make_backend(backend).apply(y, x.to(test_device), w, LoraBatch.from_token_slots([2, 6], test_device))
        want = torch.stack([current.scale * (x[0] @ current.weights[PATH][0].T) @ current.weights[PATH][1].T,
                            other.scale * (x[1] @ other.weights[PATH][0].T) @ other.weights[PATH][1].T])
        torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)
    assert w is not None and w.A.view(-1, D_IN)[12:24].any()  # the old rows are there to be masked


def _check(slots: DeviceSlots) -> None:
    """Every resident adapter owns exactly its run of pages; no page has two owners."""
    owner = slots._owner
    seen = [None] * len(owner)
    for served, entry in slots.lru.items():
        assert entry.pages == slots.bank.pages_for(entry.rank)
        for page in range(entry.slot, entry.slot + entry.pages):
            assert seen[page] is None and owner[page] is served
            seen[page] = served
    assert seen == owner


def _fits(slots: DeviceSlots, pages: int, pins_only: bool = False) -> bool:
    """Brute force: some run of ``pages`` pages is free or held by idle (``pins_only``: any), unpinned adapters."""
    n = slots.bank.num_pages
    return any(all(o is None or ((pins_only or slots.lru.refcount(o) == 0) and not slots.lru.is_pinned(o))
                   for o in slots._owner[lo: lo + pages]) for lo in range(1, n - pages + 2))


@pytest.mark.parametrize("seed", range(6))
def test_the_page_allocator_keeps_its_invariants(seed):
    """A seeded random sequence (bounded: 300 operations) of loads, acquires, releases, pins and
    unloads of adapters of ranks 1-16 over 8 pages of 4."""
    rng = random.Random(seed)
    slots = DeviceSlots(_bank())
    pool = [_adapter(f"a{i}", rng.choice([1, 3, 4, 5, 8, 12, 16]), seed=i) for i in range(12)]
    held: list = []
    for _ in range(300):
        op = rng.random()
        adapter = rng.choice(pool)
        if op < 0.5:
            before = {s: e.slot for s, e in slots.lru.items()}
            busy = {s for s in before if slots.lru.refcount(s) or slots.lru.is_pinned(s)}
            resident = adapter.served in before
            could = resident or _fits(slots, slots.bank.pages_of(adapter))
            if not resident:
                assert slots.can_load(adapter) == could
                pinned_out = not _fits(slots, slots.bank.pages_of(adapter), pins_only=True)
                assert slots.blocked_by_pins(adapter) == pinned_out
            entry = slots.ensure(adapter)
            assert (entry is not None) == could
            assert all(s in slots.lru and slots.lru.peek(s).slot == before[s] for s in busy)  # never evicted, moved
        elif op < 0.7 and adapter.served in slots.lru:
            slots.acquire(adapter.served)
            held.append(adapter.served)
        elif op < 0.85 and held:
            slots.release(held.pop(rng.randrange(len(held))))
        elif op < 0.93 and adapter.served in slots.lru:
            slots.pin(adapter.served, rng.random() < 0.5)
        elif adapter.served in slots.lru:
            if slots.lru.refcount(adapter.served) or slots.lru.is_pinned(adapter.served):
                with pytest.raises(FailedPrecondition):
                    slots.unload(adapter.served)
            else:
                slots.unload(adapter.served)
        _check(slots)
