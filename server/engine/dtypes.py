"""``--dtype auto``: which dtype the engine serves in, decided once from the device.

bf16 where the hardware has native bf16 math (CPU: AVX512-BF16 or AMX; CUDA: compute
capability that ``torch.cuda.is_bf16_supported()`` accepts), fp32 otherwise: without
those units the CPU kernels convert bf16 to fp32 around the math, so bf16 only costs
precision there.
"""
from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The ``flags`` of the first CPU in ``cpuinfo`` (empty when unreadable, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_dtype(requested: str, device: str, *, flags: set[str] | None = None,
                  cuda_bf16: bool | None = None) -> tuple[str, str]:
    """``(dtype, why)`` for ``requested`` (auto|float32|bfloat16|float16) on ``device``.

    ``flags`` (CPU feature flags) and ``cuda_bf16`` are read from the host when None;
    tests pass them in. An explicit dtype is returned as is.
    """
    if requested != "auto":
        return requested, "set explicitly"
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if cuda_bf16:
            return "bfloat16", "auto: the CUDA device supports bf16"
        return "float32", "auto: the CUDA device does not support bf16"
    if kind == "cpu":
        found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        if found:
            return "bfloat16", f"auto: the CPU has {' and '.join(found)}"
        return "float32", f"auto: the CPU has none of {', '.join(BF16_CPU_FLAGS)} (bf16 would be emulated)"
    return "float32", f"auto: no bf16 rule for device {device!r}"
