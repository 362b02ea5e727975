"""The bf16 GEMV of ``gemv_bf16.c`` for 1-32 rows on x86 CPUs without bf16 arithmetic.

ATen's bf16 GEMV converts each weight on its own and streams ~4 GB/s per core on the AVX2 host
(`bench/gemm_bench.py`), so a one-row bf16 decode step spent most of its time there. The C
kernel reads each weight row once per four rows of x with AVX2 and sums in fp32, like a native
bf16 GEMM (only the order of the sum differs, so results may differ from ATen's by one bf16 ulp).
Up to 32 rows it also beats upcasting weight blocks to fp32 for oneDNN (kernels.upcast_blocks),
which pays for the fp32 copies; beyond, oneDNN's blocking wins (measured crossover 32-64 rows).

It is compiled once per machine (:mod:`cpu_build`) and runs on torch's own OpenMP pool (the
``libgomp.so.1`` torch has loaded). A probe against fp32 arithmetic gates it. Where there is no
compiler, no AVX2/FMA, or the probe fails, :func:`library` is None and callers keep ATen's path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from adapterctl.server.engine import cpu_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv_bf16.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 32  # rows beyond it use the upcast GEMM (kernels.upcast_blocks)
K_MULTIPLE = 16  # the kernel reads 16 weights at a time



@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel after a passing probe, or None (logged once, with why)."""
    lib = cpu_build.load(SOURCE, FLAGS, "bf16 GEMV kernel")
    if lib is None:
        return None
    long = ctypes.c_long
    ptr = ctypes.c_void_p
    lib.gemv_bf16.argtypes = [ptr, long, ptr, long, ptr, long, long, long, ptr, long, ctypes.c_int]
    lib.gemv_bf16.restype = ctypes.c_int
    if not _probe(lib):
        log.warning("bf16 GEMV kernel failed its probe against fp32 arithmetic; using ATen's")
        return None
    log.info("bf16 GEMV kernel loaded for 1-%d rows", MAX_ROWS)
    return lib


def _probe(lib: ctypes.CDLL) -> bool:
    """Every row count and a ragged output width agree with fp32 arithmetic rounded to bf16,
    within one bf16 ulp (the sum order differs)."""
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(37, 64, generator=gen).bfloat16(), torch.randn(37, generator=gen).bfloat16()
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        want = x.float() @ w.float().T + bias.float()
        got = _call(lib, x, w, bias)
        if got is None or not torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-6):
            return False
    return True


def _call(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    rows, k = x.shape
    n = w.shape[0]
    y = torch.empty((rows, n), dtype=torch.bfloat16)  # contiguous: row stride n
    rc = lib.gemv_bf16(w.data_ptr(), w.stride(0), x.data_ptr(), x.stride(0), None if bias is None else bias.data_ptr(),
                       rows, n, k, y.data_ptr(), n, torch.get_num_threads())
    return y if rc == 0 else None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes these: bf16 CPU tensors, ``x`` [1..MAX_ROWS, k] and ``weight``
    [n, k] with unit column stride, ``k`` a multiple of 16, ``bias`` None or contiguous [n]."""
    # few tensor attribute reads: this runs before every decode GEMV (~0.7 us per stride() call)
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not (x.is_cpu and weight.is_cpu):
        return False
    xs, ws = x.stride(), weight.stride()
    return (len(xs) == len(ws) == 2 and xs[1] == ws[1] == 1 and 1 <= x.shape[0] <= MAX_ROWS
            and x.shape[1] == weight.shape[1] and x.shape[1] % K_MULTIPLE == 0
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.dim() == 1 and bias.is_contiguous())))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` in bf16, [rows, n] (bias [n] added in fp32 before rounding), or
    None where the kernel does not apply (see :func:`supports`; no kernel here; out of memory)."""
    lib = library()
    if lib is None or not supports(x, weight, bias):
        return None
    return _call(lib, x, weight, bias)
