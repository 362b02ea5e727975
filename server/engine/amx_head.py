"""The bf16 LM head on Intel AMX tiles (``amx_head.c``): the head's vocabulary slices in the
kernel's layout, their logits, or only each row's first maximum.

oneDNN's prepacked bf16 GEMM runs the head on AMX too, but at 25-64 rows of Gemma 3 270M's
262k-row head it took 37-47 ms on a 2-core AMX Xeon (with the argmax over its output), against
26-29 ms for this kernel at 32 rows (its logits bitwise oneDNN's there; at 64 rows all but 6e-5
of them, the last bf16 bit) and the same ~38-41 ms at 64. The int8 estimate of
:mod:`greedy_head` is faster still up to 24 rows; this serves the head's slices beyond it, and
logits for sampled rows. 1-4 rows go to the AVX512-BF16 GEMV on the plain rows instead
(:mod:`cpu_gemv`), through :func:`kernels.small_rows_linear`. Where it applies the
runner keeps this layout instead of oneDNN's blocked copy, so it costs no memory.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from adapterctl.server.engine import cpu_build, cpu_gemv, kernels

SOURCE = Path(__file__).with_name("amx_head.c")
FLAGS = cpu_build.AMX_FLAGS
K_MULTIPLE = 32  # inputs per A tile row
_P, _L = ctypes.c_void_p, ctypes.c_long


class Part(NamedTuple):
    """A vocabulary slice of the head: ``packed`` in the kernel's layout (pairs of 16-row blocks,
    zero rows past ``plain``'s), ``plain`` its bf16 rows [n, k] (for 1-4 rows' GEMV)."""

    packed: torch.Tensor
    plain: torch.Tensor


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel after Linux granted the tile state and it passed its probe, or None (no AMX-BF16
    here, no compiler that knows AMX, or the probe failed; logged when unexpected)."""
    return cpu_build.load_amx(SOURCE, "AMX bf16 LM head", "the LM head stays on oneDNN", "amx_head_init", _setup,
                              _probe)


def _setup(lib: ctypes.CDLL) -> None:
    lib.amx_head_bf16.argtypes = [_P, _L, _L, _P, _L, _L, _P, _L, _P, _P, ctypes.c_int]
    lib.amx_head_bf16.restype = ctypes.c_int


def pack(w: torch.Tensor) -> torch.Tensor:
    """``w`` bf16 [n, k] (k a multiple of 32) as [ceil(n / 32), k / 32, 2, 16, 16, 2]: per pair of
    16-row blocks and 32 inputs, two B tiles whose row i holds inputs 2i, 2i + 1 of each block row."""
    n, k = w.shape
    w = torch.cat([w, w.new_zeros(-n % 32, k)])
    return w.view(-1, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def prepare(w: torch.Tensor) -> Part | None:
    """A slice ``w`` bf16 [n, k] of the head as a :class:`Part`, or None where the kernel does not
    take it (no kernel here, not contiguous bf16 on the CPU, k not a multiple of 32)."""
    if library() is None or w.dtype != torch.bfloat16 or not w.is_cpu or w.dim() != 2:
        return None
    if w.shape[1] % K_MULTIPLE or not w.is_contiguous():
        return None
    return Part(pack(w), w)


def _run(lib: ctypes.CDLL, x: torch.Tensor, part: Part, logits: torch.Tensor | None,
         val: torch.Tensor | None, idx: torch.Tensor | None) -> int:
    n, k = part.plain.shape
    return lib.amx_head_bf16(part.packed.data_ptr(), n, k, x.data_ptr(), x.stride(0), x.shape[0],
                             None if logits is None else logits.data_ptr(), n, None if val is None else val.data_ptr(),
                             None if idx is None else idx.data_ptr(), torch.get_num_threads())


def _usable(x: torch.Tensor, part: Part) -> bool:
    return x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] == part.plain.shape[1]


def linear(x: torch.Tensor, part: Part) -> torch.Tensor:
    """Logits bf16 [rows, n] of ``x`` bf16 [rows, k] (unit last stride): 1-4 rows through the
    AVX512-BF16 GEMV on the plain rows, more through the AMX kernel."""
    lib = library()
    if x.shape[0] > cpu_gemv.AVX512_BF16.max_rows and lib is not None and _usable(x, part):
        out = torch.empty(x.shape[0], part.plain.shape[0], dtype=torch.bfloat16)
        if _run(lib, x, part, out, None, None) == 0:
            return out
    return kernels.small_rows_linear(x, part.plain)  # the GEMV's rows (oneDNN on the plain rows otherwise)


def first_max(x: torch.Tensor, part: Part) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values bf16 [rows], indices int64 [rows]): each row's first maximum of :func:`linear`'s
    logits, without writing them; None where the kernel does not take ``x`` (fewer than 5 rows,
    dtype, layout) or a logit is NaN (the caller then reduces the logits itself)."""
    lib = library()
    if x.shape[0] <= cpu_gemv.AVX512_BF16.max_rows or lib is None or not _usable(x, part):
        return None
    rows = x.shape[0]
    val, idx = torch.empty(rows), torch.empty(rows, dtype=torch.int64)
    if _run(lib, x, part, None, val, idx) != 0:
        return None
    return val.to(torch.bfloat16), idx  # exact: the values are bf16 roundings


def _probe(lib: ctypes.CDLL) -> bool:
    """Logits within bf16 rounding of exact sums, and the argmax mode the first maximum of the
    logits mode's output, on a ragged vocabulary (not a multiple of 32) with ties, for row
    counts on and off the 16-row tiles."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-4, 5, (77, 64), generator=gen).bfloat16()  # small integers: exact sums, many ties
    part = Part(pack(w), w)
    for rows in (5, 16, 33):
        x = torch.randint(-3, 4, (rows, 64), generator=gen).bfloat16()
        out = torch.empty(rows, 77, dtype=torch.bfloat16)
        val, idx = torch.empty(rows), torch.empty(rows, dtype=torch.int64)
        if _run(lib, x, part, out, None, None) != 0 or _run(lib, x, part, None, val, idx) != 0:
            return False
        want = (x.double() @ w.double().T).bfloat16()
        if not (torch.equal(out, want) and torch.equal(idx, want.argmax(-1))
                and torch.equal(val.bfloat16(), want.gather(1, idx[:, None])[:, 0])):
            return False
    return True
