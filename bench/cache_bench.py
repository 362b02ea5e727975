"""Adapter-cache workloads (p5) over a real registry on a loopback moto S3 server:
cold load registry -> device slot, host -> device promotion, and a Zipf(1.0) mix over
500 rank-8 adapters with 16 device slots (max rank 64, paged: ``lora_page_rank``) and 64 host
slots vs the same requests on 16 resident adapters (a separate set, run before and after the
Zipf run; their mean time counts)."""
from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from bench.common import median, prompts, random_adapters, request, run_all


class MotoS3:
    """A moto S3 server on 127.0.0.1 with one bucket; sets AWS_* env vars while open."""

    def __enter__(self) -> str:
        import boto3
        from moto.server import ThreadedMotoServer

        self._saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                      "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://{host}:{port}")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
        return f"s3://{bucket}/adapters"

    def __exit__(self, *exc) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _zipf(n_items: int, n_draws: int, seed: int) -> list[int]:
    weights = [1.0 / (k + 1) for k in range(n_items)]
    return random.Random(seed).choices(range(n_items), weights=weights, k=n_draws)


async def p5(base, tok, model, templates: dict[str, Path], quick: bool, log,
             engine_config: Callable[..., Any]) -> dict[str, Any]:
    """Needs ``model`` (already wrapped by an earlier engine is fine) and two template
    adapter dirs: ``r16`` and ``r8`` (q/v)."""
    from adapterctl.registry import open_registry
    from adapterctl.server.cache.store import AdapterStore, AdapterStoreConfig
    from adapterctl.server.engine.engine import BatchingEngine

    n_zipf, n_cold, n_req, new = (40, 3, 48, 8) if quick else (500, 10, 256, 32)
    with tempfile.TemporaryDirectory(prefix="bench-p5-") as tmp, MotoS3() as uri:
        root = Path(tmp)
        reg = open_registry(uri)
        began = time.monotonic()
        groups = (
            ("cold", templates["r16"], n_cold, 11),
            ("z", templates["r8"], n_zipf, 12),
            ("h", templates["r8"], 16, 13),
        )
        for prefix, template, count, seed in groups:
            for d in random_adapters(template, root / "src", prefix, count, seed=seed):
                reg.publish(d, d.name, base_model=str(base.path))
        log(f"p5: published {n_cold + n_zipf + 16} adapters to moto S3 in {time.monotonic() - began:.0f}s")
        config = engine_config(max_adapters=16, max_waiting=4096, ignore_eos=True)
        store = AdapterStore(AdapterStoreConfig(cache_dir=root / "disk", host_max_items=64), reg, base,
                             max_lora_rank=config.max_lora_rank)
        engine = BatchingEngine(base, store, config, model=model, tokenizer=tok)
        await engine.start()
        try:
            cold = []
            for i in range(n_cold):
                t = time.perf_counter()
                await engine.load_adapter(f"cold{i}")
                cold.append(1e3 * (time.perf_counter() - t))
            promote = [await _promote_ms(engine, store, f"cold{i % n_cold}") for i in range(max(5, n_cold))]
            ks = _zipf(n_zipf, n_req, seed=5)
            ps = prompts(tok, n_req, 16, 32, seed=6)
            hot_reqs = [request(f"h{i}", p, new, f"h{k % 16}") for i, (p, k) in enumerate(zip(ps, ks))]
            hot, hot_first = [], []
            for phase in ("hot", "zipf", "hot"):  # hot runs bracket the zipf run against load drift
                if phase == "hot":
                    for k in range(16):  # a separate set, so zipf's popular adapters start cold
                        await engine.load_adapter(f"h{k}")
                    seconds, recs = await run_all(engine, hot_reqs)
                    hot.append(seconds)
                    hot_first.append(_first_token_s(recs))
                else:
                    zipf_s, recs = await run_all(engine, [request(f"z{i}", p, new, f"z{k}")
                                                          for i, (p, k) in enumerate(zip(ps, ks))])
                    zipf_first = _first_token_s(recs)
            hot_s = sum(hot) / len(hot)
            bank = engine.runner.bank
            resident = bank.num_pages // bank.pages_for(8)  # rank-8 adapters the device memory holds at once
        finally:
            await engine.stop()
    return {
        "p5_cold_load_ms_p50": median(cold),
        "p5_promote_ms_p50": median(promote),
        "p5_zipf_over_hot": hot_s / zipf_s,
        "p5_zipf_tok_s": n_req * new / zipf_s,
        "p5_hot_tok_s": n_req * new / hot_s,
        "p5_distinct_adapters": len(set(ks)),
        "p5_device_capacity": resident,
        "p5_zipf_min_steps": _min_steps(len(set(ks)), n_req, new, resident, config.max_running_requests),
        "p5_hot_min_steps": _min_steps(16, n_req, new, resident, config.max_running_requests),
        "p5_requests": n_req,
        "p5_registry_adapters": n_zipf,
        "p5_hot_runs_s": hot,
        # where the Zipf run's extra time goes: its first token waits for the cold loads (registry ->
        # host) that share the CPU with the first prefill; after that its steps cost what hot ones do
        "p5_zipf_first_token_s": zipf_first,
        "p5_hot_first_token_s": sum(hot_first) / len(hot_first),
    }


def _first_token_s(recs) -> float:
    """Seconds from the first submission to the first token of any request of one run."""
    return min(r.first for r in recs if r.first is not None) - min(r.submitted for r in recs)


def _min_steps(adapters: int, requests: int, new: int, slots: int, rows: int) -> int:
    """Counted, not timed: the fewest decode steps for ``requests`` of ``new`` tokens each over
    ``adapters`` distinct adapters, ``slots`` of which fit the device at once. A place holds one
    adapter for at least ``new`` steps, so some place serves ceil(adapters / slots) of them in turn;
    and a step decodes at most ``rows`` rows."""
    return max(-(-adapters // slots) * new, -(-requests * new // rows))


async def _promote_ms(engine, store, ref: str) -> float:
    """Host RAM -> device slot: drop the version from its slot, then time the copy back
    (on the decode thread, between steps, as a request's admission would)."""
    served = await store.resolve(ref)
    loaded = await store.get(served)  # a host-tier hit

    def promote() -> float:
        if served in engine.slots.lru:
            engine.slots.unload(served)
        t = time.perf_counter()
        engine.slots.ensure(loaded)
        return 1e3 * (time.perf_counter() - t)

    return await engine.on_decode_thread(promote)
