"""Decode against the memory roofline (issue 10): how much of the machine's memory
bandwidth one decode step's weight traffic uses, measured in one run.

* ``mem_bw_gb_s``: the best of 5 passes of a streaming ``sum`` (bytes read) and a copy
  (bytes read + written) over 1 GiB, measured before and again after each dtype's engine ran,
  the best of all: what the memory system delivers to torch here when nothing else holds it.
* ``single_stream_tok_s_<dt>``: one greedy base request, 64 / 16 new tokens, prefill
  included (the issue's single-stream definition), through ``BatchingEngine``; the best of 3
  such requests (1 with ``--quick``), as the bandwidth is a best of passes: on a shared host a
  neighbour that starts mid-run slows one figure, and best-of on both sides keeps the ratio from
  swinging with it either way.
* ``single_adapter_over_base_<dt>``: the same single stream through one rank-16 q/v adapter
  (``single_stream_adapter_tok_s_<dt>``, best of as many, alternating with the base ones) ÷ the
  base stream's: what an adapter costs a lone request (its decode layers take the same planned C
  call, LoRA deltas included, where that applies).
* ``roofline_<dt>_b1``: the weight bytes of one step (every projection and the LM head,
  in ``<dt>``) × steps per second of that stream ÷ ``mem_bw_gb_s``.
* ``roofline_<dt>_b64``: the same at 64 base rows, from the decode phase only: the time
  from the moment every row has its first token to the last token (``new - 1`` steps).

``<dt>`` is ``bf16`` always (the issue's keys) and also ``fp32`` when the engine's
``--dtype auto`` picks fp32 on this host: without AVX512-BF16 / AMX the CPU emulates bf16,
so the fp32 figures are the ones that say how close this host's serving path is.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from bench.common import prompts, request, run_all

SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def read_bandwidth(device: str = "cpu", gib: float = 1.0, reps: int = 5) -> float:
    """Memory bandwidth in bytes/s on ``device``: the best of ``reps`` passes of a streaming
    ``sum`` over ``gib`` GiB (bytes read) and of a copy of it (bytes read + written)."""
    x = torch.ones(int(gib * (1 << 30)) // 4, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    float(x.sum())
    y.copy_(x)
    read = min(_seconds(lambda: float(x.sum()), sync) for _ in range(reps))
    copy = min(_seconds(lambda: y.copy_(x), sync) for _ in range(reps))
    return max(x.numel() * 4 / read, 2 * x.numel() * 4 / copy)


def _seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    began = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - began


def step_weight_bytes(model: torch.nn.Module, itemsize: int) -> int:
    """Bytes of weights one decode step streams: every 2-D weight of the decoder layers
    plus the LM head (the embedding table is only gathered, a few rows per step)."""
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    return (layers + model.lm_head.weight.numel()) * itemsize


async def measure(engine, tok, quick: bool, adapter: str) -> dict[str, Any]:
    """Single-stream (base, and through ``adapter``) and 64-row base decode rates of ``engine`` (started)."""
    new1, rows, new64 = (8, 16, 4) if quick else (64, 64, 32)  # --quick: a smoke run, 16 rows
    one = prompts(tok, 1, 16, 16, seed=5)[0]
    await run_all(engine, [request("w1", one, 4), request("w2", one, 4, adapter)])  # warm-up, adapter loaded
    singles, adapted = [], []
    for i in range(1 if quick else 3):  # alternating, so a neighbour hits both
        singles.append(new1 / (await run_all(engine, [request(f"s{i}", one, new1)]))[0])
        adapted.append(new1 / (await run_all(engine, [request(f"a{i}", one, new1, adapter)]))[0])
    reqs = [request(f"r{i}", p, new64) for i, p in enumerate(prompts(tok, rows, 16, 32, seed=6))]
    _, recs = await run_all(engine, reqs)
    decode_s = max(r.done for r in recs) - max(r.first for r in recs)
    return {"single_tok_s": max(singles), "singles": singles, "adapter_tok_s": max(adapted), "adapted": adapted,
            "b64_steps_s": (new64 - 1) / decode_s, "b64_rows": rows}


async def roofline(tok, quick: bool, log, make_engine, device: str, adapter: str) -> dict[str, Any]:
    """The keys above; ``make_engine(dtype)`` builds an unstarted engine that serves ``adapter``."""
    from adapterctl.server.engine.dtypes import resolve_dtype

    bws = [read_bandwidth(device)]
    out: dict[str, Any] = {}
    auto, why = resolve_dtype("auto", device)
    out["dtype_auto"] = f"{auto} ({why})"
    for dtype in dict.fromkeys(["bfloat16", auto]):
        engine = make_engine(dtype)
        await engine.start()
        try:
            m = await measure(engine, tok, quick, adapter)
            weights = step_weight_bytes(engine.runner.model, torch.finfo(getattr(torch, dtype)).bits // 8)
        finally:
            await engine.stop()
        bws.append(read_bandwidth(device))
        bw = max(bws)
        out["mem_bw_gb_s"], out["mem_bw_gb_s_each"] = bw / 1e9, [round(b / 1e9, 1) for b in bws]
        dt = SHORT[dtype]
        out[f"single_stream_tok_s_{dt}"] = m["single_tok_s"]
        out[f"single_stream_adapter_tok_s_{dt}"] = m["adapter_tok_s"]
        out[f"single_adapter_over_base_{dt}"] = m["adapter_tok_s"] / m["single_tok_s"]
        out[f"roofline_{dt}_b1"] = weights * m["single_tok_s"] / bw
        out[f"roofline_{dt}_b64"] = weights * m["b64_steps_s"] / bw
        out[f"step_weight_mb_{dt}"] = weights / 1e6
        out["roofline_b64_rows"] = m["b64_rows"]
        log(f"{dt}: single stream {m['single_tok_s']:.1f} tok/s (best of "
            f"{', '.join(f'{s:.1f}' for s in m['singles'])}), through an adapter {m['adapter_tok_s']:.1f} (best of "
            f"{', '.join(f'{s:.1f}' for s in m['adapted'])}), decode {m['b64_steps_s']:.2f} steps/s "
            f"({m['b64_rows']} rows) {weights / 1e6:.0f} MB/step, bandwidth {bw / 1e9:.1f} GB/s (best of "
            f"{out['mem_bw_gb_s_each']}) -> roofline b1 "
            f"{out[f'roofline_{dt}_b1']:.3f}, b64 {out[f'roofline_{dt}_b64']:.3f}")
        del engine
    return out

