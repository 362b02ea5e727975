"""More distinct adapters than device slots: a cold adapter queued behind a flood of hot
ones waits a bounded time — ``max_bypass`` later admissions, then one hot adapter's slot
is drained for it (at most one batch of rows overtakes meanwhile) — whereas unbounded
skipping (vLLM-style) lets the whole flood overtake it."""
from __future__ import annotations

import asyncio

import pytest

PROMPT = [2, 651, 7344, 691, 1590]
ROWS = 6  # max_running_requests: the most rows that can be admitted while a slot drains


# (max_adapters, lora_page_rank): two slots of one adapter each, or one slot (max rank 64) in pages of 8,
# where the hot r4 and r8 take a page each and the cold r64 needs every page: both hot adapters drain for it
LAYOUTS = {"slots": (2, 64), "pages": (1, 8)}


def _overtakers(run, make_engine, dict_store, collect, request_for, max_bypass: int, layout: str) -> int:
    """How many requests queued after the cold one got their first token before it."""
    slots, page = LAYOUTS[layout]
    engine = make_engine(dict_store, max_adapters=slots, lora_page_rank=page, max_running_requests=ROWS,
                         max_batch_tokens=32, max_bypass=max_bypass)
    hot = ["r4-qv", "r8-qkvo"]
    first_step: dict[str, int] = {}  # request id -> index of the step that sampled its first token
    steps = iter(range(10**9))

    def hook(seqs, logits):
        step = next(steps)
        for seq in seqs:
            first_step.setdefault(seq.request.request_id, step)

    engine.logits_hook = hook

    async def one(rid: str, adapter: str, n: int):
        async for _ in engine.generate(request_for(PROMPT, n, adapter, rid=rid)):
            pass

    async def scenario():
        tasks = [asyncio.create_task(one(f"early{i}", hot[i % 2], 4 + i % 5)) for i in range(8)]
        await asyncio.sleep(0)  # queue them first, in order
        tasks.append(asyncio.create_task(one("cold", "r64-all", 6)))
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one(f"late{i}", hot[i % 2], 4 + (i * 3) % 7)) for i in range(24)]
        await asyncio.gather(*tasks)

    run(scenario(), timeout=120)
    return sum(1 for rid, step in first_step.items() if rid.startswith("late") and step < first_step["cold"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("max_bypass", [0, 4])
def test_cold_adapter_waits_a_bounded_time(max_bypass, layout, run, make_engine, dict_store, collect, request_for):
    assert _overtakers(run, make_engine, dict_store, collect, request_for, max_bypass, layout) <= max_bypass + ROWS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unbounded_skipping_starves_the_cold_adapter(layout, run, make_engine, dict_store, collect, request_for):
    assert _overtakers(run, make_engine, dict_store, collect, request_for, 10_000, layout) == 24  # all of the flood
