"""One C call (``cpu_fused.c``) instead of ~7-10 ATen ops for a decode step's small row-wise ops
on x86 CPUs: Gemma's RMSNorm and the rotary embedding, on bf16 or fp32 rows, and attention's
per-token work before the scores (q/k norms, RoPE, the K/V cache writes) as one call a layer;
and the first maximum of each row of an LM-head slice (:func:`first_max`, ``argmax`` exactly),
when a step's rows only need their argmax and the greedy head does not take them.

At one row these ops cost their dispatch, not their arithmetic: 109 norms and 36 rotations a
Gemma 3 270M bf16 step were ~1,000 of its ~1,130 ATen calls. Both are bitwise ATen's: every op
rounds as ATen's does, and the norm's sum of squares adds in the order of ATen's CPU sum kernel
(8-lane vectors, four at a time, its cascade), so a step's logits are identical with and without
them (``bench/step_bench.py --baseline aten_ops`` checks it on the real model).

Compiled once per machine (:mod:`cpu_build`) and gated by a probe against ATen. Up to
``MAX_ROWS`` rows (a decode step's token x head rows; beyond that is prefill, where ATen's
vectorised, threaded ops are as fast); anything else, or no kernel, gives None and callers keep
ATen's path.
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
# rows (tokens x heads) per call: 64 decode rows of Gemma 3 270M (4 query heads) are 256. On the AMX
# host 64 -> 256 took a 64-row bf16 step 86 -> 82 ms and a 32-row one 69 -> 64 ms (same tokens); beyond
# is prefill, where ATen's vectorised, threaded ops are as fast
MAX_ROWS = 256
DTYPES = (torch.bfloat16, torch.float32)  # what the norm and the rotation take



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
    for fn in (lib.residual_norm_bf16, lib.residual_norm_f32):
        fn.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ctypes.c_float, long, long, ptr, ptr]
        fn.restype = None
    for fn in (lib.attention_prep_bf16, lib.attention_prep_f32):
        fn.argtypes = [ptr, long, long, ptr, long, long, ptr, long, long,  # q, k, v and their strides
                       ptr, ctypes.c_float, ptr, ctypes.c_float, ptr, ptr,  # norms, cos, sin
                       long, long, long, long, long, ptr, ptr, ptr,  # sc, n, heads, kvh, d, qout, kc, vc
                       long, long, long, long, long, ptr, ptr]  # cache extents and strides, rows, pos
        fn.restype = ctypes.c_int
    for fn in (lib.first_max_bf16, lib.first_max_f32):
        fn.argtypes = [ptr, long, long, long, ptr]
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
        if not _prep_matches(lib, qkv, cos, sin, gen):
            return False
        a, h = (torch.randn(2, 640, generator=gen) * 9).to(dtype), torch.randn(2, 640, generator=gen).to(dtype)
        s1, s2 = 1 + torch.randn(640, generator=gen), 1 + torch.randn(640, generator=gen)
        h_out, x_out = _residual(lib, a, h, (s1, 1e-6), (s2, 1e-6))
        if not (torch.equal(h_out, h + reference_norm(a, s1, 1e-6))
                and torch.equal(x_out, reference_norm(h_out, s2, 1e-6))):  # type: ignore[arg-type]
            return False
        if not _first_max_matches(lib, dtype, gen):
            return False
        for dim, scale_of_x in ((640, 1.0), (1100, 30.0), (37, 1e-3)):
            x = (torch.randn(5, 2, dim, generator=gen) * scale_of_x).to(dtype)
            scale = 1.0 + torch.randn(dim, generator=gen)
            if not torch.equal(_norm(lib, x, scale, 1e-6), reference_norm(x, scale, 1e-6)):
                return False
    return True


def _first_max_matches(lib: ctypes.CDLL, dtype: torch.dtype, gen: torch.Generator) -> bool:
    """:func:`first_max` is ATen's ``argmax`` on rows with ties, NaNs, infinities, signed zeros and
    widths with left-over scalars."""
    x = torch.randint(-3, 4, (9, 77), generator=gen).to(dtype)  # many ties
    x[1, 40], x[1, 70], x[2, 5], x[3, 76] = float("nan"), float("nan"), float("inf"), float("nan")
    x[4] = float("-inf")
    x[5] = 0.0
    x[5, 3] = -0.0
    x[6, :] = -0.0
    x[7, 76] = 9.0  # the maximum in the left-over scalars
    return torch.equal(_first_max(lib, x[:, :-1]), x[:, :-1].argmax(-1)) and torch.equal(_first_max(lib, x),
                                                                                          x.argmax(-1))


def _first_max(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    fn = lib.first_max_bf16 if x.dtype == torch.bfloat16 else lib.first_max_f32
    fn(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], idx.data_ptr())
    return idx


def first_max(x: torch.Tensor) -> torch.Tensor | None:
    """``x.argmax(-1)`` (int64 [rows]) for CPU ``x`` [rows, n] (bf16 or fp32, unit last stride, n >= 1),
    the same index (first maximum; a row's first NaN where it has one); else None. ~0.4 ms on 64 x
    32768 bf16 logits on the AMX Xeon, where ATen's bf16 amax + argmax took ~0.7."""
    lib = library()
    if lib is None or x.dim() != 2 or x.dtype not in DTYPES or x.device.type != "cpu" or x.shape[1] < 1:
        return None
    if x.stride(1) != 1:
        return None
    return _first_max(lib, x)


def _rows(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(n, heads, token stride, head stride) of ``x`` [n, d] or [n, heads, d] with unit last stride."""
    st = x.stride()  # once: each stride() call costs ~0.7 us, and this runs ~145 times a step
    if st[-1] != 1:
        return None
    if len(st) == 2:
        return x.shape[0], 1, st[0], 0
    if len(st) == 3:
        return x.shape[0], x.shape[1], st[0], st[1]
    return None


def _norm(lib: ctypes.CDLL, x: torch.Tensor, scale: torch.Tensor, eps: float,
          shape: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    n, heads, sn, sh = shape or _rows(x)  # type: ignore[misc]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    fn = lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else lib.rms_norm_f32
    fn(x.data_ptr(), sn, sh, scale.data_ptr(), n, heads, x.shape[-1], eps, y.data_ptr())
    return y


def _rope(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          shape: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    n, heads, sn, sh = shape or _rows(x)  # type: ignore[misc]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    fn = lib.rope_bf16 if x.dtype == torch.bfloat16 else lib.rope_f32
    fn(x.data_ptr(), sn, sh, cos.data_ptr(), sin.data_ptr(), cos.stride(0), n, heads, x.shape[-1], y.data_ptr())
    return y


def _prep_matches(lib: ctypes.CDLL, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  gen: torch.Generator) -> bool:
    """:func:`attention_prep` on ``qkv`` [3, 6 * 32] (q: 4 heads, k and v: 1) is bitwise the
    separate norms, rotations and cache writes, with and without the norms."""
    q, k, v = (qkv[:, a * 32: b * 32].view(3, b - a, 32) for a, b in ((0, 4), (4, 5), (5, 6)))
    rows, pos = torch.tensor([1, 0, 2]), torch.tensor([5, 9, 0])
    scale = 1 + torch.randn(32, generator=gen)
    for norms in (None, ((scale, 1e-6), (scale.flip(0), 1e-5))):
        kc, vc = (torch.zeros(3, 1, 10, 32, dtype=qkv.dtype) for _ in range(2))
        got = _prep(lib, q, k, v, norms, cos, sin, kc, vc, rows, pos)
        qn, kn = (q, k) if norms is None else (reference_norm(q, *norms[0]), reference_norm(k, *norms[1]))
        want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
        want_k[rows, :, pos], want_v[rows, :, pos] = reference_rope(kn, cos, sin), v
        if got is None or not (torch.equal(got, reference_rope(qn, cos, sin)) and torch.equal(kc, want_k)
                               and torch.equal(vc, want_v)):
            return False
    return True


NormParams = tuple[torch.Tensor, float]  # (fp32 scale [dim], eps) of a Gemma-order norm
Norms = tuple[NormParams, NormParams] | None  # the q and k norms of attention_prep


def _prep(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: Norms, cos: torch.Tensor,
          sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor,
          pos: torch.Tensor) -> torch.Tensor | None:
    (n, heads, qn, qh), (_, kvh, kn, kh), (_, _, vn, vh) = _rows(q), _rows(k), _rows(v)  # type: ignore[misc]
    out = torch.empty((n, heads, q.shape[2]), dtype=q.dtype)
    (qs, qe), (ks, ke) = norms if norms is not None else ((None, 0.0), (None, 0.0))
    fn = lib.attention_prep_bf16 if q.dtype == torch.bfloat16 else lib.attention_prep_f32
    st = kc.stride()
    rc = fn(q.data_ptr(), qn, qh, k.data_ptr(), kn, kh, v.data_ptr(), vn, vh,
            None if qs is None else qs.data_ptr(), qe, None if ks is None else ks.data_ptr(), ke,
            cos.data_ptr(), sin.data_ptr(), cos.stride(0), n, heads, kvh, q.shape[2], out.data_ptr(),
            kc.data_ptr(), vc.data_ptr(), kc.shape[0], kc.shape[2], st[0], st[1], st[2],
            rows.data_ptr(), pos.data_ptr())
    return out if rc == 0 else None


def attention_prep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: Norms, cos: torch.Tensor,
                   sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rows: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor | None:
    """``reference_rope(norm(q))`` [n, heads, d] (contiguous), having written ``rope(norm(k))``
    and ``v`` into ``kc``/``vc`` [row_cap, kvh, pos_cap, d] at (``rows``, ``pos``) [n] (int64),
    bitwise as :func:`rms_norm`, :func:`rope` and an indexed write do; ``norms``: the q and k
    norms' (fp32 scale [d], eps), or None for a model without them. ``q``, ``k``, ``v``: [n,
    heads or kvh, d] with unit last stride; ``cos``/``sin`` [n, 1, d]. None (nothing written)
    where it does not apply: no kernel, dtypes, shapes or strides it does not take, more than
    ``MAX_ROWS`` rows, or a row or position outside the caches."""
    lib = library()
    if lib is None or q.dtype not in DTYPES or not q.is_cpu:
        return None
    shapes = [_rows(t) if t.dim() == 3 else None for t in (q, k, v)]
    if None in shapes or shapes[0][0] * shapes[0][1] > MAX_ROWS:  # type: ignore[index]
        return None
    n, d = q.shape[0], q.shape[2]
    same = all(t.dtype == q.dtype and t.is_cpu for t in (k, v, cos, sin, kc, vc))
    if not same or k.shape != v.shape or k.shape[0] != n or k.shape[2] != d or kc.dim() != 4:
        return None
    if cos.shape != (n, 1, d) or cos.stride() != sin.stride() or cos.stride(-1) != 1 or d % 2:
        return None
    if kc.shape != vc.shape or kc.stride() != vc.stride() or kc.stride(-1) != 1 or kc.shape[1:4:2] != (k.shape[1], d):
        return None
    if rows.dtype != torch.int64 or pos.dtype != torch.int64 or rows.shape != (n,) or pos.shape != (n,) \
            or not (rows.is_contiguous() and pos.is_contiguous()):
        return None
    if norms is not None and not all(sc.dtype == torch.float32 and sc.shape == (d,) and sc.is_contiguous()
                                     for sc, _ in norms):
        return None
    return _prep(lib, q, k, v, norms, cos, sin, kc, vc, rows, pos)


MAX_DIM = 8192  # residual_norm's width limit (cpu_fused.c)


def _residual(lib: ctypes.CDLL, a: torch.Tensor, h: torch.Tensor, norm1: NormParams,
              norm2: NormParams | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, dim = a.shape
    h_out = torch.empty((n, dim), dtype=a.dtype)
    x_out = None if norm2 is None else torch.empty((n, dim), dtype=a.dtype)
    fn = lib.residual_norm_bf16 if a.dtype == torch.bfloat16 else lib.residual_norm_f32
    fn(a.data_ptr(), h.data_ptr(), norm1[0].data_ptr(), norm1[1], None if norm2 is None else norm2[0].data_ptr(),
       0.0 if norm2 is None else norm2[1], n, dim, h_out.data_ptr(), None if x_out is None else x_out.data_ptr())
    return h_out, x_out


def residual_norm(a: torch.Tensor, h: torch.Tensor, norm1: NormParams,
                  norm2: NormParams | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(h + norm1(a), norm2(h + norm1(a)))`` (the second None when ``norm2`` is), bitwise as
    :func:`rms_norm` and ATen's add, for contiguous CPU ``a`` and ``h`` [n, dim] of one dtype
    (n <= MAX_ROWS, dim <= MAX_DIM); else None."""
    lib = library()
    if lib is None or a.dtype not in DTYPES or a.dtype != h.dtype or not (a.is_cpu and h.is_cpu) or a.dim() != 2:
        return None
    if a.shape != h.shape or a.shape[0] > MAX_ROWS or a.shape[1] > MAX_DIM:
        return None
    if not (a.is_contiguous() and h.is_contiguous()):
        return None
    for norm in (norm1, norm2):
        if norm is not None and (norm[0].dtype != torch.float32 or norm[0].shape != (a.shape[1],)
                                 or not norm[0].is_contiguous()):
            return None
    return _residual(lib, a, h, norm1, norm2)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`reference_norm`, bitwise, for CPU ``x`` [n, d] or [n, heads, d] (bf16 or fp32, unit
    last stride, n * heads <= MAX_ROWS) and a contiguous fp32 ``scale`` [d]; else None."""
    lib = library()
    if lib is None or x.dtype not in DTYPES or x.device.type != "cpu" or scale.dtype != torch.float32:
        return None
    shape = _rows(x)
    if shape is None or shape[0] * shape[1] > MAX_ROWS or not scale.is_contiguous():
        return None
    return _norm(lib, x, scale, eps, shape)


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
    return _rope(lib, x, cos, sin, shape)
