"""Dense matmul for the engine's hot path. On CPU, oneDNN's fp32 GEMM (the kernel torch's
inductor emits for CPU linears) measured 1.3-2.4x faster than ATen's default MKL sgemm
for decode-sized inputs on this project's AMD host, with the same fp32 accuracy
(max |diff| ~1e-4 on Gemma logits); elsewhere (CUDA, builds without oneDNN) F.linear.
oneDNN has no bf16 inner product on CPUs without native bf16 (AVX2-only: "could not
create a primitive descriptor"), so ``auto`` probes the dtype once and falls back.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

GEMMS = ("auto", "onednn", "torch")
Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN; ``x`` is ``[..., in]`` on CPU."""
    if x.dim() != 2:
        return onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@functools.cache
def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's CPU inner product runs in ``dtype`` on this CPU (one tiny probe)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        onednn_linear(torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def pick_gemm(name: str, device: torch.device, dtype: torch.dtype) -> Gemm:
    """The GEMM for ``name`` ("auto": oneDNN on CPU when it runs in ``dtype``, else torch)."""
    usable = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_runs(dtype)
    if name == "onednn" and not usable:
        raise ValueError(f"oneDNN GEMM is not available for {device.type}/{dtype}")
    return onednn_linear if usable and name in ("auto", "onednn") else torch_linear
