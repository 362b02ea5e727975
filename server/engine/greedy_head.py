"""Greedy tokens from an int8 copy of the LM head, the same tokens as the full bf16 head.

The LM head is most of a small model's decode bytes (Gemma 3 270M: 335 of 536 MB per step in
bf16), and a greedy row needs only its argmax. So each row's logits are first bounded from an
int8 copy (one scale per vocabulary row, half the bytes: ``gemv_i8.c``), and only the rows that
can still be the maximum are computed exactly, by the same bf16 GEMV as the full head
(``cpu_gemv``: each output row's arithmetic does not depend on which rows are computed with it,
so these logits are bitwise the full head's).

Why the argmax cannot change: with ``A`` the int8 estimate and ``L`` the exact bf16 logit,
``|A - L| <= d`` where ``d = c * |x|_1 + a * e + REL |A|``; ``c`` (per vocabulary row) covers the
rounding of the weights to int8 (measured per row at load) and the full head's fp32 sum, ``a``
(per vocabulary row, ``s |q|_1``) times ``e`` (per row, the largest error of rounding x to int16
in the kernel) covers x's rounding, and ``REL`` the final bf16 rounding of ``L`` and the fp32
rounding of ``A`` (the kernel's integer sums are exact). The true maximum ``t`` has
``A_t + d_t >= L_t >= L_u >= A_u - d_u`` for every ``u``,
so it is among the candidates ``{v : A_v + d_v >= max_u (A_u - d_u)}``, and so is every row tied
with it; the candidates get their exact logits and every other entry -inf, so ``argmax`` (first
maximum) picks what it picks on the full row. On Gemma 3 270M a row kept at most 34 candidates
on real prompts (median 9), up to 183 on ``bench/step_bench.py``'s synthetic tokens.

Only for rows whose sole consumer is ``argmax`` (greedy, no logprobs, no grammar mask): their
logits row is not a distribution.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from adapterctl.server.engine import cpu_build, cpu_gemv
from adapterctl.server.engine.kernels import upcast_linear

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv_i8.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_CANDIDATES = 4096  # per row; a row with more takes the full head (at most 183 seen on Gemma)
QUANT_BLOCK = 8192  # vocabulary rows quantised at a time (bounds the fp32 scratch at load)
MAX_K = 4096  # the kernel's int32 lanes cannot overflow up to this input width
GROUP, CHUNK = 4, 16  # the packed layout: per group of 4 vocabulary rows, 16 weights of each at a time
REL = 2.0 ** -8 + 2.0 ** -22  # |A|'s share of d: bf16's half ulp, with room for A's fp32 rounding


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded int8 kernels after a passing probe, or None (logged once, with why)."""
    lib = cpu_build.load(SOURCE, FLAGS, "int8 greedy LM head")
    if lib is None:
        return None
    long, ptr = ctypes.c_long, ctypes.c_void_p
    lib.gemv_i8.argtypes = [ptr, ptr, long, long, ptr, long, ptr, long, ptr, ctypes.c_int]
    lib.gemv_i8.restype = ctypes.c_int
    lib.select_candidates.argtypes = [ptr, long, ptr, ptr, ptr, ptr, ctypes.c_float, long, long, long, ptr, ptr]
    lib.select_candidates.restype = ctypes.c_int
    if not _probe(lib):
        log.warning("int8 greedy LM head failed its probe against fp32 arithmetic; using the full head")
        return None
    return lib


def pack(q: torch.Tensor) -> torch.Tensor:
    """``q`` int8 [n, k] in the kernel's layout, [ceil(n / 4), k / 16, 4, 16] (zero rows pad n)."""
    n, k = q.shape
    pad = -n % GROUP
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
    return q.view(-1, GROUP, k // CHUNK, CHUNK).transpose(1, 2).contiguous()


def _run(lib: ctypes.CDLL, packed: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
         threads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``A`` fp32 [rows, n], ``e`` fp32 [rows]) for ``x`` fp32 [rows, k] contiguous; None when
    out of memory."""
    n, k = scale.shape[0], x.shape[1]
    out, ex = torch.empty(x.shape[0], n), torch.empty(x.shape[0])
    if lib.gemv_i8(packed.data_ptr(), scale.data_ptr(), n, k, x.data_ptr(), x.shape[0], out.data_ptr(),
                   out.stride(0), ex.data_ptr(), threads):
        return None
    return out, ex


def _probe(lib: ctypes.CDLL) -> bool:
    """Every row-group size (1-7 rows) and a ragged vocabulary stay within x's rounding of exact
    arithmetic, as the bound assumes."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (37, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.5
    x = torch.randn(7, 64, generator=gen).bfloat16().float()
    got = _run(lib, pack(q), scale, x, 1)
    if got is None:
        return False
    want = (x.double() @ q.double().T) * scale.double()
    slack = (scale.double() * q.double().abs().sum(1))[None] * got[1].double()[:, None] + REL * want.abs()
    return bool(((got[0].double() - want).abs() <= slack).all() and (got[1] < x.abs().amax(1) * 2.0 ** -15).all())


class GreedyHead:
    """The int8 copy of ``weight`` [vocab, k] (bf16, the model's LM head) and its bounds."""

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL) -> None:
        self.weight, self.lib = weight, lib
        vocab, k = weight.shape
        # x s_v |x|_1: the error of the full head's fp32 sum of k terms, <= k u |x|_1 max|w_v|
        # (u = 2^-24, max|w_v| = 127 s_v), twice over and with 5 % to spare (0.0102 at k = 640)
        sum_slack = 2 * k * 2.0 ** -24 * 127 * 1.05
        self.q = torch.empty(-(-vocab // GROUP), k // CHUNK, GROUP, CHUNK, dtype=torch.int8)  # pack()'s layout
        self.scale = torch.empty(vocab)
        self.coef = torch.empty(vocab)  # c_v of the module docstring
        self.qa = torch.empty(vocab)  # a_v of the module docstring
        for lo in range(0, vocab, QUANT_BLOCK):
            w = weight[lo: lo + QUANT_BLOCK].float()
            scale = (w.abs().amax(1) / 127).clamp_min(1e-30)
            q = torch.round(w / scale[:, None]).clamp_(-127, 127)
            # the measured |w - scale * q|, plus the fp32 rounding of that product and difference
            resid = (w - scale[:, None] * q).abs_().amax(1) + scale * 2.0 ** -14
            self.q[lo // GROUP: (lo + QUANT_BLOCK) // GROUP] = pack(q.to(torch.int8))  # QUANT_BLOCK % GROUP == 0
            self.scale[lo: lo + QUANT_BLOCK] = scale
            self.coef[lo: lo + QUANT_BLOCK] = (resid + sum_slack * scale) * 1.01
            self.qa[lo: lo + QUANT_BLOCK] = (scale.double() * q.double().abs().sum(1) * 1.01).float()

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
              gemm: object) -> "GreedyHead | None":
        """A head for ``weight`` when its full head runs on the C bf16 GEMV (bf16 CPU weights,
        that kernel and the int8 one loaded, ``gemm`` the engine's upcast dispatcher), it has no
        bias and no softcap; else None."""
        if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or bias is not None or softcap
                or gemm is not upcast_linear or weight.shape[1] % cpu_gemv.K_MULTIPLE or not weight.is_contiguous()
                or weight.shape[1] > MAX_K
                or cpu_gemv.library() is None):
            return None
        lib = library()
        if lib is None:
            return None
        head = cls(weight, lib)
        log.info("greedy LM head: int8 copy of %d x %d (%d MiB)", *weight.shape, head.q.numel() >> 20)
        return head

    def takes(self, rows: int) -> bool:
        return 1 <= rows <= cpu_gemv.MAX_ROWS

    def estimate(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(``A`` fp32 [rows, vocab], the int8 estimates of the logits of ``hs`` [rows, k] (bf16),
        ``e`` fp32 [rows], the error of x's rounding in them); None when out of memory."""
        return _run(self.lib, self.q, self.scale, hs.float().contiguous(), torch.get_num_threads())

    def logits(self, hs: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] in ``hs``'s dtype: each row's exact logits at its candidates, -inf
        elsewhere (an argmax-only row), for ``hs`` [rows, k]; None when a row is not finite or
        has more than ``MAX_CANDIDATES`` candidates (the caller then runs the full head)."""
        rows, vocab = hs.shape[0], self.scale.shape[0]
        x = hs.float().contiguous()
        x1 = x.abs().sum(-1)  # [rows]
        if not bool(torch.isfinite(x1).all()):
            return None
        got = _run(self.lib, self.q, self.scale, x, torch.get_num_threads())
        if got is None:
            return None
        est, ex = got
        idx = torch.empty(rows, MAX_CANDIDATES, dtype=torch.int64)
        count = torch.empty(rows, dtype=torch.int64)
        if self.lib.select_candidates(est.data_ptr(), est.stride(0), self.coef.data_ptr(), self.qa.data_ptr(),
                                      x1.data_ptr(), ex.data_ptr(), REL, rows, vocab, MAX_CANDIDATES,
                                      idx.data_ptr(), count.data_ptr()):
            return None
        out = torch.full((rows, vocab), float("-inf"), dtype=hs.dtype)
        for r, c in enumerate(count.tolist()):
            keep = idx[r, :c]
            exact = cpu_gemv.linear(hs[r: r + 1], self.weight.index_select(0, keep))
            if exact is None:
                return None
            out[r, keep] = exact[0]
        return out
