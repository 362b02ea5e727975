"""Greedy tokens from an int8 copy of the LM head, the same tokens as the full bf16 head.

The LM head is most of a small model's decode bytes (Gemma 3 270M: 335 of 536 MB per step in
bf16), and a greedy row needs only its argmax. So each row's logits are first bounded from an
int8 copy (one scale per vocabulary row, half the bytes: ``gemv_i8.c``), and only the rows that
can still be the maximum are computed exactly, by the same bf16 GEMV as the full head
(``cpu_gemv``: each output row's arithmetic does not depend on which rows are computed with it,
so these logits are bitwise the full head's).

Why the argmax cannot change: with ``A`` the int8 estimate and ``L`` the exact bf16 logit,
``|A - L| <= d`` where ``d = c * |x|_1 + 2^-8 |A|``; ``c`` (per vocabulary row) covers the
rounding of the weights to int8 (measured per row at load), both fp32 sums and the final bf16
rounding. The true maximum ``t`` has ``A_t + d_t >= L_t >= L_u >= A_u - d_u`` for every ``u``,
so it is among the candidates ``{v : A_v + d_v >= max_u (A_u - d_u)}``, and so is every row tied
with it; the candidates get their exact logits and every other entry -inf, so ``argmax`` (first
maximum) picks what it picks on the full row. On Gemma 3 270M a row kept 3-45 candidates on real prompts, up to 117 on
``bench/step_bench.py``'s synthetic tokens.

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
MAX_CANDIDATES = 4096  # per row; a row with more takes the full head (at most 117 seen on Gemma)
QUANT_BLOCK = 8192  # vocabulary rows quantised at a time (bounds the fp32 scratch at load)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded int8 kernels after a passing probe, or None (logged once, with why)."""
    lib = cpu_build.load(SOURCE, FLAGS, "int8 greedy LM head")
    if lib is None:
        return None
    long, ptr = ctypes.c_long, ctypes.c_void_p
    lib.gemv_i8.argtypes = [ptr, ptr, long, long, ptr, long, ptr, long, ctypes.c_int]
    lib.gemv_i8.restype = None
    lib.select_candidates.argtypes = [ptr, long, ptr, ptr, long, long, long, ptr, ptr]
    lib.select_candidates.restype = ctypes.c_int
    if not _probe(lib):
        log.warning("int8 greedy LM head failed its probe against fp32 arithmetic; using the full head")
        return None
    return lib


def _probe(lib: ctypes.CDLL) -> bool:
    """Every row-group size (1-5 rows) and a ragged vocabulary agree with fp32 arithmetic to
    fp32 rounding, as the bound assumes."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (37, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.5
    x = torch.randn(5, 64, generator=gen).bfloat16().float()
    out = torch.empty(5, 37)
    lib.gemv_i8(q.data_ptr(), scale.data_ptr(), 37, 64, x.data_ptr(), 5, out.data_ptr(), 37, 1)
    want = (x.double() @ q.double().T) * scale.double()
    return bool(torch.allclose(out.double(), want, rtol=1e-5, atol=1e-4))


class GreedyHead:
    """The int8 copy of ``weight`` [vocab, k] (bf16, the model's LM head) and its bounds."""

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL) -> None:
        self.weight, self.lib = weight, lib
        vocab, k = weight.shape
        # x s_v |x|_1: the error of both fp32 sums of k terms, each <= k u |x|_1 max|w_v| (u = 2^-24,
        # max|w_v| = 127 s_v), with 5 % to spare (0.0102 at Gemma's k = 640)
        sum_slack = 2 * k * 2.0 ** -24 * 127 * 1.05
        self.q = torch.empty(vocab, k, dtype=torch.int8)
        self.scale = torch.empty(vocab)
        self.coef = torch.empty(vocab)  # c_v of the module docstring
        for lo in range(0, vocab, QUANT_BLOCK):
            w = weight[lo: lo + QUANT_BLOCK].float()
            scale = (w.abs().amax(1) / 127).clamp_min(1e-30)
            q = torch.round(w / scale[:, None]).clamp_(-127, 127)
            # the measured |w - scale * q|, plus the fp32 rounding of that product and difference
            resid = (w - scale[:, None] * q).abs_().amax(1) + scale * 2.0 ** -14
            self.q[lo: lo + QUANT_BLOCK] = q
            self.scale[lo: lo + QUANT_BLOCK] = scale
            self.coef[lo: lo + QUANT_BLOCK] = (resid + sum_slack * scale) * 1.01

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
              gemm: object) -> "GreedyHead | None":
        """A head for ``weight`` when its full head runs on the C bf16 GEMV (bf16 CPU weights,
        that kernel and the int8 one loaded, ``gemm`` the engine's upcast dispatcher), it has no
        bias and no softcap; else None."""
        if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or bias is not None or softcap
                or gemm is not upcast_linear or weight.shape[1] % cpu_gemv.K_MULTIPLE or not weight.is_contiguous()
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

    def estimate(self, hs: torch.Tensor) -> torch.Tensor:
        """``A``: fp32 [rows, vocab] int8 estimates of the logits of ``hs`` [rows, k] (bf16)."""
        return self._estimate(hs.float().contiguous())

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.q.shape[0])
        self.lib.gemv_i8(self.q.data_ptr(), self.scale.data_ptr(), self.q.shape[0], self.q.shape[1], x.data_ptr(),
                         x.shape[0], out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out

    def logits(self, hs: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] in ``hs``'s dtype: each row's exact logits at its candidates, -inf
        elsewhere (an argmax-only row), for ``hs`` [rows, k]; None when a row is not finite or
        has more than ``MAX_CANDIDATES`` candidates (the caller then runs the full head)."""
        rows, vocab = hs.shape[0], self.q.shape[0]
        x = hs.float().contiguous()
        x1 = x.abs().sum(-1)  # [rows]
        if not bool(torch.isfinite(x1).all()):
            return None
        est = self._estimate(x)
        idx = torch.empty(rows, MAX_CANDIDATES, dtype=torch.int64)
        count = torch.empty(rows, dtype=torch.int64)
        if self.lib.select_candidates(est.data_ptr(), est.stride(0), self.coef.data_ptr(), x1.data_ptr(), rows,
                                      vocab, MAX_CANDIDATES, idx.data_ptr(), count.data_ptr()):
            return None
        out = torch.full((rows, vocab), float("-inf"), dtype=hs.dtype)
        for r, c in enumerate(count.tolist()):
            keep = idx[r, :c]
            exact = cpu_gemv.linear(hs[r: r + 1], self.weight.index_select(0, keep))
            if exact is None:
                return None
            out[r, keep] = exact[0]
        return out
