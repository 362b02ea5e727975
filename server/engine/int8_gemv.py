"""The int8 x int16 estimators of an LM head's logits (:mod:`greedy_head`), one interface, three
kernels: ``gemv_i8.c`` (AVX2: ``vpmaddwd`` on a copy packed four vocabulary rows per line),
``gemv_i8_vnni.c`` (AVX512-VNNI: ``vpdpwssd``, one lane per vocabulary row; 1.7x the AVX2 kernel at
32 rows on Zen 4: 27.8 vs 47.5 ms for Gemma 3 270M's head) and ``gemv_i8_amx.c`` (Intel AMX: int8
tiles, x split exactly into two int8 halves).

All three compute ``A[r, v] = scale[v] * sx[r] * sum_k q[v, k] * xq[r, k]`` with ``xq`` x rounded to
int16 per row (``quantize``, once per step; it also gives the rounding's largest error ``e[r]``),
the products and sums exact in integers, one rounding to fp32 at the end; so the same bound holds
for all. They differ in layout and speed: the AVX2 kernel streams the copy once for any number of rows (each group of
four vocabulary rows widened to int16 once, then served from L1 to every block of three x rows)
and is compute-bound beyond a few rows on an AVX2-only CPU (AMD EPYC, 2 cores, same head: 9-15 ms
at 1 row, 25 at 8, 89 at 32, 161 at 64, against oneDNN's prepacked fp32 head at 61-73, 84-98, 146,
222-255; streaming the copy once per three rows had taken 125 at 32 rows and 242 at 64), AMX
streams the copy once per 24 rows (2-core Xeon VM, Gemma 3 270M head, scratch timings: 6.2 ms at
1 row, 8.3 at 16, 18 at 32, 31 at 64; oneDNN's prepacked bf16 head 14.2 at 1 row, 13.8 at 4, 18.1
at 32, 28.8 at 64; its fp32 head 26.0 at 1 row, 112.9 at 32, 103.2 at 64).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from adapterctl.server.engine import cpu_build

log = logging.getLogger(__name__)

MAX_K = 4096  # neither kernel's int32 sums can overflow up to this input width


class Quantized(NamedTuple):
    """x [rows, k] rounded to int16 per row (gemv_i8.c's ``quantize_rows``): ``x ~ sx[r] * xq[r]``."""

    xq: torch.Tensor  # int16 [rows, k]
    sx: torch.Tensor  # fp64 [rows]
    ex: torch.Tensor  # fp32 [rows]: >= the largest |x[r, i] - sx[r] * xq[r, i]|


def quantize(lib: ctypes.CDLL, x: torch.Tensor, xmax: float) -> Quantized:
    """``x`` fp32 [rows, k] (contiguous, finite) rounded so that its largest |x| maps to ``xmax``."""
    rows, k = x.shape
    q = Quantized(torch.empty(rows, k, dtype=torch.int16), torch.empty(rows, dtype=torch.float64), torch.empty(rows))
    lib.quantize_rows(x.data_ptr(), rows, k, xmax, q.xq.data_ptr(), q.sx.data_ptr(), q.ex.data_ptr())
    return q


class Estimator(Protocol):
    """An int8 estimate kernel: its weight layout, x's rounding, its run, and how many rows it pays
    off for."""

    name: str
    k_multiple: int  # the input width must be a multiple of this
    lib: ctypes.CDLL  # gemv_i8.c's library: x's quantisation and candidate selection serve both

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` int8 [n, k] in the kernel's layout (zero rows pad n)."""

    def quantize(self, x: torch.Tensor) -> Quantized:
        """``x`` fp32 [rows, k] contiguous and finite, rounded to int16 as :meth:`run` takes it."""

    def run(self, packed: torch.Tensor, scale: torch.Tensor, x: Quantized, out: torch.Tensor) -> bool:
        """Write ``A`` into ``out`` fp32 [rows, n] (unit column stride) for ``x`` (:meth:`quantize`'s);
        False when out of memory."""

    def max_rows(self, dtype: torch.dtype, native: bool) -> int:
        """Most rows for which the estimate beats the full head in ``dtype``; ``native``: the full
        head's GEMM runs ``dtype`` in hardware (oneDNN), not an fp32 upcast of it."""


def _ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


class Avx2Estimator:
    """``gemv_i8.c``: 4 vocabulary rows x 16 inputs per 64-byte line, read in order."""

    name, k_multiple = "avx2", 16
    GROUP, CHUNK = 4, 16
    XMAX = 32767.0  # |int16 x|

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """[ceil(n / GROUP), k / CHUNK, GROUP, CHUNK] (here [ceil(n / 4), k / 16, 4, 16])."""
        n, k = q.shape
        q = torch.cat([q, q.new_zeros(-n % self.GROUP, k)])
        return q.view(-1, self.GROUP, k // self.CHUNK, self.CHUNK).transpose(1, 2).contiguous()

    def quantize(self, x: torch.Tensor) -> Quantized:
        return quantize(self.lib, x, self.XMAX)

    @property
    def kernel(self):
        """The C estimate: ``gemv_i8`` (this layout)."""
        return self.lib.gemv_i8

    def run(self, packed: torch.Tensor, scale: torch.Tensor, x: Quantized, out: torch.Tensor) -> bool:
        rows, k = x.xq.shape
        q, s, xp, sp, o = _ptrs(packed, scale, x.xq, x.sx, out)
        self.kernel(q, s, scale.shape[0], k, xp, sp, rows, o, out.stride(0), torch.get_num_threads())
        return True

    NATIVE_BF16_ROWS = 7

    def max_rows(self, dtype: torch.dtype, native: bool) -> int:
        # step_bench --baseline full_head, tokens identical. AVX2 host: fp32 1.75x at 1 row, 1.31x
        # at 32, 1.17x at 64; bf16 (whose head beyond 32 rows is the upcast fp32 GEMM) 1.57x at 32,
        # 1.24x at 64. Zen 4 (AVX512-BF16, no AMX): fp32 1.75x at 1 row, 1.11x at 64; but its
        # native bf16 head (oneDNN, vdpbf16ps) wins from 8 rows: 1.41-1.44x at 1, 1.10-1.19x at 4,
        # 1.06-1.09x at 5-7, 0.91-1.01x at 8, 0.80x at 32. Beyond 64 rows: unmeasured.
        return self.NATIVE_BF16_ROWS if native and dtype == torch.bfloat16 else 64


class VnniEstimator(Avx2Estimator):
    """``gemv_i8_vnni.c``: 16 vocabulary rows x 2 inputs per 32 bytes, read in order; x as the
    AVX2 kernel rounds it, and bitwise its estimates (the same exact integer sums)."""

    name, k_multiple = "vnni", 32
    GROUP, CHUNK = 16, 2  # pack: [ceil(n / 16), k / 2, 16, 2]

    def __init__(self, lib: ctypes.CDLL, vnni: ctypes.CDLL) -> None:
        super().__init__(lib)
        self.vnni = vnni

    @property
    def kernel(self):
        """The C estimate: ``gemv_i8_vnni`` (same arguments as ``gemv_i8``, this layout)."""
        return self.vnni.gemv_i8_vnni

    # step_bench --baseline full_head, Zen 4, tokens identical: against oneDNN's native bf16 head
    # 1.30x at 8 rows, 1.11x at 16, 1.04x at 32, 0.92x at 64; fp32 1.79x at 1 row, 1.39x at 32,
    # 1.28x at 64 (the AVX2 estimate there: 1.12x at 32)
    NATIVE_BF16_ROWS = 32


class AmxEstimator:
    """``gemv_i8_amx.c``: TDPBSSD's B operand, one 1 KiB tile per 16 vocabulary rows x 64 inputs;
    x is rounded to int16 by ``gemv_i8.c``'s ``quantize_rows``."""

    name, k_multiple = "amx", 64
    ROWS_PER_PASS = 24  # gemv_i8_amx.c: x rows a pass over the copy serves
    XMAX = 127 * 256 + 127  # |int16 x| whose high byte stays in [-127, 127]

    def __init__(self, lib: ctypes.CDLL, amx: ctypes.CDLL) -> None:
        self.lib, self.amx = lib, amx

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """[ceil(n / 16), k / 64, 16, 16, 4]: tile row i holds inputs 4i..4i+3 of each of 16 rows."""
        n, k = q.shape
        q = torch.cat([q, q.new_zeros(-n % 16, k)])
        return q.view(-1, 16, k // 64, 16, 4).permute(0, 2, 3, 1, 4).contiguous()

    def quantize(self, x: torch.Tensor) -> Quantized:
        return quantize(self.lib, x, float(self.XMAX))

    def run(self, packed: torch.Tensor, scale: torch.Tensor, x: Quantized, out: torch.Tensor) -> bool:
        rows, k = x.xq.shape
        q, s, xp, sp, o = _ptrs(packed, scale, x.xq, x.sx, out)
        return self.amx.gemv_i8_amx(q, s, scale.shape[0], k, xp, sp, rows, o, out.stride(0),
                                    torch.get_num_threads()) == 0

    def max_rows(self, dtype: torch.dtype, native: bool) -> int:
        # bf16: one pass (at 32 rows AMX's bf16 head costs the same as the estimate); fp32: the
        # estimate stays under the fp32 head's time at any batch the engine runs (113 vs 18 ms at 32)
        return self.ROWS_PER_PASS if dtype == torch.bfloat16 else 256


SOURCE = Path(__file__).with_name("gemv_i8.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
VNNI_SOURCE = Path(__file__).with_name("gemv_i8_vnni.c")
VNNI_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")  # what gemv_i8_vnni.c uses
VNNI_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-fopenmp", "-shared",
              "-fPIC")
AMX_SOURCE = Path(__file__).with_name("gemv_i8_amx.c")
AMX_FLAGS = ("-O3", "-mavx512f", "-mavx512dq", "-mamx-tile", "-mamx-int8", "-fopenmp", "-shared", "-fPIC")


def _bind(lib: ctypes.CDLL, **signatures: tuple[list, object]) -> ctypes.CDLL:
    """Declare each function's (argtypes, restype) on ``lib``."""
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


@functools.cache
def library() -> ctypes.CDLL | None:
    """The AVX2 kernels (the estimate, x's quantisation and ``select_candidates``) after a passing
    probe, or None (logged once, with why)."""
    lib = cpu_build.load(SOURCE, FLAGS, "int8 greedy LM head")
    if lib is None:
        return None
    _bind(lib, gemv_i8=([_PTR, _PTR, _LONG, _LONG, _PTR, _PTR, _LONG, _PTR, _LONG, _INT], None),
          select_candidates=([_PTR, _LONG, _PTR, _PTR, _PTR, _PTR, ctypes.c_float, _LONG, _LONG, _LONG, _PTR, _PTR,
                              _INT], _INT),
          quantize_rows=([_PTR, _LONG, _LONG, ctypes.c_double, _PTR, _PTR, _PTR], None))
    if not probe(Avx2Estimator(lib)):
        log.warning("int8 greedy LM head failed its probe against exact arithmetic; using the full head")
        return None
    return lib


@functools.cache
def amx_library() -> ctypes.CDLL | None:
    """The AMX estimate after the kernel granted the tile state and passed its probe, or None
    (no AMX-INT8 here, no compiler that knows AMX, or the probe failed; logged when unexpected)."""
    base = library()
    if base is None or not amx_host():
        return None
    lib = cpu_build.load(AMX_SOURCE, AMX_FLAGS, "AMX int8 LM-head estimate")
    if lib is None:
        return None
    _bind(lib, gemv_i8_amx=([_PTR, _PTR, _LONG, _LONG, _PTR, _PTR, _LONG, _PTR, _LONG, _INT], _INT),
          amx_init=([], _INT))
    if lib.amx_init() != 0:
        log.warning("Linux did not grant the AMX tile state; using the AVX2 int8 estimate")
        return None
    if not probe(AmxEstimator(base, lib)):
        log.warning("AMX int8 estimate failed its probe against exact arithmetic; using the AVX2 one")
        return None
    return lib


@functools.cache
def vnni_library() -> ctypes.CDLL | None:
    """The AVX512-VNNI estimate after its probe, or None (no avx512_vnni here, no compiler, or the
    probe failed; logged when unexpected)."""
    base = library()
    if base is None or not all(cpu_build.has_cpu_flag(f) for f in VNNI_CPU_FLAGS):
        return None
    lib = cpu_build.load(VNNI_SOURCE, VNNI_FLAGS, "AVX512-VNNI int8 LM-head estimate")
    if lib is None:
        return None
    _bind(lib, gemv_i8_vnni=([_PTR, _PTR, _LONG, _LONG, _PTR, _PTR, _LONG, _PTR, _LONG, _INT], None))
    if not probe(VnniEstimator(base, lib)):
        log.warning("AVX512-VNNI int8 estimate failed its probe against exact arithmetic; using the AVX2 one")
        return None
    return lib


def amx_host() -> bool:
    """The CPU has AMX tiles with int8 (Linux's /proc/cpuinfo flags)."""
    return cpu_build.has_cpu_flag("amx_tile") and cpu_build.has_cpu_flag("amx_int8")


def estimator(k: int) -> Estimator | None:
    """The fastest estimator that runs here for input width ``k`` (AMX, else AVX512-VNNI, else
    AVX2), or None. All need the AVX2 library (x's rounding and candidate selection live there)."""
    lib = library()
    if lib is None or k % Avx2Estimator.k_multiple or k > MAX_K:
        return None
    amx = amx_library() if k % AmxEstimator.k_multiple == 0 else None
    if amx is not None:
        return AmxEstimator(lib, amx)
    vnni = vnni_library() if k % VnniEstimator.k_multiple == 0 else None
    return VnniEstimator(lib, vnni) if vnni is not None else Avx2Estimator(lib)


def probe(est: Estimator) -> bool:
    """Every row count up to a pass and more, and a ragged vocabulary, stay within x's rounding of
    exact arithmetic, as the bound assumes, and x's rounding is int16-fine."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (37, 128), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.5
    x = torch.randn(30, 128, generator=gen).bfloat16().float()
    x[3, 5] = 200.0  # one row whose int16 step is coarse
    packed = est.pack(q)
    want = (x.double() @ q.double().T) * scale.double()
    for rows in (1, 2, 3, 7, 30):
        out, xq = torch.empty(rows, 37), est.quantize(x[:rows].contiguous())
        if not est.run(packed, scale, xq, out):
            return False
        ex = xq.ex
        slack = (scale.double() * q.double().abs().sum(1))[None] * ex.double()[:, None] + 2.0 ** -22 * want[:rows].abs()
        if not (((out.double() - want[:rows]).abs() <= slack).all()
                and (ex < x[:rows].abs().amax(1) * 2.0 ** -15).all()):
            return False
    return True
