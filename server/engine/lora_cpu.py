"""The LoRA delta of decode tokens on CPU as one C call per projection (``lora_cpu.c``).

:class:`~.lora.GatherBackend` on CPU, for many decode tokens of different adapters: ATen's path
gathers (or slices) each token's A and Bt, runs two bmm, a multiply and an add per projection;
bf16 bmm of these shapes is slow on CPU (at 32 rows a rank-16 q/v delta cost ~9 ms of a ~70 ms
Gemma 3 270M step on Zen 4). The C call reads the slot banks in place and rounds as that path
does (:mod:`~.lora`'s docstring); the planned decode layer (:mod:`~.decode_layer`) calls it too.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from adapterctl.server.engine import cpu_build

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
MAX_RANK = 1024  # lora_cpu.c's
MAX_IN = 16384  # lora_cpu.c's (bf16 also needs in % 8 == 0)
_P, _L = ctypes.c_void_p, ctypes.c_long
_SYMBOL = {torch.bfloat16: "lora_bf16", torch.float32: "lora_fp32"}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (no compiler, not an AVX2 host; logged once)."""
    lib = cpu_build.load(SOURCE, FLAGS, "LoRA delta kernel")
    if lib is None:
        return None
    for name in _SYMBOL.values():
        fn = getattr(lib, name)
        fn.argtypes = [_P, _L, _P, _L, _L, _P, _P, _L, _L, _P, _P, _L, _P, _P, ctypes.c_int]
    lib.lora_fp32.restype = None
    lib.lora_bf16.restype = ctypes.c_int  # -1: an input width it does not take (nothing written)
    return lib


def add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, ranks: torch.Tensor,
        scale: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor | None = None) -> bool:
    """``y[t] += delta(x[t])`` for the tokens ``tokens`` [m] (rows of ``x`` [N, in] and ``y`` [N, out];
    None: rows 0..m-1) with slots ``slots`` [m] (int64; 0 or a slot of rank 0: nothing added), from
    the paged banks ``a`` [pages + 1, page_rank, in], ``bt`` [pages + 1, page_rank, out] (a slot's rows
    run on into its next pages), ``ranks`` int64 [pages + 1] (each at most ``MAX_RANK``: the caller's check;
    the kernel skips a larger one) and ``scale`` fp32 [pages + 1]; False (nothing written) where the kernel does not
    load or the tensors are not so (CPU, fp32 or bf16, unit column strides, contiguous banks; bf16:
    ``in`` a multiple of 8 up to ``MAX_IN``)."""
    lib = library()
    dtype = y.dtype
    if (lib is None or dtype not in _SYMBOL or x.dtype != dtype or a.dtype != dtype or bt.dtype != dtype
            or y.device.type != "cpu" or x.device.type != "cpu" or y.dim() != 2 or x.dim() != 2
            or y.stride(1) != 1 or x.stride(1) != 1 or not (a.is_contiguous() and bt.is_contiguous())
            or a.shape[1] > MAX_RANK or ranks.dtype != torch.int64 or scale.dtype != torch.float32
            or slots.dtype != torch.int64 or not slots.is_contiguous()
            or (tokens is not None and (tokens.dtype != torch.int64 or not tokens.is_contiguous()))):
        return False
    rc = getattr(lib, _SYMBOL[dtype])(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), slots.shape[0],
                                      None if tokens is None else tokens.data_ptr(), slots.data_ptr(), x.shape[1],
                                      y.shape[1], a.data_ptr(), bt.data_ptr(), a.shape[1], ranks.data_ptr(),
                                      scale.data_ptr(), torch.get_num_threads())
    return rc != -1
