"""p8: time to first token with and without the prefix cache on chat traffic that shares
a long system prompt: 64 / 16 (--quick) requests over 8 adapters, a ~400-token system
prompt and a short user turn each (Gemma chat template), 8 closed-loop clients; the
same workload on two engines that differ only in ``prefix_cache_bytes``, one after the
other in this process. ``p8_prefix_ttft_gain`` = TTFT p50 without ÷ with."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any, Callable

from bench.common import WORDS, load_dirs, percentile, request, timed_generate

SYSTEM_TOKENS = 400
CLIENTS = 8


def chat_prompts(tok, n: int, seed: int) -> tuple[list[list[int]], int]:
    """``n`` chat prompts (system + user turn, generation prompt added) sharing one system
    prompt of about SYSTEM_TOKENS tokens; also the length of their common token prefix."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(2 * SYSTEM_TOKENS)]
    while len(tok("You are a helpful assistant. " + " ".join(words)).input_ids) > SYSTEM_TOKENS:
        words = words[:-8]
    system = "You are a helpful assistant. " + " ".join(words)
    out = []
    for _ in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "?"
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        out.append(list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)))
    common = min(next((i for i, (a, b) in enumerate(zip(out[0], p)) if a != b), len(p)) for p in out[1:])
    return out, common


async def _closed_loop(engine, reqs) -> list[float]:
    """CLIENTS clients, each sending its share of ``reqs`` one after another; TTFTs in seconds."""
    async def client(c: int) -> list[float]:
        return [(await timed_generate(engine, r)).ttft for r in reqs[c::CLIENTS]]

    return [t for ts in await asyncio.gather(*(client(c) for c in range(CLIENTS))) for t in ts]


async def p8(base, tok, model, dirs: list[Path], quick: bool, log: Callable[[str], None],
             engine_config: Callable[..., Any]) -> dict[str, Any]:
    """``engine_config(**fields)`` builds the EngineConfig (device, dtype, gemm set by the caller)."""
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.engine import BatchingEngine

    n, new = (16, 4) if quick else (64, 16)
    names = [d.name for d in dirs[:8]]
    ps, common = chat_prompts(tok, n, seed=8)
    reqs = [request(f"p8-{i}", p, new, names[(i % CLIENTS + i // CLIENTS) % len(names)]) for i, p in enumerate(ps)]
    adapters = load_dirs(dirs[:8], base)
    ttft: dict[str, list[float]] = {}
    for label, budget in (("off", 0), ("on", 256 << 20)):
        engine = BatchingEngine(base, MemoryStore(adapters),
                                engine_config(max_adapters=8, max_running_requests=16, ignore_eos=True,
                                              prefix_cache_bytes=budget),
                                model=model, tokenizer=tok)
        await engine.start()
        try:
            for name in names:
                await engine.load_adapter(name)
            await timed_generate(engine, request("warm", ps[0][-24:], 2))  # not the shared prefix
            ttft[label] = await _closed_loop(engine, reqs)
            hit = engine.prefix.hit_tokens / engine.prefix.lookup_tokens if engine.prefix else 0.0
        finally:
            await engine.stop()
        model = engine.runner.model
        log(f"p8 prefix cache {label}: TTFT p50 {1e3 * percentile(ttft[label], 50):.0f} ms, "
            f"{100 * hit:.0f} % of prompt tokens restored")
    off, on = percentile(ttft["off"], 50), percentile(ttft["on"], 50)
    return {"p8_prefix_ttft_gain": off / on, "p8_ttft_p50_off_s": off, "p8_ttft_p50_on_s": on,
            "p8_ttft_p99_off_s": percentile(ttft["off"], 99), "p8_ttft_p99_on_s": percentile(ttft["on"], 99),
            "p8_requests": n, "p8_prompt_tokens_mean": sum(map(len, ps)) / n, "p8_shared_prefix_tokens": common,
            "p8_restored_fraction": hit}
