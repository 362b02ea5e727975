"""Export: the PEFT adapter files plus ``adapterctl.json``, the lineage record the registry
reads (``base_model.fingerprint`` and ``config`` dims for its shape checks) and copies into
the version manifest (``training``) on publish."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from adapterctl.basemodel import BaseModel
from adapterctl.trainer.config import TrainConfig

MANIFEST_FILE = "adapterctl.json"
MANIFEST_FORMAT = "adapterctl.adapter/v1"
_BASE_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size")


def save_adapter(peft_model: Any, output_dir: Path, base: BaseModel) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (no model-card README).

    Files are saved into a temporary directory inside ``output_dir`` and moved in with
    ``os.replace``, so a crash never leaves a half-written weights file behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base.id
    # PEFT expands all-linear into full module paths; short names adapt the same modules
    # (PEFT matches by suffix) and are what the registry and server expect.
    config.target_modules = set(resolved_target_modules(peft_model))
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".save-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.replace(Path(tmp) / name, output_dir / name)
    (output_dir / "README.md").unlink(missing_ok=True)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def library_versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    import adapterctl

    return {"adapterctl": adapterctl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def build_manifest(config: TrainConfig, base: BaseModel, *, lora_targets: list[str], dataset: dict[str, Any],
                   metrics: dict[str, Any], wall_time_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``adapterctl.json`` document: ``format``, ``base_model`` {id, fingerprint, config},
    ``lora`` {rank, alpha, dropout, target_modules, use_rslora, use_dora} and ``training``
    {dataset digests and counts, metrics, resolved config, library versions, wall time}.
    ``lora_targets`` are the module names actually adapted (``all-linear`` expanded)."""
    base_config = base.config()
    return {
        "format": MANIFEST_FORMAT,
        "base_model": {"id": base.id, "fingerprint": base.fingerprint,
                       "config": {k: base_config.get(k) for k in _BASE_CONFIG_KEYS}},
        "lora": {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
                 "target_modules": lora_targets, "use_rslora": config.use_rslora, "use_dora": config.use_dora},
        "training": {"dataset": dataset, "metrics": metrics, "config": config.to_dict(),
                     "versions": library_versions(), "wall_time_s": round(wall_time_s, 3), **(extra or {})},
    }


def resolved_target_modules(peft_model: Any) -> list[str]:
    """The short names of the modules PEFT adapted (``all-linear`` expanded), sorted."""
    targets = peft_model.peft_config["default"].target_modules
    names = [targets] if isinstance(targets, str) else list(targets)
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> Path:
    """Atomically write ``adapterctl.json`` (sorted keys, so equal content gives equal bytes)."""
    target = output_dir / MANIFEST_FILE
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, target)
    return target
