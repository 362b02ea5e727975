"""Greedy tokens from an int8 copy of the LM head: the full head's argmax, a fraction of its cost.

The LM head is most of a small model's decode work (Gemma 3 270M: 335 of 536 MB per step in
bf16, 671 of 1072 in fp32, and ~60 % of the FLOPs of a batched step), and a greedy row needs
only its argmax. So each row's logits are first bounded from an int8 copy (one scale per
vocabulary row; :mod:`int8_gemv`: AVX2, AVX512-VNNI or AMX), and only the rows that can still be
the maximum are computed, by the head's own GEMM (the engine's, on the gathered candidate rows).

Why the argmax cannot change: with ``A`` the int8 estimate and ``L`` a logit as the head's GEMM
computes it, ``|A - L| <= d`` where ``d = c * |x|_1 + a * e + REL |A|``; ``c`` (per vocabulary
row) covers the rounding of the weights to int8 (measured per row at load) and the GEMM's
rounding (a sum of ``k`` products in fp32: ``2 k u |x|_1 max|w_v|``, twice what any order or FMA
use can reach), ``a`` (per vocabulary row, ``s |q|_1``) times ``e`` (per row, the largest error of
rounding x to int16 in the kernel) covers x's rounding, and ``REL`` the final rounding of ``L`` to
the model's dtype and of ``A`` to fp32 (the kernels' integer sums are exact). The true maximum
``t`` has ``A_t + d_t >= L_t >= L_u >= A_u - d_u`` for every ``u``, so it is among the candidates
``{v : A_v + d_v >= max_u (A_u - d_u)}``, and so is every row tied with it; the candidates get
their logits and the first maximum among them (ascending vocabulary order, as ``argmax``) is the
token. On Gemma 3 270M a row kept at most 34 candidates on real prompts (median 9).

Where the head's GEMM computes each output from its own row alone (the C bf16 GEMVs of
:mod:`cpu_gemv`: AVX2, and AVX512-BF16 at 1-4 rows through ``kernels.small_rows_linear``), the
candidates' logits are bitwise the full head's, so the token is exactly the full head's. oneDNN
(fp32; bf16 with AVX512-BF16 or AMX) reads the full head in its blocked layout and the gathered
rows in their plain one, so there the logits may differ in the last bit and the two tokens only
where the best logits tie within that rounding, the latitude any choice of GEMM already has
(oneDNN's fp32 logits are not MKL's either).

Only for rows whose sole consumer is ``argmax`` (greedy, no logprobs, no grammar mask).
"""
from __future__ import annotations

import logging
from typing import Generator, Iterator

import torch

from adapterctl.server.engine import int8_gemv, kernels
from adapterctl.server.engine.kernels import Gemm

log = logging.getLogger(__name__)

MAX_CANDIDATES = 4096  # per row; a row with more takes the full head (at most 183 seen on Gemma)
QUANT_BLOCK = 8192  # vocabulary rows quantised at a time (bounds the fp32 scratch at load)
# |A|'s share of d: the final rounding of L (bf16's half ulp; fp32's is in c's sum term), with
# room for A's fp32 rounding
REL = {torch.bfloat16: 2.0 ** -8 + 2.0 ** -22, torch.float32: 2.0 ** -21}


class GreedyHead:
    """The int8 copy of ``weight`` [vocab, k] (the model's LM head, bf16 or fp32) and its bounds."""

    @torch.no_grad()
    def __init__(self, weight: torch.Tensor, gemm: Gemm, est: int8_gemv.Estimator) -> None:
        # detached: a model's head is a Parameter that requires grad, and copying its blocks' results
        # into scale/coef/qa would keep every block's intermediates alive in a graph (~6 GB, Gemma)
        weight = weight.detach()
        self.weight, self.gemm, self.est = weight, gemm, est
        self.rel = REL[weight.dtype]
        vocab, k = weight.shape
        # x s_v |x|_1: the error of the GEMM's fp32 sum of k terms (and, in fp32, of its products),
        # <= (k + 1) u |x|_1 max|w_v| (u = 2^-24, max|w_v| = 127 s_v), twice over and with 5 % to
        # spare (0.0102 at k = 640)
        sum_slack = 2 * (k + 1) * 2.0 ** -24 * 127 * 1.05
        q = torch.empty(vocab, k, dtype=torch.int8)
        self.scale = torch.empty(vocab)
        self.coef = torch.empty(vocab)  # c_v of the module docstring
        self.qa = torch.empty(vocab)  # a_v of the module docstring
        for lo in range(0, vocab, QUANT_BLOCK):
            w = weight[lo: lo + QUANT_BLOCK].float()
            scale = (w.abs().amax(1) / 127).clamp_min(1e-30)
            qf = torch.round(w / scale[:, None]).clamp_(-127, 127)
            # the measured |w - scale * q|, plus the fp32 rounding of that product and difference
            resid = (w - scale[:, None] * qf).abs_().amax(1) + scale * 2.0 ** -14
            q[lo: lo + QUANT_BLOCK] = qf.to(torch.int8)
            self.scale[lo: lo + QUANT_BLOCK] = scale
            self.coef[lo: lo + QUANT_BLOCK] = (resid + sum_slack * scale) * 1.01
            self.qa[lo: lo + QUANT_BLOCK] = (scale.double() * qf.double().abs().sum(1) * 1.01).float()
        self.q = est.pack(q)  # the kernel's layout
        # [>= rows, vocab] fp32 estimate buffers free for reuse: a run holds one until it ends (a fresh
        # [32, 262k] costs ~8 ms of page faults), so runs interleaved by the caller never share one
        self._spare: list[torch.Tensor] = []

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
              gemm: Gemm) -> "GreedyHead | None":
        """A head for ``weight`` (bf16 or fp32, on the CPU, contiguous) with no bias and no softcap,
        whose candidates ``gemm`` (the engine's GEMM for the full head) computes, where an int8
        estimator runs here; else None."""
        if (weight.dtype not in REL or weight.device.type != "cpu" or bias is not None or softcap
                or not weight.is_contiguous()):
            return None
        est = int8_gemv.estimator(weight.shape[1])
        if est is None:
            return None
        head = cls(weight, gemm, est)
        log.info("greedy LM head: int8 copy of %d x %d (%d MiB, %s estimate) for %s rows up to %d",
                 *weight.shape, head.q.numel() >> 20, est.name, str(weight.dtype).rsplit(".", 1)[-1],
                 head.max_rows)
        return head

    @property
    def max_rows(self) -> int:
        return self.est.max_rows(self.weight.dtype, native=kernels.native(self.gemm))

    def takes(self, rows: int) -> bool:
        return 1 <= rows <= self.max_rows

    def estimate(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(``A`` fp32 [rows, vocab], the int8 estimates of the logits of ``hs`` [rows, k], ``e``
        fp32 [rows], the error of x's rounding in them); None when out of memory."""
        x = self.est.quantize(hs.float().contiguous())
        out = torch.empty(hs.shape[0], self.scale.shape[0])
        return (out, x.ex) if self._estimate(x, 0, out.shape[1], out) else None

    def _estimate(self, x: int8_gemv.Quantized, lo: int, hi: int, out: torch.Tensor) -> bool:
        """Vocabulary rows ``lo .. hi - 1`` (``lo`` a multiple of 64) of the estimate of ``x`` into
        ``out[:, lo:hi]`` (``out`` fp32 [rows, vocab]), each bitwise as in a whole pass; False when
        out of memory."""
        per = self.q[0].numel() // x.xq.shape[1]  # vocabulary rows per leading index of the packed copy
        assert lo % per == 0, (lo, per)
        return self.est.run(self.q[lo // per: -(-hi // per)], self.scale[lo:hi], x, out[:, lo:hi])

    def pieces(self, hs: torch.Tensor, chunk: int) -> Iterator[bool | tuple[torch.Tensor, torch.Tensor] | None]:
        """:meth:`tokens` in steps, so a caller can serve other work between them: yields False
        after each ``chunk`` vocabulary rows of the estimate but the last (``chunk`` a multiple
        of 64), then the result of :meth:`tokens` (None: the caller runs the full head). Between
        steps the caller may run other forwards, greedy heads included (each run holds its own
        estimate buffer)."""
        got = yield from self._candidates(hs, chunk)
        yield self._tokens(hs, got)

    def _candidates(self, hs: torch.Tensor, chunk: int
                    ) -> Generator[bool, None, tuple[torch.Tensor, torch.Tensor] | None]:
        """:meth:`candidates` as a generator: yields False after each ``chunk`` vocabulary rows
        of the estimate but the last, returns the candidates."""
        x = hs.float().contiguous()
        x1 = x.abs().sum(-1)  # [rows]
        if not bool(torch.isfinite(x1).all()):
            return None
        rows, vocab = x.shape[0], self.scale.shape[0]
        rounded = self.est.quantize(x)  # once: every slice reads the same rounding
        buf = self._spare.pop() if self._spare else torch.empty(0, vocab)
        try:
            if buf.shape[0] < rows:
                buf = torch.empty(rows, vocab)
            est = buf[:rows]
            for lo in range(0, vocab, chunk):
                if not self._estimate(rounded, lo, min(lo + chunk, vocab), est):
                    return None
                if lo + chunk < vocab:
                    yield False
            return self.select(est, rounded.ex, x1)
        finally:
            self._spare.append(buf)

    def candidates(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(``idx`` int64 [rows, MAX_CANDIDATES], row r's candidates ascending in ``idx[r, :count[r]]``;
        ``count`` int64 [rows]) for ``hs`` [rows, k]; None when a row is not finite or has more
        than ``MAX_CANDIDATES``."""
        run = self._candidates(hs, self.scale.shape[0])  # one slice: it yields nothing
        try:
            next(run)
        except StopIteration as done:
            return done.value
        raise AssertionError("a one-slice estimate yielded")

    def select(self, est: torch.Tensor, ex: torch.Tensor, x1: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`candidates` from the estimate ``est`` [rows, vocab], ``ex`` [rows] and ``x1``
        (the rows' L1 norms)."""
        rows = est.shape[0]
        idx = torch.empty(rows, MAX_CANDIDATES, dtype=torch.int64)
        count = torch.empty(rows, dtype=torch.int64)
        if self.est.lib.select_candidates(est.data_ptr(), est.stride(0), self.coef.data_ptr(), self.qa.data_ptr(),
                                          x1.data_ptr(), ex.data_ptr(), self.rel, rows, est.shape[1],
                                          MAX_CANDIDATES, idx.data_ptr(), count.data_ptr(),
                                          min(rows, torch.get_num_threads())):
            return None
        return idx, count

    def tokens(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token ids int64 [rows], their logits [rows] in ``hs``'s dtype): each row's first maximum
        of its logits, for ``hs`` [rows, k]; None where :meth:`candidates` is (the caller then runs
        the full head)."""
        return self._tokens(hs, self.candidates(hs))

    def _tokens(self, hs: torch.Tensor, got: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`tokens` from the rows' candidates ``got`` (:meth:`candidates`' result)."""
        if got is None:
            return None
        idx, count = got
        rows = hs.shape[0]
        # one GEMM over the union of the rows' candidates (ascending), each row masked to its own
        mine = torch.arange(MAX_CANDIDATES)[None, :] < count[:, None]  # [rows, cap]
        union, where = torch.unique(idx[mine], sorted=True, return_inverse=True)  # [U], [sum(count)]
        logits = self.gemm(hs, self.weight.index_select(0, union), None)  # [rows, U]
        own = torch.zeros(rows, union.shape[0], dtype=torch.bool)
        own[torch.arange(rows).repeat_interleave(count), where] = True
        pick = logits.masked_fill(~own, float("-inf")).argmax(-1)  # first maximum: lowest vocabulary id
        return union[pick], logits.gather(1, pick[:, None])[:, 0]
