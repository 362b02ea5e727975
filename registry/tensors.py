"""Checks of ``adapter_model.safetensors`` against the base model's dimensions.

Only the safetensors header and raw tensor data are read (``safe_open`` with
numpy; bf16 through the header offsets) — never pickle, never torch, never the
base weights. Every problem is one line: InvalidArgument or FailedPrecondition.
"""
from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from adapterctl.errors import FailedPrecondition, InvalidArgument

# PEFT's saved names: base_model.model.<module path>.lora_A.weight / .lora_B.weight
_TENSOR_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.(?P<kind>lora_A|lora_B)\.weight$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass(frozen=True)
class ModelDims:
    """The base-model sizes that fix LoRA shapes (from config.json, no weights)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        cfg = config if "hidden_size" in config else config.get("text_config") or config
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(
                hidden=int(cfg["hidden_size"]),
                intermediate=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                layers=int(cfg["num_hidden_layers"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FailedPrecondition(f"base model config lacks a usable {exc} (needed to check LoRA shapes)") from None

    def in_out(self, module: str) -> tuple[int, int] | None:
        """``(in_features, out_features)`` of a base linear layer by its short name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }.get(module)


SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSummary:
    dtype: str  # e.g. "float32"; "mixed(float16,float32)" if tensors differ
    target_modules: list[str]  # short names present, sorted
    modules: int  # number of adapted module instances


def check_tensors(path: Path, peft_config: dict[str, Any], dims: ModelDims) -> TensorSummary:
    """Validate names, pairing, ranks, shapes, dtypes and values of every tensor."""
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise InvalidArgument(f"{path.name} is not a valid safetensors file: {exc}") from None
    with handle as f:
        names = list(f.keys())
        if not names:
            raise InvalidArgument(f"{path.name} holds no tensors")
        pairs: dict[str, set[str]] = defaultdict(set)
        dtypes: set[str] = set()
        for name in names:
            sl = f.get_slice(name)
            module, kind = _module_of(name, peft_config, dims)
            _check_shape(name, module, kind, list(sl.get_shape()), peft_config, dims)
            dtype = sl.get_dtype()
            if dtype not in DTYPE_NAMES:
                raise InvalidArgument(f"tensor {name!r} has dtype {dtype}; use one of {sorted(DTYPE_NAMES)}")
            dtypes.add(DTYPE_NAMES[dtype])
            pairs[module].add(kind)
            if dtype != "BF16" and not np.isfinite(f.get_tensor(name)).all():
                raise InvalidArgument(f"tensor {name!r} contains NaN or Inf values")
    _check_bf16_finite(path, names)
    for module, kinds in sorted(pairs.items()):
        if kinds != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - kinds).pop()
            raise InvalidArgument(f"module {module!r} has no {missing} tensor (LoRA needs both A and B)")
    dtype = dtypes.pop() if len(dtypes) == 1 else f"mixed({','.join(sorted(dtypes))})"
    targets = sorted({m.rpartition(".")[2] for m in pairs})
    return TensorSummary(dtype=dtype, target_modules=targets, modules=len(pairs))


def rank_for(module: str, peft_config: dict[str, Any]) -> int:
    """The declared rank of ``module``: the first matching ``rank_pattern`` key, else ``r``."""
    for pattern, rank in (peft_config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module):
            return int(rank)
    return int(peft_config["r"])


def _module_of(name: str, peft_config: dict[str, Any], dims: ModelDims) -> tuple[str, str]:
    """``(module path, "lora_A"|"lora_B")`` of a tensor name, refusing anything unservable."""
    if "lora_magnitude_vector" in name:
        raise FailedPrecondition(f"tensor {name!r} is a DoRA magnitude vector; DoRA is not supported yet")
    if "lora_embedding" in name:
        raise FailedPrecondition(f"tensor {name!r} adapts an embedding; only linear layers are supported")
    match = _TENSOR_RE.match(name)
    if not match:
        raise InvalidArgument(
            f"tensor {name!r} is not a LoRA weight of a base module "
            "(expected base_model.model.<module>.lora_A.weight / .lora_B.weight)"
        )
    module, kind = match["module"], match["kind"]
    short = module.rpartition(".")[2]
    if dims.in_out(short) is None:
        raise FailedPrecondition(
            f"tensor {name!r} adapts {short!r}; supported modules are {', '.join(SUPPORTED_MODULES)}"
        )
    if not _targeted(module, peft_config.get("target_modules")):
        raise InvalidArgument(f"tensor {name!r} adapts {module!r}, which target_modules does not name")
    layer = _LAYER_RE.search(module)
    if layer and int(layer.group(1)) >= dims.layers:
        raise InvalidArgument(
            f"tensor {name!r} is for layer {layer.group(1)} but the base model has {dims.layers} layers"
        )
    return module, kind


def _targeted(module: str, targets: Any) -> bool:
    if isinstance(targets, str):  # PEFT: a regex full-matched against the module path
        return re.fullmatch(targets, module) is not None or targets == "all-linear"
    return any(module == t or module.endswith("." + t) for t in targets or [])


def _check_shape(name: str, module: str, kind: str, shape: list[int], peft_config: dict, dims: ModelDims) -> None:
    if any(d == 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r} is empty (shape {shape})")
    fan_in, fan_out = dims.in_out(module.rpartition(".")[2])  # type: ignore[misc]
    rank = rank_for(module, peft_config)
    expected = [rank, fan_in] if kind == "lora_A" else [fan_out, rank]
    if shape != expected:
        raise InvalidArgument(
            f"tensor {name!r} has shape {shape}, expected {expected} for rank {rank} on this base "
            f"(hidden_size={dims.hidden}, intermediate_size={dims.intermediate}, heads={dims.heads}, "
            f"kv_heads={dims.kv_heads}, head_dim={dims.head_dim})"
        )


def _check_bf16_finite(path: Path, names: list[str]) -> None:
    """numpy has no bfloat16: read the raw 16-bit words and test the exponent bits
    (all ones = Inf or NaN)."""
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    for name in names:
        info = header[name]
        if info["dtype"] != "BF16":
            continue
        begin, end = info["data_offsets"]
        words: np.ndarray = np.memmap(
            path, dtype="<u2", mode="r", offset=8 + header_len + begin, shape=((end - begin) // 2,)
        )
        if ((words & 0x7F80) == 0x7F80).any():
            raise InvalidArgument(f"tensor {name!r} contains NaN or Inf values")
