"""The bf16 GEMVs of ``gemv_bf16.c`` (AVX2, 1-32 rows), ``gemv_bf16_avx512f.c`` (AVX-512F, 1-32
rows) and ``gemv_bf16_avx512.c`` (AVX512-BF16, 1-4 rows), one entry point and contract, chosen by
:class:`Kernel`.

``AVX2``, for x86 CPUs without bf16 arithmetic: ATen's bf16 GEMV converts each weight on its own
and streams ~4 GB/s per core on the AVX2 host (`bench/gemm_bench.py`), so a one-row bf16 decode
step spent most of its time there. The C kernel reads each weight row once per four rows of x with
AVX2 and sums in fp32, like a native bf16 GEMM (only the order of the sum differs, so results may
differ from ATen's by one bf16 ulp). Up to 32 rows it also beats upcasting weight blocks to fp32
for oneDNN (kernels.upcast_blocks), which pays for the fp32 copies; beyond, oneDNN's blocking wins
(measured crossover 32-64 rows).

``AVX512``, the same arithmetic for CPUs with AVX-512F but no bf16 arithmetic (:func:`upcast_kernel`
takes it over ``AVX2`` where it loads): twice the FMA width, and each thread runs every group of
four x rows over an L2-sized block of weight rows, so the weights stream from memory once per call.
On an Intel Xeon without AVX512-BF16 (Dec 6, ``bench.gemm_bench``, Gemma 3 270M's shapes): against
the AVX2 kernel 1.4-1.7x on the layer projections at 32 rows, 2.1-3.3x on the LM head at 8-32 rows
(0.88-2.1x across shapes at 1-16 rows); 1.2-1.6x faster than the upcast at 32 rows; at 64 rows
the two were even (0.7-1.07), so it stops at 32 too.

``AVX512_BF16``, for CPUs with native bf16 dot products, AMX or not (kernels.small_rows_linear):
oneDNN's prepacked bf16 GEMM streams the layer weights at ~25-35 GB/s at 1-4 rows on a 2-core
Zen 4; this kernel (``vdpbf16ps``, weights prefetched in order into L2) reads them at ~31-47
(and beats oneDNN's AMX GEMM on a 2-core Xeon too: a one-row bf16 step 1.5x faster).

Each is compiled once per machine (:mod:`cpu_build`) and runs on torch's own OpenMP pool (the
``libgomp.so.1`` torch has loaded). A probe against fp32 arithmetic gates it. Where there is no
compiler, no such CPU, or the probe fails, :func:`library` is None and callers keep ATen's or
oneDNN's path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from adapterctl.server.engine import cpu_build

log = logging.getLogger(__name__)


class Kernel(NamedTuple):
    """One C bf16 GEMV: its source, compiler flags, the CPU flag it needs beyond AVX2, and its reach."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cpu_flag: str | None  # /proc/cpuinfo flag the kernel needs (None: AVX2 + FMA, cpu_build checks)
    max_rows: int  # more rows go elsewhere (the caller's GEMM)
    k_multiple: int  # the input width must be a multiple of this


_SO = ("-fopenmp", "-shared", "-fPIC")
AVX2 = Kernel("AVX2 bf16 GEMV", Path(__file__).with_name("gemv_bf16.c"), ("-O3", "-mavx2", "-mfma", *_SO),
              None, 32, 16)
AVX512 = Kernel("AVX-512 bf16 GEMV", Path(__file__).with_name("gemv_bf16_avx512f.c"),
                ("-O3", "-mavx512f", "-mfma", *_SO), "avx512f", 32, 32)
AVX512_BF16 = Kernel("AVX512-BF16 GEMV", Path(__file__).with_name("gemv_bf16_avx512.c"),
                     ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", *_SO), "avx512_bf16", 4, 32)


@functools.cache
def library(kernel: Kernel | None = None) -> ctypes.CDLL | None:
    """``kernel`` (default :data:`AVX2`) loaded after a passing probe, or None (logged once, with why)."""
    kernel = kernel or AVX2
    if kernel.cpu_flag is not None and not cpu_build.has_cpu_flag(kernel.cpu_flag):
        return None
    lib = cpu_build.load(kernel.source, kernel.flags, kernel.name)
    if lib is None:
        return None
    long = ctypes.c_long
    ptr = ctypes.c_void_p
    lib.gemv_bf16.argtypes = [ptr, long, ptr, long, ptr, long, long, long, ptr, long, ctypes.c_int]
    lib.gemv_bf16.restype = ctypes.c_int
    if not _probe(lib, kernel):
        log.warning("%s failed its probe against fp32 arithmetic; not using it", kernel.name)
        return None
    log.info("%s loaded for 1-%d rows", kernel.name, kernel.max_rows)
    return lib


def upcast_kernel(*widths: int) -> Kernel:
    """The GEMV for bf16 on CPUs without bf16 arithmetic (``kernels.upcast_linear`` and its planned
    layers): :data:`AVX512` where it loads and takes every input width in ``widths`` (a multiple of
    its ``k_multiple``), else :data:`AVX2`."""
    fits = all(k % AVX512.k_multiple == 0 for k in widths)
    return AVX512 if fits and library(AVX512) is not None else AVX2


def _probe(lib: ctypes.CDLL, kernel: Kernel) -> bool:
    """Every row count and a ragged output width agree with fp32 arithmetic rounded to bf16,
    within one bf16 ulp (the sum order differs)."""
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(37, 64, generator=gen).bfloat16(), torch.randn(37, generator=gen).bfloat16()
    for rows in range(1, kernel.max_rows + 1):
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


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             kernel: Kernel | None = None) -> bool:
    """Whether :func:`linear` takes these: bf16 CPU tensors, ``x`` [1..kernel.max_rows, k] and
    ``weight`` [n, k] with unit column stride, ``k`` a multiple of kernel.k_multiple, ``bias`` None
    or contiguous [n]."""
    # few tensor attribute reads: this runs before every decode GEMV (~0.7 us per stride() call)
    kernel = kernel or AVX2
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not (x.is_cpu and weight.is_cpu):
        return False
    xs, ws = x.stride(), weight.stride()
    return (len(xs) == len(ws) == 2 and xs[1] == ws[1] == 1 and 1 <= x.shape[0] <= kernel.max_rows
            and x.shape[1] == weight.shape[1] and x.shape[1] % kernel.k_multiple == 0
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.dim() == 1 and bias.is_contiguous())))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           kernel: Kernel | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` in bf16, [rows, n] (bias [n] added in fp32 before rounding), or
    None where ``kernel`` (default :data:`AVX2`) does not apply (see :func:`supports`; no kernel
    here; out of memory)."""
    kernel = kernel or AVX2
    lib = library(kernel)
    if lib is None or not supports(x, weight, bias, kernel):
        return None
    return _call(lib, x, weight, bias)
