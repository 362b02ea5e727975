"""Throughput and latency workloads on the real base model: heterogeneous adapters vs
base (p1), vs stock PEFT switching adapters (p2), base decode at 64 streams, and Poisson
arrivals vs static batching (p3). Baselines run in this process, interleaved with the
engine where the workload allows, so a noisy shared CPU hits both sides alike."""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import torch

from bench.common import median, percentile, prompts, request, run_all, timed_generate


async def p1_p2(engine, peft, tok, names: list[str], quick: bool) -> dict[str, Any]:
    """32 concurrent requests, each on its own rank-16 q/v adapter, vs the same with no
    adapter (p1, five interleaved pairs) and vs PEFT ``set_adapter`` one adapter at a
    time (p2: engine mixed tokens/s over PEFT's)."""
    n, new, reps = (8, 8, 1) if quick else (32, 32, 5)
    ps = prompts(tok, n, 16, 32, seed=1)
    base_reqs = [request(f"b{i}", p, new) for i, p in enumerate(ps)]
    mixed_reqs = [request(f"m{i}", p, new, names[i]) for i, p in enumerate(ps)]
    for name in names[:n]:  # resident: p1 measures batching, p5 measures loading
        await engine.load_adapter(name)
    await run_all(engine, base_reqs[:2])  # warm-up
    t_base, t_mixed = [], []
    for _ in range(reps):  # interleaved so a noisy neighbour hits both sides
        t_base.append((await run_all(engine, base_reqs))[0])
        t_mixed.append((await run_all(engine, mixed_reqs))[0])
    base_tps, mixed_tps = n * new / median(t_base), n * new / median(t_mixed)
    # p1 is the median of per-pair ratios: the two runs of a pair are adjacent in time,
    # so a neighbour's load burst moves both.
    p1 = median([b / m for b, m in zip(t_base, t_mixed)])
    k = 2 if quick else n
    start = time.monotonic()
    for i in range(k):
        peft.set_adapter(names[i])
        ids = torch.tensor([ps[i]], device=peft.device)
        with torch.inference_mode():
            peft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False)
    switch_tps = k * new / (time.monotonic() - start)
    return {"p1_mixed_over_base": p1, "p2_over_switching": mixed_tps / switch_tps,
            "engine_base_tok_s_b32": base_tps, "engine_mixed_tok_s_b32": mixed_tps, "peft_switching_tok_s": switch_tps,
            "p1_requests": n, "p1_new_tokens": new, "p1_reps": reps}


async def base_b64(engine, tok, quick: bool) -> dict[str, Any]:
    """Base-model tokens/s with 64 concurrent requests (prefill included)."""
    new = 8 if quick else 64
    reqs = [request(f"s{i}", p, new) for i, p in enumerate(prompts(tok, 64, 16, 32, seed=2))]
    seconds, _ = await run_all(engine, reqs)
    return {"base_tok_s_b64": 64 * new / seconds}


async def p3(engine, peft, tok, sat_tok_s: float, quick: bool) -> dict[str, Any]:
    """Poisson arrivals at about half the engine's saturated rate: goodput vs static
    batching of the same arrivals, and TTFT p99 vs an idle engine's TTFT."""
    n, lo, hi = (12, 4, 16) if quick else (64, 8, 128)
    rng = random.Random(4)
    max_new = [rng.randint(lo, hi) for _ in range(n)]
    ps = prompts(tok, n, 16, 32, seed=3)
    rate = 0.5 * sat_tok_s / statistics.mean(max_new)  # requests per second
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    solo = []
    for i in range(7):  # one request at a time on the idle engine
        solo.append((await timed_generate(engine, request(f"solo{i}", ps[i], 1))).ttft)
    ttft_solo = median(solo)

    start = time.monotonic()

    async def arrive(i: int):
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
        return await timed_generate(engine, request(f"p3-{i}", ps[i], max_new[i]))

    recs = await asyncio.gather(*(arrive(i) for i in range(n)))
    engine_span = max(r.done for r in recs) - start
    engine_goodput = sum(r.tokens for r in recs) / engine_span
    ttft_p99 = percentile([r.ttft for r in recs], 99)
    static_span = _static_batching(peft, tok, ps, max_new, arrivals)
    static_goodput = sum(max_new) / static_span
    return {"p3_goodput_over_static": engine_goodput / static_goodput, "p3_ttft_p99_over_solo": ttft_p99 / ttft_solo,
            "p3_engine_goodput_tok_s": engine_goodput, "p3_static_goodput_tok_s": static_goodput,
            "p3_ttft_p99_s": ttft_p99, "p3_ttft_p50_s": percentile([r.ttft for r in recs], 50),
            "p3_ttft_p99_over_p50": ttft_p99 / percentile([r.ttft for r in recs], 50),
            "p3_ttft_solo_s": ttft_solo, "p3_rate_req_s": rate, "p3_requests": n,
            "p3_engine_span_s": engine_span, "p3_static_span_s": static_span}


def _static_batching(peft, tok, ps, max_new, arrivals, max_batch: int = 32) -> float:
    """HF generate on batches of up to ``max_batch``; a batch starts when the previous
    ends and takes every request that has arrived. Arrival waits are simulated (the
    clock jumps), generate time is real. Returns the makespan in seconds."""
    clock, pending = 0.0, list(range(len(ps)))
    with peft.disable_adapter(), torch.inference_mode():
        while pending:
            clock = max(clock, arrivals[pending[0]])
            batch = [i for i in pending if arrivals[i] <= clock][:max_batch]
            width = max(len(ps[i]) for i in batch)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(ps[i])) + ps[i] for i in batch], device=peft.device)
            mask = torch.tensor([[0] * (width - len(ps[i])) + [1] * len(ps[i]) for i in batch], device=peft.device)
            steps = max(max_new[i] for i in batch)
            began = time.monotonic()
            peft.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            clock += time.monotonic() - began
            pending = [i for i in pending if i not in batch]
    return clock
