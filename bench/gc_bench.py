"""Full garbage collections while serving (EngineConfig.gc_freeze; server/engine/gc_heap.py).

CPython starts a full (generation 2) collection by itself now and then; it holds the GIL while
it walks every tracked object, so the decode thread stops between kernels. This forces three
full collections from another thread during one greedy stream (Gemma 3 270M, fp32 unless
``--dtype``, 64 new tokens; at tokens 16, 32 and 48) on an engine whose heap is frozen and on one
whose heap is not, alternating, ``--rounds`` each, in one process. Prints per mode the median
collection time and the longest and median gap between tokens as the client sees them, then
``gc_itl_max_unfrozen_over_frozen`` in the last JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import threading
import time
from typing import Any

from bench.common import base_model, prompts, request

AT_TOKENS = (16, 32, 48)


async def stream(engine, tok) -> dict[str, float]:
    """One 64-token greedy stream with full collections forced at AT_TOKENS from a plain thread."""
    from adapterctl.server.types import TokenEvent

    reached = {n: threading.Event() for n in AT_TOKENS}
    durations: list[float] = []

    def collector() -> None:
        for n in AT_TOKENS:
            if not reached[n].wait(120):
                return
            t = time.perf_counter()
            gc.collect()
            durations.append(1e3 * (time.perf_counter() - t))

    thread = threading.Thread(target=collector, daemon=True)
    thread.start()
    times = []
    async for item in engine.generate(request("gc", prompts(tok, 1, 24, 24, seed=3)[0], 64)):
        if isinstance(item, TokenEvent):
            times.append(time.perf_counter())
            if len(times) in reached:
                reached[len(times)].set()
    for event in reached.values():
        event.set()
    thread.join(120)
    gaps = [1e3 * (b - a) for a, b in zip(times, times[1:])]
    return {"gc_full_ms": statistics.median(durations), "itl_max_ms": max(gaps), "itl_p50_ms": statistics.median(gaps)}


async def run(rounds: int, dtype: str) -> dict[str, Any]:
    from adapterctl.basemodel import load_tokenizer
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine

    base = base_model()
    tok = load_tokenizer(base)
    per: dict[str, list[dict[str, float]]] = {"frozen": [], "unfrozen": []}
    for i in range(rounds):
        for mode in ("unfrozen", "frozen") if i % 2 == 0 else ("frozen", "unfrozen"):
            engine = BatchingEngine(base, MemoryStore({}), EngineConfig(device="cpu", dtype=dtype, ignore_eos=True,
                                                                        gc_freeze=mode == "frozen"), tokenizer=tok)
            await engine.start()
            try:
                per[mode].append(await stream(engine, tok))
            finally:
                await engine.stop()
            print(f"{mode}: {per[mode][-1]}", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"objects_tracked": len(gc.get_objects())}
    for mode, recs in per.items():
        for key in ("gc_full_ms", "itl_max_ms", "itl_p50_ms"):
            out[f"{key}_{mode}"] = statistics.median(r[key] for r in recs)
    out["gc_itl_max_unfrozen_over_frozen"] = out["itl_max_ms_unfrozen"] / out["itl_max_ms_frozen"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="streams per mode (alternating)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.rounds, args.dtype))))


if __name__ == "__main__":
    main()
