"""Fault drills with asserted outcomes, against a server subprocess whose registry is a
moto S3 server reached through :class:`FaultProxy`. Each drill returns a one-line
detail or raises AssertionError; SIGKILL-during-publish lives in :mod:`.publish_kill`."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc
from bench.reliability.common import Probe, ServerProc, health_status, log, metadata, write_adapter
from bench.reliability.faultproxy import FaultProxy

PROMPT = "The movie was"


@dataclass
class DrillEnv:
    """What every drill gets: the server (registry through ``proxy``), the registry opened
    directly on moto (for publishing and tampering), the base model and a scratch dir."""

    server: ServerProc
    proxy: FaultProxy
    registry: Any
    s3: Any              # boto3 client on moto, for tampering with blobs
    bucket: str
    prefix: str
    base: Any
    root: Path
    seq: int = 0

    def publish(self, tag: str) -> str:
        """A fresh adapter (never requested yet) published as ``tag``; returns its name."""
        self.seq += 1
        name = f"drill-{tag}-{self.seq}"
        self.registry.publish(write_adapter(self.root / name, self.base, 1000 + self.seq), name)
        return name


async def generate(address: str, adapter: str, max_new: int = 4, timeout: float = 120) -> pb.GenerateResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.InferenceStub(channel).Generate(
            Probe(adapter, PROMPT, max_new).request(), metadata=metadata(), timeout=timeout)


async def status_of(coro: Awaitable[Any]) -> str:
    try:
        await coro
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def disk_entries(server: ServerProc) -> dict[str, Path]:
    """Disk-tier dirs by digest hex (complete entries only)."""
    root = server.workdir / "adapter-cache"
    return {p.name: p for p in root.iterdir() if len(p.name) == 64} if root.is_dir() else {}


def disk_tier_intact(env: DrillEnv) -> int:
    """Number of disk-tier entries; AssertionError if any file differs from its manifest."""
    entries = disk_entries(env.server)
    for hexdigest, path in entries.items():
        meta = json.loads((path / ".adapterctl-cache.json").read_text())
        manifest = env.registry.resolve(f"{meta['name']}@sha256:{hexdigest}")
        for f in manifest.files:
            got = "sha256:" + hashlib.sha256((path / f.path).read_bytes()).hexdigest()
            assert got == f.digest, f"disk tier {meta['name']}:{meta['version']} {f.path} is corrupt"
    return len(entries)


# ---- the drills ----------------------------------------------------------------------
async def s3_down(env: DrillEnv) -> str:
    warm, cold = env.publish("warm"), env.publish("cold")
    want = (await generate(env.server.address, warm)).text
    env.proxy.set_mode("down")
    try:
        began = time.monotonic()
        for ref in (f"{warm}:1", warm):  # exact and alias refs of a cached adapter keep serving
            r = await generate(env.server.address, ref)
            assert r.text == want and r.adapter.version == 1, f"cached {ref} changed while S3 is down"
        cached_s = time.monotonic() - began
        code = await status_of(generate(env.server.address, cold))
        assert code == "UNAVAILABLE", f"cold adapter while S3 is down: {code}, expected UNAVAILABLE"
    finally:
        env.proxy.set_mode("pass")
    r = await generate(env.server.address, cold)  # recovery needs no restart
    assert r.adapter.name == cold, "cold adapter did not recover"
    return f"cached served in {cached_s:.1f}s for 2 requests, cold UNAVAILABLE, recovered"


async def s3_slow(env: DrillEnv, delay: float = 2.0) -> str:
    warm, cold = env.publish("warm"), env.publish("slowcold")
    await generate(env.server.address, f"{warm}:1")
    env.proxy.set_mode("delay", delay=delay)
    try:
        cold_task = asyncio.ensure_future(generate(env.server.address, f"{cold}:1"))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await generate(env.server.address, f"{warm}:1")
        resident_s = time.monotonic() - began
        assert not cold_task.done(), "cold load finished before the proxy delay"
        r = await cold_task
        cold_s = time.monotonic() - began
    finally:
        env.proxy.set_mode("pass")
    assert resident_s < delay, f"resident adapter took {resident_s:.2f}s with S3 delayed {delay}s"
    assert r.adapter.name == cold and cold_s >= delay
    return f"resident {resident_s * 1000:.0f} ms while a cold load took {cold_s:.1f}s (S3 +{delay:.0f}s/response)"


async def s3_flaky(env: DrillEnv, rate: float = 0.15, n: int = 4) -> str:
    names = [env.publish("flaky") for _ in range(n)]
    env.proxy.set_mode("flaky", error_rate=rate)
    before = env.proxy.injected
    try:
        codes = [await status_of(generate(env.server.address, f"{name}:1")) for name in names]
    finally:
        env.proxy.set_mode("pass")
    injected = env.proxy.injected - before
    assert codes == ["OK"] * n, f"loads under {rate:.0%} injected 503s: {codes}"
    assert injected > 0, "the proxy injected no error"
    entries = disk_tier_intact(env)
    return f"{n} cold loads OK through {injected} injected 503s; {entries} disk entries verified"


async def corrupt_blob(env: DrillEnv) -> str:
    name = env.publish("corrupt")
    manifest = env.registry.resolve(f"{name}:1")
    weights = next(f for f in manifest.files if f.path.endswith(".safetensors"))
    key = f"{env.prefix}/blobs/sha256/{weights.digest.split(':')[1]}"
    body = bytearray(env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read())
    body[-8:] = b"\xff" * 8
    env.s3.put_object(Bucket=env.bucket, Key=key, Body=bytes(body))
    codes = [await status_of(generate(env.server.address, f"{name}:1")) for _ in range(2)]
    assert codes == ["DATA_LOSS"] * 2, f"corrupted blob gave {codes}, expected DATA_LOSS twice (not cached)"
    hexdigest = manifest.digest.split(":")[1]
    assert hexdigest not in disk_entries(env.server), "a corrupted adapter entered the disk tier"
    staging = [p for p in (env.server.workdir / "adapter-cache").iterdir() if p.name.startswith(".pull-")]
    assert not staging, f"staging leftovers {staging}"
    return "DATA_LOSS twice, nothing on disk"


async def disk_tier_unwritable(env: DrillEnv) -> str:
    """Disk tier full (a filled 64 KiB tmpfs, when we may mount) or read-only (chmod)."""
    cache = env.server.workdir / "adapter-cache"
    name = env.publish("diskfull")
    mounted = False
    saved = cache.with_name("adapter-cache.saved")
    if os.geteuid() == 0 and shutil.which("mount"):
        os.rename(cache, saved)
        cache.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                                 capture_output=True).returncode == 0
        if not mounted:
            cache.rmdir()
            os.rename(saved, cache)
        else:
            _fill(cache / "filler")
    mode = cache.stat().st_mode
    if not mounted:
        cache.chmod(0o555)
    try:
        log_size = env.server.log_size()
        r = await generate(env.server.address, f"{name}:1")
        assert r.adapter.name == name, "serving stopped with the disk tier unusable"
        new_log = env.server.log_since(log_size)
        assert "disk tier" in new_log and name in new_log, "no log line names the unusable disk tier"
        line = next(ln for ln in new_log.splitlines() if "disk tier" in ln and "unusable" in ln)
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=True)
            cache.rmdir()
            os.rename(saved, cache)
        else:
            cache.chmod(mode)
    return f"{'full (filled tmpfs)' if mounted else 'read-only'}: served; log: {_message(line)[:160]}"


def _message(line: str) -> str:
    """The ``msg`` of a JSON log line (the raw line when it is not one, e.g. after a progress bar)."""
    try:
        return json.loads(line[line.index("{"):]).get("msg", line)
    except ValueError:
        return line


def _fill(path: Path) -> None:
    """Write zeros until the filesystem is full (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


async def _load(address: str, adapters: list[str], n: int, max_new: int,
                started: asyncio.Semaphore | None = None) -> list[Any]:
    """``n`` streaming requests; each result is the final response or the error code.
    ``started`` is released once per stream when its first chunk arrives (it is in flight)."""
    async def one(i: int) -> Any:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.InferenceStub(channel).GenerateStream(
                Probe(adapters[i % len(adapters)], PROMPT, max_new).request(f"load-{i}"), metadata=metadata(),
                timeout=300)
            final, first = None, True
            try:
                async for msg in call:
                    if first and started is not None:
                        started.release()
                        first = False
                    if msg.HasField("final"):
                        final = msg.final
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return final
    return await asyncio.gather(*(one(i) for i in range(n)))


async def sigkill_restart(env: DrillEnv) -> str:
    name = env.publish("kill")
    want = (await generate(env.server.address, f"{name}:1")).text
    hexdigest = env.registry.resolve(f"{name}:1").digest.split(":")[1]
    load = asyncio.ensure_future(_load(env.server.address, [f"{name}:1"], 12, 64))
    await asyncio.sleep(1.0)
    env.server.signal(signal.SIGKILL)
    env.server.wait(30)
    results = await load
    assert all(r in ("UNAVAILABLE", "CANCELLED") or r is not None for r in results)
    # Damage the disk-tier copy: the restarted server must verify, not trust it.
    weights = disk_entries(env.server)[hexdigest] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    weights.write_bytes(bytes(data))
    log_size = env.server.log_size()
    began = time.monotonic()
    env.server.start()
    restart_s = time.monotonic() - began
    assert await health_status(env.server.address) == "SERVING"
    r = await generate(env.server.address, f"{name}:1")
    assert r.text == want, "restarted server served a damaged disk-tier copy"
    assert "corrupt" in env.server.log_since(log_size), "no log line about the corrupt disk copy"
    return f"SERVING {restart_s:.0f}s after restart; damaged disk copy re-pulled, same text"


async def sigterm_drain(env: DrillEnv, grace: float) -> str:
    name = env.publish("term")
    await generate(env.server.address, f"{name}:1")
    started = asyncio.Semaphore(0)
    load = asyncio.ensure_future(_load(env.server.address, [f"{name}:1", ""], 8, 24, started))
    for _ in range(8):  # SIGTERM only once every stream has its first chunk: truly in flight
        await asyncio.wait_for(started.acquire(), 300)
    began = time.monotonic()
    env.server.signal(signal.SIGTERM)
    refused = "OK"
    for _ in range(100):  # new requests are refused once the signal is handled
        refused = await status_of(generate(env.server.address, f"{name}:1", timeout=10))
        if refused == "UNAVAILABLE":
            break
        await asyncio.sleep(0.05)
    results = await load
    rc = env.server.wait(grace + 60)
    took = time.monotonic() - began
    finished = [r for r in results if isinstance(r, pb.GenerateResponse)]
    assert refused == "UNAVAILABLE", f"a new request during the drain got {refused}"
    assert len(finished) == len(results), f"in-flight requests cut: {[r for r in results if isinstance(r, str)]}"
    assert rc == 0, f"exit code {rc}"
    env.server.start()
    return f"{len(finished)} in-flight finished, new request UNAVAILABLE, exit 0 after {took:.1f}s (grace {grace:.0f}s)"


DRILLS: list[tuple[str, Callable[[DrillEnv], Awaitable[str]]]] = [
    ("s3_down", s3_down), ("s3_slow", s3_slow), ("s3_flaky", s3_flaky), ("corrupt_blob", corrupt_blob),
    ("disk_tier_unwritable", disk_tier_unwritable), ("sigkill_restart", sigkill_restart),
]


async def run_drills(env: DrillEnv, grace: float) -> list[tuple[str, bool, str]]:
    """``(name, passed, detail)`` per drill, in order; a failed drill does not stop the rest."""
    out = []
    drills = [*DRILLS, ("sigterm_drain", lambda e: sigterm_drain(e, grace))]
    for name, drill in drills:
        env.proxy.set_mode("pass")
        began = time.monotonic()
        try:
            if not env.server.alive():
                env.server.start()
            detail = await drill(env)
            out.append((name, True, detail))
        except Exception as exc:  # an assertion or anything unexpected: the drill failed
            out.append((name, False, f"{type(exc).__name__}: {exc}"))
        log(f"drill {name}: {'PASS' if out[-1][1] else 'FAIL'} ({time.monotonic() - began:.0f}s) {out[-1][2]}")
    with contextlib.suppress(Exception):
        env.proxy.set_mode("pass")
    return out
