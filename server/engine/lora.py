"""LoRA compute for heterogeneous batches: one backend interface, CPU implementations,
and the LoRA-aware linear that wraps a base ``nn.Linear``.

Semantics every backend implements, for each token ``t`` with slot ``s = token_slots[t] != 0``::

    y[t] += scale[s] * (x[t] @ A[s].T) @ Bt[s]          # Bt[s] = B[s].T

The banks are paged (:class:`~.slots.SlotBank`): ``A`` is ``[pages + 1, page_rank, in]``
and ``Bt`` ``[pages + 1, page_rank, out]``; the adapter in slot ``s`` (its first page) has its
``r`` rank rows at flat rows ``s * page_rank .. s * page_rank + r - 1``, so ``A[s]`` above reads
``r`` rows that may run over into its next pages, and its pages' rows beyond ``r`` are zero.
In fp32 the scale is applied to the rank-``r`` product (a segment's delta is fused into ``y``
by ``addmm``, gathered rows' delta added after one ``bmm``); in bf16/fp16 the delta is rounded as PEFT rounds it
(``B(A(x))``, times the fp32 scale as PEFT's Python float, then added), so greedy tokens agree with
PEFT run in the same dtype.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterctl.server.engine import lora_cpu
from adapterctl.server.engine.batch import LoraBatch, current_batch
from adapterctl.server.engine.kernels import Gemm, torch_linear


@dataclass
class LoraWeights:
    """The slot bank of one targeted linear (slot 0 = no adapter, always zero)."""

    A: torch.Tensor  # [num_pages + 1, page_rank, in_features]
    Bt: torch.Tensor  # [num_pages + 1, page_rank, out_features]  (B transposed)
    scale: torch.Tensor  # [num_pages + 1] fp32 (whatever the bank's dtype), shared by all modules (per adapter)
    ranks: list[int] = field(default_factory=list)  # [num_pages + 1] rank written per first page; 0 = none
    # ``ranks`` as int64 [num_pages + 1] on the CPU, for the C kernels (lora_cpu); :meth:`set_rank` keeps both
    rank_table: torch.Tensor = field(init=False)
    # a copy of rank_table on the slots' device for the ATen gather (no host copy per step on CUDA); None: stale
    _ranks_here: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.rank_table = torch.tensor(self.ranks, dtype=torch.int64)

    def set_rank(self, slot: int, rank: int) -> None:
        self.ranks[slot] = rank
        self.rank_table[slot] = rank
        self._ranks_here = None

    @property
    def page(self) -> int:
        """Rank rows per page."""
        return self.A.shape[1]

    def rows(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in], Bt [rank, out]) of the adapter in ``slot``: views, no copy."""
        lo = slot * self.page
        return self.A.view(-1, self.A.shape[-1])[lo: lo + rank], self.Bt.view(-1, self.Bt.shape[-1])[lo: lo + rank]

    def gathered(self, slots: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [n, rank, in], Bt [n, rank, out]): each slot's first ``rank`` rows, zero beyond its own
        rank (copies; rows past a page read on into the next pages, so they are masked)."""
        if rank <= self.page:  # within one page: zero past each adapter's rank already
            return self.A[:, :rank].index_select(0, slots), self.Bt[:, :rank].index_select(0, slots)
        a, bt = self.A.view(-1, self.A.shape[-1]), self.Bt.view(-1, self.Bt.shape[-1])
        j = torch.arange(rank, device=slots.device)
        idx = (slots.unsqueeze(1) * self.page + j).clamp_(max=a.shape[0] - 1)  # [n, rank]
        if self._ranks_here is None or self._ranks_here.device != slots.device:  # copied once per change
            self._ranks_here = self.rank_table.to(slots.device, copy=True)
        own = self._ranks_here.index_select(0, slots)  # [n]
        past = (j >= own.unsqueeze(1)).unsqueeze(2)  # [n, rank, 1]
        return a[idx].masked_fill_(past, 0), bt[idx].masked_fill_(past, 0)

    def batch_rank(self, batch: LoraBatch) -> int:
        """Largest rank this module has among the slots of ``batch`` (0: nothing to add)."""
        return max((self.ranks[s] for s in batch.slots), default=0)


class LoraBackend(ABC):
    """Adds the LoRA delta of every token's slot to the base output, in place."""

    name: str = "abstract"

    @abstractmethod
    def apply(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, meta: LoraBatch) -> None:
        """``y`` [num_tokens, out] += per-token delta of ``x`` [num_tokens, in] (see module docstring)."""


def _segment(y: torch.Tensor, x: torch.Tensor, w: LoraWeights, slot: int, lo: int, hi: int) -> None:
    rank = w.ranks[slot]
    if rank:
        a, bt = w.rows(slot, rank)
        h = x[lo:hi] @ a.T  # [n, r]
        if y.dtype == torch.float32:
            y[lo:hi].addmm_(h.mul_(w.scale[slot]), bt)  # [n, out]
        else:  # half precision: PEFT's rounding order, (B(A(x)) * scale) then add
            y[lo:hi].add_((h @ bt).mul_(w.scale[slot]))


class SegmentBackend(LoraBackend):
    """One pair of matmuls per run of equal slots, on views (no gather): best when few
    distinct adapters share many tokens (prefill, popular adapters)."""

    name = "segment"

    def apply(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, meta: LoraBatch) -> None:
        b = meta.seg_bounds
        for i, slot in enumerate(meta.seg_slots):
            if slot:
                _segment(y, x, w, slot, b[i], b[i + 1])


class GatherBackend(LoraBackend):
    """Each token's (A, Bt) in two batched matmuls over all adapter tokens at once: best
    when many different adapters each have one token (decode). When the tokens' slots
    are one consecutive run (s0, s0+1, ...), the bank is sliced, not copied. On CPU (fp32,
    bf16) one C call per projection instead (:mod:`~.lora_cpu`: the banks read in place, the
    same roundings)."""

    name = "gather"

    def apply(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, meta: LoraBatch) -> None:
        rank = w.batch_rank(meta)
        if rank == 0:
            return
        full = meta.all_tokens_lora
        if y.device.type == "cpu" and rank <= lora_cpu.MAX_RANK and lora_cpu.add(
                y, x, w.A, w.Bt, w.rank_table, w.scale, meta.token_slots if full else meta.lora_token_slots,
                None if full else meta.lora_tokens):
            return
        slots = meta.token_slots if full else meta.lora_token_slots
        xs = x if full else x.index_select(0, meta.lora_tokens)
        first = meta.slot_run_start if full and rank <= w.page else None
        if first is not None:  # zero-copy views of consecutive one-page slots
            n = xs.shape[0]
            a, bt, sc = w.A[first: first + n, :rank], w.Bt[first: first + n, :rank], w.scale[first: first + n]
        else:
            a, bt = w.gathered(slots, rank)  # [n, r, in], [n, r, out]
            sc = w.scale.index_select(0, slots)
        h = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2))  # [n, 1, r]
        if y.dtype == torch.float32:
            delta = torch.bmm(h.mul_(sc.view(-1, 1, 1)), bt).squeeze(1)  # [n, out]
        else:  # half precision: PEFT's rounding order, (B(A(x)) * scale) then add
            delta = torch.bmm(h, bt).squeeze(1).mul_(sc.view(-1, 1))
        # one batched GEMM, then one add: baddbmm_ into y (a column slice of a packed q/k/v output)
        # ran one addmm per token on CPU, ~8 ms of a 32-row fp32 step with 32 adapters
        if full:
            y.add_(delta)
        else:
            y.index_add_(0, meta.lora_tokens, delta)


class AutoBackend(LoraBackend):
    """Segment matmuls for runs of at least ``min_segment_tokens`` tokens (prefill chunks,
    popular adapters), one gathered bmm for the rest (decode rows of many adapters) — the
    measured best on CPU (see BENCHMARKS.md): gathering copies r*(in+out) weights per
    token, a segment costs two small matmul launches."""

    name = "auto"

    def __init__(self, min_segment_tokens: int = 8) -> None:
        self.min_segment_tokens = min_segment_tokens
        self._gather = GatherBackend()

    def apply(self, y: torch.Tensor, x: torch.Tensor, w: LoraWeights, meta: LoraBatch) -> None:
        b = meta.seg_bounds
        long_segs = [i for i, s in enumerate(meta.seg_slots) if s and b[i + 1] - b[i] >= self.min_segment_tokens]
        for i in long_segs:
            _segment(y, x, w, meta.seg_slots[i], b[i], b[i + 1])
        if not long_segs:
            self._gather.apply(y, x, w, meta)
        elif len(long_segs) < len(meta.slots):
            rest = meta.short_view(self.min_segment_tokens)
            if rest is not None:
                self._gather.apply(y, x, w, rest)


BACKENDS: dict[str, type[LoraBackend]] = {"auto": AutoBackend, "segment": SegmentBackend, "gather": GatherBackend}


def make_backend(name: str) -> LoraBackend:
    """Backend by name (``auto``, ``segment``, ``gather``); a CUDA kernel would register here."""
    return BACKENDS[name]()


class LoraLinear(nn.Module):
    """The base layer's ``x @ W.T + b`` (through the engine's GEMM, see kernels.py) plus
    the LoRA delta of the current :class:`LoraBatch` (if any).

    ``weights`` is None until some adapter targets this module; the base layer's
    parameters are shared, not copied. Accepts ``x`` of shape ``[..., in]``.
    """

    def __init__(self, base: nn.Linear, path: str, backend: LoraBackend, gemm: Gemm = torch_linear) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.backend = backend
        self.gemm = gemm
        self.weights: LoraWeights | None = None
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.operand: torch.Tensor | None = None  # base weight in the GEMM's own layout (kernels.prepare)

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads .weight of projections
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemm(x, self.base.weight if self.operand is None else self.operand, self.base.bias)
        meta = current_batch()
        if meta is None or self.weights is None or not meta.has_lora:
            return y
        flat_x = x.reshape(-1, x.shape[-1])
        if flat_x.shape[0] != meta.num_tokens:
            raise RuntimeError(f"{self.path}: batch has {meta.num_tokens} tokens but input has {flat_x.shape[0]}")
        flat_y = y.view(-1, y.shape[-1])
        self.backend.apply(flat_y, flat_x, self.weights, meta)
        return y
