"""Fixtures for the adapter cache tests: real PEFT adapters saved from the tiny base."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from adapterctl.errors import IntegrityError, NotFound, Unavailable
from adapterctl.refs import parse_ref
from adapterctl.server.types import EngineObserver


@pytest.fixture(scope="session")
def tiny_model(tiny_base):
    """The tiny base model, loaded once; copy it before wrapping with PEFT."""
    from adapterctl.basemodel import load_model

    return load_model(tiny_base, device="cpu")


@pytest.fixture(scope="session")
def make_adapter(tiny_model, tiny_base, tmp_path_factory) -> Callable[..., Path]:
    """``make_adapter(name, meta=True, **LoraConfig kwargs) -> dir``: a PEFT LoRA saved
    with ``save_pretrained`` from the tiny base (random B so deltas are non-zero),
    plus an ``adapterctl.json`` naming the tiny base's fingerprint when ``meta``."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft-adapters")
    made: dict[str, Path] = {}

    def make(name: str, meta: bool = True, seed: int = 0, **kwargs) -> Path:
        if name in made:
            return made[name]
        kwargs.setdefault("r", 4)
        kwargs.setdefault("lora_alpha", 8)
        kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
        kwargs.setdefault("init_lora_weights", False)
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(**kwargs))
        out = root / name
        peft_model.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)
        if meta:
            (out / "adapterctl.json").write_text(json.dumps({
                "format": "adapterctl.adapter/v1",
                "base_model": {"id": tiny_base.id, "fingerprint": tiny_base.fingerprint},
                "lora": {"rank": kwargs["r"], "alpha": kwargs["lora_alpha"]},
            }))
        made[name] = out
        return out

    return make


@dataclass(frozen=True)
class FakeFile:
    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class FakeManifest:
    """The fields of adapterctl.registry.Manifest the cache reads."""

    name: str
    version: int
    digest: str
    files: tuple[FakeFile, ...]
    base_model: dict
    lora: dict
    total_bytes: int
    labels: dict = field(default_factory=dict)


class FakeRegistry:
    """A RegistryReader over local adapter dirs that counts pulls and fails on demand:
    ``down`` -> Unavailable, ``corrupt`` digests -> a half-written dest then
    IntegrityError (worse than the real registry, which leaves nothing), ``gate`` ->
    pulls block until it is set (``pull_started`` says one is waiting)."""

    def __init__(self) -> None:
        self.versions: dict[str, list[FakeManifest]] = {}
        self.dirs: dict[str, Path] = {}
        self.alias_table: dict[str, dict[str, int]] = {}
        self.pulls: Counter[str] = Counter()
        self.down = False
        self.corrupt: set[str] = set()
        self.gate: threading.Event | None = None
        self.pull_started = threading.Event()
        self._lock = threading.Lock()

    def publish(self, name: str, adapter_dir: Path, fingerprint: str | None, **lora) -> FakeManifest:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        lora = {"rank": cfg["r"], "alpha": cfg["lora_alpha"], "use_dora": cfg.get("use_dora", False),
                "modules_to_save": cfg.get("modules_to_save"), "target_modules": cfg["target_modules"], **lora}
        files = tuple(
            FakeFile(p.name, "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
            for p in sorted(adapter_dir.iterdir()) if p.is_file()
        )
        version = len(self.versions.get(name, [])) + 1
        body = json.dumps([name, version, [f.digest for f in files], fingerprint, lora], sort_keys=True)
        manifest = FakeManifest(name, version, "sha256:" + hashlib.sha256(body.encode()).hexdigest(), files,
                                {"id": "tiny", "fingerprint": fingerprint}, lora, sum(f.size for f in files))
        self.versions.setdefault(name, []).append(manifest)
        self.dirs[manifest.digest] = adapter_dir
        return manifest

    def promote(self, name: str, version: int, alias: str) -> None:
        self.alias_table.setdefault(name, {})[alias] = version

    # ---- RegistryReader ----
    def resolve(self, ref):
        self._check_up()
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions.get(ref.name) or []
        if ref.digest is not None:
            found = [m for m in versions if m.digest == ref.digest]
        elif ref.version is not None:
            found = [m for m in versions if m.version == ref.version]
        elif ref.alias not in (None, "latest"):
            version = self.alias_table.get(ref.name, {}).get(ref.alias)
            found = [m for m in versions if m.version == version]
        else:
            found = versions[-1:]
        if not found:
            raise NotFound(f"{ref} not found")
        return found[0]

    def pull(self, manifest, dest: Path, *, progress: bool = False) -> Path:
        with self._lock:
            self.pulls[manifest.digest] += 1
        self.pull_started.set()
        if self.gate is not None and not self.gate.wait(timeout=10):
            raise TimeoutError("test gate never opened")
        self._check_up()
        dest = Path(dest)
        if manifest.digest in self.corrupt:
            dest.mkdir(parents=True)
            (dest / "adapter_model.safetensors").write_bytes(b"partial")
            raise IntegrityError(f"sha256 mismatch pulling {manifest.name}:{manifest.version}")
        tmp = dest.parent / (".fake-" + dest.name)
        shutil.copytree(self.dirs[manifest.digest], tmp)
        os.replace(tmp, dest)
        return dest

    def list_names(self) -> list[str]:
        self._check_up()
        return sorted(self.versions)

    def list_versions(self, name: str) -> list[FakeManifest]:
        self._check_up()
        return list(self.versions.get(name, []))

    def aliases(self, name: str) -> dict[str, int]:
        self._check_up()
        return dict(self.alias_table.get(name, {}))

    def _check_up(self) -> None:
        if self.down:
            raise Unavailable("registry unreachable (test)")


class RecordingObserver(EngineObserver):
    """Records cache/load/residency hooks; ``wait_for(pred)`` blocks (bounded) until
    ``pred(self)`` holds, for synchronising with worker threads without sleeps."""

    def __init__(self) -> None:
        self.cache: list[tuple[str, str, str]] = []
        self.loads: list[tuple[str, float, str]] = []
        self.residency: dict[str, tuple[int, int, int]] = {}
        self._cond = threading.Condition()

    def on_cache(self, tier, event, adapter):
        with self._cond:
            self.cache.append((tier, event, adapter))
            self._cond.notify_all()

    def on_load(self, source, seconds, adapter):
        with self._cond:
            self.loads.append((source, seconds, adapter))
            self._cond.notify_all()

    def on_residency(self, tier, adapters, nbytes, pinned):
        with self._cond:
            self.residency[tier] = (adapters, nbytes, pinned)

    def count(self, tier: str, event: str) -> int:
        with self._cond:
            return sum(1 for t, e, _ in self.cache if (t, e) == (tier, event))

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)


@pytest.fixture
def fake_registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()
