"""Dense matmul for the engine's hot path. On CPU, oneDNN's fp32 GEMM (the kernel torch's
inductor emits for CPU linears) measured 1.3-2.4x faster than ATen's default MKL sgemm
for decode-sized inputs on this project's AMD host, with the same fp32 accuracy
(max |diff| ~1e-4 on Gemma logits); elsewhere (CUDA, builds without oneDNN) F.linear. On
CPUs with AVX-512F or AVX2 + FMA, fp32 goes to the panel GEMM of :mod:`panel_gemm` instead
(:func:`panel_linear`): 1.13-1.25x faster than oneDNN's at 1-32 rows on a Xeon without bf16
units, 0.98-1.06x at 64-512; its AVX2 build 1.06-1.20x at 1-32 rows on a Zen 3 EPYC, 0.99x at
64; each row's result independent of the rest of the batch.
oneDNN has no bf16 inner product on AVX2-only CPUs ("could not create a primitive
descriptor"), and on AVX-512 CPUs without AVX512-BF16/AMX it runs bf16 emulated (Dec 6, an
Intel Xeon without them: bf16 steps 2.0-3.0x slower at 1-64 rows than the path below), so
``auto`` takes oneDNN for bf16 only where :func:`native_bf16`. Elsewhere bf16 GEMMs of up to
32 rows stream the bf16 weights through the C GEMV of ``cpu_gemv.upcast_kernel()`` (AVX-512F
where the CPU has it, else AVX2: half the bytes of fp32, no scratch copies), and more rows
upcast the weight a block at a time to fp32 in a scratch buffer that stays in cache for
oneDNN's fp32 GEMM (:func:`upcast_blocks`: 3-4x faster than ATen's bf16 GEMM at 32-64 rows,
which runs row by row); without a C GEMV, fewer than 8 rows use ATen's bf16 GEMV. Where oneDNN
runs bf16 natively (AVX512-BF16, with or without AMX), 1-4 rows go to the AVX512-BF16 GEMV of
:mod:`cpu_gemv` instead (:func:`small_rows_linear`), which streams the weights faster than
oneDNN's GEMM does at those sizes (a one-row bf16 step 1.3x faster on Zen 4, 1.5x on an AMX
Xeon, with the planned layers it enables), and on AMX hosts 5-64 rows go to the AMX GEMM of
:mod:`amx_gemm` on the same plain rows (the 18 layers' GEMMs of Gemma 3 270M 1.25-1.34x faster
than oneDNN's at 5-32 rows, 1.11x at 64, 1.04x at 128, 0.94x at 256, so more rows keep oneDNN).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from adapterctl.server.engine import amx_gemm, cpu_build, cpu_gemv, dtypes, panel_gemm

GEMMS = ("auto", "onednn", "torch", "gemv")
Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN; ``x`` is ``[..., in]`` on CPU."""
    if x.dim() != 2:
        return onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def panel_linear(x: torch.Tensor, weight: "torch.Tensor | panel_gemm.Panels", bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32, ``x`` [..., in] on CPU: through the panel GEMM of
    :mod:`panel_gemm` (``weight`` its panels, :func:`prepare`'s, or plain fp32 rows: bitwise the
    same result, each row's independent of the others), else oneDNN's (fp32) or ATen's (other
    dtypes, which oneDNN may not run here: no bf16 inner product on AVX2-only CPUs)."""
    if x.dim() != 2:
        return panel_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    y = panel_gemm.linear(x if x.stride(1) == 1 else x.contiguous(), weight, bias)
    if y is not None:
        return y
    if isinstance(weight, panel_gemm.Panels):  # only the kernel reads panels: an input it refuses is an error
        raise RuntimeError(f"panel GEMM does not take x {tuple(x.shape)} {x.dtype} against {weight.shape}")
    return onednn_linear(x, weight, bias) if x.dtype == torch.float32 else F.linear(x, weight, bias)


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class Dual(NamedTuple):
    """A weight [out, in] twice: in oneDNN's blocked layout and in its plain rows (which the C GEMV
    of :func:`small_rows_linear` reads). Costs the plain copy's memory on top of the blocked one."""

    packed: torch.Tensor
    plain: torch.Tensor


def small_rows_linear(x: torch.Tensor, weight: "torch.Tensor | Dual", bias: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``x @ weight.T + bias`` in bf16, ``x`` [..., in]: up to ``cpu_gemv.AVX512_BF16.max_rows``
    rows through the AVX512-BF16 GEMV on the plain weight, up to ``amx_gemm.MAX_ROWS`` through the
    AMX GEMM on it where that loads, more (or where neither takes them) through oneDNN on the
    blocked one (``weight`` a :class:`Dual`, or a plain tensor, which oneDNN then reorders per call)."""
    if x.dim() != 2:
        return small_rows_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], plain(weight).shape[0])
    rows = x.shape[0]
    y = (cpu_gemv.linear(x, plain(weight), bias, cpu_gemv.AVX512_BF16) if rows <= cpu_gemv.AVX512_BF16.max_rows
         else amx_gemm.linear(x, plain(weight), bias) if rows <= amx_gemm.MAX_ROWS else None)
    if y is not None:
        return y
    return onednn_linear(x, weight.packed if isinstance(weight, Dual) else weight, bias)


def plain(weight: "torch.Tensor | Dual") -> torch.Tensor:
    """The plain [out, in] rows of a GEMM operand (:func:`prepare`'s), where it keeps them."""
    return weight.plain if isinstance(weight, Dual) else weight


UPCAST_MIN_ROWS = 8  # without the C GEMV, fewer rows keep ATen's (measured crossover 4-8 rows, AVX2 host)
UPCAST_BLOCK = 1024  # weight rows upcast at a time (fp32 scratch <= 8 MiB; 512-2048 measured alike)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``x.dtype`` (bf16) for CPUs without bf16 arithmetic, ``x``
    [..., in]: up to ``max_rows`` rows through the C GEMV of ``cpu_gemv.upcast_kernel(in)`` (AVX-512
    or AVX2; it streams the bf16 weights), more through :func:`upcast_blocks`; without a C kernel,
    fewer than ``UPCAST_MIN_ROWS`` rows use ATen's bf16 GEMV."""
    if x.dim() != 2:
        return upcast_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    y = cpu_gemv.linear(x, weight, bias, cpu_gemv.upcast_kernel(x.shape[1]))  # None beyond max_rows, or none here
    if y is not None:
        return y
    if x.shape[0] < UPCAST_MIN_ROWS:
        return F.linear(x, weight, bias)
    return upcast_blocks(x, weight, bias)


def upcast_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [rows, in] @ ``weight.T`` + ``bias`` in bf16: blocks of ``weight`` rows are upcast
    into one fp32 scratch buffer and multiplied by oneDNN's fp32 GEMM. bf16 x bf16 products are
    exact in fp32 and the sums accumulate in fp32, as in a native bf16 GEMM; only the summation
    order differs."""
    rows, n = x.shape[0], weight.shape[0]
    xf = x.float().contiguous()
    out = x.new_empty(rows, n)
    scratch = torch.empty(min(UPCAST_BLOCK, n), weight.shape[1])
    for lo in range(0, n, UPCAST_BLOCK):
        hi = min(lo + UPCAST_BLOCK, n)
        block = scratch[: hi - lo]
        block.copy_(weight[lo:hi])
        b = None if bias is None else bias[lo:hi].float()
        out[:, lo:hi] = torch.ops.mkldnn._linear_pointwise(xf, block, b, "none", [], "")
    return out


PREPACK_ROWS = 32  # the batch size oneDNN's weight layout is chosen for; any row count runs on it


def prepare(gemm: Gemm, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in the layout ``gemm`` reads fastest, once at load time: for oneDNN's
    GEMM its blocked layout (a copy), else ``weight`` itself. fp32: measured 10-25 % faster at
    8-64 rows on the AVX2 host, the same at one row, bit-identical results from 8 rows on. bf16
    (where oneDNN runs it natively: AVX512-BF16 / AMX): 1.1-2.8x faster per projection at 1-64
    rows on the AMX host (``bench.gemm_bench``), since unpacked weights are reordered on every
    call. The result is only an operand of ``gemm``: it cannot be sliced or read as a tensor.
    For :func:`small_rows_linear`, a :class:`Dual` of that layout and ``weight`` itself; for
    :func:`panel_linear`, fp32 weights in its panels (instead of oneDNN's layout, not beside it)."""
    if gemm is panel_linear and weight.dtype == torch.float32:
        return panel_gemm.pack(weight)  # type: ignore[return-value]
    if gemm in (onednn_linear, small_rows_linear) and _reorder_runs(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PREPACK_ROWS)
        return Dual(packed, weight) if gemm is small_rows_linear else packed
    return weight


def native(gemm: Gemm) -> bool:
    """Whether ``gemm`` runs its dtype in hardware (oneDNN, with or without the small-rows GEMV; the
    fp32 panel GEMM) rather than upcasting bf16 to fp32 around the math."""
    return gemm in (onednn_linear, small_rows_linear, panel_linear)


@functools.cache
def _reorder_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN reorders ``dtype`` (fp32, bf16) linear weights on this build and CPU (one
    tiny probe)."""
    if (dtype not in (torch.float32, torch.bfloat16) or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            or not _onednn_runs(dtype)):
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=dtype), PREPACK_ROWS)
        onednn_linear(torch.ones(2, 16, dtype=dtype), packed)
    except RuntimeError:
        return False
    return True


@functools.cache
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's CPU inner product runs in ``dtype`` on this CPU (one tiny probe)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        onednn_linear(torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 in hardware here: it runs bf16 at all (probe) and the CPU lists
    one of ``dtypes.BF16_CPU_FLAGS`` (AVX512-BF16, AMX). Without them oneDNN may still run bf16
    on AVX-512, emulated: whole bf16 steps measured 2.0-3.0x slower (1-64 rows) than with
    :func:`upcast_linear` and the AVX-512 GEMV."""
    return _onednn_runs(torch.bfloat16) and any(cpu_build.has_cpu_flag(f) for f in dtypes.BF16_CPU_FLAGS)


def pick_gemm(name: str, device: torch.device, dtype: torch.dtype) -> Gemm:
    """The GEMM for ``name``. "auto": on CPU for fp32, :func:`panel_linear` where its kernel loads
    (AVX-512F or AVX2 + FMA), else oneDNN where it runs; oneDNN for bf16 where
    :func:`native_bf16` (:func:`small_rows_linear` where the AVX512-BF16 GEMV loads); bf16 on
    any other CPU where oneDNN's fp32 GEMM runs, :func:`upcast_linear`; else torch (CUDA, other
    dtypes). "onednn": oneDNN wherever it runs ``dtype``, emulated bf16 included, else an error.
    "gemv": :func:`small_rows_linear` for bf16 with native bf16, and a clear error where the
    AVX512-BF16 GEMV does not load; other dtypes and devices as "auto"."""
    cpu = device.type == "cpu"
    runs = cpu and dtype in (torch.float32, torch.bfloat16) and _onednn_runs(dtype)
    if name == "onednn":
        if not runs:
            raise ValueError(f"oneDNN GEMM is not available for {device.type}/{dtype}")
        return onednn_linear
    usable = runs and (dtype != torch.bfloat16 or native_bf16())
    if name == "gemv":
        if not (usable and dtype == torch.bfloat16):
            return pick_gemm("auto", device, dtype)
        if cpu_gemv.library(cpu_gemv.AVX512_BF16) is None:
            raise ValueError("the AVX512-BF16 GEMV does not load here (it needs avx512_bf16 and a C compiler)")
        return small_rows_linear
    if usable and name == "auto" and dtype == torch.bfloat16 and _small_rows_pay():
        return small_rows_linear
    if usable and name == "auto" and dtype == torch.float32 and panel_gemm.library() is not None:
        return panel_linear
    if usable and name == "auto":
        return onednn_linear
    if name == "auto" and cpu and dtype == torch.bfloat16 and _onednn_runs(torch.float32):
        return upcast_linear
    return torch_linear


def _small_rows_pay() -> bool:
    """The AVX512-BF16 GEMV loads here: measured faster than oneDNN at 1-4 rows on Zen 4 (no AMX)
    and on an AMX Xeon (Dec 6: a one-row bf16 step 42 vs 62 ms, four rows 36 vs 59, planned
    layers included; single stream 36.0 vs 23.8 tok/s)."""
    return cpu_gemv.library(cpu_gemv.AVX512_BF16) is not None
