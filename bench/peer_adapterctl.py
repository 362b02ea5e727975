"""adapterctl's side of ``python -m bench.peer``: the same workload as ``bench/peer_vllm.py``
(same token ids, same PEFT adapter files) through ``BatchingEngine`` in this process.

``python -m bench.peer_adapterctl --workload W --dtype float32|bfloat16 --out R`` writes
``{"system", "dtype", "runs": {"base"|"mixed"|"single"|"single_adapter": {"tok_s", "seconds", "tokens"}}}``.
tokens/s is generated tokens over the wall time from submitting every request to the last
one finishing (prefill included), as on vLLM's side.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


def build_engine(workload: dict[str, Any], dtype: str):
    """The one place that knows how the engine is built: the workload's base model, every
    adapter in memory under its directory's name with a slot each, a row per prompt, and
    vLLM's limits (``max_lora_rank``, ``max_batch_tokens``)."""
    from adapterctl.basemodel import load_tokenizer, resolve_base_model
    from adapterctl.server.cache.memory import MemoryStore
    from adapterctl.server.engine.config import EngineConfig
    from adapterctl.server.engine.engine import BatchingEngine
    from bench.common import load_dirs

    base = resolve_base_model(workload["model"], progress=False)
    dirs = [Path(d) for d in workload["adapters"]]
    config = EngineConfig(device="cpu", dtype=dtype, max_adapters=max(len(dirs), 1),
                          max_lora_rank=workload["max_lora_rank"], max_running_requests=len(workload["prompts"]),
                          max_waiting=len(workload["prompts"]), max_batch_tokens=workload["max_batch_tokens"],
                          ignore_eos=True)
    return BatchingEngine(base, MemoryStore(load_dirs(dirs, base)), config, tokenizer=load_tokenizer(base))


async def _tokens(engine, req) -> list[int]:
    from adapterctl.server.types import GenerationResult

    async for item in engine.generate(req):
        if isinstance(item, GenerationResult):
            return list(item.token_ids)
    raise RuntimeError(f"request {req.request_id} ended without a result")


async def _timed(engine, prompts: list[list[int]], new: int, adapters: list[str | None], tag: str) -> dict[str, Any]:
    from bench.common import request

    reqs = [request(f"{tag}{i}", p, new, a) for i, (p, a) in enumerate(zip(prompts, adapters))]
    began = time.monotonic()
    tokens = await asyncio.gather(*(_tokens(engine, r) for r in reqs))
    seconds = time.monotonic() - began
    return {"tok_s": sum(map(len, tokens)) / seconds, "seconds": seconds, "tokens": tokens}


async def run(workload: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Warm up (every adapter into its slot), then time base, mixed, single and single_adapter once each."""
    started = time.monotonic()
    prompts, new = workload["prompts"], workload["new_tokens"]
    names = [Path(d).name for d in workload["adapters"]][: len(prompts)]
    engine = build_engine(workload, dtype)
    await engine.start()
    try:
        for name in names:
            await engine.load_adapter(name)
        load_s = time.monotonic() - started
        none = [None] * len(prompts)
        short = [p[:4] for p in prompts]  # warm-up, as on vLLM's side
        await _timed(engine, short, 2, none, "wb")
        await _timed(engine, short, 2, names, "wm")
        runs = {"base": await _timed(engine, prompts, new, none, "b"),
                "mixed": await _timed(engine, prompts, new, names, "m"),
                "single": await _timed(engine, [workload["single_prompt"]], workload["single_new_tokens"], [None], "s"),
                "single_adapter": await _timed(engine, [workload["single_prompt"]], workload["single_new_tokens"],
                                               names[:1], "sa")}
    finally:
        await engine.stop()
    import torch

    return {"system": "adapterctl", "version": f"torch {torch.__version__}", "dtype": dtype, "load_s": load_s,
            "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_adapterctl", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, help="workload JSON written by bench/peer.py")
    parser.add_argument("--dtype", required=True, choices=("float32", "bfloat16"))
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    workload = json.loads(Path(args.workload).read_text())
    result = asyncio.run(run(workload, args.dtype))
    Path(args.out).write_text(json.dumps(result))
    print(f"adapterctl {args.dtype}: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s" for k, v in result["runs"].items()),
          file=sys.stderr)


if __name__ == "__main__":
    main()
