"""RMSNorms as one fused ``F.rms_norm`` call each, where that is bitwise what the model's
own module computes.

A decode step of Gemma 3 270M runs 109 RMSNorms (six per layer: input, q, k, post-attention,
pre- and post-feedforward, plus the final one). HF's modules spend 8-10 tensor ops each
(upcast, pow, mean, add, rsqrt, mul, ``1 + weight``, mul, cast); at one row that per-op
overhead, not arithmetic, is most of a norm's cost. ``F.rms_norm`` is one op.

Each family writes its norm a little differently (Gemma: ``x_hat * (1 + w)`` in fp32 then
cast; Llama/Qwen: cast ``x_hat`` first, then ``* w``), so the effective weight is not
guessed: :func:`fuse_norms` tries candidates and keeps a module only when the fused call
reproduces its output **bitwise** on probes of the model's dtype and width. Otherwise the
module is left as it is, so a family this does not know costs speed, never accuracy.

On CPU, a Gemma-order norm (bf16 or fp32) then runs as one C call (:mod:`cpu_fused`, where it
loads; ``c_kernel=False`` keeps ATen's): ATen's ``F.rms_norm`` is itself ~8 ops there. The
kernel is bitwise ATen's (it adds the squares in the order of ATen's sum kernel).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from adapterctl.server.engine import cpu_fused

log = logging.getLogger(__name__)


class FusedRMSNorm(nn.Module):
    """``F.rms_norm(x, [dim], weight, eps)`` cast to ``x``'s dtype; ``x`` is ``[..., dim]``.
    ``weight`` is the effective scale (e.g. Gemma's ``1 + w`` in fp32), computed once."""

    def __init__(self, original: nn.Module, weight: torch.Tensor, eps: float, cast_first: bool) -> None:
        super().__init__()
        self.original = original  # kept: its parameters are the model's, e.g. for state_dict
        self.register_buffer("scale", weight, persistent=False)
        self.shape = (weight.shape[0],)
        self.eps = eps
        self.cast_first = cast_first
        self.c_kernel = False  # CPU rows through cpu_fused.rms_norm (set by fuse_norms)

    def c_params(self) -> tuple[torch.Tensor, float] | None:
        """(scale, eps) for a C kernel that replays this norm (cpu_fused), or None where it
        does not run through one."""
        return (self.scale, self.eps) if self.c_kernel and not self.cast_first else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast_first:  # Llama order: normalise, cast, then scale in x's dtype
            return F.rms_norm(x, self.shape, None, self.eps) * self.scale
        if self.c_kernel:
            y = cpu_fused.rms_norm(x, self.scale, self.eps)  # None: not CPU rows it takes
            if y is not None:
                return y
        # Gemma order: everything in fp32, cast at the end (fp32 in and weight: the fused kernel)
        return F.rms_norm(x.float(), self.shape, self.scale, self.eps).to(x.dtype)


def _candidates(norm: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    w = norm.weight.detach()
    return [((1.0 + w.float()), False), (w.float(), False), (w, True)]


def _probes(dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1, dim), (5, dim), (3, 4, dim)]
    scales = [1.0, 30.0, 1e-3]
    return [(torch.randn(s, generator=g) * c).to(device=device, dtype=dtype) for s, c in zip(shapes, scales)]


def fused_equivalent(norm: nn.Module) -> FusedRMSNorm | None:
    """A :class:`FusedRMSNorm` that is bitwise ``norm`` on every probe, or None."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    probes = _probes(weight.shape[0], weight.dtype, weight.device)
    with torch.inference_mode():
        expected = [norm(x) for x in probes]
        for scale, cast_first in _candidates(norm):
            fused = FusedRMSNorm(norm, scale, float(eps), cast_first)
            got = [fused(x) for x in probes]
            if all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, expected)):
                return fused
    return None


def fuse_norms(model: nn.Module, c_kernel: bool = True) -> tuple[int, int]:
    """Replace, in place, every ``*RMSNorm`` submodule of ``model`` that has a bitwise fused
    equivalent (Gemma-order ones then through the C kernel, if ``c_kernel`` and it loads);
    returns ``(fused, left as they are)``."""
    c_kernel = c_kernel and cpu_fused.library() is not None
    fused = kept = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not type(child).__name__.endswith("RMSNorm"):
                continue
            replacement = fused_equivalent(child)
            if replacement is None:
                kept += 1
                continue
            replacement.c_kernel = c_kernel and not replacement.cast_first and child.weight.dtype in cpu_fused.DTYPES
            setattr(parent, name, replacement)
            fused += 1
    if kept:
        log.info("RMSNorm: %d fused, %d kept as the model's modules (no bitwise fused equivalent)", fused, kept)
    return fused, kept
