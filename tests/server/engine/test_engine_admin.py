"""Admin operations on the device tier: load ahead of traffic, pin keeps a slot, unload
refuses pinned or busy adapters, a version an alias moved away from leaves its slot once
idle, and paged slots hold several low-rank adapters in one max-rank slot's memory."""
from __future__ import annotations

import pytest

from adapterctl.errors import FailedPrecondition, ResourceExhausted

PROMPT = [2, 651, 7344, 691]


def test_load_pin_unload_and_list(run, make_engine, dict_store, collect, request_for):
    engine = make_engine(dict_store, max_adapters=2, lora_page_rank=64)  # one adapter per slot
    status = run(engine.load_adapter("r4-qv"))
    assert (status.tier, status.rank, status.active_requests) == ("device", 4, 0)
    pinned = run(engine.pin_adapter("r4-qv", True))
    assert pinned.pinned and pinned.tier == "device"
    run(engine.load_adapter("r8-qkvo"))
    run(collect(engine, request_for(PROMPT, 2, "r64-all")))  # needs a slot: evicts r8, never the pinned r4
    rows = run(engine.list_adapters())
    names = {row.name: row for row in rows if row.tier == "device"}
    assert set(names) == {"r4-qv", "r64-all"} and names["r4-qv"].pinned
    assert {row.name for row in rows if row.tier == "host"} == {"r8-qkvo", "r16-all-rslora"}  # the store's rows
    with pytest.raises(FailedPrecondition, match="pinned"):
        run(engine.unload_adapter("r4-qv"))
    run(engine.pin_adapter("r4-qv", False))
    assert run(engine.unload_adapter("r4-qv")).tier != "device"  # the reply says where it lives now
    assert [row.name for row in run(engine.list_adapters()) if row.tier == "device"] == ["r64-all"]


def test_load_fails_when_every_slot_is_pinned(run, make_engine, dict_store, request_for):
    engine = make_engine(dict_store, max_adapters=1, lora_page_rank=64)
    run(engine.pin_adapter("r4-qv", True))
    with pytest.raises(ResourceExhausted, match="pinned"):
        run(engine.load_adapter("r8-qkvo"))
    with pytest.raises(ResourceExhausted, match="pinned"):  # a request for another adapter is refused, not parked
        run(engine.generate(request_for(PROMPT, 2, "r8-qkvo")).__anext__())


def test_paged_slot_holds_low_rank_adapters_and_pins_hold_their_pages(run, make_engine, dict_store, collect,
                                                                       request_for):
    """One slot of max rank 64 in pages of 8: r4 and r8 take a page each, r16 two, r64 all eight."""
    engine = make_engine(dict_store, max_adapters=1, lora_page_rank=8, ignore_eos=True)
    for name in ("r4-qv", "r8-qkvo", "r16-all-rslora"):
        run(engine.load_adapter(name))
    assert {row.name for row in run(engine.list_adapters()) if row.tier == "device"} == {
        "r4-qv", "r8-qkvo", "r16-all-rslora"}  # one slot's memory, three adapters
    run(engine.pin_adapter("r4-qv", True))
    with pytest.raises(ResourceExhausted, match="pinned"):  # r64 needs every page; r4's is pinned
        run(engine.load_adapter("r64-all"))
    with pytest.raises(ResourceExhausted, match="pinned"):
        run(engine.generate(request_for(PROMPT, 2, "r64-all")).__anext__())
    run(engine.pin_adapter("r4-qv", False))
    _, result = run(collect(engine, request_for(PROMPT, 3, "r64-all")))  # evicts all three for its eight pages
    assert len(result.token_ids) == 3 and result.adapter.name == "r64-all"
    assert [row.name for row in run(engine.list_adapters()) if row.tier == "device"] == ["r64-all"]


def test_busy_adapter_cannot_be_unloaded(run, make_engine, dict_store, request_for):
    engine = make_engine(dict_store)

    async def scenario():
        gen = engine.generate(request_for(PROMPT, 400, "r4-qv"))
        await gen.__anext__()
        with pytest.raises(FailedPrecondition, match="serving 1 requests"):
            await engine.unload_adapter("r4-qv")
        await gen.aclose()

    run(scenario())


def test_retired_alias_version_leaves_the_device_once_idle(run, make_engine, dict_store, collect, request_for):
    engine = make_engine(dict_store)

    async def moved():
        return [("r4-qv", "prod", 1, 2)]

    dict_store.refresh_aliases = moved

    async def scenario():
        gen = engine.generate(request_for(PROMPT, 400, "r4-qv"))
        await gen.__anext__()
        assert await engine.refresh_aliases() == [("r4-qv", "prod", 1, 2)]
        await collect(engine, request_for(PROMPT, 2, "r8-qkvo"))  # a few steps later: still in use
        assert "r4-qv" in {row.name for row in await engine.list_adapters() if row.tier == "device"}
        await gen.aclose()
        await collect(engine, request_for(PROMPT, 2, "r8-qkvo"))
        return {row.name for row in await engine.list_adapters() if row.tier == "device"}

    assert run(scenario()) == {"r8-qkvo"}
