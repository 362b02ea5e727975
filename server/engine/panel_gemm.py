"""The fp32 panel GEMM: ``gemm_f32_avx512.c`` on CPUs with AVX-512F, ``gemm_f32_avx2.c`` (the same
contract on 256-bit registers) on AVX2 + FMA ones. Weights in panels of 32 output rows
(:func:`pack`, once at load time), every output a sum in input order (so a row's result is
bitwise the same whatever else is in the batch, whether the weight is packed or plain, and which
of the two kernels ran it).

On a 2-core Intel Xeon without bf16 units (Dec 6, ``python -m bench.gemm_bench --dtypes float32``:
all 18 layers' projections of Gemma 3 270M's shapes, one weight set per layer, so they stream from
memory as in a step) it ran 1.13-1.25x faster than oneDNN's prepacked fp32 GEMM at 1-32 rows,
1.06x at 64, 1.01x at 128 and 0.98x at 512 (prefills); the AVX2 build on a 2-core Zen 3 EPYC
(Dec 7) 1.06-1.20x at 1-32 rows, 0.99x at 64 and 1.06x at 512. ``kernels.pick_gemm`` takes it
for fp32 on CPUs where one loads.
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

NR = 32  # output rows per panel
_SO = ("-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


class Variant(NamedTuple):
    """One build of the kernel: its source, compiler flags and the CPU flag it needs."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cpu_flag: str


AVX512 = Variant("AVX-512 fp32 panel GEMM", Path(__file__).with_name("gemm_f32_avx512.c"), ("-O3", "-mavx512f", *_SO),
                 "avx512f")
AVX2 = Variant("AVX2 fp32 panel GEMM", Path(__file__).with_name("gemm_f32_avx2.c"), ("-O3", "-mavx2", *_SO), "avx2")
VARIANTS = (AVX512, AVX2)  # best first


class Panels(NamedTuple):
    """A weight [n, k] as ``data`` [ceil(n / 32), k, 32] fp32 (rows past n zero)."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


@functools.cache
def variant() -> Variant | None:
    """The best variant that loads on this CPU (AVX-512F, else AVX2 + FMA), or None."""
    return next((v for v in VARIANTS if build(v) is not None), None)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel of :func:`variant`, or None (neither loads here)."""
    best = variant()
    return None if best is None else build(best)


@functools.cache
def build(which: Variant) -> ctypes.CDLL | None:
    """``which`` built and loaded after a passing probe, or None (the CPU lacks its flag, no
    compiler, the probe failed; logged once)."""
    if not cpu_build.has_cpu_flag(which.cpu_flag) or not cpu_build.has_cpu_flag("fma"):
        return None
    lib = cpu_build.load(which.source, which.flags, which.name)
    if lib is None:
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.gemm_f32.argtypes = [p, p, n, n, n, p, n, p, n, p, n, ctypes.c_int]
    lib.gemm_f32.restype = None
    if not _probe(lib):
        log.warning("%s failed its probe against fp64 arithmetic; not using it", which.name)
        return None
    return lib


def pack(weight: torch.Tensor) -> Panels:
    """``weight`` [n, k] fp32 on the CPU in the kernel's panels (a copy)."""
    n, k = weight.shape
    w = torch.cat([weight.detach(), weight.new_zeros(-n % NR, k)]) if n % NR else weight.detach()
    return Panels(w.reshape(-1, NR, k).transpose(1, 2).contiguous(), n, k)


def supports(x: torch.Tensor, weight: "torch.Tensor | Panels", bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes these: fp32 CPU tensors, ``x`` [rows >= 1, k] and ``weight``
    [n, k] (or its panels) with unit column strides, ``bias`` None or contiguous fp32 [n]."""
    w = weight.data if isinstance(weight, Panels) else weight
    if x.dtype != torch.float32 or w.dtype != torch.float32 or not (x.is_cpu and w.is_cpu) or x.dim() != 2:
        return False
    n, k = weight.shape
    return (x.shape[0] >= 1 and x.shape[1] == k >= 1 and x.stride(1) == 1 and (isinstance(weight, Panels)
            or (w.dim() == 2 and w.stride(1) == 1))
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == (n,) and bias.is_contiguous())))


def linear(x: torch.Tensor, weight: "torch.Tensor | Panels", bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` [rows, n] fp32 (``weight`` plain [n, k] or :func:`pack`-ed), or None
    where the kernel does not load here or :func:`supports` says no."""
    lib = library()
    if lib is None or not supports(x, weight, bias):
        return None
    return _call(lib, x, weight, bias)


def _call(lib: ctypes.CDLL, x: torch.Tensor, weight: "torch.Tensor | Panels", bias: torch.Tensor | None
          ) -> torch.Tensor:
    n, k = weight.shape
    y = torch.empty((x.shape[0], n))
    packed, plain = (weight.data, None) if isinstance(weight, Panels) else (None, weight)
    lib.gemm_f32(None if packed is None else packed.data_ptr(), None if plain is None else plain.data_ptr(),
                 0 if plain is None else plain.stride(0), n, k, x.data_ptr(), x.stride(0),
                 None if bias is None else bias.data_ptr(), x.shape[0], y.data_ptr(), n, torch.get_num_threads())
    return y


def _probe(lib: ctypes.CDLL) -> bool:
    """Packed and plain weights, every row count to 40 and 77, a ragged width (70 outputs), inputs
    not a multiple of a chunk (150): within fp32 rounding of fp64 arithmetic, and bitwise equal to
    each other and to the one-row result."""
    gen = torch.Generator().manual_seed(0)
    w, bias = torch.randn(70, 150, generator=gen), torch.randn(70, generator=gen)
    panels = pack(w)
    for rows in (*range(1, 41), 77):
        x = torch.randn(rows, 150, generator=gen)
        got, plain = _call(lib, x, panels, bias), _call(lib, x, w, bias)
        want = (x.double() @ w.double().T + bias.double()).float()
        if not (torch.equal(got, plain) and torch.allclose(got, want, rtol=1e-5, atol=1e-4)
                and torch.equal(got[-1:], _call(lib, x[-1:], panels, bias))):
            return False
    return True
