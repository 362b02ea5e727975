"""One C call (``cpu_fused.c``) instead of ~7-10 ATen ops for a decode step's small row-wise ops
on x86 CPUs: Gemma's RMSNorm and the rotary embedding, on bf16 or fp32 rows.

At one row these ops cost their dispatch, not their arithmetic: 109 norms and 36 rotations a
Gemma 3 270M bf16 step were ~1,000 of its ~1,130 ATen calls. Both are bitwise ATen's: every op
rounds as ATen's does, and the norm's sum of squares adds in the order of ATen's CPU sum kernel
(8-lane vectors, four at a time, its cascade), so a step's logits are identical with and without
them (``bench/step_bench.py --baseline aten_ops`` checks it on the real model).

Compiled once per machine (:mod:`cpu_build`) and gated by a probe against ATen. Up to
``MAX_ROWS`` rows (token x head rows beyond that are prefill, where ATen's vectorised, threaded
ops are as fast); anything else, or no kernel, gives None and callers keep ATen's path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from adapterctl.server.engine import cpu_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_fused.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC")
MAX_ROWS = 64  # rows (tokens x heads) per call; beyond, ATen's threaded ops
DTYPES = (torch.bfloat16, torch.float32)  # what the norm and the rotation take


def _build() -> Path:
    return cpu_build.build(SOURCE, FLAGS)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels after a passing probe, or None (logged once, with why)."""
    lib = cpu_build.load(SOURCE, FLAGS, "fused norm/RoPE kernels")
    if lib is None:
        return None
    long, ptr = ctypes.c_long, ctypes.c_void_p
    for fn in (lib.rms_norm_bf16, lib.rms_norm_f32):
        fn.argtypes = [ptr, long, long, ptr, long, long, long, ctypes.c_float, ptr]
    for fn in (lib.rope_bf16, lib.rope_f32):
        fn.argtypes = [ptr, long, long, ptr, ptr, long, long, long, long, ptr]
    for fn in (lib.rms_norm_bf16, lib.rms_norm_f32, lib.rope_bf16, lib.rope_f32):
        fn.restype = None
    if not _probe(lib):
        log.warning("fused norm/RoPE kernels failed their probe against ATen; using ATen's ops")
        return None
    return lib


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in ATen ops (HF's formula); ``x`` [..., d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reference_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm in ATen: fp32 throughout, one cast back to ``x``'s dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).to(x.dtype)


def _probe(lib: ctypes.CDLL) -> bool:
    """Rotations and norms bitwise ATen's, in bf16 and fp32 (strided q as the engine slices it;
    norm widths with and without left-over vectors and scalars, wide-ranging values)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        qkv = torch.randn(3, 6 * 32, generator=gen).to(dtype)
        x = qkv[:, : 4 * 32].view(3, 4, 32)  # [n, heads, d] with a token stride of 6 * 32
        ang = torch.randn(3, 1, 32, generator=gen)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        if not torch.equal(_rope(lib, x, cos, sin), reference_rope(x, cos, sin)):
            return False
        for dim, scale_of_x in ((640, 1.0), (1100, 30.0), (37, 1e-3)):
            x = (torch.randn(5, 2, dim, generator=gen) * scale_of_x).to(dtype)
            scale = 1.0 + torch.randn(dim, generator=gen)
            if not torch.equal(_norm(lib, x, scale, 1e-6), reference_norm(x, scale, 1e-6)):
                return False
    return True


def _rows(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(n, heads, token stride, head stride) of ``x`` [n, d] or [n, heads, d] with unit last stride."""
    if x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    return None


def _norm(lib: ctypes.CDLL, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    n, heads, sn, sh = _rows(x)  # type: ignore[misc]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    fn = lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.rms_norm_f32
    fn(x.data_ptr(), sn, sh, scale.data_ptr(), n, heads, x.shape[-1], eps, y.data_ptr())
    return y


def _rope(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    n, heads, sn, sh = _rows(x)  # type: ignore[misc]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    fn = lib.rope_bf16 if x.dtype == torch.bfloat16 else lib.rope_f32
    fn(x.data_ptr(), sn, sh, cos.data_ptr(), sin.data_ptr(), cos.stride(0), n, heads, x.shape[-1], y.data_ptr())
    return y


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`reference_norm`, bitwise, for CPU ``x`` [n, d] or [n, heads, d] (bf16 or fp32, unit
    last stride, n * heads <= MAX_ROWS) and a contiguous fp32 ``scale`` [d]; else None."""
    lib = library()
    if lib is None or x.dtype not in DTYPES or x.device.type != "cpu" or scale.dtype != torch.float32:
        return None
    shape = _rows(x)
    if shape is None or shape[0] * shape[1] > MAX_ROWS or not scale.is_contiguous():
        return None
    return _norm(lib, x, scale, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`reference_rope`, bitwise, for CPU ``x`` [n, heads, d] (bf16 or fp32, unit last
    stride, n * heads <= MAX_ROWS) and ``cos``/``sin`` [n, 1, d] of its dtype; else None."""
    lib = library()
    if lib is None or x.dim() != 3 or x.dtype not in DTYPES or x.device.type != "cpu":
        return None
    shape = _rows(x)
    if shape is None or shape[0] * shape[1] > MAX_ROWS or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    if cos.shape != (x.shape[0], 1, x.shape[2]) or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        return None
    return _rope(lib, x, cos, sin)
