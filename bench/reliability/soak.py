"""The soak: Zipf(1.0) traffic over many adapters, streaming and unary mixed, random
cancels and short deadlines, 8-32 requests in flight; every completed text must equal
the idle-server greedy text and name the version that served it; RSS is sampled.

Figures: requests, wrong_or_lost (wrong text, wrong/missing version, no answer, or a
status other than OK / CANCELLED / DEADLINE_EXCEEDED), rss after warm-up / end / peak.
"""
from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass, field

import grpc

from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc
from bench.reliability.common import Probe, ServerProc, greedy, log, metadata

S = grpc.StatusCode
EXPECTED_FAILURES = {S.CANCELLED, S.DEADLINE_EXCEEDED}


@dataclass
class SoakPlan:
    """``n`` requests drawn Zipf over ``adapters`` x ``prompts`` x ``max_new`` choices."""

    adapters: list[str]
    digests: dict[str, str]
    prompts: list[str]
    max_new: tuple[int, ...]
    n: int
    seed: int = 0
    cancel_rate: float = 0.10
    short_deadline_rate: float = 0.10
    concurrency: tuple[int, int] = (8, 32)
    phase: int = 250  # requests per concurrency level

    def draws(self) -> list[tuple[Probe, str, float | None]]:
        """``(probe, mode, deadline)`` per request; mode: unary | stream | cancel-unary | cancel-stream."""
        rng = random.Random(self.seed)
        weights = [1.0 / (k + 1) for k in range(len(self.adapters))]
        out = []
        for name in rng.choices(self.adapters, weights=weights, k=self.n):
            probe = Probe(f"{name}:1" if rng.random() < 0.5 else name, rng.choice(self.prompts),
                          rng.choice(self.max_new))
            stream = rng.random() < 0.5
            roll = rng.random()
            if roll < self.cancel_rate:
                mode, deadline = ("cancel-stream" if stream else "cancel-unary"), None
            elif roll < self.cancel_rate + self.short_deadline_rate:
                mode, deadline = ("stream" if stream else "unary"), rng.uniform(0.02, 0.5)
            else:
                mode, deadline = ("stream" if stream else "unary"), None
            out.append((probe, mode, deadline))
        return out


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    wrong_or_lost: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    rss_warm: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else 0.0

    def wrong(self, why: str) -> None:
        self.wrong_or_lost += 1
        if len(self.examples) < 10:
            self.examples.append(why)


def _key(p: Probe) -> tuple[str, str, int]:
    return (p.adapter.split(":")[0], p.prompt, p.max_new_tokens)


async def references(address: str, draws: list[tuple[Probe, str, float | None]]) -> dict[tuple, tuple[str, int]]:
    """Idle-server greedy ``(text, version)`` for every distinct (adapter, prompt, max_new) drawn."""
    keys = sorted({_key(p) for p, _, _ in draws})
    probes = [Probe(f"{name}:1", prompt, n) for name, prompt, n in keys]
    answers = await greedy(address, probes)
    return {k: (text, version) for k, (text, _, version) in zip(keys, answers)}


async def _request(stub, probe: Probe, mode: str, deadline: float | None, rid: str, ref: tuple[str, int],
                   digest: str, rng: random.Random, report: SoakReport) -> None:
    want_text, want_version = ref
    timeout = deadline or 600.0
    try:
        if mode.endswith("stream"):
            call = stub.GenerateStream(probe.request(rid), metadata=metadata(), timeout=timeout)
            chunks, final, cut = [], None, mode == "cancel-stream" and rng.randrange(3)
            async for msg in call:
                if msg.HasField("final"):
                    final = msg.final
                else:
                    chunks.append(msg.chunk.text)
                    if cut and len(chunks) >= cut:
                        call.cancel()
                        report.statuses["CANCELLED"] += 1
                        return
            if final is None:
                return report.wrong(f"{rid}: stream ended without final")
            text, resp = "".join(chunks), final
            if text != resp.text:
                return report.wrong(f"{rid}: chunks {text!r} != final {resp.text!r}")
        else:
            coro = stub.Generate(probe.request(rid), metadata=metadata(), timeout=timeout)
            if mode == "cancel-unary":
                task = asyncio.ensure_future(coro)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                if not task.done():
                    task.cancel()
                    report.statuses["CANCELLED"] += 1
                    try:
                        await task
                    except (asyncio.CancelledError, grpc.aio.AioRpcError):
                        pass
                    return
                resp = task.result()
            else:
                resp = await coro
        report.statuses["OK"] += 1
        report.completed += 1
        if resp.text != want_text:
            return report.wrong(f"{rid}: text {resp.text!r} != idle {want_text!r}")
        if (resp.adapter.name, resp.adapter.version, resp.adapter.digest) != \
                (probe.adapter.split(":")[0], want_version, digest):
            return report.wrong(f"{rid}: served {resp.adapter} for {probe.adapter}")
        if resp.request_id != rid:
            report.wrong(f"{rid}: answer for request id {resp.request_id!r}")
    except grpc.aio.AioRpcError as exc:
        report.statuses[exc.code().name] += 1
        if exc.code() not in EXPECTED_FAILURES:
            report.wrong(f"{rid}: {exc.code().name} {exc.details()}")


async def soak(server: ServerProc, plan: SoakPlan, warmup: int = 200) -> SoakReport:
    """Runs ``plan`` against ``server``: references on the idle server first (which also
    loads every adapter drawn), ``warmup`` requests of the plan, RSS, the rest, RSS."""
    report = SoakReport()
    draws = plan.draws()
    began = time.monotonic()
    refs = await references(server.address, draws)
    log(f"soak: {len(refs)} idle-server references in {time.monotonic() - began:.0f}s")
    rng = random.Random(plan.seed + 1)
    sampling = True

    async def sample() -> None:
        while sampling:
            rss = server.rss()
            report.rss_peak = max(report.rss_peak, rss)
            report.rss_samples.append((time.monotonic() - began, rss))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        started = time.monotonic()
        for lo in range(0, len(draws), plan.phase):
            if lo >= warmup and not report.rss_warm:
                report.rss_warm = server.rss()
                log(f"soak: RSS after warm-up {report.rss_warm / 2**20:.0f} MiB")
            batch = list(enumerate(draws[lo:lo + plan.phase], lo))
            level = rng.randint(*plan.concurrency)

            async def worker() -> None:
                while batch:
                    i, (probe, mode, deadline) = batch.pop(0)
                    await _request(stub, probe, mode, deadline, f"soak-{i}", refs[_key(probe)],
                                   plan.digests[probe.adapter.split(":")[0]], rng, report)
                    report.requests += 1

            await asyncio.gather(*(worker() for _ in range(level)))
            if (lo // plan.phase) % 4 == 3:
                log(f"soak: {report.requests}/{plan.n} requests, {report.wrong_or_lost} wrong/lost, "
                    f"RSS {server.rss() / 2**20:.0f} MiB, {time.monotonic() - started:.0f}s")
    # The idle server answers exactly as before the soak (nothing drifted).
    after = await references(server.address, draws[:50])
    for key, value in after.items():
        if refs[key] != value:
            report.wrong(f"after soak {key}: {value} != {refs[key]}")
    sampling = False
    await sampler
    report.rss_warm = report.rss_warm or server.rss()
    report.rss_end = server.rss()
    report.seconds = time.monotonic() - started
    return report
