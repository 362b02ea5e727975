"""Publish-time checks of an adapter directory; nothing is written until they all pass.

Refuses, one line each: missing/extra files, pickle weights, non-LoRA or DoRA
configs, ``modules_to_save``, an unknown base model, and (via
:mod:`adapterctl.registry.tensors`) bad tensor names, shapes, dtypes and values.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from adapterctl.basemodel import BaseModel, resolve_base_model, resolve_local_base_model
from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound, malformed_as
from adapterctl.registry.manifest import ALLOWED_FILES
from adapterctl.registry.tensors import ModelDims, check_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "adapterctl.json"
META_FORMAT = "adapterctl.adapter/v1"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABEL_VALUE = 256


@dataclass(frozen=True)
class LocalFile:
    """A file to publish: ``name`` in the version, ``digest`` ``sha256:<hex>``."""

    path: Path
    name: str
    digest: str
    size: int


@dataclass(frozen=True)
class ValidatedAdapter:
    """Everything the manifest needs, computed from a directory that passed every check."""

    files: list[LocalFile]  # sorted by name
    base_model: dict[str, str]  # {"id", "fingerprint"}
    lora: dict[str, Any]
    training: dict[str, Any] | None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def validate_adapter(adapter_dir: Path, base_model: str | None = None, *, progress: bool = False) -> ValidatedAdapter:
    """Check ``adapter_dir`` for publishing; ``base_model`` (an id or directory for
    :func:`adapterctl.basemodel.resolve_base_model`) supplies the fingerprint and
    config when ``adapterctl.json`` does not, and must agree with it when both do."""
    with malformed_as(InvalidArgument, f"adapter {adapter_dir}", SafetensorError):
        return _validate(Path(adapter_dir), base_model, progress)


def _validate(adapter_dir: Path, base_model: str | None, progress: bool) -> ValidatedAdapter:
    names = check_files(adapter_dir)
    peft_config = _read_json(adapter_dir / CONFIG_FILE)
    meta = _read_json(adapter_dir / META_FILE) if META_FILE in names else {}
    _check_peft_config(peft_config, meta)
    base, base_config = _base_model(meta, base_model, peft_config, progress)
    summary = check_tensors(adapter_dir / WEIGHTS_FILE, peft_config, ModelDims.from_config(base_config))
    lora = {
        "rank": int(peft_config["r"]),
        "alpha": peft_config.get("lora_alpha", 8),
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "target_modules": summary.target_modules,
        "dtype": summary.dtype,
        "use_dora": False,
        "modules_to_save": [],
    }
    for key in ("rank_pattern", "alpha_pattern"):
        if peft_config.get(key):
            lora[key] = dict(peft_config[key])
    files = [_hash_file(adapter_dir / name) for name in sorted(names)]
    return ValidatedAdapter(files=files, base_model=base, lora=lora, training=meta.get("training"))


def check_files(adapter_dir: Path) -> list[str]:
    """The publishable file names in ``adapter_dir``; refuses pickles, extras and gaps."""
    if not adapter_dir.is_dir():
        raise NotFound(f"adapter directory {adapter_dir} does not exist")
    entries = sorted(p.name for p in adapter_dir.iterdir())
    for name in entries:
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidArgument(
                f"{name}: pickle weights are refused (never unpickled); save the adapter as {WEIGHTS_FILE}"
            )
    for name in REQUIRED_FILES:
        if name not in entries:
            raise InvalidArgument(
                f"{adapter_dir} has no {name} (a PEFT LoRA adapter needs {' and '.join(REQUIRED_FILES)})"
            )
    for name in entries:
        path = adapter_dir / name
        if name not in ALLOWED_FILES:
            kind = "directory" if path.is_dir() else "file"
            raise InvalidArgument(
                f"unexpected {kind} {name!r} in {adapter_dir}: a version holds only {', '.join(ALLOWED_FILES)}"
            )
        if path.is_symlink() or not path.is_file():  # a symlink could change between hash and upload
            raise InvalidArgument(f"{path} is not a regular file{' (a symlink)' if path.is_symlink() else ''}")
    return entries


def validate_labels(labels: dict[str, str] | None) -> dict[str, str]:
    """Label keys are short identifiers; values are single-line strings up to 256 characters."""
    out: dict[str, str] = {}
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"invalid label key {key!r}: letters, digits, '.', '_', '/', '-' (max 63)")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or "\n" in value:
            raise InvalidArgument(f"invalid value for label {key!r}: one line of at most {MAX_LABEL_VALUE} characters")
        out[key] = value
    return out


def _check_peft_config(config: dict[str, Any], meta: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FailedPrecondition(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported (LoRA only)")
    if config.get("use_dora"):
        raise FailedPrecondition(f"{CONFIG_FILE}: DoRA adapters (use_dora: true) are not supported by the server yet")
    if config.get("modules_to_save"):
        raise FailedPrecondition(
            f"{CONFIG_FILE}: modules_to_save {config['modules_to_save']} is not supported by the server yet "
            "(retrain without it)"
        )
    if config.get("lora_bias"):
        raise FailedPrecondition(f"{CONFIG_FILE}: lora_bias is not supported by the server yet")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArgument(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    if not isinstance(config.get("lora_alpha", 8), (int, float)):
        raise InvalidArgument(f"{CONFIG_FILE}: lora_alpha must be a number")
    if not config.get("target_modules"):
        raise InvalidArgument(f"{CONFIG_FILE}: target_modules is empty")
    if meta.get("format", META_FORMAT) != META_FORMAT:
        raise InvalidArgument(f"{META_FILE}: format {meta.get('format')!r} is not {META_FORMAT!r}")
    meta_rank = (meta.get("lora") or {}).get("rank")
    if meta_rank is not None and meta_rank != rank:
        raise InvalidArgument(f"{META_FILE} says rank {meta_rank} but {CONFIG_FILE} has r={rank}")


def infer_base_model(adapter_dir: Path, *, progress: bool = False) -> BaseModel | None:
    """The base a stock PEFT directory (no adapterctl.json fingerprint) names in
    ``adapter_config.json``'s ``base_model_name_or_path``, when this machine has it
    (see :func:`adapterctl.basemodel.resolve_local_base_model`); None when the
    directory declares its base itself. FailedPrecondition when it names none or
    one that does not resolve here."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_FILE).is_file():
        return None  # publish refuses the directory itself, with the reason
    meta_path = adapter_dir / META_FILE
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    if (meta.get("base_model") or {}).get("fingerprint"):
        return None
    return _named_base(_read_json(adapter_dir / CONFIG_FILE), progress)


def _named_base(peft_config: dict[str, Any], progress: bool) -> BaseModel:
    named = peft_config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        raise FailedPrecondition(
            f"no base model: {CONFIG_FILE} has no base_model_name_or_path and {META_FILE} no fingerprint; "
            "pass --base-model to name the base it was trained on"
        )
    try:
        return resolve_local_base_model(named.strip(), progress=progress)
    except (NotFound, InvalidArgument) as exc:
        raise FailedPrecondition(
            f"{CONFIG_FILE} names base model {named!r}, which does not resolve on this machine ({exc}); "
            "pass --base-model ID_OR_DIR"
        ) from None


def _base_model(meta: dict[str, Any], base_model: str | None, peft_config: dict[str, Any], progress: bool):
    """``({"id", "fingerprint"}, config dict)`` from ``--base-model``, adapterctl.json,
    or else the ``base_model_name_or_path`` of adapter_config.json (resolved locally)."""
    declared = meta.get("base_model") or {}
    declared_fp = declared.get("fingerprint")
    if declared_fp is not None and not _FINGERPRINT_RE.match(str(declared_fp)):
        raise InvalidArgument(f"{META_FILE}: base_model.fingerprint {declared_fp!r} is not sha256:<64 hex>")
    if base_model:
        resolved = resolve_base_model(base_model, progress=progress)
        if declared_fp and declared_fp != resolved.fingerprint:
            raise FailedPrecondition(
                f"adapter was trained on base {declared.get('id', '?')!r} ({declared_fp[:19]}...) but "
                f"--base-model {base_model!r} is {resolved.fingerprint[:19]}..."
            )
        return {"id": declared.get("id") or resolved.id, "fingerprint": resolved.fingerprint}, resolved.config()
    if not declared_fp:
        resolved = _named_base(peft_config, progress)
        return {"id": resolved.id, "fingerprint": resolved.fingerprint}, resolved.config()
    if not isinstance(declared.get("config"), dict):
        raise FailedPrecondition(
            f"{META_FILE} has no base_model.config to check tensor shapes against; pass --base-model"
        )
    return {"id": str(declared.get("id") or "unknown"), "fingerprint": declared_fp}, declared["config"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path.name} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path.name} must hold a JSON object")
    return data


def _hash_file(path: Path) -> LocalFile:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return LocalFile(path=path, name=path.name, digest="sha256:" + digest.hexdigest(), size=size)
