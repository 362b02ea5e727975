"""Host-RAM adapter weights: reads a PEFT LoRA directory (safetensors only) into
per-module (A, B) fp32 tensors keyed by base-model module path, refusing what the
engine cannot serve exactly (DoRA, modules_to_save, rank over the limit, other bases)."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes

from adapterctl.basemodel import BaseModel
from adapterctl.errors import FailedPrecondition, malformed_as
from adapterctl.server.types import ServedAdapter

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "adapterctl.json"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# adapter_config.json fields whose non-default value changes inference in ways the
# engine's `y += scale * (x @ A.T) @ B.T` does not reproduce -> refused, named.
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora)"),
    ("modules_to_save", "modules_to_save"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("target_parameters", "LoRA on parameters (target_parameters)"),
    ("layer_replication", "layer_replication"),
    ("use_qalora", "QALoRA (use_qalora)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("megatron_config", "Megatron layers (megatron_config)"),
)
# Unconverted PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapters expect a modified base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_KEY_HINTS = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "lora_embedding_": "LoRA on embeddings",
    "trainable_tokens": "trainable tokens (trainable_token_indices)",
    ".bias": "LoRA bias",
}


@dataclass
class LoadedAdapter:
    """One adapter version resident in host RAM.

    Invariants: every ``weights[path] = (A, B)`` has ``A: [rank, in_features]`` and
    ``B: [out_features, rank]``, fp32, CPU, contiguous, where ``path`` is a base-model
    module name (``model.layers.3.self_attn.q_proj``). The adapter's delta for that
    module is exactly ``scale * (x @ A.T) @ B.T``; ``scale = alpha / rank`` (or
    ``alpha / sqrt(rank)`` with rsLoRA). Adapters with ``rank_pattern`` /
    ``alpha_pattern`` are normalised to this form: A/B zero-padded to the largest
    module rank and each module's own scale folded into its B.
    """

    served: ServedAdapter
    rank: int
    alpha: float
    use_rslora: bool
    scale: float
    target_modules: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int

    @property
    def label(self) -> str:
        return f"{self.served.name}:{self.served.version}"


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_lora_config(config: Mapping[str, Any], max_lora_rank: int, where: str = "adapter") -> None:
    """Raise FailedPrecondition naming the first LoRA feature the engine cannot serve.

    Accepts PEFT ``adapter_config.json`` dicts and manifest ``lora`` dicts (``rank``
    instead of ``r``)."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise FailedPrecondition(f"{where}: PEFT type {peft_type!r} is not supported (only LoRA)")
    for field, feature in _UNSUPPORTED:
        if config.get(field) not in (None, False, [], {}, ""):
            raise FailedPrecondition(f"{where}: {feature} is not supported by this server")
    if config.get("bias", "none") != "none":
        raise FailedPrecondition(f"{where}: trained biases (bias={config['bias']!r}) are not supported")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise FailedPrecondition(
            f"{where}: init_lora_weights={init!r} adapters modify the base weights; "
            "convert them to plain LoRA when saving (path_initial_model_for_weight_conversion)"
        )
    ranks = [int(config.get("r", config.get("rank", 0)) or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_lora_rank:
        raise FailedPrecondition(f"{where}: LoRA rank {max(ranks)} exceeds the server's max_lora_rank {max_lora_rank}")


def check_base_fingerprint(fingerprint: str | None, base: BaseModel, where: str = "adapter") -> None:
    """FailedPrecondition when the adapter records a base fingerprint other than ``base``'s."""
    if fingerprint and fingerprint != base.fingerprint:
        raise FailedPrecondition(
            f"{where} was trained on base model {fingerprint[:19]}…, but this server serves "
            f"{base.id} ({base.fingerprint[:19]}…)"
        )


@functools.lru_cache(maxsize=8)
def _base_linear_shapes(path: Path, fingerprint: str) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight"):
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def base_linear_shapes(base: BaseModel) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` for every 2-D weight of the base,
    read from safetensors headers only (no tensor data); cached per fingerprint."""
    return _base_linear_shapes(base.path, base.fingerprint)


def load_peft_dir(
    path: Path,
    base: BaseModel,
    max_lora_rank: int,
    *,
    served: ServedAdapter | None = None,
    expected_fingerprint: str | None = None,
) -> LoadedAdapter:
    """Read a PEFT LoRA directory into a :class:`LoadedAdapter` for ``base``.

    ``served`` names the registry version (default: the directory name, version 0 and
    a digest of the two PEFT files). ``expected_fingerprint`` (from a manifest) and
    ``adapterctl.json``'s base fingerprint must both match ``base``. Raises
    FailedPrecondition for anything the engine cannot serve exactly.
    """
    path = Path(path)
    where = f"adapter {served.name}:{served.version}" if served else f"adapter at {path}"
    with malformed_as(FailedPrecondition, where, SafetensorError):
        return _load_peft_dir(path, where, base, max_lora_rank, served, expected_fingerprint)


def _load_peft_dir(path: Path, where: str, base: BaseModel, max_lora_rank: int, served: ServedAdapter | None,
                   expected_fingerprint: str | None) -> LoadedAdapter:
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise FailedPrecondition(f"{where}: not a PEFT adapter directory ({CONFIG_FILE} missing)")
    if not weights_file.is_file():
        pickled = (path / "adapter_model.bin").exists()
        raise FailedPrecondition(
            f"{where}: {WEIGHTS_FILE} missing" + (" (pickle adapter_model.bin is not supported)" if pickled else "")
        )
    config = json.loads(config_file.read_text())
    check_lora_config(config, max_lora_rank, where)
    check_base_fingerprint(expected_fingerprint, base, where)
    check_base_fingerprint(_meta_fingerprint(path / META_FILE), base, where)
    raw = weights_file.read_bytes()
    if served is None:
        digest = hashlib.sha256(config_file.read_bytes() + raw).hexdigest()
        served = ServedAdapter(name=path.name, version=0, digest=f"sha256:{digest}")
    return build_loaded(served, config, load_safetensors_bytes(raw), base, where)


def build_loaded(
    served: ServedAdapter, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], base: BaseModel, where: str
) -> LoadedAdapter:
    """Map PEFT tensor names onto base module paths, check shapes and normalise scales."""
    shapes = base_linear_shapes(base)
    _check_targets_exist(config.get("target_modules"), shapes, where)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            feature = next((f for hint, f in _KEY_HINTS.items() if hint in key), None)
            raise FailedPrecondition(
                f"{where}: "
                + (f"{feature} is not supported by this server" if feature else f"unexpected tensor {key!r}")
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise FailedPrecondition(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    per_module: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise FailedPrecondition(f"{where}: module {module} has lora_{''.join(ab)} but not both A and B")
        if module not in shapes:
            raise FailedPrecondition(f"{where}: target module {module} does not exist in base model {base.id}")
        a, b = ab["A"], ab["B"]
        out_f, in_f = shapes[module]
        rank_m = a.shape[0] if a.dim() == 2 else -1
        want_r = int(rank_pattern.get(_pattern_key(rank_pattern, module), r))
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (want_r, in_f) or tuple(b.shape) != (out_f, want_r):
            raise FailedPrecondition(
                f"{where}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; base {base.id} needs "
                f"A ({want_r}, {in_f}) and B ({out_f}, {want_r})"
            )
        alpha_m = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), alpha))
        per_module[module] = (a, b, lora_scale(alpha_m, rank_m, rslora))
    rank = max(a.shape[0] for a, _, _ in per_module.values())
    scale = lora_scale(alpha, rank, rslora)
    weights = {m: _normalise(a, b, s, rank, scale, where) for m, (a, b, s) in per_module.items()}
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in weights}))
    log.debug("loaded %s: rank=%d scale=%g modules=%d bytes=%d", where, rank, scale, len(weights), nbytes)
    return LoadedAdapter(served, rank, alpha, rslora, scale, targets, weights, nbytes)


def _normalise(a: torch.Tensor, b: torch.Tensor, own_scale: float, rank: int, scale: float, where: str):
    """fp32 contiguous (A [rank, in], B [out, rank]): zero-pad to ``rank``; fold own/common scale into B."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    if own_scale != scale:
        if scale == 0:
            raise FailedPrecondition(f"{where}: lora_alpha 0 with a non-zero alpha_pattern is not supported")
        b = b * (own_scale / scale)
    pad = rank - a.shape[0]
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a.contiguous(), b.contiguous()


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the module path's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _check_targets_exist(targets: Any, shapes: Mapping[str, tuple[int, int]], where: str) -> None:
    if not isinstance(targets, (list, tuple)):
        return  # a regex string or None: the per-tensor module check covers it
    names = {m.rsplit(".", 1)[-1] for m in shapes} | set(shapes)
    missing = [
        t for t in targets if t != "all-linear" and t not in names and not any(m.endswith("." + t) for m in shapes)
    ]
    if missing:
        raise FailedPrecondition(f"{where}: target modules {missing} do not exist in the base model")


def _meta_fingerprint(meta_file: Path) -> str | None:
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text()).get("base_model", {}).get("fingerprint")
    except (ValueError, AttributeError) as exc:
        raise FailedPrecondition(f"{meta_file} is not valid adapterctl metadata: {exc}") from exc
