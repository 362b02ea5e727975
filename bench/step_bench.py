"""``python -m bench.step_bench [--dtype float32] [--rows 1,64] [--steps 30] [--baseline unfused] [--prompt 20]``:
one decode step of the runner as the engine builds it (one-op RMSNorms, packed q/k/v and
gate/up, the LM head in one piece, weights in the GEMM's layout) against a baseline, both
in this process on the real base model, alternating step by step so a noisy neighbour
hits both. Base rows, prompts of ``--prompt`` tokens (20), then decode. Baselines:

* ``unfused``: HF norm modules, seven GEMMs per layer, the LM head in vocab slices;
* ``unpacked``: the same step with the weights in their plain layout (``prepack=False``);
* ``torch``: the same step with every GEMM through ``F.linear`` (``cpu_gemm="torch"``): ATen's
  MKL in fp32, ATen's bf16 GEMV/GEMM in bf16, against oneDNN and the AVX2 bf16 GEMV;
* ``onednn``: the same step with every GEMM through oneDNN (``cpu_gemm="onednn"``), against
  ``auto``'s choice (fp32 on AVX-512F or AVX2: the panel GEMM of ``panel_gemm``; bf16 on AVX512-BF16,
  AMX or not: the AVX512-BF16 GEMV at 1-4 rows; on other CPUs, where oneDNN may emulate bf16,
  ``upcast_linear``);
* ``fp32``: the same step in fp32 (``--dtype float32``'s path) against bf16 (``--dtype bfloat16``
  only): what bf16 buys on this CPU, which ``--dtype auto`` decides from its flags; the logits'
  largest difference is then bf16's error;
* ``aten_ops``: the same step with norms and RoPE in ATen ops (``fused_ops=False``), against one
  C call each (``cpu_fused``);
* ``unplanned``: the same step with every layer through the Python path (``cpu_planned_layers=False``),
  against one C call a layer (:mod:`~adapterctl.server.engine.decode_layer`: bf16 with a C GEMV, 1-4
  rows on AVX512-BF16); attention and GELU there may differ from ATen's by a bf16 ulp;
* ``full_head``: argmax-only rows through the whole LM head (each slice reduced to its first
  maximum as it is computed), against the int8 greedy head (``greedy_head``, CPU); checks the same
  tokens, and prints the most candidates a row kept.

``--lora``: every row decodes through its own random rank-16 q/v adapter (one slot each, the same
weights in both runners) instead of the base model.

Prints per row count the median step time of each, ``step_fused_speedup_b<rows>``,
``step_prepack_speedup_b<rows>``, ``step_gemm_speedup_b<rows>``, ``step_gemv_speedup_b<rows>``,
``step_ops_speedup_b<rows>``, ``step_plan_speedup_b<rows>``, ``step_dtype_speedup_b<rows>`` or
``step_head_speedup_b<rows>``
(baseline ÷ engine), whether
the logits of every step were bit-identical and their largest difference; the LAST line is one JSON object of those.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch


def _runner(base, dtype: str, rows: int, fuse: bool, prepack: bool = True, gemm: str = "auto",
            fused_ops: bool = True, greedy_head: bool = True, planned: bool = True, prompt: int = 20):
    from adapterctl.basemodel import load_model
    from adapterctl.server.engine.runner import Chunk, ModelRunner

    runner = ModelRunner(load_model(base, "cpu", dtype), max_rows=rows, max_positions=max(512, prompt + 256),
                         num_slots=max(4, rows),
                         max_rank=16,
                         lora_modules=("q_proj", "v_proj"), fuse=fuse, prepack=prepack, gemm=gemm,
                         fused_ops=fused_ops, greedy_head=greedy_head, planned_layers=planned)
    with torch.inference_mode():
        for i in range(rows):
            runner.kv.alloc_row(prompt + 236)
        fwd = runner.start([Chunk(i, 0, [2] + list(range(1000 + 20 * i, 999 + 20 * i + prompt)), 0, True)
                            for i in range(rows)])
        while fwd.step():
            pass
    return runner


def _adapters(runners: list, rows: int) -> None:
    """Write ``rows`` random rank-16 q/v adapters into slots 1..rows of every runner (the same weights)."""
    import types

    gen = torch.Generator().manual_seed(0)
    for slot in range(1, rows + 1):
        mods = runners[0].lora_modules
        weights = {p: (torch.randn(16, m.in_features, generator=gen) * 0.05,
                       torch.randn(m.out_features, 16, generator=gen) * 0.05) for p, m in mods.items()}
        adapter = types.SimpleNamespace(weights=weights, rank=16, scale=2.0,
                                        served=types.SimpleNamespace(name=f"bench{slot}", version=1))
        for r in runners:
            r.bank.write(slot, adapter)


def _step(runner, rows: int, pos: int, whole_head: bool, argmax_only: bool = False, lora: bool = False
          ) -> tuple[float, Any]:
    """(seconds, the step's logits; with ``argmax_only`` its tokens); ``lora``: row i in slot i + 1."""
    from adapterctl.server.engine.runner import Chunk

    began = time.perf_counter()
    with torch.inference_mode():
        fwd = runner.start([Chunk(i, pos, [3000 + pos + i], i + 1 if lora else 0, True, argmax_only)
                            for i in range(rows)])
        while fwd.step(whole_head=whole_head):
            pass
    return time.perf_counter() - began, fwd.tokens if argmax_only else fwd.logits


def measure(base, dtype: str, rows: int, steps: int, baseline: str = "unfused", lora: bool = False,
            prompt: int = 20) -> dict[str, Any]:
    unpacked, aten_ops = baseline == "unpacked", baseline == "aten_ops"
    full_head, unplanned, fp32 = baseline == "full_head", baseline == "unplanned", baseline == "fp32"
    if fp32 and dtype != "bfloat16":
        raise SystemExit("--baseline fp32 times fp32 against --dtype bfloat16")
    gemm = baseline if baseline in ("torch", "onednn") else "auto"
    # baselines that keep the engine's fused layers
    same_layers = unpacked or gemm != "auto" or aten_ops or full_head or unplanned or fp32
    unfused = _runner(base, "float32" if fp32 else dtype, rows, same_layers, prepack=not unpacked, gemm=gemm,
                      fused_ops=not aten_ops, greedy_head=not full_head, planned=not unplanned, prompt=prompt)
    # against ATen's ops the engine keeps ATen's attention and GELU too (the bitwise check of the C ops)
    fused = _runner(base, dtype, rows, True, planned=not aten_ops, prompt=prompt)
    if lora:
        _adapters([unfused, fused], rows)
    kept: list[int] = []  # the most candidates a row kept, per greedy step
    if full_head:
        if fused.greedy_head is None or not fused.greedy_head.takes(rows):
            raise SystemExit(f"--baseline full_head needs the greedy head for {rows} rows (an x86-64 CPU with AVX2 "
                             "and a C compiler; see greedy_head.max_rows)")
        real = fused.greedy_head.select
        fused.greedy_head.select = lambda *a: _counted(real(*a), kept)
    t_old, t_new, identical, diff = [], [], True, 0.0
    for k in range(steps + 3):
        a, la = _step(unfused, rows, prompt + k, whole_head=same_layers, argmax_only=full_head, lora=lora)
        b, lb = _step(fused, rows, prompt + k, whole_head=True, argmax_only=full_head, lora=lora)
        if full_head:  # both are token lists
            identical &= la == lb
        else:
            identical &= torch.equal(la, lb)
            diff = max(diff, (la.float() - lb.float()).abs().max().item())
        if k >= 3:  # warm-up steps not counted
            t_old.append(a)
            t_new.append(b)
    old, new = statistics.median(t_old), statistics.median(t_new)
    name = {"unpacked": "prepack", "torch": "gemm", "onednn": "gemv", "aten_ops": "ops", "unplanned": "plan",
            "full_head": "head", "fp32": "dtype"}.get(baseline, "fused")
    out = {f"step_ms_{baseline}_b{rows}": 1e3 * old, f"step_ms_engine_b{rows}": 1e3 * new,
           f"step_{name}_speedup_b{rows}": old / new, f"logits_identical_b{rows}": identical,
           f"logits_max_diff_b{rows}": diff}
    if full_head:
        out[f"greedy_candidates_max_b{rows}"] = max(kept, default=0)
    return out


def _counted(got, kept: list[int]):
    """``GreedyHead.select``'s result, recording its largest per-row count in ``kept``."""
    if got is not None:
        kept.append(int(got[1].max()))
    return got


def main(argv: list[str] | None = None) -> None:
    from bench.common import base_model

    parser = argparse.ArgumentParser(prog="python -m bench.step_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rows", default="1,64", help="comma-separated row counts")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row count")
    parser.add_argument("--baseline", default="unfused",
                        choices=("unfused", "unpacked", "torch", "onednn", "fp32", "aten_ops", "unplanned",
                                 "full_head"))
    parser.add_argument("--lora", action="store_true", help="each row through its own rank-16 q/v adapter")
    parser.add_argument("--prompt", type=int, default=20, help="prompt tokens per row before the timed decode steps")
    args = parser.parse_args(argv)
    base = base_model()
    out: dict[str, Any] = {"dtype": args.dtype, "threads": torch.get_num_threads(), "baseline": args.baseline,
                           "lora": args.lora, "prompt": args.prompt}
    for rows in (int(r) for r in args.rows.split(",")):
        out.update(measure(base, args.dtype, rows, args.steps, args.baseline, args.lora, args.prompt))
        old, new = out[f"step_ms_{args.baseline}_b{rows}"], out[f"step_ms_engine_b{rows}"]
        print(f"{rows} rows: {args.baseline} {old:.1f} ms, engine {new:.1f} ms, speedup {old / new:.3f}, logits "
              f"identical {out[f'logits_identical_b{rows}']} (max diff {out[f'logits_max_diff_b{rows}']:.2e})",
              file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
