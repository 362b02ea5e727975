"""``python -m bench.run [--quick]``: the serving benchmark of issue 4 on the real base
model, baselines and engine side by side in one process. Prints a table, then as the
LAST line one JSON object with the p1/p2/p3/p4/p5/p6 ratios and base_tok_s_b64.

Workloads (full / --quick):
  p1/p2  32 / 8 concurrent requests, prompts 16-32 tokens, 32 / 8 new tokens, greedy, each
         on its own rank-16 q/v adapter; vs the same without adapter (p1, engine both
         sides, median of 5 interleaved pairs) and vs stock PEFT set_adapter one adapter
         at a time (p2).
  b64    64 concurrent base requests, 64 / 8 new tokens.
  p3     64 / 12 requests, max_new uniform in [8, 128] / [4, 16], Poisson arrivals at half
         the engine's b64 rate; vs HF generate static batches of <= 32 (same arrivals).
  p4     32 / 8 concurrent streams on their own rank-16 adapters through the HTTP and gRPC
         front ends on loopback vs the same in-process (bench/frontend_bench.py).
  p5     500 / 40 rank-8 adapters on a moto S3 registry, 16 slots, 64 host slots,
         256 / 48 Zipf(1.0) requests; cold loads and promotions of rank-16 q/v adapters.
  p6     bench/train_bench.py (null when it is absent).
  p8     64 / 16 chat requests over 8 adapters sharing a ~400-token system prompt, 8 closed-loop
         clients: TTFT p50 with the prefix cache off ÷ on (bench/prefix_bench.py).
  roof   single-stream tok/s and decode weight traffic ÷ measured memory bandwidth at 1 and
         64 rows, in bf16 and in the dtype ``--dtype auto`` picks (bench/roofline.py).

``--device cuda`` runs the engine and the in-process baselines on that device (default cpu).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEYS = (
    "p1_mixed_over_base",
    "p2_over_switching",
    "p3_goodput_over_static",
    "p3_ttft_p99_over_solo",
    "p4_http_over_inprocess",
    "p4_grpc_over_inprocess",
    "p5_cold_load_ms_p50",
    "p5_promote_ms_p50",
    "p5_zipf_over_hot",
    "base_tok_s_b64",
    "p6_train_over_stock",
    "p8_prefix_ttft_gain",
    "single_stream_tok_s_bf16",
    "single_adapter_over_base_bf16",
    "roofline_bf16_b1",
    "roofline_bf16_b64",
)
WORKLOADS = ("p1", "p2", "b64", "p3", "p4", "p5", "p6", "p8", "roof")
GOALS = {
    "p1_mixed_over_base": ">= 0.90",
    "p2_over_switching": ">= 8",
    "p3_goodput_over_static": ">= 1.5",
    "p3_ttft_p99_over_solo": "<= 2.0",
    "p4_http_over_inprocess": ">= 0.90",
    "p4_grpc_over_inprocess": ">= 0.90",
    "p5_cold_load_ms_p50": "<= 100",
    "p5_promote_ms_p50": "<= 5",
    "p5_zipf_over_hot": ">= 0.80",
    "base_tok_s_b64": "",
    "p6_train_over_stock": "",
    "p8_prefix_ttft_gain": ">= 3",
    "single_stream_tok_s_bf16": "(/ vLLM's: bench-peer)",
    "single_adapter_over_base_bf16": "",
    "roofline_bf16_b1": ">= 0.6",
    "roofline_bf16_b64": ">= 0.40",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def serving(quick: bool, only: set[str], cpu_gemm: str, device: str,
                  lora_page_rank: int | None = None, gc_freeze: bool = True) -> dict[str, Any]:
    import torch
    from peft import PeftModel

    from adapterctl.basemodel import load_model, load_tokenizer
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine
    from bench import cache_bench, engine_bench, frontend_bench, prefix_bench, roofline
    from bench.common import base_model, load_dirs, random_adapters, template_adapter

    torch.manual_seed(0)
    base = base_model()
    tok = load_tokenizer(base)
    plain = load_model(base, device=device)

    def engine_config(**fields: Any) -> EngineConfig:  # every engine of this run: same device, gemm, fp32, pages
        if lora_page_rank is not None:
            fields.setdefault("lora_page_rank", lora_page_rank)
        return EngineConfig(device=device, dtype="float32", cpu_gemm=cpu_gemm, gc_freeze=gc_freeze, **fields)

    out: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "cpu_gemm": cpu_gemm, "device": device,
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        templates = {"r16": template_adapter(plain, root / "t16", 16, ["q_proj", "v_proj"]),
                     "r8": template_adapter(plain, root / "t8", 8, ["q_proj", "v_proj"])}
        dirs = random_adapters(templates["r16"], root / "ad", "a", 32, seed=1)
        names = [d.name for d in dirs]
        peft = PeftModel.from_pretrained(plain, str(dirs[0]), adapter_name=names[0]).eval()
        for d in dirs[1:]:
            peft.load_adapter(str(d), adapter_name=d.name)
        _log("baseline PEFT model with 32 adapters ready")
        engine = BatchingEngine(base, MemoryStore(load_dirs(dirs, base)),
                                engine_config(max_adapters=32, max_running_requests=64, max_waiting=256,
                                              ignore_eos=True),
                                tokenizer=tok)
        await engine.start()
        try:
            if "p1" in only or "p2" in only:
                out.update(await engine_bench.p1_p2(engine, peft, tok, names, quick))
                _log(f"p1 {out['p1_mixed_over_base']:.3f}  p2 {out['p2_over_switching']:.2f}")
            if "b64" in only or "p3" in only:
                out.update(await engine_bench.base_b64(engine, tok, quick))
                _log(f"base_tok_s_b64 {out['base_tok_s_b64']:.1f}")
            if "p3" in only:
                out.update(await engine_bench.p3(engine, peft, tok, out["base_tok_s_b64"], quick))
                _log(f"p3 goodput {out['p3_goodput_over_static']:.2f}  ttft {out['p3_ttft_p99_over_solo']:.2f}")
            if "p4" in only:
                out.update(await frontend_bench.p4(engine, tok, names, quick))
                _log(f"p4 http {out['p4_http_over_inprocess']:.3f}  grpc {out['p4_grpc_over_inprocess']:.3f}")
        finally:
            await engine.stop()
        model = engine.runner.model
        del peft, plain, engine
        if "p5" in only:
            out.update(await cache_bench.p5(base, tok, model, templates, quick, _log, engine_config))
            _log(f"p5 cold {out['p5_cold_load_ms_p50']:.1f} ms  promote {out['p5_promote_ms_p50']:.2f} ms  "
                 f"zipf/hot {out['p5_zipf_over_hot']:.2f}")
        if "p8" in only:
            out.update(await prefix_bench.p8(base, tok, model, dirs, quick, _log, engine_config))
            _log(f"p8 prefix TTFT gain {out['p8_prefix_ttft_gain']:.2f}")
        if "roof" in only:
            def roof_engine(dtype: str) -> BatchingEngine:  # 64 base rows and one adapter, in ``dtype``
                config = EngineConfig(device=device, dtype=dtype, cpu_gemm=cpu_gemm, gc_freeze=gc_freeze,
                                      max_running_requests=64, max_waiting=64, ignore_eos=True)
                return BatchingEngine(base, MemoryStore(load_dirs(dirs[:1], base)), config, tokenizer=tok)

            out.update(await roofline.roofline(tok, quick, _log, roof_engine, device, names[0]))
    return out


def training(quick: bool) -> dict[str, Any]:
    try:
        from bench import train_bench
    except ImportError:
        return {"p6_train_over_stock": None}
    result = train_bench.run(quick=quick, steps=3 if quick else None)
    return {k: v for k, v in result.items() if k.startswith("p6_")}


def table(results: dict[str, Any]) -> str:
    lines = [f"{'metric':<28}{'value':>12}  goal", "-" * 52]
    for key in KEYS:
        value = results.get(key)
        shown = "null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<28}{shown:>12}  {GOALS[key]}")
    lines.append("")
    lines += [f"  {k} = {v:.3f}" if isinstance(v, float) else f"  {k} = {v}"
              for k, v in sorted(results.items()) if k not in KEYS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (under 3 minutes)")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (the rest print null)")
    parser.add_argument("--cpu-gemm", default="auto", choices=("auto", "onednn", "torch", "gemv"),
                        help="the engine's dense matmul (baselines always use stock torch)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="torch device of the engine and the in-process baselines (EngineConfig.device)")
    parser.add_argument("--lora-page-rank", type=int, default=None,
                        help="EngineConfig.lora_page_rank of the engines (default: its default; 64, the default max "
                             "rank: one adapter per device slot, the layout before paging)")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="EngineConfig.gc_freeze=False: the engines leave Python's garbage collector as it is")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    started = time.monotonic()
    only = set(args.only.split(","))
    if not only <= set(WORKLOADS):
        parser.error(f"--only takes a subset of {','.join(WORKLOADS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device (is this a CUDA build of torch?)")
    results = asyncio.run(serving(args.quick, only, args.cpu_gemm, args.device, args.lora_page_rank,
                                  not args.no_gc_freeze)) \
        if only - {"p6"} else {}
    results.update(training(args.quick) if "p6" in only else {"p6_train_over_stock": None})
    results["wall_s"] = time.monotonic() - started
    print(table(results))
    print(json.dumps({k: results.get(k) for k in KEYS}))


if __name__ == "__main__":
    main()
