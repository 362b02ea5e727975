"""``python -m bench.gemm_bench [--rows 1,8,32,64,512] [--dtypes float32,bfloat16]``: the
engine's GEMM kernels against ATen's ``F.linear`` on the base model's projection shapes
(packed q/k/v, o, packed gate/up, down, the LM head), in one process, alternating, best
of three rounds. Random weights of the model's shapes; only the config is read.

* fp32: ``kernels.pick_gemm("auto")`` (the panel GEMM on AVX-512F or AVX2 CPUs, else oneDNN) on the
  weight the engine gives it (``kernels.prepare``: its panels, or oneDNN's blocked layout) vs
  ``F.linear`` (ATen's MKL sgemm).
* bf16: ``pick_gemm("auto")`` (oneDNN bf16 where the CPU has bf16 arithmetic, else
  :func:`kernels.upcast_linear`: the C GEMV of ``cpu_gemv`` up to 32 rows, upcast weight
  blocks beyond) vs ``F.linear`` in bf16; where the C GEMV runs, also vs the upcast
  (``kernels.upcast_blocks``) on the same rows, and where that GEMV is the AVX-512 one, vs the
  AVX2 one.

* fp32 where ``auto`` is the panel GEMM (AVX-512F or AVX2): also every layer's projections in one pass,
  one set of weights per layer so they stream from memory as in a step, against oneDNN's
  prepacked GEMM (``gemm_layers_streamed_over_onednn_fp32_b<rows>``: oneDNN ÷ panel time).

Every row prints the ms and GFLOP/s of both and ``auto`` ÷ ``F.linear`` time; the LAST line
is one JSON object: ``gemm_speedup_<dtype>_<shape>_b<rows>`` (F.linear ÷ auto time),
``gemm_gemv_over_upcast_bf16_<shape>_b<rows>`` (upcast ÷ C GEMV time, where it runs),
``gemm_avx512_over_avx2_bf16_<shape>_b<rows>`` (AVX2 ÷ AVX-512 GEMV time, where the latter runs), the
model's step totals ``gemm_step_ms_<dtype>_b<rows>`` (every projection x layers + the head,
auto) and the CPU (lscpu model, ISA flags). Weights are reused across repetitions, so a
shape that fits in the caches looks faster than it runs in a step: compare kernels, not
absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROUNDS = 3


def shapes(config) -> dict[str, tuple[int, int, int]]:
    """name -> (out, in, count per step) of the decoder's projections and the LM head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return {"qkv": (q + 2 * kv, h, layers), "o": (h, q, layers), "gate_up": (2 * inter, h, layers),
            "down": (h, inter, layers), "head": (config.vocab_size, h, 1)}


def _best(fn: Callable[[], Any], reps: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - began) / reps


def measure(dtype: torch.dtype, name: str, out: int, inp: int, rows: int) -> dict[str, float]:
    from adapterctl.server.engine import cpu_gemv
    from adapterctl.server.engine.kernels import pick_gemm, prepare, upcast_blocks, upcast_linear

    torch.manual_seed(0)
    w, x = torch.randn(out, inp).to(dtype), torch.randn(rows, inp).to(dtype)
    auto = pick_gemm("auto", torch.device("cpu"), dtype)
    operand = prepare(auto, w)
    reps = max(1, min(30, int(2e9 / (2 * rows * out * inp + 1e7))))  # about a second of work per call
    kernel = cpu_gemv.upcast_kernel()
    gemv = auto is upcast_linear and cpu_gemv.library(kernel) is not None and cpu_gemv.supports(x, w, None, kernel)
    fns = {"auto": lambda: auto(x, operand, None), "aten": lambda: F.linear(x, w)}
    if gemv:
        fns["upcast"] = lambda: upcast_blocks(x, w)
        if kernel is not cpu_gemv.AVX2 and cpu_gemv.supports(x, w):
            fns["avx2"] = lambda: cpu_gemv.linear(x, w, None, cpu_gemv.AVX2)
    times = dict.fromkeys(fns, float("inf"))
    with torch.inference_mode():
        for _ in range(ROUNDS):  # alternating, so a noisy neighbour hits each
            for key, fn in fns.items():
                times[key] = min(times[key], _best(fn, reps))
    name = f"cpu_gemv {kernel.name.split()[0]}" if gemv else auto.__name__ + ("" if operand is w else "+prepacked")
    return {**{f"{key}_ms": 1e3 * t for key, t in times.items()}, "gflop": 2 * rows * out * inp / 1e9, "kernel": name}


def streamed(config, rows: int, rounds: int = 5) -> dict[str, float] | None:
    """fp32, where ``auto`` is the panel GEMM: every layer's projections (random weights of the model's
    shapes, one set per layer, so they stream from memory as in a step) through ``auto`` and through
    oneDNN's prepacked GEMM, alternating pass by pass; the median ms of a pass each. None elsewhere."""
    from adapterctl.server.engine.kernels import onednn_linear, panel_linear, pick_gemm, prepare

    if pick_gemm("auto", torch.device("cpu"), torch.float32) is not panel_linear:
        return None
    gen = torch.Generator().manual_seed(0)
    layer_shapes = [(out, inp) for name, (out, inp, _) in shapes(config).items() if name != "head"]
    passes: dict[str, list] = {"auto": [], "onednn": []}
    for _ in range(config.num_hidden_layers):
        weights = [torch.randn(out, inp, generator=gen) for out, inp in layer_shapes]
        passes["auto"].append([prepare(panel_linear, w) for w in weights])
        passes["onednn"].append([prepare(onednn_linear, w) for w in weights])
    xs = [torch.randn(rows, inp, generator=gen) for _, inp in layer_shapes]
    gemms = {"auto": panel_linear, "onednn": onednn_linear}
    times: dict[str, list[float]] = {"auto": [], "onednn": []}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for key, layers in passes.items():
                began = time.perf_counter()
                for ops in layers:
                    for x, op in zip(xs, ops):
                        gemms[key](x, op, None)
                times[key].append(time.perf_counter() - began)
    return {f"{key}_ms": 1e3 * statistics.median(t[1:]) for key, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig

    from bench.common import base_model
    from bench.peer import cpu_info

    parser = argparse.ArgumentParser(prog="python -m bench.gemm_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,64,512", help="comma-separated row counts (M)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(str(base_model().path))
    config = getattr(config, "text_config", config)
    cpu = cpu_info()
    print(f"cpu {cpu['cpu_model']}, {cpu['cpus']} CPUs, ISA {' '.join(cpu['cpu_isa'])}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    result: dict[str, Any] = {"cpu_model": cpu["cpu_model"], "cpu_isa": cpu["cpu_isa"]}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        short = {"float32": "fp32", "bfloat16": "bf16"}[dtype_name]
        for rows in (int(r) for r in args.rows.split(",")):
            step_ms = 0.0
            for name, (out, inp, count) in shapes(config).items():
                m = measure(dtype, name, out, inp, rows)
                step_ms += count * m["auto_ms"]
                result[f"gemm_speedup_{short}_{name}_b{rows}"] = m["aten_ms"] / m["auto_ms"]
                upcast = ""
                if "upcast_ms" in m:
                    result[f"gemm_gemv_over_upcast_{short}_{name}_b{rows}"] = m["upcast_ms"] / m["auto_ms"]
                    upcast = f"   upcast {m['upcast_ms']:9.2f} ms, upcast/auto {m['upcast_ms'] / m['auto_ms']:.2f}"
                if "avx2_ms" in m:
                    result[f"gemm_avx512_over_avx2_{short}_{name}_b{rows}"] = m["avx2_ms"] / m["auto_ms"]
                    upcast += f", AVX2 GEMV/auto {m['avx2_ms'] / m['auto_ms']:.2f}"
                print(f"{short} rows {rows:4d} {name:8s} [{out:6d} x {inp:5d}] {m['kernel']:24s} "
                      f"{m['auto_ms']:9.2f} ms ({m['gflop'] / m['auto_ms'] * 1e3:5.1f} GFLOP/s)   F.linear "
                      f"{m['aten_ms']:9.2f} ms ({m['gflop'] / m['aten_ms'] * 1e3:5.1f} GFLOP/s)   "
                      f"auto/F.linear {m['auto_ms'] / m['aten_ms']:.2f}{upcast}", file=sys.stderr, flush=True)
            result[f"gemm_step_ms_{short}_b{rows}"] = step_ms
            got = streamed(config, rows) if dtype == torch.float32 else None
            if got is not None:
                ratio = result[f"gemm_layers_streamed_over_onednn_fp32_b{rows}"] = got["onednn_ms"] / got["auto_ms"]
                print(f"fp32 rows {rows:4d} all layers, weights streamed: panel GEMM {got['auto_ms']:8.2f} ms, "
                      f"oneDNN prepacked {got['onednn_ms']:8.2f} ms, oneDNN/panel {ratio:.2f}",
                      file=sys.stderr, flush=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
