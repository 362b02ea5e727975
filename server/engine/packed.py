"""Projections that read the same input, as one GEMM: q/k/v, and the MLP's gate/up.

At one decode row a projection is a GEMV of a few MB, and each call has a fixed cost
(dispatch, oneDNN primitive lookup, thread start-up) next to streaming its weights.
Packing turns seven GEMMs per layer into four with the same bytes read.

The packed weight ``[sum(out_i), in]`` is one contiguous tensor, and each original
``nn.Linear.weight`` becomes a row-slice **view** of it, so nothing is stored twice and
adapters, ``state_dict`` and the HF modules still see their own weights (the copied
originals' pages are given back when they are a file mapping: ``pages.py``). Where the
GEMM reads its own weight layout (``kernels.prepare``: oneDNN's blocked fp32), the pack is
only that layout's copy and the originals stay as loaded (their pages given back). Each part's
LoRA delta is added to its column slice of the packed output by the part's own
:class:`~adapterctl.server.engine.lora.LoraLinear` backend and slot bank, so adapters
target ``q_proj`` / ``v_proj`` exactly as before.
"""
from __future__ import annotations

from typing import TypeGuard

import torch
from torch import nn

from adapterctl.server.engine import kernels, pages
from adapterctl.server.engine.batch import current_batch
from adapterctl.server.engine.kernels import Gemm
from adapterctl.server.engine.lora import LoraLinear


class PackedLinear:
    """``parts`` (LoraLinears over one input width) computed as one GEMM."""

    def __init__(self, parts: list[LoraLinear], gemm: Gemm, prepack: bool = True) -> None:
        bases = [p.base for p in parts]
        self.parts, self.gemm = parts, gemm
        self.bounds = [0]
        for b in bases:
            self.bounds.append(self.bounds[-1] + b.out_features)
        originals = [b.weight.detach() for b in bases]
        weight = torch.cat(originals)  # [sum(out), in]
        self.bias = torch.cat([b.bias.detach() for b in bases]) if bases[0].bias is not None else None
        self.weight = kernels.prepare(gemm, weight) if prepack else weight  # the GEMM's operand
        if kernels.plain(self.weight) is weight:  # the pack itself (or kept beside its blocked
            # layout, kernels.Dual): the originals become views of it
            for b, lo, hi in zip(bases, self.bounds, self.bounds[1:]):
                b.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
                if self.bias is not None:
                    b.bias = nn.Parameter(self.bias[lo:hi], requires_grad=False)
        del weight  # with a prepared copy, the plain pack is freed here
        self.released = pages.release(originals)  # bytes of mmapped originals no longer resident

    @staticmethod
    def can_pack(parts: list) -> TypeGuard[list[LoraLinear]]:
        """All LoraLinears with one input width, one dtype/device, and all or none biased."""
        if not parts or not all(isinstance(p, LoraLinear) for p in parts):
            return False
        bases = [p.base for p in parts]
        w0 = bases[0].weight
        return all(b.in_features == bases[0].in_features and b.weight.dtype == w0.dtype
                   and b.weight.device == w0.device and (b.bias is None) == (bases[0].bias is None) for b in bases)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` [N, in] -> one ``[N, out_i]`` (column-slice view) per part, LoRA included."""
        y = self.gemm(x, self.weight, self.bias)  # [N, sum(out)]
        outs = [y[:, lo:hi] for lo, hi in zip(self.bounds, self.bounds[1:])]
        meta = current_batch()
        if meta is not None and meta.has_lora:
            if x.shape[0] != meta.num_tokens:
                raise RuntimeError(f"batch has {meta.num_tokens} tokens but input has {x.shape[0]}")
            for part, out in zip(self.parts, outs):
                if part.weights is not None:
                    part.backend.apply(out, x, part.weights, meta)
        return outs
