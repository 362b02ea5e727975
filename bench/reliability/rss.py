"""The issue-12 RSS reproduction: hostile GenerateRequests (long prompts, max_new_tokens
up to the server limit, short deadlines and cancels) against a server with default
limits; RSS before, at its peak, and once the server has been idle a moment.

The KV cache reserves ``prompt + max_new_tokens`` positions for every running row, so
one such request grows the slabs of all ``max_running_requests`` rows; this part shows
whether that memory comes back (it does since ``KVCache.release_idle``)."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc

from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc
from bench.reliability.common import WORDS, ServerProc, metadata


@dataclass
class RssReport:
    requests: int
    rss_start_mib: int
    rss_peak_mib: int
    rss_idle_mib: int
    kv_log_lines: list[str]

    @property
    def idle_growth(self) -> float:
        return (self.rss_idle_mib - self.rss_start_mib) / self.rss_start_mib


async def hostile_rss(server: ServerProc, adapter: str, n: int, seed: int, limit: int,
                      concurrency: int = 16, idle_s: float = 3.0) -> RssReport:
    rng = random.Random(seed)
    start = server.rss()
    peak = start
    log_size = server.log_size()

    async def one(stub) -> None:
        words = rng.randrange(1, 1200)
        req = pb.GenerateRequest(adapter=rng.choice(("", adapter)), max_new_tokens=rng.randrange(1, limit + 1),
                                 prompt=" ".join(rng.choice(WORDS) for _ in range(words)))
        try:
            await stub.Generate(req, metadata=metadata(), timeout=rng.uniform(0.05, 2.0))
        except grpc.aio.AioRpcError:
            pass

    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, server.rss())
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        todo = list(range(n))

        async def worker() -> None:
            while todo:
                todo.pop()
                await one(stub)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.sleep(idle_s)  # deadlines passed: every row is freed, the engine goes idle
    deadline = time.monotonic() + 180  # a cancelled 2k-token prefill step can run ~30 s on 2 busy cores
    while time.monotonic() < deadline and "KV cache grown" in _last_kv_line(server, log_size):
        await asyncio.sleep(0.5)  # the engine releases the grown slabs on its next idle poll
    sampling = False
    await sampler
    idle = server.rss()
    lines = [ln for ln in server.log_since(log_size).splitlines() if "KV cache" in ln]
    return RssReport(n, start >> 20, peak >> 20, idle >> 20, lines[-4:])


def _last_kv_line(server: ServerProc, offset: int) -> str:
    lines = [ln for ln in server.log_since(offset).splitlines() if "KV cache" in ln]
    return lines[-1] if lines else ""
