"""Compile a C kernel of this package once per machine and hand back the shared library's path.

A library is built with the system C compiler (``$CC``, else ``cc``) into
``$ADAPTERCTL_KERNEL_CACHE`` (default ``~/.cache/adapterctl/kernels``), named by the digest of
its source, compiler and flags; it appears by an atomic rename, so concurrent servers never load
a half-written one. The CPU image builds its kernels at image build time (``deploy/Dockerfile``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

from adapterctl.server.engine import dtypes

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTERCTL_KERNEL_CACHE") or Path.home() / ".cache" / "adapterctl" / "kernels")


def avx2_host() -> bool:
    """Linux on x86-64 with AVX2 and FMA (what torch's own CPU dispatch found)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_cpu_flag(name: str) -> bool:
    """Whether Linux lists ``name`` among the CPU's feature flags (read once)."""
    return name in _flags()


@functools.cache
def _flags() -> frozenset[str]:
    return frozenset(dtypes.cpu_flags())


def build(source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library of ``source`` built with ``flags``, compiling it first when this
    source, the headers beside it, compiler and flags have none yet. Raises RuntimeError (no
    compiler, it failed)."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    cc = os.environ.get("CC") or "cc"
    digest = hashlib.sha256(text + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, flags: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """``source`` built (:func:`build`) and loaded, or None, with a warning naming ``what``, where
    this is no AVX2 x86-64 Linux host, there is no working compiler, or the library does not load."""
    if not avx2_host():
        return None
    try:
        return ctypes.CDLL(str(build(source, flags)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("%s unavailable, using ATen's: %s", what, exc)
        return None


# what the AMX kernels (amx_head.c, gemm_bf16_amx.c) are built with and need of the CPU
AMX_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
             "-shared", "-fPIC")
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl")


def load_amx(source: Path, what: str, fallback: str, init: str, setup: Callable[[ctypes.CDLL], None],
             probe: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """An AMX kernel ``source`` built and loaded, ``setup`` (its argtypes), Linux asked for the tile
    state through its ``init`` function, and ``probe`` passed; else None (no AMX-BF16 here, no
    compiler that knows AMX; a warning ending in ``fallback`` where Linux refused or the probe failed)."""
    if not all(has_cpu_flag(f) for f in AMX_CPU_FLAGS):
        return None
    lib = load(source, AMX_FLAGS, what)
    if lib is None:
        return None
    setup(lib)
    request = getattr(lib, init)
    request.argtypes, request.restype = [], ctypes.c_int
    if request() != 0:
        log.warning("Linux did not grant the AMX tile state to the %s; %s", what, fallback)
        return None
    if not probe(lib):
        log.warning("%s failed its probe; %s", what, fallback)
        return None
    return lib


def main() -> None:
    """``python -m adapterctl.server.engine.cpu_build``: build every kernel of the package (the
    images do this at build time, then drop the compiler) and print each library's path."""
    from adapterctl.server.engine import (
        amx_gemm,
        amx_head,
        cpu_fused,
        cpu_gemv,
        decode_layer,
        int8_gemv,
        lora_cpu,
        panel_gemm,
    )

    kernels = (cpu_gemv.AVX2, cpu_gemv.AVX512, cpu_gemv.AVX512_BF16, *panel_gemm.VARIANTS)
    for source, flags in (*((g.source, g.flags) for g in kernels), (cpu_fused.SOURCE, cpu_fused.FLAGS),
                          (int8_gemv.SOURCE, int8_gemv.FLAGS), (int8_gemv.AMX_SOURCE, int8_gemv.AMX_FLAGS),
                          (int8_gemv.VNNI_SOURCE, int8_gemv.VNNI_FLAGS),
                          (decode_layer.SOURCE, decode_layer.FLAGS), (lora_cpu.SOURCE, lora_cpu.FLAGS),
                          (amx_head.SOURCE, amx_head.FLAGS), (amx_gemm.SOURCE, amx_gemm.FLAGS)):
        print(build(source, flags))


if __name__ == "__main__":
    main()
