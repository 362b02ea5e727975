"""Shared pieces of the serving benchmarks: the base model, prompts, random PEFT
adapters written in PEFT's own format, an in-memory adapter source, a loopback moto
S3 server, and timing helpers."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORDS = ("the movie story actor scene great bad plot music film love time people world city night day life "
         "water house old new young small big light dark happy sad friend family school work food game").split()


def base_model():
    from adapterctl.basemodel import resolve_base_model

    return resolve_base_model(os.environ.get("ADAPTERCTL_BASE_MODEL"), progress=True)


def prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``lo..hi`` tokens (BOS + random words), deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(hi)).capitalize()).input_ids
        out.append(ids[:length])
    return out


def template_adapter(model, out: Path, rank: int, targets: list[str]) -> Path:
    """One real PEFT save (config + key names) to clone random adapters from."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    return out


def random_adapters(template: Path, root: Path, prefix: str, n: int, seed: int) -> list[Path]:
    """``n`` adapters shaped like ``template`` with random A and small random B (so each
    changes the output a little and every blob is distinct)."""
    import torch
    from safetensors.torch import load_file, save_file

    shapes = {k: v.shape for k, v in load_file(str(template / "adapter_model.safetensors")).items()}
    config = (template / "adapter_config.json").read_text()
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(n):
        d = root / f"{prefix}{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(config)
        tensors = {
            k: torch.randn(s, generator=g) * (0.02 if "lora_B" in k else s[-1] ** -0.5) for k, s in shapes.items()
        }
        save_file(tensors, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


def load_dirs(dirs: list[Path], base) -> dict[str, Any]:
    from adapterctl.server.cache.loaded import load_peft_dir

    return {d.name: load_peft_dir(d, base, 64) for d in dirs}


@dataclass
class Timed:
    """Per-request timestamps (seconds, monotonic) and token count of one engine request."""

    submitted: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ttft(self) -> float:
        return self.first - self.submitted


async def timed_generate(engine, request) -> Timed:
    """One request's submit, first-token and done times. The calling thread first gives back its
    OpenMP pool (a baseline run here since the engine started may have made one), so that the
    engine's decode thread computes with the only pool, as when serving (server/omp.py)."""
    from adapterctl.server import omp
    from adapterctl.server.types import GenerationResult

    omp.release_pool()
    rec = Timed(time.monotonic())
    async for item in engine.generate(request):
        if rec.first is None and getattr(item, "token_ids", None):
            rec.first = time.monotonic()
        if isinstance(item, GenerationResult):
            rec.done, rec.tokens = time.monotonic(), item.completion_tokens
    return rec


async def run_all(engine, requests) -> tuple[float, list[Timed]]:
    """Submit all at once; wall seconds until the last finishes, and per-request records."""
    start = time.monotonic()
    recs = await asyncio.gather(*(timed_generate(engine, r) for r in requests))
    return time.monotonic() - start, recs


def percentile(values: list[float], q: float) -> float:
    """Percentile ``q`` in [0, 100], interpolating linearly between order statistics
    (numpy's default method)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def request(rid: str, prompt: list[int], max_new: int, adapter: str | None = None):
    from adapterctl.server.types import GenerationRequest, SamplingParams

    return GenerationRequest(rid, list(prompt), SamplingParams(max_new_tokens=max_new), adapter)


def dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
