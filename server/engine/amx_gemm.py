"""A bf16 GEMM on Intel AMX tiles over the weights' plain rows (``gemm_bf16_amx.c``).

Where oneDNN runs bf16 natively the runner's GEMM is :func:`kernels.small_rows_linear`: 1-4 rows
through the AVX512-BF16 GEMV on the plain rows, more through oneDNN's prepacked GEMM. On an AMX
host this kernel takes 5 to ``MAX_ROWS`` rows instead, reading the same plain rows (no copy of
its own), so the planned decode layers of :mod:`decode_layer` can run those rows too and the
Python path, which calls the same GEMM, writes bitwise what they write. Sums in fp32 in the
tiles, each output rounded to nearest even (as oneDNN rounds); the order of the sums is the
tiles', so results may differ from oneDNN's by a bf16 ulp.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from adapterctl.server.engine import cpu_build

SOURCE = Path(__file__).with_name("gemm_bf16_amx.c")
FLAGS = cpu_build.AMX_FLAGS
MULTIPLE = 32  # outputs and inputs each a multiple of this
MAX_ROWS = 64  # the most rows the runner sends here (more: oneDNN; see kernels.small_rows_linear)
_P, _L = ctypes.c_void_p, ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel after Linux granted the tile state and it passed its probe, or None (no AMX-BF16
    here, no compiler that knows AMX, or the probe failed; logged when unexpected)."""
    return cpu_build.load_amx(SOURCE, "AMX bf16 GEMM", "bf16 GEMMs stay on oneDNN", "amx_gemm_init", _setup, _probe)


def _setup(lib: ctypes.CDLL) -> None:
    lib.amx_gemm_bf16.argtypes = [_P, _L, _P, _L, _P, _L, _L, _L, _P, _L, ctypes.c_int]
    lib.amx_gemm_bf16.restype = ctypes.c_int


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel reads ``weight`` (bf16 [out, in] on the CPU, unit last stride, both
    sizes multiples of ``MULTIPLE``) here."""
    return (weight.dtype == torch.bfloat16 and weight.is_cpu and weight.dim() == 2 and weight.stride(1) == 1
            and weight.shape[0] % MULTIPLE == 0 and weight.shape[1] % MULTIPLE == 0 and library() is not None)


def _run(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> int:
    n, k = weight.shape
    return lib.amx_gemm_bf16(weight.data_ptr(), weight.stride(0), x.data_ptr(), x.stride(0),
                             None if bias is None else bias.data_ptr(), x.shape[0], n, k, y.data_ptr(), n,
                             torch.get_num_threads())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x`` bf16 [rows, in] @ ``weight.T`` (+ ``bias`` bf16 [out]) -> bf16 [rows, out], or None
    where the kernel does not take them (see :func:`takes`; ``x`` not bf16 2-D with a unit last
    stride)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != weight.shape[1]:
        return None
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        return None
    lib = library()
    if lib is None or not takes(weight) or x.shape[0] < 1:
        return None
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    return y if _run(lib, x, weight, bias, y) == 0 else None


def _probe(lib: ctypes.CDLL) -> bool:
    """Exact results on small integers (every sum exact in fp32, so any order agrees) for row
    counts on and off the 16-row groups, weights with a row stride beyond their width, and a bias."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-4, 5, (96, 160), generator=gen).bfloat16()
    bias = torch.randint(-8, 9, (64,), generator=gen).bfloat16()
    for rows, sub, b in ((1, False, None), (5, True, None), (16, False, bias), (33, True, bias), (64, False, None)):
        wt = w[:64, :128] if sub else w[:, :160].contiguous()
        x = torch.randint(-3, 4, (rows, wt.shape[1]), generator=gen).bfloat16()
        bb = b if wt.shape[0] == 64 else None
        y = torch.empty(rows, wt.shape[0], dtype=torch.bfloat16)
        if _run(lib, x, wt, bb, y) != 0:
            return False
        want = x.double() @ wt.double().T + (0 if bb is None else bb.double())
        if not torch.equal(y, want.bfloat16()):
            return False
    return True
